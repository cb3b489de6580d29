"""Token permutation by expert and its inverse, with an explicit ``backend`` argument.

``permute`` gathers the token rows of every slot routed to an FFN expert into one [S, D]
tensor sorted by expert (stable: within an expert, by flat slot id ``t * K + k``); slots
routed to zero experts are left out. ``unpermute`` brings rows back to the [T, K, D] slot
layout. Both are gathers (no scatter with duplicate indices), and their backward passes are
the matching gathers plus a fixed slot-order sum in float32, computed with torch ops for
either backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longcat_sim.model.kernels import torch_ref
from longcat_sim.model.kernels.backend import Backend, check_backend, require_triton


@dataclass(frozen=True)
class Permutation:
    """Index maps between slot layout [T, K] and expert-sorted rows [S].

    ``slot_S``/``token_S``: flat slot id and token of each row; ``row_of_slot_TK``: row of
    each slot, -1 for zero-expert slots; ``counts_N``: rows per FFN expert (long).
    """

    slot_S: torch.Tensor
    token_S: torch.Tensor
    row_of_slot_TK: torch.Tensor
    counts_N: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.slot_S.shape[0]


def _check_routing(topk_idx_TK: torch.Tensor, n_routed: int) -> None:
    if topk_idx_TK.dim() != 2 or topk_idx_TK.dtype != torch.int64:
        raise ValueError(
            f"topk_idx_TK must be a long [T, K] tensor, got {topk_idx_TK.dtype} "
            f"{tuple(topk_idx_TK.shape)}"
        )
    if n_routed < 1:
        raise ValueError(f"n_routed must be >= 1 FFN expert, got {n_routed}")
    if topk_idx_TK.numel() and int(topk_idx_TK.min()) < 0:
        raise ValueError("topk_idx_TK holds negative expert ids; expert ids start at 0")


def plan_permutation(
    topk_idx_TK: torch.Tensor, n_routed: int, *, backend: Backend = "torch"
) -> Permutation:
    """Index maps that sort FFN slots by expert; ids >= ``n_routed`` are zero experts."""
    check_backend(backend)
    _check_routing(topk_idx_TK, n_routed)
    if backend == "triton":
        require_triton(topk_idx_TK)
        from longcat_sim.model.kernels import triton_permute

        slot_S, token_S, row_of_slot_TK, counts_N = triton_permute.plan_rows(topk_idx_TK, n_routed)
        return Permutation(slot_S, token_S, row_of_slot_TK, counts_N)
    slot_S, row_of_slot_TK, counts_N = torch_ref.plan_rows_ref(topk_idx_TK, n_routed)
    token_S = torch.div(slot_S, topk_idx_TK.shape[1], rounding_mode="floor")
    return Permutation(slot_S, token_S, row_of_slot_TK, counts_N)


def _gather_rows(src_RD: torch.Tensor, index_S: torch.Tensor, backend: Backend) -> torch.Tensor:
    if backend == "triton":
        require_triton(src_RD, index_S)
        from longcat_sim.model.kernels import triton_permute

        return triton_permute.gather_rows(src_RD, index_S)
    return torch_ref.gather_rows_ref(src_RD, index_S)


class _PermuteRows(torch.autograd.Function):
    """``x_TD[token_S]``; backward sums each token's slot gradients in slot order (float32)."""

    @staticmethod
    def forward(ctx, x_TD, perm: Permutation, backend: Backend):  # type: ignore[override]
        ctx.perm, ctx.x_dtype = perm, x_TD.dtype
        return _gather_rows(x_TD, perm.token_S, backend)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_SD):  # type: ignore[override]
        grad_TD = torch_ref.sum_slots_ref(grad_SD, ctx.perm.row_of_slot_TK)
        return grad_TD.to(ctx.x_dtype), None, None


class _UnpermuteRows(torch.autograd.Function):
    """Rows into slot layout [T, K, D]; backward gathers the slot gradients back into rows."""

    @staticmethod
    def forward(ctx, y_SD, perm: Permutation, backend: Backend):  # type: ignore[override]
        ctx.perm = perm
        rows = _gather_rows(y_SD, perm.row_of_slot_TK.reshape(-1), backend)
        return rows.view(*perm.row_of_slot_TK.shape, y_SD.shape[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_TKD):  # type: ignore[override]
        flat = grad_TKD.reshape(-1, grad_TKD.shape[-1])
        return torch_ref.gather_rows_ref(flat, ctx.perm.slot_S), None, None


def permute(
    x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, n_routed: int, *, backend: Backend = "torch"
) -> tuple[torch.Tensor, Permutation]:
    """``(x_SD, perm)``: token rows of FFN slots grouped by expert, and the maps to undo it."""
    if x_TD.dim() != 2 or x_TD.shape[0] != topk_idx_TK.shape[0]:
        raise ValueError(
            f"x_TD must be [T, D] with T = {topk_idx_TK.shape[0]} routed tokens, "
            f"got {tuple(x_TD.shape)}"
        )
    perm = plan_permutation(topk_idx_TK, n_routed, backend=backend)
    return _PermuteRows.apply(x_TD, perm, backend), perm


def unpermute(y_SD: torch.Tensor, perm: Permutation, *, backend: Backend = "torch") -> torch.Tensor:
    """``y_TKD[t, k] = y_SD[perm.row_of_slot_TK[t, k]]``; zero-expert slots get zero rows."""
    check_backend(backend)
    if y_SD.dim() != 2 or y_SD.shape[0] != perm.num_rows:
        raise ValueError(
            f"y_SD must be [S, D] with S = {perm.num_rows} permuted rows, got {tuple(y_SD.shape)}"
        )
    return _UnpermuteRows.apply(y_SD, perm, backend)
