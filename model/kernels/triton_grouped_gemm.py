"""Triton grouped SwiGLU expert GEMM over variable-size groups (imports triton: load lazily).

Rows arrive sorted by expert. The host cuts every non-empty group into row tiles of
``block_m`` rows that never straddle two experts; each program owns one (row tile, column
tile) pair, so empty experts cost nothing and no program reads another expert's rows. Two
launches of one kernel run back to back: the ``SWIGLU`` one writes ``silu(x Wg^T) * (x Wu^T)``
(and the two pre-activations for the backward pass), the plain one multiplies by ``Wd^T``.
Both accumulate in float32. On CPU (Triton's interpreter) operands are upcast to float32
before ``tl.dot``; on CUDA, fp16/bf16 operands go to ``tl.dot`` as they are with a float32
accumulator, and float32 operands use IEEE (not TF32) precision.
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
def _tile_rows_cols(
    tile_expert_ptr, tile_row_ptr, tile_end_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """This program's expert, its row tile (with the in-expert mask) and its column tile."""
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    rows = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return expert, rows, rows < tl.load(tile_end_ptr + tile), cols


@triton.jit
def _row_tile(a_ptr, rows, in_rows, ks, depth, UPCAST: tl.constexpr):
    """``a[rows, ks]`` of a row-major [*, depth] matrix (zero outside)."""
    mask = in_rows[:, None] & (ks < depth)[None, :]
    a = tl.load(a_ptr + rows[:, None] * depth + ks[None, :], mask=mask, other=0.0)
    return a.to(tl.float32) if UPCAST else a


@triton.jit
def _weight_tile(w_ptr, cols, in_cols, ks, depth, UPCAST: tl.constexpr):
    """``w[cols, ks]^T`` of a row-major [*, depth] weight (zero outside)."""
    mask = (ks < depth)[:, None] & in_cols[None, :]
    w = tl.load(w_ptr + cols[None, :] * depth + ks[:, None], mask=mask, other=0.0)
    return w.to(tl.float32) if UPCAST else w


@triton.jit
def _expert_gemm_kernel(
    a_ptr, w_ptr, w2_ptr, tile_expert_ptr, tile_row_ptr, tile_end_ptr,
    out_ptr, pre_gate_ptr, pre_up_ptr,
    depth, n_cols,
    SWIGLU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One (row tile, column tile) of ``a W[expert]^T``: ``a`` [rows, depth], ``W`` [N, n_cols,
    depth]. ``SWIGLU``: ``W`` is the gate and ``w2`` the up weight; ``out`` gets
    ``silu(a Wg^T) * (a Wu^T)``, ``pre_gate``/``pre_up`` the two products. Otherwise ``out``
    gets the product (``w2``, ``pre_gate``, ``pre_up`` unused)."""
    expert, rows, in_rows, cols = _tile_rows_cols(
        tile_expert_ptr, tile_row_ptr, tile_end_ptr, BLOCK_M, BLOCK_N
    )
    in_cols = cols < n_cols
    w_offset = expert * n_cols * depth
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, depth, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = _row_tile(a_ptr, rows, in_rows, ks, depth, UPCAST)
        w = _weight_tile(w_ptr + w_offset, cols, in_cols, ks, depth, UPCAST)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if SWIGLU:
            wu = _weight_tile(w2_ptr + w_offset, cols, in_cols, ks, depth, UPCAST)
            acc_up = tl.dot(a, wu, acc_up, input_precision=DOT_PRECISION)
    out_offsets = rows[:, None] * n_cols + cols[None, :]
    out_mask = in_rows[:, None] & in_cols[None, :]
    out_ty = out_ptr.dtype.element_ty
    if SWIGLU:
        tl.store(pre_gate_ptr + out_offsets, acc.to(out_ty), mask=out_mask)
        tl.store(pre_up_ptr + out_offsets, acc_up.to(out_ty), mask=out_mask)
        acc = acc * tl.sigmoid(acc) * acc_up
    tl.store(out_ptr + out_offsets, acc.to(out_ty), mask=out_mask)


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
    tiles = (tile_expert, tile_row, tile_end)
    _expert_gemm_kernel[(num_tiles, triton.cdiv(inter, cfg.block_n))](
        x, gate, up, *tiles, hidden, pre_gate, pre_up, width, inter, SWIGLU=True, **launch
    )
    _expert_gemm_kernel[(num_tiles, triton.cdiv(width, cfg.block_n))](  # w2, pre_* unused
        hidden, down, down, *tiles, y, y, y, inter, width, SWIGLU=False, **launch
    )
    return y, pre_gate, pre_up
