"""Triton kernels for token permutation by expert (imports triton: load it lazily).

Planning runs in two passes over blocks of consecutive flat slots. Pass one ranks every FFN
slot among the earlier slots of its block with the same expert and records per-block expert
counts; a prefix sum over (expert, block) turns those counts into the first row of each
block's run of each expert; pass two writes ``row = base[block, expert] + rank``. The rows
come out stably sorted by expert without a sort and without atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PLAN_BLOCK = 128
MAX_BLOCK_D = 1024
GATHER_TILE = 4096  # elements per gather program


@triton.jit
def _slot_rank_kernel(
    idx_ptr, rank_ptr, block_counts_ptr, num_slots, n_routed, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    offs = pid.to(tl.int64) * BLOCK + lane
    in_range = offs < num_slots
    expert = tl.load(idx_ptr + offs, mask=in_range, other=-1)
    is_ffn = in_range & (expert < n_routed)
    expert = tl.where(is_ffn, expert, -1)
    same = (expert[:, None] == expert[None, :]).to(tl.int32)
    earlier = (lane[None, :] < lane[:, None]).to(tl.int32)
    rank = tl.sum(same * earlier, axis=1)
    total = tl.sum(same, axis=1)
    tl.store(rank_ptr + offs, rank, mask=is_ffn)
    tl.store(
        block_counts_ptr + pid.to(tl.int64) * n_routed + expert, total, mask=is_ffn & (rank == 0)
    )


@triton.jit
def _slot_row_kernel(
    idx_ptr, rank_ptr, base_ptr, row_of_slot_ptr, slot_ptr, token_ptr,
    num_slots, n_routed, topk, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < num_slots
    expert = tl.load(idx_ptr + offs, mask=in_range, other=-1)
    is_ffn = in_range & (expert < n_routed)
    rank = tl.load(rank_ptr + offs, mask=is_ffn, other=0)
    base = tl.load(base_ptr + pid.to(tl.int64) * n_routed + expert, mask=is_ffn, other=0)
    row = base + rank
    tl.store(row_of_slot_ptr + offs, tl.where(is_ffn, row, -1), mask=in_range)
    tl.store(slot_ptr + row, offs, mask=is_ffn)
    tl.store(token_ptr + row, offs // topk, mask=is_ffn)


@triton.jit
def _gather_rows_kernel(
    src_ptr, index_ptr, out_ptr, num_rows, width, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_rows = rows < num_rows
    src_rows = tl.load(index_ptr + rows, mask=in_rows, other=-1)
    mask = in_rows[:, None] & (cols < width)[None, :]
    vals = tl.load(
        src_ptr + src_rows[:, None] * width + cols[None, :],
        mask=mask & (src_rows >= 0)[:, None],
        other=0,
    )
    tl.store(out_ptr + rows[:, None] * width + cols[None, :], vals, mask=mask)


def plan_rows(
    topk_idx_TK: torch.Tensor, n_routed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(slot_S, token_S, row_of_slot_TK, counts_N)``, as ``torch_ref.plan_rows_ref``."""
    num_tokens, topk = topk_idx_TK.shape
    device = topk_idx_TK.device
    idx = topk_idx_TK.contiguous().view(-1)
    num_slots = idx.numel()
    num_blocks = triton.cdiv(num_slots, PLAN_BLOCK)
    rank = torch.empty(num_slots, dtype=torch.int32, device=device)
    block_counts_BN = torch.zeros(num_blocks, n_routed, dtype=torch.int32, device=device)
    if num_blocks:
        _slot_rank_kernel[(num_blocks,)](
            idx,
            rank,
            block_counts_BN,
            num_slots,
            n_routed,
            BLOCK=PLAN_BLOCK,
            enable_fp_fusion=False,
        )
    block_counts_BN = block_counts_BN.long()
    counts_N = block_counts_BN.sum(dim=0)
    first_row_N = counts_N.cumsum(0) - counts_N
    base_BN = first_row_N + block_counts_BN.cumsum(0) - block_counts_BN
    num_rows = int(counts_N.sum())
    row_of_slot = torch.empty(num_slots, dtype=torch.int64, device=device)
    slot_S = torch.empty(num_rows, dtype=torch.int64, device=device)
    token_S = torch.empty(num_rows, dtype=torch.int64, device=device)
    if num_blocks:
        _slot_row_kernel[(num_blocks,)](
            idx, rank, base_BN.contiguous(), row_of_slot, slot_S, token_S,
            num_slots, n_routed, topk, BLOCK=PLAN_BLOCK, enable_fp_fusion=False,
        )  # fmt: skip
    return slot_S, token_S, row_of_slot.view(num_tokens, topk), counts_N


def gather_rows(src_RD: torch.Tensor, index_S: torch.Tensor) -> torch.Tensor:
    """``out[s] = src[index[s]]``, or a zero row where ``index[s] == -1``."""
    src = src_RD.contiguous()
    index = index_S.contiguous()
    rows, width = index.shape[0], src.shape[1]
    out = torch.empty(rows, width, dtype=src.dtype, device=src.device)
    if rows and width:
        block_d = min(triton.next_power_of_2(width), MAX_BLOCK_D)
        block_r = max(1, min(GATHER_TILE // block_d, 64))
        grid = (triton.cdiv(rows, block_r), triton.cdiv(width, block_d))
        _gather_rows_kernel[grid](
            src, index, out, rows, width, BLOCK_R=block_r, BLOCK_D=block_d, enable_fp_fusion=False
        )
    return out
