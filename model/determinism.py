"""Deterministic mode as one explicit object: what it switches on, and for how long.

:class:`DeterministicMode` is a context manager. On entry it

- turns on ``torch.use_deterministic_algorithms`` (ops without a deterministic kernel raise
  instead of silently racing; uninitialised memory is filled so that reading it shows),
- fixes the intra-op thread count (``threads``; results do not depend on it, see below),
- records the previous settings and restores every one of them on exit.

The model side of deterministic mode is the config field ``ModelConfig.deterministic``
(:func:`deterministic_config`): batch-invariant linear layers, attention and expert GEMMs, fixed
slot-order sums in the MoE, stable sorts and a lowest-id tie rule in the router. Together with
:func:`clip_grad_norm_fixed_order` (a gradient norm whose summation tree depends on tensor
sizes only) a training step is bitwise equal across reruns *and* across thread counts.

The thread count is a setting of the process: nothing here reads or writes environment
variables after torch is loaded. ``OMP_WAIT_POLICY=PASSIVE`` (set by the determinism harness
for its worker processes) only changes how idle OpenMP threads wait, never a result.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from longcat_sim.model.config import ModelConfig
from longcat_sim.model.kernels.batch_invariant import SUM_CHUNK, fixed_order_sum


def deterministic_config(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with the batch-invariant, fixed-order kernels switched on."""
    return cfg if cfg.deterministic else cfg.replace(deterministic=True)


def torch_flags() -> dict[str, Any]:
    """The process-wide torch settings that decide reproducibility, as plain values."""
    return {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "fill_uninitialized_memory": bool(torch.utils.deterministic.fill_uninitialized_memory),
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "mkldnn_enabled": torch.backends.mkldnn.enabled,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }


@dataclass
class DeterministicMode:
    """``with DeterministicMode(threads=2): ...`` runs the block in deterministic mode.

    ``threads=None`` keeps the current intra-op thread count. Re-entering a mode object that is
    already active is an error (its saved state would be overwritten).
    """

    threads: int | None = None
    _saved: dict[str, Any] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.threads is not None and (
            not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1
        ):
            raise ValueError(f"threads must be a positive integer or None, got {self.threads!r}")

    def __enter__(self) -> DeterministicMode:
        if self._saved is not None:
            raise RuntimeError("this DeterministicMode is already active; use a new one")
        self._saved = torch_flags()
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.utils.deterministic.fill_uninitialized_memory = True
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc: object) -> None:
        saved, self._saved = self._saved, None
        assert saved is not None
        torch.use_deterministic_algorithms(
            saved["deterministic_algorithms"], warn_only=saved["deterministic_warn_only"]
        )
        torch.utils.deterministic.fill_uninitialized_memory = saved["fill_uninitialized_memory"]
        torch.backends.cudnn.deterministic = saved["cudnn_deterministic"]
        torch.backends.cudnn.benchmark = saved["cudnn_benchmark"]
        torch.set_num_threads(saved["num_threads"])

    @property
    def active(self) -> bool:
        return self._saved is not None


def grad_norm_fixed_order(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all gradients, thread-count invariant: each tensor is cut into rows of
    ``SUM_CHUNK`` elements (one shorter last row), every row's norm is a reduction of fixed
    length (rows are split between threads, never a row), and the squared row norms are added
    by :func:`fixed_order_sum`, then across tensors in parameter order in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for p in parameters:
        if p.grad is None:
            continue
        flat = p.grad.detach().reshape(-1)
        full = flat.numel() - flat.numel() % SUM_CHUNK
        norms = []
        if full:
            norms.append(torch.linalg.vector_norm(flat[:full].view(-1, SUM_CHUNK), dim=1))
        if flat.numel() > full:
            norms.append(torch.linalg.vector_norm(flat[full:]).reshape(1))
        rows = torch.cat(norms) if len(norms) > 1 else norms[0]
        total = total + fixed_order_sum(rows.double().square())
    return total.sqrt().float()


@torch.no_grad()
def clip_grad_norm_fixed_order(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` with :func:`grad_norm_fixed_order` as the norm.

    Same clipping rule (scale by ``max_norm / (norm + 1e-6)`` when that is below one); the norm
    itself has a summation order fixed by the tensor sizes, so it is thread-count invariant.
    """
    params = [p for p in parameters if p.grad is not None]
    norm = grad_norm_fixed_order(params)
    if math.isfinite(max_norm):
        coefficient = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(coefficient.to(p.grad.dtype))
    return norm
