"""Benchmarks of the MoE kernels: the torch path against the Triton path, kernel by kernel.

On CUDA the Triton kernels run compiled, at a slice of a LongCat-like layer in bfloat16. On
CPU they run in Triton's interpreter at toy sizes: that times the interpreter, not the
kernels, so the numbers are reported (one pytest-benchmark group per kernel) and nothing
about time is asserted anywhere. Every benchmark checks its result against the torch path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from longcat_sim.model.config import get_preset
from longcat_sim.model.kernels import torch_ref
from longcat_sim.model.kernels.combine import combine
from longcat_sim.model.kernels.grouped_gemm import grouped_swiglu
from longcat_sim.model.kernels.permute import permute
from longcat_sim.model.kernels.router_topk import router_topk
from longcat_sim.model.moe import MoE
from tests.kernels import BACKENDS, moe_with_kernels

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:  # before the first Triton kernel is defined (kernels import triton lazily)
    os.environ["TRITON_INTERPRET"] = "1"
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")


@dataclass(frozen=True)
class Shape:
    tokens: int
    hidden: int
    inter: int
    n_routed: int
    n_zero: int
    topk: int
    dtype: torch.dtype


SHAPE = (
    Shape(tokens=4096, hidden=1024, inter=512, n_routed=64, n_zero=32, topk=8, dtype=torch.bfloat16)
    if ON_CUDA
    else Shape(tokens=64, hidden=64, inter=32, n_routed=8, n_zero=4, topk=3, dtype=torch.float32)
)


@dataclass(frozen=True)
class Problem:
    logits_TE: torch.Tensor
    bias_E: torch.Tensor
    topk_idx_TK: torch.Tensor
    topk_gate_TK: torch.Tensor
    x_TD: torch.Tensor
    x_SD: torch.Tensor
    counts_N: torch.Tensor
    row_of_slot_TK: torch.Tensor
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    y_SD: torch.Tensor


@pytest.fixture(scope="module")
def problem() -> Problem:
    s, gen = SHAPE, torch.Generator().manual_seed(0)
    experts = s.n_routed + s.n_zero
    logits = torch.randn(s.tokens, experts, generator=gen).to(DEVICE)
    bias = (torch.randn(experts, generator=gen) * 1e-3).to(DEVICE)
    routing = router_topk(logits, bias, topk=s.topk, n_routed=s.n_routed,
                          routed_scaling_factor=6.0, scale_zero_expert_gates=True)  # fmt: skip
    x = torch.randn(s.tokens, s.hidden, generator=gen).to(DEVICE, s.dtype)
    x_SD, perm = permute(x, routing.topk_idx_TK, s.n_routed)
    weights = (
        (torch.randn(s.n_routed, s.inter, s.hidden, generator=gen) / s.hidden**0.5),
        (torch.randn(s.n_routed, s.inter, s.hidden, generator=gen) / s.hidden**0.5),
        (torch.randn(s.n_routed, s.hidden, s.inter, generator=gen) / s.inter**0.5),
    )
    weights = tuple(w.to(DEVICE, s.dtype) for w in weights)
    y_SD, _, _ = torch_ref.grouped_swiglu_ref(x_SD, *weights, perm.counts_N.tolist())
    return Problem(logits, bias, routing.topk_idx_TK, routing.topk_gate_TK, x, x_SD,
                   perm.counts_N, perm.row_of_slot_TK, weights, y_SD)  # fmt: skip


def measure(benchmark: Any, kernel: str, backend: str, fn: Callable[[], Any]) -> Any:
    """Time ``fn`` (synchronising CUDA) and label the result for the report."""
    benchmark.group = f"moe kernel: {kernel}"
    benchmark.extra_info.update(
        backend=backend,
        device=str(DEVICE),
        triton_interpreter=not ON_CUDA and backend == "triton",
        shape={k: str(v) for k, v in vars(SHAPE).items()},
    )

    def timed() -> Any:
        out = fn()
        if ON_CUDA:
            torch.cuda.synchronize()
        return out

    rounds, warmup = (20, 3) if ON_CUDA else (3, 1)
    return benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_router_topk(benchmark: Any, problem: Problem, backend: str) -> None:
    out = measure(benchmark, "router_topk", backend, lambda: router_topk(
        problem.logits_TE, problem.bias_E, topk=SHAPE.topk, n_routed=SHAPE.n_routed,
        routed_scaling_factor=6.0, scale_zero_expert_gates=True, backend=backend,
    ))  # fmt: skip
    assert torch.equal(out.topk_idx_TK, problem.topk_idx_TK)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_permute(benchmark: Any, problem: Problem, backend: str) -> None:
    x_SD, perm = measure(benchmark, "permute", backend, lambda: permute(
        problem.x_TD, problem.topk_idx_TK, SHAPE.n_routed, backend=backend
    ))  # fmt: skip
    assert torch.equal(x_SD, problem.x_SD)
    assert torch.equal(perm.row_of_slot_TK, problem.row_of_slot_TK)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_grouped_swiglu(benchmark: Any, problem: Problem, backend: str) -> None:
    y_SD = measure(benchmark, "grouped_swiglu", backend, lambda: grouped_swiglu(
        problem.x_SD, *problem.weights, problem.counts_N, backend=backend
    ))  # fmt: skip
    scale = problem.y_SD.float().abs().max().item()
    tol = 1e-5 if SHAPE.dtype == torch.float32 else 2 * 2.0**-7
    torch.testing.assert_close(y_SD.float(), problem.y_SD.float(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_combine(benchmark: Any, problem: Problem, backend: str) -> None:
    out = measure(benchmark, "combine", backend, lambda: combine(
        problem.x_TD, problem.y_SD, problem.topk_gate_TK, problem.row_of_slot_TK, backend=backend
    ))  # fmt: skip
    want = torch_ref.combine_ref(
        problem.x_TD, problem.y_SD, problem.topk_gate_TK, problem.row_of_slot_TK
    )
    assert torch.equal(out, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_moe_forward(benchmark: Any, backend: str) -> None:
    """The whole routed-expert layer rebuilt from the four kernels (forward only)."""
    s = SHAPE
    cfg = get_preset("tiny").replace(
        hidden_size=s.hidden, expert_ffn_hidden_size=s.inter, n_routed_experts=s.n_routed,
        zero_expert_num=s.n_zero, moe_topk=s.topk,
        target_ffn_experts=float(min(s.topk, s.n_routed)) * 2 / 3,
    )  # fmt: skip
    moe = MoE(cfg, generator=torch.Generator().manual_seed(1)).to(DEVICE, s.dtype)
    x = torch.randn(s.tokens, s.hidden, generator=torch.Generator().manual_seed(2)).to(
        DEVICE, s.dtype
    )
    with torch.no_grad():
        out, _ = measure(
            benchmark, "moe_forward", backend, lambda: moe_with_kernels(moe, x, backend)
        )
        want, _ = moe(x)
    tol = 1e-5 if s.dtype == torch.float32 else 2 * 2.0**-7
    scale = want.float().abs().max().item()
    torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol * scale)
