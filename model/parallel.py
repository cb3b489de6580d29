"""Expert parallelism: FFN experts sharded over the ranks of a process group.

Rank r of W computes the contiguous block of FFN experts ``[r*N/W, (r+1)*N/W)``. One MoE call:

1. the router runs locally (it is replicated); slots routed to zero experts never leave the rank,
   their ``gate * x`` is added locally;
2. the per-expert row counts are exchanged (an equal-split ``all_to_all_single``), then the rows
   sorted by expert (hence by owner) travel with an uneven-split ``all_to_all_single``;
3. the owner runs its experts on each (source rank, expert) block of rows;
4. the outputs travel back along the reverse exchange and are combined on the source rank.

Both exchanges can be left in flight (``async_op=True``): the MoE's phases are called by the
layer's own forward (``model/block.py``) at the points of ``longcat_sim.stages.layer_order``; in
the shortcut topology the dispatch starts right after the first attention and is waited for
after FFN_0 and MLA_1, and the combine is in flight over FFN_1. The backward of an exchange is
the reverse exchange (:class:`_ExchangeDone`).

Expert GEMMs use the row-tiled kernels of ``model/kernels/batch_invariant.py``: a row's output
does not depend on which other rows share the call, so it is the same whichever ranks send what.
Weight gradients are computed per (source rank, expert) block; with a :class:`SliceGradLedger`
attached they are kept per global batch slice instead of being summed, so a trainer can add them
in global slice order and get gradients that do not depend on the world size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from longcat_sim.model.experts import expert_backward_from_hidden, expert_forward
from longcat_sim.model.kernels.batch_invariant import mm_rows, mm_t_rows, silu_forward
from longcat_sim.model.moe import MoE, plan_dispatch
from longcat_sim.model.probes import CombineCall, ExpertCall, rows_of_blocks
from longcat_sim.model.router import RouterOutput
from longcat_sim.model.transformer import LongcatFlashForCausalLM, ModelOutput

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class ExpertShard:
    """Which FFN experts rank ``rank`` of ``world`` owns: ``[first, first + count)``."""

    rank: int
    world: int
    n_experts: int

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world} ranks")
        if self.n_experts % self.world:
            raise ValueError(
                f"{self.n_experts} FFN experts cannot be split evenly over {self.world} ranks; "
                f"use a world size that divides {self.n_experts}"
            )

    @property
    def count(self) -> int:
        return self.n_experts // self.world

    @property
    def first(self) -> int:
        return self.rank * self.count

    def block(self) -> slice:
        return slice(self.first, self.first + self.count)


def _group_info(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, world) of ``group``; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


@dataclass
class ExchangeClock:
    """Host wall time a rank spends in its exchanges (the expert counts and the rows, forward
    and backward): issuing one, blocked on a synchronous one, or waiting for one in flight.

    The rest of a step is the rank's own work, including whatever CPU the collective backend's
    threads take from it while an exchange is in flight. With NCCL the host waits are not the
    transfers (they run on the device's streams)."""

    seconds: float = 0.0

    def reset(self) -> None:
        self.seconds = 0.0

    def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def _timed(clock: ExchangeClock | None, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    return fn(*args, **kwargs) if clock is None else clock.run(fn, *args, **kwargs)


def _exchange(
    x_RD: torch.Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    group: dist.ProcessGroup | None,
    *,
    async_op: bool = False,
) -> tuple[torch.Tensor, dist.Work | None]:
    """``all_to_all_single`` of rows with uneven splits (a copy when not distributed)."""
    x_RD = x_RD.contiguous()
    if not (dist.is_available() and dist.is_initialized()):
        return x_RD.clone(), None
    out = x_RD.new_empty(sum(recv_splits), *x_RD.shape[1:])
    work = dist.all_to_all_single(
        out, x_RD, recv_splits, send_splits, group=group, async_op=async_op
    )
    return out, work


@dataclass
class PendingExchange:
    """An exchange in flight: ``wait()`` returns the received rows, attached to autograd."""

    sent_RD: torch.Tensor
    received_RD: torch.Tensor
    work: dist.Work | None
    send_splits: list[int]
    recv_splits: list[int]
    group: dist.ProcessGroup | None
    clock: ExchangeClock | None = None

    def wait(self) -> torch.Tensor:
        return _ExchangeDone.apply(self.sent_RD, self)


class _ExchangeDone(torch.autograd.Function):
    """Completes a :class:`PendingExchange` (its forward waits); backward = reverse exchange."""

    @staticmethod
    def forward(ctx, sent_RD, pending):  # type: ignore[override]
        if pending.work is not None:
            _timed(pending.clock, pending.work.wait)
        ctx.splits, ctx.group = (pending.send_splits, pending.recv_splits), pending.group
        ctx.clock = pending.clock
        return pending.received_RD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_RD):  # type: ignore[override]
        send_splits, recv_splits = ctx.splits
        grad_RD = _timed(ctx.clock, _exchange, grad_RD, recv_splits, send_splits, ctx.group)[0]
        return grad_RD, None


def start_exchange(
    x_RD: torch.Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    group: dist.ProcessGroup | None,
    clock: ExchangeClock | None = None,
) -> PendingExchange:
    """Issue the row exchange with ``async_op=True`` and return without waiting."""
    received, work = _timed(
        clock, _exchange, x_RD.detach(), send_splits, recv_splits, group, async_op=True
    )
    return PendingExchange(x_RD, received, work, send_splits, recv_splits, group, clock)


@dataclass
class SliceGradLedger:
    """Expert weight gradients kept per global batch slice, summed later in slice order.

    ``slice_of_source[s]`` names the global slice whose rows rank s sends in the current call.
    """

    slice_of_source: list[int] = field(default_factory=list)
    grads: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)

    def buffers(self, slice_id: int, like: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if slice_id not in self.grads:
            self.grads[slice_id] = tuple(torch.zeros_like(w) for w in like)
        return self.grads[slice_id]

    def reduce(self, like: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Sum of the recorded gradients in ascending slice id (zeros when none), then clear."""
        totals = tuple(torch.zeros_like(w) for w in like)
        for slice_id in sorted(self.grads):
            totals = tuple(t + g for t, g in zip(totals, self.grads[slice_id], strict=True))
        self.grads.clear()
        return totals


def _expert_blocks(counts_SE: list[list[int]]):
    """(source, local expert, row slice) of every non-empty block, in received order."""
    start = 0
    for source, row in enumerate(counts_SE):
        for expert, count in enumerate(row):
            if count:
                yield source, expert, slice(start, start + count)
            start += count


class _ShardExperts(torch.autograd.Function):
    """SwiGLU experts on rows grouped by (source rank, local expert), row-invariant GEMMs.

    Weight gradients are computed per block; they are returned summed in source order, or, with
    a ledger, recorded under the block's global slice and not returned.
    """

    @staticmethod
    def forward(ctx, x_RD, w_gate, w_up, w_down, counts_SE, ledger, probe, first):  # type: ignore[override]
        pre_gate_RI = x_RD.new_empty(x_RD.shape[0], w_gate.shape[1])
        pre_up_RI = torch.empty_like(pre_gate_RI)
        y_RD = torch.empty_like(x_RD)
        blocks = []
        for _, e, rows in _expert_blocks(counts_SE):
            hook = probe.gemm_hook(first + e) if probe is not None else None
            expert_forward(x_RD[rows], w_gate[e].t(), w_up[e].t(), w_down[e].t(),
                           pre_gate_RI[rows], pre_up_RI[rows], y_RD[rows],
                           deterministic=True, gemm_hook=hook)  # fmt: skip
            blocks.append((first + e, rows))
        if probe is not None:
            probe.on_experts(
                ExpertCall(
                    rows_of_blocks(blocks, x_RD.shape[0]),
                    blocks,
                    x_RD,
                    pre_gate_RI,
                    pre_up_RI,
                    y_RD,
                    (w_gate, w_up, w_down),
                    True,
                    first,
                )
            )
        ctx.counts_SE, ctx.ledger = counts_SE, ledger
        ctx.slice_of_source = list(ledger.slice_of_source) if ledger is not None else None
        ctx.save_for_backward(x_RD, w_gate, w_up, w_down, pre_gate_RI, pre_up_RI)
        return y_RD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y_RD):  # type: ignore[override]
        x_RD, w_gate, w_up, w_down, pre_gate_RI, pre_up_RI = ctx.saved_tensors
        weights = (w_gate, w_up, w_down)
        grad_y_RD = grad_y_RD.contiguous()
        grad_x_RD = torch.zeros_like(x_RD)
        per_source = [tuple(torch.zeros_like(w) for w in weights) for _ in ctx.counts_SE]
        if ctx.ledger is not None:
            per_source = [ctx.ledger.buffers(slice_id, weights) for slice_id in ctx.slice_of_source]
        for source, e, rows in _expert_blocks(ctx.counts_SE):
            g_gate, g_up, g_down = (g[e] for g in per_source[source])
            x_rD, dy_rD, a_rI, b_rI = (
                x_RD[rows],
                grad_y_RD[rows],
                pre_gate_RI[rows],
                pre_up_RI[rows],
            )
            silu_rI = silu_forward(a_rI)
            mm_t_rows(dy_rD, silu_rI * b_rI, out=g_down)
            grad_hidden_rI = mm_rows(dy_rD, w_down[e])
            expert_backward_from_hidden(x_rD, grad_hidden_rI, a_rI, b_rI, silu_rI, w_gate[e],
                                        w_up[e], g_gate, g_up, grad_x_RD[rows],
                                        deterministic=True)  # fmt: skip
        if ctx.ledger is not None:
            return grad_x_RD, None, None, None, None, None, None, None
        totals = per_source[0]
        for grads in per_source[1:]:
            totals = tuple(t + g for t, g in zip(totals, grads, strict=True))
        return grad_x_RD, *totals, None, None, None, None


@dataclass
class MoEInFlight:
    """State of one expert-parallel MoE call between its phases."""

    x_TD: torch.Tensor
    shape: torch.Size
    routing: RouterOutput
    zero_gate_T: torch.Tensor
    gate_S: torch.Tensor
    slot_S: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    counts_SE: list[list[int]]
    pending: PendingExchange | None = None


class ExpertParallelMoE(nn.Module):
    """Runs a :class:`model.moe.MoE` with its FFN experts sharded over ``group``.

    Every rank holds the router; rank r computes only the experts of
    ``ExpertShard(r, W, N).block()`` (the slice of the stacked weights it reads). It has the
    MoE's phases ``start`` -> ``compute`` -> ``finish`` (``model/block.py`` calls them where
    ``longcat_sim.stages`` says, so the exchanges stay in flight over dense blocks) and its
    ``forward(x) -> (out, RouterOutput)``. ``overlap = False`` asks the layer to run the phases
    back to back. The wrapped MoE's parameters are used as they are.
    """

    def __init__(
        self,
        moe: MoE,
        group: dist.ProcessGroup | None = None,
        ledger: SliceGradLedger | None = None,
        clock: ExchangeClock | None = None,
        *,
        overlap: bool = True,
    ) -> None:
        super().__init__()
        rank, world = _group_info(group)
        self.moe, self.group, self.ledger, self.clock = moe, group, ledger, clock
        self.overlap = overlap
        self.shard = ExpertShard(rank, world, moe.n_routed_experts)

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        block = self.shard.block()
        experts = self.moe.experts
        return experts.gate_proj[block], experts.up_proj[block], experts.down_proj[block]

    def _exchange_counts(self, counts_N: torch.Tensor) -> list[list[int]]:
        """Rows per (source rank, local expert) this rank receives."""
        count, world = self.shard.count, self.shard.world
        recv_counts, _ = _timed(
            self.clock,
            _exchange,
            counts_N.view(-1, 1),
            [count] * world,
            [count] * world,
            self.group,
        )
        return recv_counts.view(world, count).tolist()

    def start(self, x: torch.Tensor) -> MoEInFlight:
        """Route locally, exchange the row counts, issue the dispatch of the rows (async)."""
        x_TD = x.reshape(-1, x.shape[-1]).contiguous()
        n, shard = self.moe.n_routed_experts, self.shard
        routing = self.moe.router(x_TD)
        gate_TK = routing.topk_gate_TK
        is_zero_TK = routing.topk_idx_TK >= n
        zero_gate_T = torch.where(is_zero_TK, gate_TK, torch.zeros_like(gate_TK)).sum(dim=-1)
        plan = plan_dispatch(routing.topk_idx_TK, routing.counts_E, n)
        gate_S = gate_TK.reshape(-1).index_select(0, plan.slot_S)
        counts_N = routing.counts_E[:n].to(torch.long).contiguous()
        counts_SE = self._exchange_counts(counts_N)
        send_splits = counts_N.view(shard.world, shard.count).sum(dim=1).tolist()
        recv_splits = [sum(row) for row in counts_SE]
        flight = MoEInFlight(
            x_TD, x.shape, routing, zero_gate_T, gate_S, plan.slot_S, send_splits, recv_splits,
            counts_SE,
        )  # fmt: skip
        rows_SD = x_TD.index_select(0, plan.token_S)
        flight.pending = start_exchange(rows_SD, send_splits, recv_splits, self.group, self.clock)
        return flight

    def compute(self, flight: MoEInFlight) -> MoEInFlight:
        """Wait for the dispatch, run the local experts, issue the combine exchange (async)."""
        assert flight.pending is not None
        received_RD = flight.pending.wait()
        y_RD = _ShardExperts.apply(
            received_RD, *self.local_weights(), flight.counts_SE, self.ledger, self.moe.probe,
            self.shard.first,
        )  # fmt: skip
        flight.pending = start_exchange(
            y_RD, flight.recv_splits, flight.send_splits, self.group, self.clock
        )
        return flight

    def finish(self, flight: MoEInFlight) -> tuple[torch.Tensor, RouterOutput]:
        """Wait for the combine exchange; ``x * zero_gate`` plus the K slots in slot order."""
        assert flight.pending is not None
        y_SD = flight.pending.wait()
        x_TD = flight.x_TD
        tokens, k = flight.routing.topk_idx_TK.shape
        contrib_SD = y_SD.float() * flight.gate_S.unsqueeze(-1)
        slots_TKD = (
            contrib_SD.new_zeros(tokens * k, x_TD.shape[1])
            .index_copy(0, flight.slot_S, contrib_SD)
            .view(tokens, k, -1)
        )
        out_TD = x_TD.float() * flight.zero_gate_T.unsqueeze(-1)
        for slot in range(k):
            out_TD = out_TD + slots_TKD[:, slot]
        probe = self.moe.probe
        if probe is not None:
            token_S = torch.div(flight.slot_S, k, rounding_mode="floor")
            with torch.no_grad():
                probe.on_combine(
                    CombineCall(out_TD, x_TD, flight.zero_gate_T, flight.gate_S, token_S, y_SD)
                )
        return out_TD.to(x_TD.dtype).view(flight.shape), flight.routing

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        return self.finish(self.compute(self.start(x)))


@contextmanager
def moes_swapped(model: LongcatFlashForCausalLM, moes: list[nn.Module]) -> Iterator[None]:
    """Each layer's ``mlp`` replaced by the matching module of ``moes`` for the block."""
    layers = model.model.layers
    originals = [layer.mlp for layer in layers]
    try:
        for layer, moe in zip(layers, moes, strict=True):
            layer.mlp = moe
        yield
    finally:
        for layer, moe in zip(layers, originals, strict=True):
            layer.mlp = moe


class ExpertParallelModel:
    """A :class:`LongcatFlashForCausalLM` whose MoE layers run expert-parallel over ``group``.

    ``forward_detailed`` swaps every layer's MoE for its :class:`ExpertParallelMoE` and runs the
    model's own forward (no cache). The wrapped model's parameters are used as they are (no
    copy); only the FFN experts of this rank's block are read by its expert GEMMs. A ``clock``
    shared by every layer adds up the time spent in exchanges, forward and backward.
    """

    def __init__(
        self,
        model: LongcatFlashForCausalLM,
        group: dist.ProcessGroup | None = None,
        *,
        ledgers: list[SliceGradLedger] | None = None,
        overlap: bool = True,
        clock: ExchangeClock | None = None,
    ) -> None:
        layers = model.model.layers
        ledgers = ledgers if ledgers is not None else [None] * len(layers)  # type: ignore[list-item]
        self.model = model
        self.moes = [
            ExpertParallelMoE(layer.mlp, group, ledger, clock, overlap=overlap)
            for layer, ledger in zip(layers, ledgers, strict=True)
        ]

    @property
    def overlap(self) -> bool:
        """Whether the ScMoE exchanges stay in flight over the dense blocks."""
        return self.moes[0].overlap

    @overlap.setter
    def overlap(self, value: bool) -> None:
        for ep in self.moes:
            ep.overlap = value

    @property
    def shard(self) -> ExpertShard:
        return self.moes[0].shard

    def set_slice_of_source(self, slice_ids: list[int]) -> None:
        """Name the global batch slice each rank feeds into the next forward."""
        for ep in self.moes:
            if ep.ledger is not None:
                ep.ledger.slice_of_source = list(slice_ids)

    def forward_detailed(self, input_ids: torch.Tensor, *, compute_mtp: bool = True) -> ModelOutput:
        """Same outputs as ``LongcatFlashForCausalLM.forward_detailed`` without a cache."""
        with moes_swapped(self.model, self.moes):
            return self.model.forward_detailed(input_ids, compute_mtp=compute_mtp)

    def expert_parameters(self) -> list[nn.Parameter]:
        """The stacked expert weights of every layer (gate, up, down per layer)."""
        out = []
        for ep in self.moes:
            experts = ep.moe.experts
            out += [experts.gate_proj, experts.up_proj, experts.down_proj]
        return out
