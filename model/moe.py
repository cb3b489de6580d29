"""Mixture of FFN experts and zero-computation (identity) experts, grouped by expert.

Only slots routed to FFN experts are gathered, sorted by expert and sent through the expert
GEMMs; a slot routed to a zero expert contributes ``gate * x`` locally and costs nothing more:

    out_t = x_t * (sum of t's zero-expert gates) + sum over t's FFN slots of gate * FFN_e(x_t)

Every sum of several contributions into one row runs in float32, in a fixed order (identity
term first, then the FFN slots by ascending expert id) and never with duplicate indices in one
call, so forward and backward are bitwise reproducible. Dispatch, experts and combine form one
autograd node; nothing of size T x K x H is ever materialised. With ``cfg.deterministic`` the
expert GEMMs and SiLU are batch-invariant (``model/kernels/batch_invariant.py``: a token's
result does not depend on the other tokens of its expert) and weight gradients are summed in
a fixed order whatever the thread count. With ``cfg.kernels == "triton"`` the dispatch plan,
the row gather, the expert GEMMs and the combine of the forward run as Triton kernels
(``model/kernels/``); the backward is the same torch code for both, recomputed from the saved
pre-activations.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from longcat_sim.model.config import ModelConfig
from longcat_sim.model.experts import (
    GroupedExperts,
    expert_backward_from_hidden,
    expert_forward,
    new_weight_grads,
    per_expert,
    transposed_experts,
    used_experts,
)
from longcat_sim.model.kernels.backend import Backend
from longcat_sim.model.kernels.batch_invariant import (
    ROWS,
    mm_rows,
    mm_t_rows,
    silu_forward,
    slot_sum,
)
from longcat_sim.model.kernels.moe_forward import moe_forward_triton
from longcat_sim.model.kernels.permute import plan_permutation
from longcat_sim.model.probes import CombineCall, ExpertCall, MoEProbe, rows_of_blocks
from longcat_sim.model.router import RouterOutput, TopkRouter, default_generator


@dataclass(frozen=True)
class DispatchPlan:
    """Where the rows sent through the expert GEMMs come from.

    ``slot_S``/``token_S``: flat slot id (t*K + k) and token of each row, sorted by expert
    and, within an expert, by token; ``counts_N[e]`` rows belong to expert e. A token picks an
    expert at most once, so the tokens inside one expert's rows are distinct. With
    ``padding > 0`` (see :func:`plan_dispatch`) the last rows of some experts are padding rows:
    the j-th of them (in row order) has slot ``T*K + j`` and token ``T + (row mod multiple)``,
    and ``counts_N`` counts them too. Slots are then still all distinct (no index is ever
    repeated in a gather of the gates, nor in its backward), and so are the tokens inside one
    expert's rows. ``backend`` names the kernels that run the forward; a ``"triton"`` plan
    also holds ``row_of_slot_TK``, each slot's row (-1 for zero-expert slots).
    """

    slot_S: torch.Tensor
    token_S: torch.Tensor
    counts_N: list[int]
    padding: int = 0  # padding rows: slots T*K .. T*K + padding - 1
    backend: Backend = "torch"
    row_of_slot_TK: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.slot_S.shape[0]


def plan_dispatch(
    topk_idx_TK: torch.Tensor,
    counts_E: torch.Tensor,
    n_routed: int,
    row_multiple: int = 1,
    *,
    kernels: Backend = "torch",
) -> DispatchPlan:
    """Sort the FFN slots by expert; zero-expert slots (ids >= n_routed) are left out.

    ``row_multiple > 1`` pads every expert's rows to a multiple of it with padding rows: the
    j-th padding row gets slot ``T*K + j`` and token ``T + (row mod row_multiple)``, indices
    just past the real ones, all slots distinct and the tokens distinct within an expert (the
    caller appends ``plan.padding`` zero gates and ``row_multiple`` zero tokens for them).
    ``kernels="triton"`` plans with the Triton kernel (same order; no padding).
    """
    if int(counts_E.sum()) != topk_idx_TK.numel():  # buffers are sized from the counts
        raise RuntimeError(
            f"routing counts add up to {int(counts_E.sum())}, not the {topk_idx_TK.numel()} "
            "routed slots: the router's output is corrupted"
        )
    if kernels == "triton":
        if row_multiple > 1:
            raise ValueError("the Triton dispatch plan has no padding rows; use kernels='torch'")
        perm = plan_permutation(topk_idx_TK, n_routed, backend="triton")
        return DispatchPlan(
            perm.slot_S, perm.token_S, perm.counts_N.tolist(), 0, "triton", perm.row_of_slot_TK
        )
    tokens, k = topk_idx_TK.shape
    flat = topk_idx_TK.reshape(-1)
    ffn_slots = torch.nonzero(flat < n_routed).squeeze(1)
    slot_S = ffn_slots[torch.argsort(flat[ffn_slots], stable=True)]
    counts_N = counts_E[:n_routed]
    if row_multiple > 1:
        padded_N = counts_N + (-counts_N) % row_multiple
        real_start_N = counts_N.cumsum(0) - counts_N
        padded_start_N = padded_N.cumsum(0) - padded_N
        expert_S = flat[slot_S]
        rank_S = torch.arange(slot_S.shape[0]) - real_start_N[expert_S]
        where_S = padded_start_N[expert_S] + rank_S
        rows = int(padded_N.sum())
        is_pad = torch.ones(rows, dtype=torch.bool).index_fill(0, where_S, False)
        pad_slot = tokens * k - 1 + is_pad.cumsum(0)  # T*K + j at the j-th padding row
        slot_S = pad_slot.index_copy(0, where_S, slot_S)
        token_S = torch.div(slot_S, k, rounding_mode="floor")
        token_S = torch.where(is_pad, tokens + torch.arange(rows) % row_multiple, token_S)
        return DispatchPlan(slot_S, token_S, padded_N.tolist(), rows - int(where_S.shape[0]))
    token_S = torch.div(slot_S, k, rounding_mode="floor")
    return DispatchPlan(slot_S, token_S, counts_N.tolist())


class _MoECore(torch.autograd.Function):
    """``out = x * zero_gate + sum over FFN slots of gate_S * expert(x[token_S])`` in float32.

    Expert by expert: gather the expert's tokens, run its GEMMs, add ``gate * y`` into their
    output rows. Temporaries are one expert's rows (they stay in cache); only the two
    pre-activations are kept for backward. Backward gets d loss / d gate from
    ``<g W_down, hidden>``, which equals ``<g, y>``, so y itself is never stored.
    """

    @staticmethod
    def forward(ctx, x_TD, zero_gate_T, gate_S, w_gate, w_up, w_down, plan, deterministic, probe):  # type: ignore[override]
        if plan.backend == "triton":
            if probe is not None:
                raise ValueError("MoE probes need the torch kernels (kernels='torch')")
            out_TD, pre_gate_SI, pre_up_SI = moe_forward_triton(
                x_TD,
                zero_gate_T,
                gate_S,
                (w_gate, w_up, w_down),
                plan.slot_S,
                plan.token_S,
                plan.row_of_slot_TK,
                plan.counts_N,
            )
        else:
            out_TD, pre_gate_SI, pre_up_SI = _torch_forward(
                x_TD, zero_gate_T, gate_S, (w_gate, w_up, w_down), plan, deterministic, probe
            )
        ctx.plan, ctx.deterministic = plan, deterministic
        ctx.save_for_backward(
            x_TD, zero_gate_T, gate_S, w_gate, w_up, w_down, pre_gate_SI, pre_up_SI
        )
        return out_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_TD):  # type: ignore[override]
        x_TD, zero_gate_T, gate_S, w_gate, w_up, w_down, pre_gate_SI, pre_up_SI = ctx.saved_tensors
        plan, dtype, det = ctx.plan, x_TD.dtype, ctx.deterministic
        grad_TD = grad_TD.float().contiguous()
        grad_x_TD = grad_TD * zero_gate_T.unsqueeze(-1)
        grad_zero_gate_T = torch.linalg.vecdot(grad_TD, x_TD.float())
        grad_gate_S = torch.empty_like(gate_S)
        grads = new_weight_grads((w_gate, w_up, w_down), plan.counts_N)
        experts = used_experts(
            plan.counts_N,
            plan.token_S,
            gate_S.unsqueeze(-1),
            grad_gate_S,
            pre_gate_SI,
            pre_up_SI,
            *per_expert((w_gate, w_up, w_down)),
            *per_expert(grads),
        )
        # reverse order: the experts the forward touched last are likeliest still cached
        for _, tokens, gate_r1, grad_gate_r, a_rI, b_rI, w_g, w_u, w_d, g_g, g_u, g_d in reversed(
            list(experts)
        ):
            grad_out_rD = grad_TD.index_select(0, tokens)
            silu_rI = silu_forward(a_rI) if det else F.silu(a_rI)
            hidden_rI = silu_rI * b_rI
            grad_hidden_rI = _mm(_as(grad_out_rD, dtype), w_d, det)  # gate not applied yet
            torch.linalg.vecdot(_as_float(grad_hidden_rI), _as_float(hidden_rI), out=grad_gate_r)
            _mm_t_into(g_d, _as(grad_out_rD.mul_(gate_r1), dtype), hidden_rI, det)
            grad_x_rD = expert_backward_from_hidden(
                x_TD.index_select(0, tokens),
                grad_hidden_rI.mul_(gate_r1),
                a_rI,
                b_rI,
                silu_rI,
                w_g,
                w_u,
                g_g,
                g_u,
                deterministic=det,
            )
            grad_x_TD.index_add_(0, tokens, _as_float(grad_x_rD))
        return grad_x_TD.to(dtype), grad_zero_gate_T, grad_gate_S, *grads, None, None, None


def _torch_forward(
    x_TD: torch.Tensor,
    zero_gate_T: torch.Tensor,
    gate_S: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    plan: DispatchPlan,
    deterministic: bool,
    probe: MoEProbe | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_MoECore``'s forward in torch ops: ``(out_TD float32, pre_gate_SI, pre_up_SI)``.
    With a ``probe`` the expert outputs are kept per row and shown to it, then the combine."""
    out_TD = x_TD.float() * zero_gate_T.unsqueeze(-1)
    pre_gate_SI = x_TD.new_empty(plan.num_rows, weights[0].shape[1])
    pre_up_SI = torch.empty_like(pre_gate_SI)
    y_SD = x_TD.new_empty(plan.num_rows, x_TD.shape[1]) if probe is not None else None
    ys = y_SD.split(plan.counts_N) if y_SD is not None else [None] * len(plan.counts_N)
    for e, tokens, gate_r1, a_rI, b_rI, w_g, w_u, w_d, y_rD in used_experts(
        plan.counts_N,
        plan.token_S,
        gate_S.unsqueeze(-1),
        pre_gate_SI,
        pre_up_SI,
        *transposed_experts(weights),
        list(ys),
    ):
        y_rD = expert_forward(
            x_TD.index_select(0, tokens), w_g, w_u, w_d, a_rI, b_rI, y_rD,
            deterministic=deterministic,
            gemm_hook=probe.gemm_hook(e) if probe is not None else None,
        )  # fmt: skip
        contrib_rD = _as_float(y_rD)  # y itself is kept (not scaled in place) for a probe
        contrib_rD = contrib_rD.mul(gate_r1) if probe is not None else contrib_rD.mul_(gate_r1)
        out_TD.index_add_(0, tokens, contrib_rD)
    if probe is not None and y_SD is not None:
        _show_probe(probe, x_TD, zero_gate_T, gate_S, weights, plan, deterministic,
                    (pre_gate_SI, pre_up_SI, y_SD, out_TD))  # fmt: skip
    return out_TD, pre_gate_SI, pre_up_SI


