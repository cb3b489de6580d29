"""Pure-PyTorch references for the MoE kernels: slow, plain, and the oracle the kernels match.

Shape letters: T tokens, K slots per token, D hidden size, N FFN experts, E = N + Z experts,
I expert intermediate size, S rows routed to FFN experts (sorted by expert, stable in slot id).
A slot's flat id is ``t * K + k``. ``row_of_slot_TK`` maps each slot to its row in the
permuted [S, ...] layout, or -1 for slots routed to zero (identity) experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def expert_slices(counts_N: list[int]) -> list[tuple[int, slice]]:
    """(expert, row slice) for every expert with rows, in expert order."""
    out, start = [], 0
    for e, count in enumerate(counts_N):
        if count:
            out.append((e, slice(start, start + count)))
            start += count
    return out


# --- permutation --------------------------------------------------------------------------


def plan_rows_ref(
    topk_idx_TK: torch.Tensor, n_routed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(slot_S, row_of_slot_TK, counts_N)``: FFN slots stably sorted by expert."""
    num_tokens, k = topk_idx_TK.shape
    flat = topk_idx_TK.reshape(-1)
    order = torch.argsort(flat, stable=True)
    is_ffn = flat < n_routed
    counts_N = torch.bincount(flat[is_ffn], minlength=n_routed)
    slot_S = order[: int(is_ffn.sum())]
    row_of_slot = torch.full_like(flat, -1)
    row_of_slot[slot_S] = torch.arange(slot_S.numel(), device=flat.device)
    return slot_S, row_of_slot.view(num_tokens, k), counts_N


def gather_rows_ref(src_RD: torch.Tensor, index_S: torch.Tensor) -> torch.Tensor:
    """``out[s] = src[index[s]]``, or a zero row where ``index[s] == -1``."""
    out = src_RD.new_zeros(index_S.shape[0], src_RD.shape[1])
    valid = index_S >= 0
    out[valid] = src_RD.index_select(0, index_S[valid])
    return out


def unpermute_ref(y_SD: torch.Tensor, row_of_slot_TK: torch.Tensor) -> torch.Tensor:
    """Rows back in slot layout [T, K, D]; zero-expert slots get zero rows."""
    t, k = row_of_slot_TK.shape
    return gather_rows_ref(y_SD, row_of_slot_TK.reshape(-1)).view(t, k, y_SD.shape[1])


def rows_ascending_ref(
    row_of_slot_TK: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows_TK, slot_order_TK)``: each token's rows in ascending order, -1 (zero slots) first.

    Rows are sorted by expert, so ascending row order is ascending expert id.
    """
    return torch.sort(row_of_slot_TK, dim=1, stable=True)


def sum_slots_ref(rows_SD: torch.Tensor, row_of_slot_TK: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum of rows[r] over t's rows r in ascending order`` (float32, from zero)."""
    rows_TK, _ = rows_ascending_ref(row_of_slot_TK)
    slots_TKD = unpermute_ref(rows_SD.float(), rows_TK)
    out_TD = slots_TKD.new_zeros(slots_TKD.shape[0], slots_TKD.shape[2])
    for k in range(slots_TKD.shape[1]):
        out_TD = torch.where((rows_TK[:, k] >= 0).unsqueeze(-1), out_TD + slots_TKD[:, k], out_TD)
    return out_TD


# --- grouped SwiGLU experts ---------------------------------------------------------------


def grouped_swiglu_ref(
    x_SD: torch.Tensor,
    gate_NID: torch.Tensor,
    up_NID: torch.Tensor,
    down_NDI: torch.Tensor,
    counts_N: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y_SD, pre_gate_SI, pre_up_SI)`` for rows grouped by expert.

    Computed in float32 from upcast inputs; the SwiGLU hidden ``silu(a) * b`` is rounded to the
    input dtype before the down projection, and every output is returned in the input dtype.
    """
    dtype = x_SD.dtype
    rows, inter, hidden = x_SD.shape[0], gate_NID.shape[1], down_NDI.shape[1]
    x32 = x_SD.float()
    pre_gate = x32.new_zeros(rows, inter)
    pre_up = x32.new_zeros(rows, inter)
    y = x32.new_zeros(rows, hidden)
    for e, rs in expert_slices(counts_N):
        pre_gate[rs] = x32[rs] @ gate_NID[e].float().t()
        pre_up[rs] = x32[rs] @ up_NID[e].float().t()
        h = (F.silu(pre_gate[rs]) * pre_up[rs]).to(dtype).float()
        y[rs] = h @ down_NDI[e].float().t()
    return y.to(dtype), pre_gate.to(dtype), pre_up.to(dtype)


def grouped_swiglu_backward_ref(
    grad_y_SD: torch.Tensor,
    x_SD: torch.Tensor,
    gate_NID: torch.Tensor,
    up_NID: torch.Tensor,
    down_NDI: torch.Tensor,
    pre_gate_SI: torch.Tensor,
    pre_up_SI: torch.Tensor,
    counts_N: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(x, gate, up, down)`` in float32 from the saved pre-activations.

    Each gradient is written by exactly one expert's GEMM (no accumulation across calls), so
    the result is deterministic; experts without rows get zero weight gradients.
    """
    dy = grad_y_SD.float()
    x32 = x_SD.float()
    grad_x = torch.zeros_like(x32)
    grad_gate = torch.zeros_like(gate_NID, dtype=torch.float32)
    grad_up = torch.zeros_like(up_NID, dtype=torch.float32)
    grad_down = torch.zeros_like(down_NDI, dtype=torch.float32)
    for e, rs in expert_slices(counts_N):
        a, b = pre_gate_SI[rs].float(), pre_up_SI[rs].float()
        sig = torch.sigmoid(a)
        silu = a * sig
        grad_down[e] = dy[rs].t() @ (silu * b)
        d_hidden = dy[rs] @ down_NDI[e].float()
        d_b = d_hidden * silu
        d_a = d_hidden * b * sig * (1.0 + a * (1.0 - sig))  # d silu(a)/da
        grad_gate[e] = d_a.t() @ x32[rs]
        grad_up[e] = d_b.t() @ x32[rs]
        grad_x[rs] = d_a @ gate_NID[e].float() + d_b @ up_NID[e].float()
    return grad_x, grad_gate, grad_up, grad_down


