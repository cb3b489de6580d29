"""The processes a training run spans: one, N spawned by ``train --nproc N``, or torchrun's.

A :class:`World` is this process's rank and the world size, read from the initialised default
process group (or a world of one without any). Its collectives are the identity in a world of
one, so a trainer calls the same functions at every size. :func:`join_env_world` joins (over
gloo) the group torchrun describes in ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_ADDR``/
``MASTER_PORT`` (``env://`` rendezvous, one host or several).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from longcat_sim.errors import UserError
from longcat_sim.model.config import ModelConfig

ENV_KEYS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
JOIN_TIMEOUT_S = 600.0
TRAIN_BACKEND = "gloo"


@dataclass(frozen=True)
class World:
    """Rank ``rank`` of ``size`` processes (``local_rank`` on its host)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's ``local`` stacked along a new leading rank dimension."""
        if not self.distributed:
            return local.unsqueeze(0)
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local.contiguous())
        return torch.stack(parts)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather_objects(self, value: object) -> list[object]:
        """Every rank's picklable ``value``, in rank order."""
        if not self.distributed:
            return [value]
        values: list[object] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def agree(self, text: str) -> bool:
        """Whether every rank holds the same ``text`` (e.g. a parameter hash)."""
        if not self.distributed:
            return True
        texts: list[object] = [None] * self.size
        dist.all_gather_object(texts, text)
        return len(set(texts)) == 1


def current_world() -> World:
    """The default process group's world, or a world of one when none is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return World(dist.get_rank(), dist.get_world_size(), local)


def env_world() -> World | None:
    """The world torchrun describes in the environment, or None outside torchrun."""
    if not all(key in os.environ for key in ENV_KEYS):
        return None
    try:
        size, rank, local = (int(os.environ[key]) for key in ENV_KEYS)
    except ValueError:
        raise UserError(f"{', '.join(ENV_KEYS)} must be integers") from None
    if size < 1 or not 0 <= rank < size:
        raise UserError(f"RANK={rank} is not in a world of WORLD_SIZE={size}")
    return World(rank, size, local)


def join_env_world(world: World) -> None:
    """Join the process group of ``world`` by env:// rendezvous, over gloo: the trainer's
    tensors live on the CPU."""
    if world.size == 1 or dist.is_initialized():
        return
    dist.init_process_group(
        TRAIN_BACKEND,
        init_method="env://",
        rank=world.rank,
        world_size=world.size,
        timeout=timedelta(seconds=JOIN_TIMEOUT_S),
    )


def check_nproc(nproc: int, model_cfg: ModelConfig, batch_size: int, slice_size: int = 1) -> None:
    """One-line errors for a world size that cannot shard this model or batch."""
    if nproc < 1:
        raise UserError(f"--nproc must be a positive integer, got {nproc}")
    if model_cfg.n_routed_experts % nproc:
        raise UserError(
            f"--nproc {nproc} must divide the {model_cfg.n_routed_experts} FFN experts of "
            f"model {model_cfg.name!r}"
        )
    if batch_size % nproc:
        raise UserError(f"--nproc {nproc} must divide the batch size {batch_size}")
    if (batch_size // slice_size) % nproc:
        raise UserError(
            f"--nproc {nproc} must divide the {batch_size // slice_size} slices of a batch "
            f"(batch_size {batch_size} / slice_size {slice_size})"
        )
