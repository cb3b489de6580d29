"""The MoE layer's forward from the Triton kernels: gather, grouped SwiGLU GEMM, combine.

Rows arrive planned (sorted by expert, as ``permute.plan_permutation`` orders them). The
result is ``model.moe._MoECore``'s forward: ``x * zero_gate`` first, then ``gate * y`` for a
token's FFN slots in ascending expert id, all in float32. The zero gate enters the combine
kernel as one extra leading slot with no row; the token's own zero-expert slots get gate 0.
"""

from __future__ import annotations

import torch


def moe_forward_triton(
    x_TD: torch.Tensor,
    zero_gate_T: torch.Tensor,
    gate_S: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    slot_S: torch.Tensor,
    token_S: torch.Tensor,
    row_of_slot_TK: torch.Tensor,
    counts_N: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out_TD float32, pre_gate_SI, pre_up_SI)``; no autograd (the caller saves the
    pre-activations for its backward)."""
    from longcat_sim.model.kernels import triton_combine, triton_grouped_gemm, triton_permute

    x_SD = triton_permute.gather_rows(x_TD, token_S)
    y_SD, pre_gate_SI, pre_up_SI = triton_grouped_gemm.grouped_swiglu_forward(
        x_SD, *weights, counts_N
    )
    tokens, k = row_of_slot_TK.shape
    ffn_gate_TK = gate_S.new_zeros(tokens * k).index_copy(0, slot_S, gate_S).view(tokens, k)
    gate_TK = torch.cat((zero_gate_T.float().unsqueeze(1), ffn_gate_TK.float()), dim=1)
    rows_TK = torch.cat((row_of_slot_TK.new_full((tokens, 1), -1), row_of_slot_TK), dim=1)
    out_TD = triton_combine.combine(x_TD.float(), y_SD, gate_TK, rows_TK)
    return out_TD, pre_gate_SI, pre_up_SI
