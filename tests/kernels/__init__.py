"""Shared helpers for the kernel tests: device, routing strategies, the kernel MoE path."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import strategies as st

from longcat_sim.model.kernels.backend import triton_available
from longcat_sim.model.kernels.combine import combine
from longcat_sim.model.kernels.grouped_gemm import grouped_swiglu
from longcat_sim.model.kernels.permute import permute
from longcat_sim.model.kernels.router_topk import route
from longcat_sim.model.moe import MoE
from longcat_sim.model.router import RouterOutput

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ("torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_available(), reason="triton is not installed"
)))  # fmt: skip
requires_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@dataclass(frozen=True)
class Routing:
    """Top-k expert ids [T, K] over ``n_routed`` FFN + ``n_zero`` zero experts."""

    topk_idx_TK: torch.Tensor
    n_routed: int
    n_zero: int

    @property
    def num_tokens(self) -> int:
        return self.topk_idx_TK.shape[0]

    @property
    def topk(self) -> int:
        return self.topk_idx_TK.shape[1]


def _rows(picks: list[torch.Tensor], k: int, gen: torch.Generator) -> torch.Tensor:
    """Stack per-token picks, each shuffled so slot position does not follow expert id."""
    rows = [p[torch.randperm(k, generator=gen)] for p in picks]
    return torch.stack(rows) if rows else torch.empty(0, k, dtype=torch.int64)


@st.composite
def routings(draw: st.DrawFn, max_tokens: int = 24, max_topk: int = 4) -> Routing:
    """Distinct experts per token; includes empty groups, single tokens, every token on one
    FFN expert, and every slot on zero experts."""
    mode = draw(st.sampled_from(["random", "one_expert", "all_zero"]))
    n = draw(st.integers(1, 6))
    z = draw(st.integers(1 if mode == "all_zero" else 0, 4))
    if mode == "all_zero":
        k = draw(st.integers(1, min(z, max_topk)))
    elif mode == "one_expert":
        k = draw(st.integers(1, min(z + 1, max_topk)))
    else:
        k = draw(st.integers(1, min(n + z, max_topk)))
    t = draw(st.integers(0, max_tokens))
    busy = draw(st.integers(0, n - 1))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    picks = []
    for _ in range(t):
        if mode == "random":
            picks.append(torch.randperm(n + z, generator=gen)[:k])
        elif mode == "all_zero":
            picks.append(n + torch.randperm(z, generator=gen)[:k])
        else:
            zeros = n + torch.randperm(z, generator=gen)[: k - 1]
            picks.append(torch.cat([torch.tensor([busy]), zeros]))
    return Routing(_rows(picks, k, gen), n, z)


def random_gates(routing: Routing, gen: torch.Generator) -> torch.Tensor:
    """Positive float32 gates [T, K]."""
    return torch.rand(routing.num_tokens, routing.topk, generator=gen) * 2.0 + 0.01


def moe_with_kernels(
    moe: MoE, x_TD: torch.Tensor, backend: str
) -> tuple[torch.Tensor, RouterOutput]:
    """``MoE.forward`` rebuilt from the kernels: route, permute, grouped SwiGLU, combine."""
    routing = route(moe.router, x_TD, backend=backend)
    x_SD, perm = permute(x_TD, routing.topk_idx_TK, moe.n_routed_experts, backend=backend)
    experts = moe.experts
    dtype = x_TD.dtype
    y_SD = grouped_swiglu(
        x_SD,
        experts.gate_proj.to(dtype),
        experts.up_proj.to(dtype),
        experts.down_proj.to(dtype),
        perm.counts_N,
        backend=backend,
    )
    out_TD = combine(x_TD, y_SD, routing.topk_gate_TK, perm.row_of_slot_TK, backend=backend)
    return out_TD, routing
