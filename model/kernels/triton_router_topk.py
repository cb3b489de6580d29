"""Triton fused router: softmax, biased top-k, gates and expert counts (imports triton).

Each program holds a tile of whole tokens' N + Z float32 logits, writes their softmax
scores, then picks K experts per token by repeated arg-max of ``scores + bias``: the largest
biased score wins, an exact tie goes to the lower expert id, and a picked expert is masked
out before the next pick. Gates are the unbiased scores of the picks times the scaling
factor (zero-expert picks unscaled unless ``SCALE_ZERO``). Counts are integer atomics, so
their value does not depend on the order the programs run in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longcat_sim.model.kernels.torch_ref import TopkOptions

TILE = 4096  # elements per program


@triton.jit
def _router_topk_kernel(
    logits_ptr, bias_ptr, scores_ptr, idx_ptr, gate_ptr, counts_ptr,
    num_tokens, num_experts, n_routed, scaling,
    TOPK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, SCALE_ZERO: tl.constexpr,
):  # fmt: skip
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, BLOCK_E)
    in_tokens = tokens < num_tokens
    valid = in_tokens[:, None] & (experts < num_experts)[None, :]
    offsets = tokens[:, None] * num_experts + experts[None, :]
    logits = tl.load(logits_ptr + offsets, mask=valid, other=-float("inf"))
    row_max = tl.where(in_tokens, tl.max(logits, axis=1), 0.0)  # padding tokens: no NaN
    shifted = tl.where(valid, tl.exp(logits - row_max[:, None]), 0.0)
    total = tl.where(in_tokens, tl.sum(shifted, axis=1), 1.0)
    scores = shifted / total[:, None]
    tl.store(scores_ptr + offsets, scores, mask=valid)
    bias = tl.load(bias_ptr + experts, mask=experts < num_experts, other=0.0)
    biased = tl.where(valid, scores + bias[None, :], -float("inf"))
    for k in tl.static_range(TOPK):
        best = tl.max(biased, axis=1)
        pick = tl.min(tl.where(biased == best[:, None], experts[None, :], BLOCK_E), axis=1)
        pick = tl.minimum(pick, num_experts - 1)  # NaN scores match nothing; stay in bounds
        prob = tl.sum(tl.where(experts[None, :] == pick[:, None], scores, 0.0), axis=1)
        gate = prob * scaling
        if not SCALE_ZERO:
            gate = tl.where(pick < n_routed, gate, prob)
        tl.store(idx_ptr + tokens * TOPK + k, pick.to(tl.int64), mask=in_tokens)
        tl.store(gate_ptr + tokens * TOPK + k, gate, mask=in_tokens)
        tl.atomic_add(counts_ptr + pick, 1, mask=in_tokens)
        biased = tl.where(experts[None, :] == pick[:, None], -float("inf"), biased)


def router_topk(
    logits_TE: torch.Tensor, bias_E: torch.Tensor, opts: TopkOptions
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(topk_idx_TK, topk_gate_TK, scores_TE, counts_E)`` for float32 ``logits_TE``."""
    logits = logits_TE.float().contiguous()
    bias = bias_E.float().contiguous()
    num_tokens, num_experts = logits.shape
    device = logits.device
    scores = torch.empty_like(logits)
    idx = torch.empty(num_tokens, opts.topk, dtype=torch.int64, device=device)
    gate = torch.empty(num_tokens, opts.topk, dtype=torch.float32, device=device)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    if num_tokens:
        block_e = triton.next_power_of_2(num_experts)
        block_t = min(max(1, TILE // block_e), triton.next_power_of_2(num_tokens))
        _router_topk_kernel[(triton.cdiv(num_tokens, block_t),)](
            logits, bias, scores, idx, gate, counts,
            num_tokens, num_experts, opts.n_routed, float(opts.routed_scaling_factor),
            TOPK=opts.topk, BLOCK_T=block_t, BLOCK_E=block_e,
            SCALE_ZERO=bool(opts.scale_zero_expert_gates),
            num_warps=4 if block_e <= 1024 else 8, enable_fp_fusion=False,
        )  # fmt: skip
    return idx, gate, scores, counts.long()
