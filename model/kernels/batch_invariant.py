"""Batch-invariant CPU replacements: a row's result never depends on the other rows of the call.

A BLAS GEMM is free to pick its kernel, blocking and thread split from the problem shape, so
the same row multiplied inside a 2-row, a 5-row or a 64-row call can round differently (MKL on
x86 does: small M takes another path, and an odd row left over by the thread split takes
another micro-kernel). The functions here remove the shape from the picture:

- :func:`mm_rows` gives every GEMM call a multiple of ``ROWS`` = 8 rows: the whole multiples
  in one call, the remainder zero-padded to 8 rows in a second. With ``tile=t`` (8, 16, 32)
  every call is exactly ``[t, K] x [K, N]``, the fixed-shape form. MKL computes each row of a
  call whose row count is a multiple of 8 exactly as in that form, on 1 and 2 threads
  (``tests/repro/test_batch_invariant.py`` checks the equivalence bitwise, with and without
  ``accumulate``); the rows it treats differently are those of calls with fewer than 8 rows
  (a GEMV for one row, other kernels for 2-3, an uneven thread split for 5-7). So the
  one-call form is batch-invariant at the GEMM's full speed: a row's result depends on the row
  alone, wherever it sits and however many rows travel with it.
- :func:`mm_t_rows` is the transposed product ``a^T b`` (a weight gradient, a sum over rows):
  one GEMM whose output rows are padded to a multiple of 8 (MKL splits a GEMM's output, never
  its summed dimension, between threads; only outputs of fewer than 8 rows split unevenly).
  Its ``tile=t`` form computes ``t`` output rows per call, each summing over all the rows;
  the same test file checks it bitwise against the one-call form.
- Both write a given ``out`` of any layout bit for bit as they would a fresh contiguous
  tensor (MKL's result can depend on the output's row stride; a non-contiguous ``out`` goes
  through a contiguous buffer).
- :func:`linear` / :class:`BatchInvariantLinear`: ``x W^T`` forward and both backward products
  built from the two above.
- :func:`causal_attention`: softmax attention by query blocks of ``ATTN_CHUNK`` positions, each
  against exactly the keys up to its block, so padding a sequence, or batching it with others,
  leaves its rows bit for bit unchanged (keys after a position get an exact zero weight).
- :func:`silu`, :func:`silu_grad`: ATen's SiLU run on aligned lengths so that every element
  takes the vector path (its scalar tail rounds differently); :func:`softmax` from per-row
  ops (the fused kernel's backward vectorises across short rows, split by threads).
- :func:`fixed_order_sum` and :func:`slot_sum`: sums whose association order is fixed by the
  data size alone (never by the thread count), for gradient norms and the MoE's gate sums.

All of it is plain torch; results equal the default ops up to rounding, and each is its own
reference for invariance (tests compare rows computed alone and inside batches bitwise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ROWS = 8  # every GEMM call here has a multiple of this many rows (never 1-7)
ATTN_CHUNK = 32
SUM_CHUNK = 1024


def _check_mm(name: str, a: torch.Tensor, b: torch.Tensor, inner: int) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[inner] != b.shape[0]:
        raise ValueError(f"{name}: incompatible shapes {tuple(a.shape)} and {tuple(b.shape)}")


def _check_out(name: str, out: torch.Tensor, shape: tuple[int, int]) -> None:
    if tuple(out.shape) != shape:
        raise ValueError(f"{name}: out has shape {tuple(out.shape)}, expected {shape}")


def mm_rows(
    a_MK: torch.Tensor,
    b_KN: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    tile: int | None = None,
) -> torch.Tensor:
    """``a @ b`` with every GEMM call's row count a multiple of ``ROWS`` (no autograd).

    The whole multiples go through one call, the remaining rows through one call of ``ROWS``
    zero-padded rows. ``tile=t`` instead makes every call exactly ``[t, K] x [K, N]``: the
    fixed-shape form, slower, kept as the reference the one-call form is tested against.
    Written into ``out`` when given (``[M, N]``, any layout: a non-contiguous one goes through
    a contiguous buffer, so the bits do not depend on it); with ``accumulate`` the product is
    added to ``out`` inside the same GEMM calls (``out += a @ b``).
    """
    _check_mm("mm_rows", a_MK, b_KN, 1)
    if tile is not None and (tile <= 0 or tile % ROWS):
        raise ValueError(f"mm_rows: tile must be a positive multiple of {ROWS}, got {tile}")
    rows = a_MK.shape[0]
    if out is None:
        if accumulate:
            raise ValueError("mm_rows: accumulate needs out")
        out = a_MK.new_empty(rows, b_KN.shape[1])
    else:
        _check_out("mm_rows", out, (rows, b_KN.shape[1]))
        if not out.is_contiguous():
            buffer = (
                out.contiguous()
                if accumulate
                else torch.empty_like(out, memory_format=torch.contiguous_format)
            )
            mm_rows(a_MK, b_KN, out=buffer, accumulate=accumulate, tile=tile)
            return out.copy_(buffer)
    step = tile or rows - rows % ROWS
    done = rows - rows % step if step else 0
    for start in range(0, done, step or 1):
        if accumulate:
            out[start : start + step].addmm_(a_MK[start : start + step], b_KN)
        else:
            torch.mm(a_MK[start : start + step], b_KN, out=out[start : start + step])
    left = rows - done
    if left:
        pad_rows = tile or ROWS
        padded = a_MK.new_zeros(pad_rows, a_MK.shape[1])
        padded[:left] = a_MK[done:]
        if accumulate:
            acc = out.new_zeros(pad_rows, out.shape[1])
            acc[:left] = out[done:]
            out[done:] = acc.addmm_(padded, b_KN)[:left]
        else:
            out[done:] = torch.mm(padded, b_KN)[:left]
    return out


def mm_t_rows(
    a_MN: torch.Tensor,
    b_MK: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    tile: int | None = None,
) -> torch.Tensor:
    """``a^T @ b`` (a sum over the M rows, e.g. a weight gradient), written into ``out`` when
    given (any layout), thread-count invariant.

    One GEMM whose output has N rows padded to a multiple of ``ROWS``: MKL splits the output
    of a GEMM between threads (never the summed dimension), and only an output of fewer than 8
    rows is split unevenly enough to change a row's kernel. ``tile=t`` instead computes ``t``
    output rows per call (``[t, M] x [M, K]``, the last tile zero-padded), each summing over
    all M rows: the fixed-shape reference.
    """
    _check_mm("mm_t_rows", a_MN.t(), b_MK, 1)
    n_out = a_MN.shape[1]
    if out is not None:
        _check_out("mm_t_rows", out, (n_out, b_MK.shape[1]))
    if tile is not None and (tile <= 0 or tile % ROWS):
        raise ValueError(f"mm_t_rows: tile must be a positive multiple of {ROWS}, got {tile}")
    n_pad = n_out + (-n_out) % (tile or ROWS)
    if n_pad != n_out:
        a_MN = F.pad(a_MN, (0, n_pad - n_out))
    direct = out is not None and n_pad == n_out and out.is_contiguous()
    out_NK = out if direct else a_MN.new_empty(n_pad, b_MK.shape[1])
    width = tile or max(n_pad, 1)  # output rows per GEMM call
    for start in range(0, n_pad, width):
        torch.mm(a_MN[:, start : start + width].t(), b_MK, out=out_NK[start : start + width])
    if out is None or direct:
        return out_NK[:n_out]
    return out.copy_(out_NK[:n_out])


class _Linear(torch.autograd.Function):
    """``y = x W^T``: forward and ``dx`` row-tiled, ``dW`` accumulated tile by tile."""

    @staticmethod
    def forward(ctx, x_MK, weight_NK):  # type: ignore[override]
        ctx.save_for_backward(x_MK, weight_NK)
        return mm_rows(x_MK, weight_NK.t())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_MN):  # type: ignore[override]
        x_MK, weight_NK = ctx.saved_tensors
        grad_MN = grad_MN.contiguous()
        grad_x = mm_rows(grad_MN, weight_NK) if ctx.needs_input_grad[0] else None
        grad_w = mm_t_rows(grad_MN, x_MK) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def linear(
    x: torch.Tensor, weight_NK: torch.Tensor, bias_N: torch.Tensor | None = None
) -> torch.Tensor:
    """Batch-invariant ``F.linear``: leading dimensions of ``x`` are flattened into rows."""
    if x.shape[-1] != weight_NK.shape[1]:
        raise ValueError(
            f"linear: input width {x.shape[-1]} does not match weight {tuple(weight_NK.shape)}"
        )
    weight = weight_NK if weight_NK.dtype == x.dtype else weight_NK.to(x.dtype)
    rows_MK = x.reshape(-1, x.shape[-1]).contiguous()
    out = _Linear.apply(rows_MK, weight).reshape(*x.shape[:-1], weight_NK.shape[0])
    return out if bias_N is None else out + bias_N


class BatchInvariantLinear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) computed by :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def linear_class(deterministic: bool) -> type[nn.Linear]:
    """The linear layer a model built with ``cfg.deterministic`` uses."""
    return BatchInvariantLinear if deterministic else nn.Linear


def causal_attention(
    q_BhTd: torch.Tensor, k_BhTd: torch.Tensor, v_BhTv: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal softmax attention, batch-, padding- and thread-invariant (differentiable).

    Queries are taken in blocks of ``ATTN_CHUNK`` positions (the last block padded). Block i
    attends to the keys ``[0, (i + 1) * ATTN_CHUNK)``: its score GEMM, softmax and output GEMM
    have shapes fixed by i alone, never by the sequence's total (padded) length or the batch,
    and keys after a query's position get an exact zero weight.
    """
    batch, heads, seq, _ = q_BhTd.shape
    chunk = ATTN_CHUNK
    blocks = -(-seq // chunk)
    pad = blocks * chunk - seq

    def rows(t: torch.Tensor) -> torch.Tensor:  # [B, h, T, x] -> [B*h, n*C, x]
        t = F.pad(t, (0, 0, 0, pad)) if pad else t
        return t.reshape(batch * heads, blocks * chunk, t.shape[-1])

    q, k, v = rows(q_BhTd), rows(k_BhTd), rows(v_BhTv)
    pos = torch.arange(blocks * chunk, device=q.device)
    outs = []
    for i in range(blocks):
        end = (i + 1) * chunk
        scores = torch.matmul(q[:, i * chunk : end], k[:, :end].transpose(1, 2)) * scale
        future = pos[None, :end] > pos[i * chunk : end, None]
        scores = scores.masked_fill(future, float("-inf"))
        weights = torch.exp(scores - scores.detach().amax(dim=-1, keepdim=True))
        denom = weights.sum(dim=-1, keepdim=True)
        outs.append(torch.matmul(weights, v[:, :end]) / denom)
    out = torch.cat(outs, dim=1) if blocks > 1 else outs[0]
    return out.reshape(batch, heads, blocks * chunk, -1)[:, :, :seq]


# ATen's elementwise kernels split a run of n >= GRAIN elements into one contiguous chunk per
# task (ceil(n / tasks) each, tasks = min(threads, ceil(n / GRAIN))) and run each chunk through a
# vector loop of 2 x the vector width, leaving (chunk length mod step) elements to a scalar
# loop. For SiLU the two loops use different formulas that disagree in the last bit for a few
# percent of inputs. :func:`_aligned` only ever hands ATen runs without a scalar remainder:
# multiples of ALIGN (64 elements x lcm(1..8): any thread count up to 8, vectors up to 512
# bits), then a multiple of 128 shorter than ALIGN (at most 2 tasks, chunks multiples of 64),
# then the last few elements zero-padded to 128.
GRAIN = 32768
STEP = 64
ALIGN = STEP * 840


def _aligned(op, out: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """``op(*inputs, out=...)`` over flat runs that take the vector path end to end."""
    flat_out = out.view(-1)
    flat_in = [t.reshape(-1) for t in inputs]
    n = flat_out.numel()
    body = n - n % ALIGN
    middle = n - (n - body) % (2 * STEP)
    for lo, hi in ((0, body), (body, middle)):
        if hi > lo:
            op(*(t[lo:hi] for t in flat_in), out=flat_out[lo:hi])
    if n > middle:
        padded = [t.new_zeros(2 * STEP) for t in flat_in]
        for dst, src in zip(padded, flat_in, strict=True):
            dst[: n - middle] = src[middle:]
        flat_out[middle:] = op(*padded, out=out.new_empty(2 * STEP))[: n - middle]
    return out


def _silu_out(x: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.silu.out(x, out=out)


def _silu_backward_out(grad: torch.Tensor, x: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.silu_backward.grad_input(grad, x, grad_input=out)


def silu_forward(x: torch.Tensor) -> torch.Tensor:
    """ATen's SiLU with every element through its vector path (no autograd)."""
    x = x.contiguous()
    return _aligned(_silu_out, torch.empty_like(x), x)


def silu_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad * silu'(x)``: ATen's SiLU backward, every element through its vector path."""
    grad, x = grad.contiguous(), x.contiguous()
    return _aligned(_silu_backward_out, torch.empty_like(x), grad, x)


class _SiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        x = x.contiguous()
        ctx.save_for_backward(x)
        return silu_forward(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return silu_grad(grad, x)


def silu(x: torch.Tensor) -> torch.Tensor:
    """ATen's SiLU (differentiable) with every element computed by the same vector formula,
    wherever it sits in the tensor and however many threads share the work (see ``ALIGN``)."""
    return _SiLU.apply(x)


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension from per-row ops (max, exp, sum, divide).

    The fused CPU kernel's backward vectorises across rows when the row is short (e.g. 12
    experts), and which rows share a vector depends on how rows are split between threads; this
    composition (and its autograd backward) treats every row alike.
    """
    e = torch.exp(x - x.detach().amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


def fixed_order_sum(x: torch.Tensor, *, chunk: int = SUM_CHUNK) -> torch.Tensor:
    """Sum of all elements as a tree of ``chunk``-wide row sums (a shorter last piece summed on
    its own): the association order depends on ``x.numel()`` only, whatever the thread count
    (a plain ``sum`` over more than 32k elements is split between threads)."""
    flat = x.reshape(-1)
    if flat.numel() == 0:
        return flat.new_zeros(())
    while flat.numel() > 1:
        n = flat.numel()
        full = n - n % chunk
        parts = []
        if full:
            parts.append(flat[:full].view(-1, chunk).sum(dim=1))
        if n > full:
            parts.append(flat[full:].sum().reshape(1))
        flat = torch.cat(parts) if len(parts) > 1 else parts[0]
    return flat.reshape(())


def slot_sum(x_TK: torch.Tensor) -> torch.Tensor:
    """``x_TK.sum(-1)`` as ``((x0 + x1) + x2) + ...``: slot order for any K."""
    out_T = x_TK[..., 0]
    for k in range(1, x_TK.shape[-1]):
        out_T = out_T + x_TK[..., k]
    return out_T