def _show_probe(probe, x_TD, zero_gate_T, gate_S, weights, plan, deterministic, tensors) -> None:
    """Show a probe the experts' rows of one call, then its combine (``model/probes.py``)."""
    pre_gate_SI, pre_up_SI, y_SD, out_TD = tensors
    starts = [0, *itertools.accumulate(plan.counts_N)]
    blocks = [(e, slice(starts[e], starts[e + 1])) for e, c in enumerate(plan.counts_N) if c]
    with torch.no_grad():
        probe.on_experts(
            ExpertCall(
                rows_of_blocks(blocks, plan.num_rows),
                blocks,
                x_TD.index_select(0, plan.token_S),
                pre_gate_SI,
                pre_up_SI,
                y_SD,
                tuple(w.detach() for w in weights),
                deterministic,
            )
        )
        probe.on_combine(CombineCall(out_TD, x_TD, zero_gate_T, gate_S, plan.token_S, y_SD))


def _mm(a: torch.Tensor, b: torch.Tensor, deterministic: bool) -> torch.Tensor:
    return mm_rows(a, b) if deterministic else torch.mm(a, b)


def _mm_t_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, deterministic: bool) -> None:
    """``out = a^T b`` (a sum over rows; in a thread-invariant fixed order when deterministic)."""
    if deterministic:
        mm_t_rows(a, b, out=out)
    else:
        torch.mm(a.t(), b, out=out)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return _as(t, torch.float32)


