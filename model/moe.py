"""Mixture of FFN experts and zero-computation (identity) experts, grouped by expert.

Only slots routed to FFN experts are gathered, sorted by expert and sent through the expert
GEMMs; a slot routed to a zero expert contributes ``gate * x`` locally and costs nothing more.
Every step that sums several contributions into one row does so in a fixed order and never
with duplicate indices, so forward and backward are bitwise reproducible:

    out_t = x_t * (sum of t's zero-expert gates) + sum over k = 0..K-1 of gate_tk * FFN_tk(x_t)

accumulated in float32 in that order (identity term first, then FFN slots by slot index).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.config import ModelConfig
from model.experts import GroupedExperts
from model.router import RouterOutput, TopkRouter, default_generator


@dataclass(frozen=True)
class DispatchPlan:
    """Where each FFN slot goes. S = number of slots routed to FFN experts.

    ``slot_S``/``token_S``: flat slot id (t*K + k) and token of each FFN slot, sorted by expert
    (stable, so within an expert by slot id). ``by_slot_S``: positions into the S rows ordered
    by slot index k, then token, split into ``rows_per_slot`` chunks; within one chunk every
    token appears at most once.
    """

    slot_S: torch.Tensor
    token_S: torch.Tensor
    counts_N: list[int]
    by_slot_S: torch.Tensor
    rows_per_slot: list[int]
    num_tokens: int

    @property
    def num_rows(self) -> int:
        return self.slot_S.shape[0]


def plan_dispatch(topk_idx_TK: torch.Tensor, counts_E: torch.Tensor, n_routed: int) -> DispatchPlan:
    """Sort the FFN slots by expert; zero-expert slots (ids >= n_routed) are left out."""
    num_tokens, k = topk_idx_TK.shape
    order = torch.argsort(topk_idx_TK.reshape(-1), stable=True)
    counts_N = counts_E[:n_routed].tolist()
    slot_S = order[: sum(counts_N)]
    token_S = torch.div(slot_S, k, rounding_mode="floor")
    k_S = slot_S - token_S * k
    by_slot_S = torch.argsort(k_S * num_tokens + token_S)
    rows_per_slot = torch.bincount(k_S, minlength=k).tolist()
    return DispatchPlan(slot_S, token_S, counts_N, by_slot_S, rows_per_slot, num_tokens)


def _accumulate_rows(out_TD: torch.Tensor, rows_SD: torch.Tensor, plan: DispatchPlan) -> None:
    """``out[token_S[s]] += rows[s]`` in place, slot index by slot index (unique rows per call)."""
    rows_by_slot = rows_SD.index_select(0, plan.by_slot_S).split(plan.rows_per_slot)
    tokens_by_slot = plan.token_S.index_select(0, plan.by_slot_S).split(plan.rows_per_slot)
    for tokens, rows in zip(tokens_by_slot, rows_by_slot, strict=True):
        if tokens.numel():
            out_TD.index_add_(0, tokens, rows)


class _GatherTokenRows(torch.autograd.Function):
    """``x_TD[token_S]``, whose backward sums each token's slot gradients in slot order."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:  # type: ignore[override]
        ctx.plan = plan
        ctx.x_shape, ctx.x_dtype = x_TD.shape, x_TD.dtype
        return x_TD.index_select(0, plan.token_S)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_SD: torch.Tensor):  # type: ignore[override]
        grad_TD = grad_SD.new_zeros(ctx.x_shape, dtype=torch.float32)
        _accumulate_rows(grad_TD, grad_SD.float(), ctx.plan)
        return grad_TD.to(ctx.x_dtype), None


class MoE(nn.Module):
    """Router + grouped FFN experts + identity experts; ``forward(x) -> (out, RouterOutput)``."""

    def __init__(self, cfg: ModelConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        gen = generator if generator is not None else default_generator()
        self.n_routed_experts = cfg.n_routed_experts
        self.router = TopkRouter(cfg, generator=gen)
        self.experts = GroupedExperts(cfg, generator=gen)

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
        zero_gate_T = torch.where(is_zero_TK, gate_TK, torch.zeros_like(gate_TK)).sum(dim=-1)
        out_TD = x_TD.float() * zero_gate_T.unsqueeze(-1)

        plan = plan_dispatch(routing.topk_idx_TK, routing.counts_E, self.n_routed_experts)
        if plan.num_rows:
            x_SD = _GatherTokenRows.apply(x_TD, plan)
            y_SD = self.experts(x_SD, plan.counts_N)
            gate_S = gate_TK.reshape(-1).index_select(0, plan.slot_S)
            _accumulate_rows(out_TD, y_SD.float() * gate_S.unsqueeze(-1), plan)
        return out_TD.to(x.dtype).reshape(x.shape), routing
