"""Deterministic weighted combine of expert outputs, with an explicit ``backend`` argument.

    out_t = x_t * (sum of t's zero-expert gates) + sum over t's FFN slots of gate_tk * y[row_tk]

``row_of_slot_TK`` (-1 for zero-expert slots) says where each slot's expert output sits in
``y_SD``. Everything is float32: the zero gates are summed in slot order k = 0..K-1, the
identity term comes first, then the FFN terms in ascending row order, which is ascending
expert id because rows are sorted by expert. Every sum has a fixed order and no index is
accumulated into twice, so results are bitwise reproducible. For float32 this is
``model.moe.MoE``'s combine term for term, wherever its zero-gate sum (``torch.sum`` over K)
also adds in slot order, as PyTorch's CPU reduction does for K <= 4. The backward pass uses
torch ops for either backend.
"""

from __future__ import annotations

import torch

from longcat_sim.model.kernels import torch_ref
from longcat_sim.model.kernels.backend import Backend, check_backend, require_triton


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, y_SD, gate_TK, row_of_slot_TK, backend: Backend):  # type: ignore[override]
        if backend == "triton":
            require_triton(x_TD, y_SD, gate_TK, row_of_slot_TK)
            from longcat_sim.model.kernels import triton_combine

            out = triton_combine.combine(x_TD, y_SD, gate_TK, row_of_slot_TK)
        else:
            out = torch_ref.combine_ref(x_TD, y_SD, gate_TK, row_of_slot_TK)
        ctx.save_for_backward(x_TD, y_SD, gate_TK, row_of_slot_TK)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out_TD):  # type: ignore[override]
        x_TD, y_SD, gate_TK, row_of_slot_TK = ctx.saved_tensors
        g_TD = grad_out_TD.float()
        gate32 = gate_TK.float()
        is_zero_TK = row_of_slot_TK < 0
        zero_gate_T = torch.where(is_zero_TK, gate32, 0.0).sum(dim=-1)
        grad_x = (g_TD * zero_gate_T.unsqueeze(-1)).to(x_TD.dtype)
        # Each slot's expert row in slot layout (zero rows for zero-expert slots).
        y_TKD = torch_ref.unpermute_ref(y_SD.float(), row_of_slot_TK)
        slot_in_TKD = torch.where(is_zero_TK.unsqueeze(-1), x_TD.float().unsqueeze(1), y_TKD)
        grad_gate = (slot_in_TKD * g_TD.unsqueeze(1)).sum(dim=-1).to(gate_TK.dtype)
        t, k = row_of_slot_TK.shape
        weighted_TKD = g_TD.unsqueeze(1) * gate32.unsqueeze(-1)
        slot_of_row = torch.empty(y_SD.shape[0], dtype=torch.int64, device=y_SD.device)
        ffn_slots = (~is_zero_TK).reshape(-1).nonzero().squeeze(-1)
        slot_of_row[row_of_slot_TK.reshape(-1)[ffn_slots]] = ffn_slots
        grad_y = (
            weighted_TKD.reshape(t * k, x_TD.shape[1]).index_select(0, slot_of_row).to(y_SD.dtype)
        )
        return grad_x, grad_y, grad_gate, None, None


def combine(
    x_TD: torch.Tensor,
    y_SD: torch.Tensor,
    topk_gate_TK: torch.Tensor,
    row_of_slot_TK: torch.Tensor,
    *,
    backend: Backend = "torch",
) -> torch.Tensor:
    """``out_TD`` in ``x_TD``'s dtype (see the module docstring for the formula and order)."""
    check_backend(backend)
    if x_TD.dim() != 2 or y_SD.dim() != 2 or y_SD.shape[1] != x_TD.shape[1]:
        raise ValueError(
            f"x_TD [T, D] and y_SD [S, D] must share D, got {tuple(x_TD.shape)} and "
            f"{tuple(y_SD.shape)}"
        )
    t = x_TD.shape[0]
    if topk_gate_TK.dim() != 2 or topk_gate_TK.shape[0] != t:
        raise ValueError(f"topk_gate_TK must be [{t}, K], got {tuple(topk_gate_TK.shape)}")
    if row_of_slot_TK.shape != topk_gate_TK.shape or row_of_slot_TK.dtype != torch.int64:
        raise ValueError(
            f"row_of_slot_TK must be a long tensor shaped like topk_gate_TK "
            f"{tuple(topk_gate_TK.shape)}, got {row_of_slot_TK.dtype} {tuple(row_of_slot_TK.shape)}"
        )
    if row_of_slot_TK.numel() and int(row_of_slot_TK.max()) >= y_SD.shape[0]:
        raise ValueError(
            f"row_of_slot_TK points past the {y_SD.shape[0]} rows of y_SD; pass the "
            f"Permutation.row_of_slot_TK that produced y_SD"
        )
    return _Combine.apply(x_TD, y_SD, topk_gate_TK, row_of_slot_TK, backend)
