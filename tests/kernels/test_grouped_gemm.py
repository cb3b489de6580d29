"""Grouped SwiGLU expert GEMM over variable-size groups.

Tolerances against the float32 reference (``torch_ref.grouped_swiglu_ref``), with
``scale = max |y_ref|``: float32 ``|y - y_ref| <= 1e-5 * scale + 1e-5 * |y_ref|`` (only the
order of float32 accumulation differs); fp16 and bf16 ``<= 2 eps * scale + 2 eps * |y_ref|``
with eps = 2^-10 (fp16), 2^-7 (bf16): the hidden and the output are rounded to the input
dtype, so a last-bit rounding flip of either is allowed. Gradients (torch backward from the
saved pre-activations) are checked against autograd through plain per-expert float64 ops.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from longcat_sim.model.config import get_preset
from longcat_sim.model.experts import GroupedExperts
from longcat_sim.model.kernels import torch_ref
from longcat_sim.model.kernels.grouped_gemm import grouped_swiglu
from tests.kernels import BACKENDS, DEVICE, requires_triton

TOLERANCE = {
    torch.float32: 1e-5,
    torch.float16: 2 * 2.0**-10,
    torch.bfloat16: 2 * 2.0**-7,
}


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    scale = expected.float().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale)


def make_problem(
    counts: list[int], width: int, inter: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n = len(counts)
    x = torch.randn(sum(counts), width, generator=gen)
    gate = torch.randn(n, inter, width, generator=gen) / width**0.5
    up = torch.randn(n, inter, width, generator=gen) / width**0.5
    down = torch.randn(n, width, inter, generator=gen) / inter**0.5
    return tuple(t.to(DEVICE, dtype) for t in (x, gate, up, down))  # type: ignore[return-value]


def naive_swiglu_f64(x, gate, up, down, counts):
    """Plain per-expert float64 SwiGLU, differentiable by autograd."""
    outs, start = [], 0
    for e, c in enumerate(counts):
        xe = x[start : start + c].double()
        h = F.silu(xe @ gate[e].double().t()) * (xe @ up[e].double().t())
        outs.append(h @ down[e].double().t())
        start += c
    return torch.cat(outs) if outs else x.new_zeros(0, x.shape[1], dtype=torch.float64)


counts_strategy = st.one_of(
    st.lists(st.integers(0, 40), min_size=1, max_size=5),  # includes empty groups
    st.integers(1, 70).map(lambda c: [0, c, 0]),  # every row on one expert
    st.just([1]),  # a single row
    st.just([0, 0, 0]),  # no rows at all
)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@settings(max_examples=10)
@given(counts=counts_strategy, width=st.sampled_from([16, 40]), inter=st.sampled_from([32, 48]))
def test_triton_matches_reference(
    dtype: torch.dtype, counts: list[int], width: int, inter: int
) -> None:
    x, gate, up, down = make_problem(counts, width, inter, dtype)
    y = grouped_swiglu(x, gate, up, down, counts, backend="triton")
    y_ref, _, _ = torch_ref.grouped_swiglu_ref(x, gate, up, down, counts)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close_scaled(y, y_ref, TOLERANCE[dtype])


@requires_triton
def test_cuda_tiling_on_this_device_matches_reference() -> None:
    """The CUDA tile sizes (64 x 64 x 32) also agree, so both configs are exercised here."""
    from longcat_sim.model.kernels import triton_grouped_gemm as tgg

    counts = [70, 0, 3, 129]
    x, gate, up, down = make_problem(counts, 96, 80, torch.float32, seed=4)
    y, pre_gate, pre_up = tgg.grouped_swiglu_forward(x, gate, up, down, counts, tgg.CUDA_CONFIG)
    y_ref, pre_gate_ref, pre_up_ref = torch_ref.grouped_swiglu_ref(x, gate, up, down, counts)
    for got, want in ((y, y_ref), (pre_gate, pre_gate_ref), (pre_up, pre_up_ref)):
        assert_close_scaled(got, want, TOLERANCE[torch.float32])


@requires_triton
def test_row_tiles_cover_each_expert_without_straddling() -> None:
    from longcat_sim.model.kernels.triton_grouped_gemm import row_tiles

    counts = [5, 0, 64, 65, 1, 0]
    tile_expert, tile_row, tile_end = row_tiles(counts, block_m=32)
    starts = [sum(counts[:e]) for e in range(len(counts))]
    covered = []
    for e, r, end in zip(tile_expert.tolist(), tile_row.tolist(), tile_end.tolist(), strict=True):
        assert end == starts[e] + counts[e] and starts[e] <= r < end
        covered += list(range(r, min(r + 32, end)))
    assert covered == list(range(sum(counts)))
    assert tile_expert.tolist() == [0, 2, 2, 3, 3, 3, 4]


def test_torch_backend_matches_grouped_experts_module() -> None:
    """The reference is the model's expert computation in float32."""
    cfg = get_preset("tiny")
    experts = GroupedExperts(cfg, generator=torch.Generator().manual_seed(2))
    counts = [3, 0, 7, 1, 0, 0, 9, 2]
    x = torch.randn(sum(counts), cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    y = grouped_swiglu(x, experts.gate_proj, experts.up_proj, experts.down_proj, counts)
    torch.testing.assert_close(y, experts(x, counts), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_matches_autograd(backend: str, dtype: torch.dtype) -> None:
    counts = [9, 0, 1, 33]
    x, gate, up, down = make_problem(counts, 40, 48, dtype, seed=1)
    leaves = [t.clone().requires_grad_() for t in (x, gate, up, down)]
    y = grouped_swiglu(*leaves, counts, backend=backend)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    (y.float() * w).sum().backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, gate, up, down)]
    (naive_swiglu_f64(*ref_leaves, counts) * w.double()).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 4 * 2.0**-10
    for got, want in zip(leaves, ref_leaves, strict=True):
        assert got.grad.dtype == dtype
        assert_close_scaled(got.grad, want.grad, tol)
    assert torch.count_nonzero(leaves[1].grad[1]) == 0  # the empty expert gets no gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_rerun_is_bitwise_equal(backend: str) -> None:
    counts = [17, 0, 40, 2]
    x, gate, up, down = make_problem(counts, 48, 64, torch.float16, seed=3)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, gate, up, down)]
        y = grouped_swiglu(*leaves, counts, backend=backend)
        y.float().square().sum().backward()
        runs.append([y.detach(), *(t.grad for t in leaves)])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_bad_inputs_raise_clear_errors() -> None:
    x, gate, up, down = make_problem([2, 3], 16, 32, torch.float32)
    with pytest.raises(ValueError, match="summing to the 5 rows"):
        grouped_swiglu(x, gate, up, down, [2, 2])
    with pytest.raises(ValueError, match="non-negative"):
        grouped_swiglu(x, gate, up, down, [6, -1])
    with pytest.raises(ValueError, match="down_NDI must be"):
        grouped_swiglu(x, gate, up, down.transpose(1, 2), [2, 3])
    with pytest.raises(ValueError, match="share one dtype"):
        grouped_swiglu(x.half(), gate, up, down, [2, 3])
    with pytest.raises(ValueError, match="unknown kernel backend"):
        grouped_swiglu(x, gate, up, down, [2, 3], backend="Triton")  # type: ignore[arg-type]
