"""Triton grouped SwiGLU expert GEMM over variable-size groups (imports triton: load lazily).

Rows arrive sorted by expert. The host cuts every non-empty group into row tiles of
``block_m`` rows that never straddle two experts; each program owns one (row tile, column
tile) pair, so empty experts cost nothing and no program reads another expert's rows. Two
kernels run back to back: ``gate_up`` writes ``silu(x Wg^T) * (x Wu^T)`` (and the two
pre-activations for the backward pass), ``down`` multiplies by ``Wd^T``. Both accumulate in
float32. On CPU (Triton's interpreter) operands are upcast to float32 before ``tl.dot``; on
CUDA, fp16/bf16 operands go to ``tl.dot`` as they are with a float32 accumulator, and float32
operands use IEEE (not TF32) precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class GemmConfig:
    """One fixed tiling (no autotuning)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


CUDA_CONFIG = GemmConfig(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=3)
INTERPRETER_CONFIG = GemmConfig(block_m=32, block_n=32, block_k=32, num_warps=1, num_stages=1)


def default_config(device: torch.device) -> GemmConfig:
    return CUDA_CONFIG if device.type == "cuda" else INTERPRETER_CONFIG


@triton.jit
def _gate_up_kernel(
    x_ptr, gate_ptr, up_ptr, tile_expert_ptr, tile_row_ptr, tile_end_ptr,
    hidden_ptr, pre_gate_ptr, pre_up_ptr,
    width, inter,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    row_end = tl.load(tile_end_ptr + tile)
    rows = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < row_end
    in_cols = cols < inter
    w_offset = expert * inter * width
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, width, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        in_k = ks < width
        x = tl.load(
            x_ptr + rows[:, None] * width + ks[None, :],
            mask=in_rows[:, None] & in_k[None, :],
            other=0.0,
        )
        w_kn = w_offset + cols[None, :] * width + ks[:, None]
        w_mask = in_k[:, None] & in_cols[None, :]
        wg = tl.load(gate_ptr + w_kn, mask=w_mask, other=0.0)
        wu = tl.load(up_ptr + w_kn, mask=w_mask, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            wg = wg.to(tl.float32)
            wu = wu.to(tl.float32)
        acc_gate = tl.dot(x, wg, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(x, wu, acc_up, input_precision=DOT_PRECISION)
    hidden = acc_gate * tl.sigmoid(acc_gate) * acc_up
    out_offsets = rows[:, None] * inter + cols[None, :]
    out_mask = in_rows[:, None] & in_cols[None, :]
    out_ty = hidden_ptr.dtype.element_ty
    tl.store(hidden_ptr + out_offsets, hidden.to(out_ty), mask=out_mask)
    tl.store(pre_gate_ptr + out_offsets, acc_gate.to(out_ty), mask=out_mask)
    tl.store(pre_up_ptr + out_offsets, acc_up.to(out_ty), mask=out_mask)


@triton.jit
def _down_kernel(
    hidden_ptr, down_ptr, tile_expert_ptr, tile_row_ptr, tile_end_ptr, y_ptr,
    width, inter,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    row_end = tl.load(tile_end_ptr + tile)
    rows = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < row_end
    in_cols = cols < width
    w_offset = expert * width * inter
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        in_k = ks < inter
        h = tl.load(
            hidden_ptr + rows[:, None] * inter + ks[None, :],
            mask=in_rows[:, None] & in_k[None, :],
            other=0.0,
        )
        w = tl.load(
            down_ptr + w_offset + cols[None, :] * inter + ks[:, None],
            mask=in_k[:, None] & in_cols[None, :],
            other=0.0,
        )
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    tl.store(
        y_ptr + rows[:, None] * width + cols[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=in_rows[:, None] & in_cols[None, :],
    )


def row_tiles(
    counts_N: list[int], block_m: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tile_expert, tile_row, tile_end)``: expert, first row and end row of every row tile.

    Built on the host from the host-side counts, so launching needs no device sync.
    """
    counts = torch.tensor(counts_N, dtype=torch.int64)
    tiles_N = (counts + block_m - 1) // block_m
    num_tiles = int(tiles_N.sum())
    tile_expert = torch.repeat_interleave(torch.arange(counts.numel()), tiles_N)
    first_tile_N = tiles_N.cumsum(0) - tiles_N
    start_N = counts.cumsum(0) - counts
    within = torch.arange(num_tiles) - first_tile_N[tile_expert]
    tile_row = start_N[tile_expert] + within * block_m
    tile_end = (start_N + counts)[tile_expert]
    return tuple(t.to(device) for t in (tile_expert, tile_row, tile_end))  # type: ignore[return-value]


def grouped_swiglu_forward(
    x_SD: torch.Tensor,
    gate_NID: torch.Tensor,
    up_NID: torch.Tensor,
    down_NDI: torch.Tensor,
    counts_N: list[int],
    config: GemmConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y_SD, pre_gate_SI, pre_up_SI)`` as ``torch_ref.grouped_swiglu_ref`` computes them."""
    cfg = config if config is not None else default_config(x_SD.device)
    x = x_SD.contiguous()
    gate, up, down = gate_NID.contiguous(), up_NID.contiguous(), down_NDI.contiguous()
    rows, width = x.shape
    inter = gate.shape[1]
    hidden = x.new_empty(rows, inter)
    pre_gate = x.new_empty(rows, inter)
    pre_up = x.new_empty(rows, inter)
    y = x.new_empty(rows, width)
    tile_expert, tile_row, tile_end = row_tiles(counts_N, cfg.block_m, x.device)
    num_tiles = tile_expert.numel()
    if num_tiles == 0:
        return y, pre_gate, pre_up
    upcast = x.device.type != "cuda"
    # IEEE for float32 operands (no TF32); 16-bit operands ignore the setting
    precision = "ieee" if upcast or x.dtype == torch.float32 else "tf32"
    launch = dict(
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        UPCAST=upcast,
        DOT_PRECISION=precision,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        enable_fp_fusion=True,
    )
    _gate_up_kernel[(num_tiles, triton.cdiv(inter, cfg.block_n))](
        x, gate, up, tile_expert, tile_row, tile_end, hidden, pre_gate, pre_up,
        width, inter, **launch,
    )  # fmt: skip
    _down_kernel[(num_tiles, triton.cdiv(width, cfg.block_n))](
        hidden, down, tile_expert, tile_row, tile_end, y, width, inter, **launch
    )
    return y, pre_gate, pre_up
