"""One optimizer step over a world of processes, with results independent of its size.

The global batch is cut into slices of ``slice_size`` sequences; rank r of W runs slices
``[r*S/W, (r+1)*S/W)`` one at a time (micro-step j on every rank at once), each slice's forward
and backward on that slice alone, with the FFN experts sharded over the ranks
(``model/parallel.py``), so a slice's gradient is computed the same on any rank:

- dense gradients are gathered per slice and summed in global slice order on every rank;
- expert weight gradients are kept per (slice, expert) block by their owner
  (:class:`~longcat_sim.model.parallel.SliceGradLedger`), summed in global slice order, then
  gathered, so every rank holds the whole gradient and applies the same update;
- the bias controller's counts are integers (an exact all-reduce).

With deterministic mode (row-invariant kernels) one process and any world size that divides the
experts and the slices end with bitwise equal parameters. A world of one runs the same code, its
collectives being the identity.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from longcat_sim.errors import UserError
from longcat_sim.model.balance import BIAS_BUFFER, BiasController, find_routers, stack_counts
from longcat_sim.model.config import ModelConfig
from longcat_sim.model.determinism import clip_grad_norm_fixed_order
from longcat_sim.model.optim import lr_multiplier, set_lr_multiplier
from longcat_sim.model.parallel import ExchangeClock, ExpertParallelModel, SliceGradLedger
from longcat_sim.model.transformer import LongcatFlashForCausalLM
from longcat_sim.train.config import TrainConfig
from longcat_sim.train.losses import slice_loss
from longcat_sim.train.metrics import batch_stats, slice_stats
from longcat_sim.train.world import World


def _flat_grads(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    )


class TrainStep:
    """``forward_backward_step`` per slice and ``train_step`` per batch for one rank.

    ``overlap`` (or a pattern of it cycled over the steps) says whether the ScMoE exchanges
    overlap dense work; it changes when exchanges wait, never a value. Without
    ``expert_parallel`` (a world of one only) the model's own modules run the MoE.
    """

    def __init__(
        self,
        model: LongcatFlashForCausalLM,
        optimizer: torch.optim.Optimizer,
        controller: BiasController,
        tc: TrainConfig,
        world: World,
        *,
        overlap: bool | tuple[bool, ...] = True,
        expert_parallel: bool = True,
    ) -> None:
        if not expert_parallel and world.distributed:
            raise ValueError("more than one process needs the expert-parallel model")
        self.model, self.optimizer, self.controller = model, optimizer, controller
        self.cfg: ModelConfig = model.config
        self.tc, self.world = tc, world
        self.pattern = overlap if isinstance(overlap, tuple) else (overlap,)
        self.clock = ExchangeClock()
        self.ep: ExpertParallelModel | None = None
        expert_ids: set[int] = set()
        if expert_parallel:
            ledgers = [SliceGradLedger() for _ in model.model.layers]
            self.ep = ExpertParallelModel(
                model, ledgers=ledgers, overlap=self.pattern[0], clock=self.clock
            )
            expert_ids = {id(p) for p in self.ep.expert_parameters()}
        self.dense = [p for p in model.parameters() if p.requires_grad and id(p) not in expert_ids]
        self.routers = find_routers(model)
        # run after the gradients are reduced, before clipping (checks and planted faults)
        self.gradient_hooks: list[Callable[[], None]] = []

    @property
    def slices_per_rank(self) -> int:
        return self.tc.batch_size // self.tc.slice_size // self.world.size

    def forward_backward_step(
        self, input_ids: torch.Tensor, targets: torch.Tensor, micro: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Micro-step ``micro`` of this rank: forward and backward of its slice. Returns the
        slice's statistics vector, its expert counts ``[L, N+Z]`` and its dense gradient."""
        tc, per_rank, size = self.tc, self.slices_per_rank, self.tc.slice_size
        first = (self.world.rank * per_rank + micro) * size
        ids, tgt = input_ids[first : first + size], targets[first : first + size]
        self.model.zero_grad(set_to_none=True)
        if self.ep is not None:
            self.ep.set_slice_of_source([src * per_rank + micro for src in range(self.world.size)])
            out = self.ep.forward_detailed(ids, compute_mtp=tc.mtp_weight > 0)
        else:
            out = self.model.forward_detailed(ids, compute_mtp=tc.mtp_weight > 0)
        total, terms = slice_loss(out, tgt, self.cfg, tc)
        (total * (size / tc.batch_size)).backward()
        stats = slice_stats(terms, out.router, self.cfg.n_routed_experts)
        return stats, stack_counts(out.router), _flat_grads(self.dense)

    def reduce_gradients(self, slice_grads: list[torch.Tensor]) -> None:
        """Every rank's slice gradients summed in global slice order, into ``.grad``."""
        gathered = self.world.gather_rows(torch.stack(slice_grads)).flatten(0, 1)
        flat = gathered[0]
        for s in range(1, gathered.shape[0]):
            flat = flat + gathered[s]
        offset = 0
        for p in self.dense:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        if self.ep is None:
            return
        for ep in self.ep.moes:
            assert ep.ledger is not None
            local = ep.ledger.reduce(tuple(w.detach() for w in ep.local_weights()))
            experts = ep.moe.experts
            params = (experts.gate_proj, experts.up_proj, experts.down_proj)
            for param, grad in zip(params, local, strict=True):
                param.grad = self.world.gather_rows(grad).flatten(0, 1)

    def train_step(self, step: int, input_ids: torch.Tensor, targets: torch.Tensor):
        """One optimizer step and bias update on the global batch; returns its metrics."""
        tc = self.tc
        start = time.perf_counter()
        self.clock.reset()
        if self.ep is not None:
            self.ep.overlap = self.pattern[step % len(self.pattern)]
        multiplier = lr_multiplier(
            step, warmup_steps=tc.warmup_steps, total_steps=tc.steps, min_ratio=tc.min_lr_ratio
        )
        set_lr_multiplier(self.optimizer, multiplier)
        stats, grads, counts = [], [], torch.zeros(0)
        for micro in range(self.slices_per_rank):
            slice_row, slice_counts, slice_grad = self.forward_backward_step(
                input_ids, targets, micro
            )
            stats.append(slice_row)
            grads.append(slice_grad)
            counts = slice_counts if micro == 0 else counts + slice_counts
        slices_seconds, exchange_seconds = time.perf_counter() - start, self.clock.seconds
        self.reduce_gradients(grads)
        for hook in self.gradient_hooks:
            hook()
        weight = tc.slice_size / tc.batch_size
        rows = self.world.gather_rows(torch.stack(stats)).flatten(0, 1)
        record = batch_stats(rows, weight, self.cfg.num_layers, self.cfg.n_routed_experts)
        loss = record.get("loss", math.nan)  # batch_stats leaves NaN terms out
        if not math.isfinite(loss):
            raise UserError(
                f"training diverged at step {step} (loss {loss}); lower --lr or raise warmup_steps"
            )
        max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
        clip = clip_grad_norm_fixed_order if tc.deterministic else torch.nn.utils.clip_grad_norm_
        grad_norm = clip(self.model.parameters(), max_norm)
        self.optimizer.step()
        if tc.bias_rate > 0:
            self.controller.update(self.routers, counts, step)  # all-reduces the counts
        elapsed = time.perf_counter() - start
        timings = {"slices_seconds": slices_seconds, "exchange_seconds": exchange_seconds}
        return self._record(step, record, tc.lr * multiplier, float(grad_norm), elapsed, timings)

    def _record(
        self, step: int, stats: dict[str, Any], lr: float, grad_norm: float, elapsed: float,
        timings: dict[str, float],
    ) -> dict[str, Any]:  # fmt: skip
        n_ffn = self.cfg.n_routed_experts
        biases = [getattr(r, BIAS_BUFFER)[:n_ffn].detach().double() for r in self.routers]
        n_tokens = self.tc.batch_size * self.tc.seq_len
        return {
            "step": step,
            **stats,
            "lr": lr,
            "grad_norm": grad_norm,
            "bias_rate": self.controller.schedule.rate_at(step),
            "bias_ffn_mean": [b.mean().item() for b in biases],
            "bias_ffn_min": [b.min().item() for b in biases],
            "bias_ffn_max": [b.max().item() for b in biases],
            "tokens": n_tokens,
            "step_seconds": elapsed,
            "tokens_per_s": n_tokens / elapsed if elapsed > 0 else math.inf,
            "overlap": self.pattern[step % len(self.pattern)],
            **timings,
        }