@dataclass
class LocalFlight:
    """A local MoE call between its phases: already computed."""

    out: torch.Tensor
    routing: RouterOutput


class MoE(nn.Module):
    """Router + grouped FFN experts + identity experts; ``forward(x) -> (out, RouterOutput)``.

    The phases ``start(x) -> flight``, ``compute(flight) -> flight``, ``finish(flight) -> (out,
    RouterOutput)`` are what ``model/block.py`` calls; locally ``start`` does all the work.
    """

    overlap = True  # the layer places the phases where its topology's order says

    def __init__(self, cfg: ModelConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        gen = generator if generator is not None else default_generator()
        self.n_routed_experts = cfg.n_routed_experts
        self.deterministic = cfg.deterministic
        self.kernels = cfg.kernels
        self.router = TopkRouter(cfg, generator=gen)
        self.experts = GroupedExperts(cfg, generator=gen)
        self.probe: MoEProbe | None = None  # model/probes.py: faults and checks, when set

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        gen = generator if generator is not None else default_generator()
        self.router.reset_parameters(gen)
        self.experts.reset_parameters(gen)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        """``x``: [..., H] (leading dims flattened to T tokens); the output has x's shape and dtype."""
        x_TD = x.reshape(-1, x.shape[-1])
        routing = self.router(x_TD)
        gate_TK = routing.topk_gate_TK
        is_zero_TK = routing.topk_idx_TK >= self.n_routed_experts
        zero_gate_T = slot_sum(torch.where(is_zero_TK, gate_TK, torch.zeros_like(gate_TK)))
        gates = gate_TK.reshape(-1)
        tokens = x_TD.shape[0]
        if self.deterministic:
            # every expert's rows padded to a multiple of ROWS (zero tokens, zero gates, each
            # padding row its own gate slot): each expert GEMM is then one batch-invariant call
            # (batch_invariant.mm_rows)
            plan = plan_dispatch(routing.topk_idx_TK, routing.counts_E, self.n_routed_experts, ROWS)
            x_TD = torch.cat((x_TD, x_TD.new_zeros(ROWS, x_TD.shape[1])))
            zero_gate_T = torch.cat((zero_gate_T, zero_gate_T.new_zeros(ROWS)))
            gates = torch.cat((gates, gates.new_zeros(plan.padding)))
        else:
            plan = plan_dispatch(
                routing.topk_idx_TK, routing.counts_E, self.n_routed_experts, kernels=self.kernels
            )
        gate_S = gates.index_select(0, plan.slot_S)
        out_TD = _MoECore.apply(
            x_TD.contiguous(),
            zero_gate_T,
            gate_S,
            *self.experts.weights(x_TD.dtype),
            plan,
            self.deterministic,
            self.probe,
        )
        return out_TD[:tokens].to(x.dtype).reshape(x.shape), routing

    def start(self, x: torch.Tensor) -> LocalFlight:
        return LocalFlight(*self(x))

    def compute(self, flight: LocalFlight) -> LocalFlight:
        return flight

    def finish(self, flight: LocalFlight) -> tuple[torch.Tensor, RouterOutput]:
        return flight.out, flight.routing
