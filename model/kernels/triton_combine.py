"""Triton deterministic weighted combine (imports triton: load it lazily).

Each program owns a tile of whole tokens x a block of columns, and no other program writes
those outputs. Per token it sums the zero-expert gates in slot order, starts from
``x * zero_gate`` and adds ``gate * y[row]`` over the token's rows in ascending row order
(= ascending expert id), all in float32, so the order of every sum is fixed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK_D = 1024
TILE = 4096  # elements per program


@triton.jit
def _combine_kernel(
    x_ptr, y_ptr, gate_ptr, row_ptr, out_ptr, num_tokens, width,
    TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_tokens = tokens < num_tokens
    tile_mask = in_tokens[:, None] & (cols < width)[None, :]
    zero_gate = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k in tl.static_range(TOPK):
        row = tl.load(row_ptr + tokens * TOPK + k, mask=in_tokens, other=0)
        gate = tl.load(gate_ptr + tokens * TOPK + k, mask=in_tokens, other=0.0)
        zero_gate += tl.where(row < 0, gate, 0.0)
    x = tl.load(x_ptr + tokens[:, None] * width + cols[None, :], mask=tile_mask, other=0.0)
    acc = x.to(tl.float32) * zero_gate[:, None]
    slots = tl.arange(0, TOPK_PAD)
    slot_mask = in_tokens[:, None] & (slots < TOPK)[None, :]
    slot_offsets = tokens[:, None] * TOPK + slots[None, :]
    rows = tl.load(row_ptr + slot_offsets, mask=slot_mask, other=-1)
    gates = tl.load(gate_ptr + slot_offsets, mask=slot_mask, other=0.0)
    no_row = 9223372036854775807  # int64 max: "no further row"
    prev = tl.full((BLOCK_T,), -1, dtype=tl.int64)
    for _ in tl.static_range(TOPK):
        row = tl.min(tl.where(rows > prev[:, None], rows, no_row), axis=1)
        has_row = row != no_row
        gate = tl.sum(tl.where(rows == row[:, None], gates, 0.0), axis=1)
        y = tl.load(
            y_ptr + row[:, None] * width + cols[None, :],
            mask=tile_mask & has_row[:, None],
            other=0.0,
        )
        acc = tl.where(has_row[:, None], acc + y.to(tl.float32) * gate[:, None], acc)
        prev = row
    out_offsets = tokens[:, None] * width + cols[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=tile_mask)


def combine(
    x_TD: torch.Tensor, y_SD: torch.Tensor, topk_gate_TK: torch.Tensor, row_of_slot_TK: torch.Tensor
) -> torch.Tensor:
    """As ``torch_ref.combine_ref``; the result has ``x_TD``'s dtype."""
    x = x_TD.contiguous()
    y = y_SD.contiguous()
    gate = topk_gate_TK.float().contiguous()
    rows = row_of_slot_TK.contiguous()
    num_tokens, width = x.shape
    topk = rows.shape[1]
    out = torch.empty_like(x)
    if num_tokens and width:
        block_d = min(triton.next_power_of_2(width), MAX_BLOCK_D)
        block_t = min(max(1, TILE // block_d), triton.next_power_of_2(num_tokens))
        grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(width, block_d))
        _combine_kernel[grid](
            x, y, gate, rows, out, num_tokens, width,
            TOPK=topk, TOPK_PAD=triton.next_power_of_2(topk), BLOCK_T=block_t, BLOCK_D=block_d,
            enable_fp_fusion=False,
        )  # fmt: skip
    return out
