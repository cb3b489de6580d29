"""Grouped SwiGLU expert GEMM over rows sorted by expert, with an explicit ``backend`` argument.

``y[rows of e] = (silu(x Wg[e]^T) * (x Wu[e]^T)) Wd[e]^T`` for every FFN expert e, where expert
e owns ``counts_N[e]`` consecutive rows (zero allowed). Accumulation is float32; the SwiGLU
hidden and the output are rounded to the input dtype. The forward runs on the chosen backend;
the backward always runs the PyTorch reference (``torch_ref.grouped_swiglu_backward_ref``,
float32, one GEMM per expert, deterministic) from the saved pre-activations.
"""

from __future__ import annotations

import torch

from longcat_sim.model.kernels import torch_ref
from longcat_sim.model.kernels.backend import Backend, check_backend, require_triton


def _check_inputs(
    x_SD: torch.Tensor,
    gate_NID: torch.Tensor,
    up_NID: torch.Tensor,
    down_NDI: torch.Tensor,
    counts: list[int],
) -> None:
    if gate_NID.dim() != 3 or up_NID.shape != gate_NID.shape:
        raise ValueError(
            f"gate_NID and up_NID must both be [N, I, D], got {tuple(gate_NID.shape)} and "
            f"{tuple(up_NID.shape)}"
        )
    n, inter, width = gate_NID.shape
    if tuple(down_NDI.shape) != (n, width, inter):
        raise ValueError(f"down_NDI must be [{n}, {width}, {inter}], got {tuple(down_NDI.shape)}")
    if x_SD.dim() != 2 or x_SD.shape[1] != width:
        raise ValueError(f"x_SD must be [rows, {width}], got {tuple(x_SD.shape)}")
    if len(counts) != n or min(counts, default=0) < 0 or sum(counts) != x_SD.shape[0]:
        raise ValueError(
            f"counts_N must give {n} non-negative per-expert row counts summing to the "
            f"{x_SD.shape[0]} rows of x_SD; got {counts}"
        )
    dtypes = {x_SD.dtype, gate_NID.dtype, up_NID.dtype, down_NDI.dtype}
    if len(dtypes) != 1:
        raise ValueError(f"x_SD and the expert weights must share one dtype, got {dtypes}")


class _GroupedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_SD, gate_NID, up_NID, down_NDI, counts: list[int], backend: Backend):  # type: ignore[override]
        if backend == "triton":
            require_triton(x_SD, gate_NID, up_NID, down_NDI)
            from longcat_sim.model.kernels import triton_grouped_gemm

            y, pre_gate, pre_up = triton_grouped_gemm.grouped_swiglu_forward(
                x_SD, gate_NID, up_NID, down_NDI, counts
            )
        else:
            y, pre_gate, pre_up = torch_ref.grouped_swiglu_ref(
                x_SD, gate_NID, up_NID, down_NDI, counts
            )
        ctx.counts = counts
        ctx.save_for_backward(x_SD, gate_NID, up_NID, down_NDI, pre_gate, pre_up)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y_SD):  # type: ignore[override]
        saved = ctx.saved_tensors  # x, gate, up, down, then the two pre-activations
        grads = torch_ref.grouped_swiglu_backward_ref(grad_y_SD, *saved, ctx.counts)
        return (*(g.to(t.dtype) for g, t in zip(grads, saved[:4], strict=True)), None, None)


def grouped_swiglu(
    x_SD: torch.Tensor,
    gate_NID: torch.Tensor,
    up_NID: torch.Tensor,
    down_NDI: torch.Tensor,
    counts_N: torch.Tensor | list[int],
    *,
    backend: Backend = "torch",
) -> torch.Tensor:
    """``y_SD`` for rows of ``x_SD`` grouped by expert, ``counts_N[e]`` rows for expert e."""
    check_backend(backend)
    counts = counts_N.tolist() if isinstance(counts_N, torch.Tensor) else list(counts_N)
    _check_inputs(x_SD, gate_NID, up_NID, down_NDI, counts)
    return _GroupedSwiGLU.apply(x_SD.contiguous(), gate_NID, up_NID, down_NDI, counts, backend)