# --- weighted combine ---------------------------------------------------------------------


def combine_ref(
    x_TD: torch.Tensor,
    y_SD: torch.Tensor,
    topk_gate_TK: torch.Tensor,
    row_of_slot_TK: torch.Tensor,
) -> torch.Tensor:
    """``out_t = x_t * zero_gate_t + sum of gate_tk * y[row_of_slot[t, k]] over t's FFN slots``.

    ``zero_gate_t`` sums the gates of t's zero-expert slots (row -1) in slot order k = 0..K-1;
    the FFN terms are added after it in ascending row order (= ascending expert id). All of it
    is float32, and the result is cast to ``x_TD``'s dtype.
    """
    gate_TK = topk_gate_TK.float()
    is_zero_TK = row_of_slot_TK < 0
    zero_gate_T = gate_TK.new_zeros(gate_TK.shape[0])
    for k in range(gate_TK.shape[1]):
        zero_gate_T = zero_gate_T + torch.where(is_zero_TK[:, k], gate_TK[:, k], 0.0)
    out_TD = x_TD.float() * zero_gate_T.unsqueeze(-1)
    if y_SD.shape[0]:
        y32 = y_SD.float()
        rows_TK, order_TK = rows_ascending_ref(row_of_slot_TK)
        gate_TK = gate_TK.gather(1, order_TK)
        for k in range(gate_TK.shape[1]):
            rows_T = rows_TK[:, k]
            contrib_TD = y32.index_select(0, rows_T.clamp(min=0)) * gate_TK[:, k, None]
            out_TD = torch.where((rows_T >= 0).unsqueeze(-1), out_TD + contrib_TD, out_TD)
    return out_TD.to(x_TD.dtype)


# --- router -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopkOptions:
    """How a router picks and weighs experts: ``topk`` picks per token among experts whose ids
    below ``n_routed`` are FFN experts (the rest zero experts); gates scaled by
    ``routed_scaling_factor`` (zero-expert gates only if ``scale_zero_expert_gates``)."""

    topk: int
    n_routed: int
    routed_scaling_factor: float
    scale_zero_expert_gates: bool


def router_topk_ref(
    logits_TE: torch.Tensor, bias_E: torch.Tensor, opts: TopkOptions
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(topk_idx_TK, topk_gate_TK, scores_TE, counts_E)`` exactly as ``TopkRouter`` computes them.

    Selection is ``torch.topk`` of ``softmax(logits) + bias`` (its order among exactly equal
    values is unspecified); gates are the unbiased probabilities times the scaling factor.
    """
    scores_TE = logits_TE.float().softmax(dim=-1)
    with torch.no_grad():
        topk_idx_TK = torch.topk(scores_TE + bias_E, opts.topk, dim=-1, sorted=True).indices
    gate_TK, counts_E = gates_of_picks(
        scores_TE,
        topk_idx_TK,
        opts.n_routed,
        opts.routed_scaling_factor,
        opts.scale_zero_expert_gates,
    )
    return topk_idx_TK, gate_TK, scores_TE, counts_E


def gates_of_picks(
    scores_TE: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    n_routed: int,
    routed_scaling_factor: float,
    scale_zero_expert_gates: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(topk_gate_TK, counts_E)``: the picked unbiased scores times the scaling factor (zero
    experts unscaled unless ``scale_zero_expert_gates``) and the picks per expert."""
    probs_TK = scores_TE.gather(1, topk_idx_TK)
    topk_gate_TK = probs_TK * routed_scaling_factor
    if not scale_zero_expert_gates:
        topk_gate_TK = torch.where(topk_idx_TK >= n_routed, probs_TK, topk_gate_TK)
    counts_E = torch.bincount(topk_idx_TK.reshape(-1), minlength=scores_TE.shape[1])
    return topk_gate_TK, counts_E
