"""Deterministic weighted combine, and the whole MoE path rebuilt from the kernels.

Tolerance: exact. Both backends run the same float32 operations in the same order as the
reference, so they must agree bitwise, and for float32 (K <= 4, where ``torch.sum`` over K
adds in slot order on CPU) bitwise with ``model.moe.MoE``'s own combine.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from longcat_sim.model.config import get_preset
from longcat_sim.model.kernels import torch_ref
from longcat_sim.model.kernels.combine import combine
from longcat_sim.model.kernels.permute import permute
from longcat_sim.model.kernels.reference import moe_reference_from_module
from longcat_sim.model.moe import MoE
from tests.kernels import BACKENDS, DEVICE, Routing, moe_with_kernels, random_gates, routings

WIDTH = 24


def make_inputs(routing: Routing, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    idx = routing.topk_idx_TK.to(DEVICE)
    x = torch.randn(routing.num_tokens, WIDTH, generator=gen).to(DEVICE, dtype)
    _, perm = permute(x, idx, routing.n_routed)
    y = (torch.randn(perm.num_rows, WIDTH, generator=gen) * 10).to(DEVICE, dtype)
    gate = random_gates(routing, gen).to(DEVICE)
    return x, y, gate, perm.row_of_slot_TK


def combine_token_by_token(x, y, gate, row_of_slot):
    """Independent oracle: Python loops over tokens, in the documented order."""
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        rows = row_of_slot[t].tolist()
        zero_gate = torch.zeros((), dtype=torch.float32, device=x.device)
        for k, r in enumerate(rows):
            if r < 0:
                zero_gate = zero_gate + gate[t, k]
        acc = x[t].float() * zero_gate
        for r in sorted(r for r in rows if r >= 0):
            acc = acc + y[r].float() * gate[t, rows.index(r)]
        out[t] = acc
    return out.to(x.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@settings(max_examples=20)
@given(routing=routings())
def test_combine_matches_token_loop_bitwise(
    backend: str, dtype: torch.dtype, routing: Routing
) -> None:
    x, y, gate, rows = make_inputs(routing, dtype)
    out = combine(x, y, gate, rows, backend=backend)
    assert out.dtype == dtype
    assert torch.equal(out, combine_token_by_token(x, y, gate, rows))
    assert torch.equal(out, torch_ref.combine_ref(x, y, gate, rows))


def test_bitwise_checks_see_the_summation_order() -> None:
    """Negative control: the same terms added in slot order instead of row order differ in
    the last bits, so the bitwise assertions above would catch an order change."""
    gen = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(6, generator=gen)[:4] for _ in range(32)])
    x, y, gate, rows = make_inputs(Routing(idx, n_routed=5, n_zero=1), torch.float32)
    by_row = combine_token_by_token(x, y, gate, rows)
    by_slot = torch.empty_like(by_row)
    for t in range(32):
        acc = x[t] * torch.where(rows[t] < 0, gate[t], 0.0).sum()
        for k in range(4):
            if rows[t, k] >= 0:
                acc = acc + y[rows[t, k]] * gate[t, k]
        by_slot[t] = acc
    torch.testing.assert_close(by_slot, by_row, rtol=1e-5, atol=1e-4)
    assert not torch.equal(by_slot, by_row)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_combine_is_bitwise_moe_combine(backend: str, seed: int) -> None:
    """float32, tiny preset (K = 3): the kernel reproduces ``MoE.forward`` bit for bit."""
    cfg = get_preset("tiny")
    moe = MoE(cfg, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    with torch.no_grad():  # push a good share of picks onto zero experts
        moe.router.e_score_correction_bias[cfg.n_routed_experts :] = 0.02
    x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(seed + 10))
    x = x.to(DEVICE)
    out_ref, routing = moe(x)
    x_SD, perm = permute(x, routing.topk_idx_TK, cfg.n_routed_experts, backend=backend)
    y_SD = moe.experts(x_SD, perm.counts_N)
    zero_picks = (routing.topk_idx_TK >= cfg.n_routed_experts).sum(dim=1)
    assert (zero_picks > 0).any() and (zero_picks < cfg.moe_topk - 1).any()
    out = combine(x, y_SD, routing.topk_gate_TK, perm.row_of_slot_TK, backend=backend)
    assert torch.equal(out, out_ref)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=10)
@given(routing=routings())
def test_backward_matches_autograd_of_reference(backend: str, routing: Routing) -> None:
    x, y, gate, rows = make_inputs(routing, torch.float32, seed=3)
    leaves = [t.clone().requires_grad_() for t in (x, y, gate)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, y, gate)]
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    (combine(*leaves, rows, backend=backend) * w).sum().backward()
    (torch_ref.combine_ref(*ref_leaves, rows) * w).sum().backward()
    for got, want in zip(leaves, ref_leaves, strict=True):
        want_grad = torch.zeros_like(want) if want.grad is None else want.grad  # unused input
        torch.testing.assert_close(got.grad, want_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rerun_is_bitwise_equal(backend: str) -> None:
    gen = torch.Generator().manual_seed(5)
    idx = torch.stack([torch.randperm(12, generator=gen)[:4] for _ in range(200)])
    x, y, gate, rows = make_inputs(Routing(idx, 8, 4), torch.float32)
    assert torch.equal(
        combine(x, y, gate, rows, backend=backend), combine(x, y, gate, rows, backend=backend)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_moe_path_matches_moe_and_naive_oracle(backend: str) -> None:
    """route -> permute -> grouped SwiGLU -> combine reproduces ``MoE`` (forward and grads)
    and the float64 token-by-token oracle. torch: forward bitwise; triton: float32 GEMMs
    accumulate in a different order, so 1e-5 relative to the output scale."""
    cfg = get_preset("tiny")
    moe = MoE(cfg, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        moe.router.e_score_correction_bias.normal_(
            0.0, 0.01, generator=torch.Generator().manual_seed(4)
        )
    x = torch.randn(48, cfg.hidden_size, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    x_ref = x.clone().requires_grad_()
    out_ref, routing_ref = moe(x_ref)
    out_ref.square().sum().backward()
    grads_ref = [x_ref.grad] + [p.grad.clone() for p in moe.parameters()]
    moe.zero_grad()
    x_k = x.clone().requires_grad_()
    out, routing = moe_with_kernels(moe, x_k, backend)
    assert torch.equal(routing.topk_idx_TK, routing_ref.topk_idx_TK)
    if backend == "torch":
        assert torch.equal(out, out_ref)
    scale = out_ref.abs().max().item()
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5 * scale)
    naive = moe_reference_from_module(x.cpu(), cfg, moe.cpu()).to(DEVICE)
    torch.testing.assert_close(out.double(), naive, rtol=1e-5, atol=1e-5 * scale)
    moe.to(DEVICE)
    out.square().sum().backward()
    for got, want in zip([x_k.grad] + [p.grad for p in moe.parameters()], grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_bad_inputs_raise_clear_errors() -> None:
    x = torch.zeros(2, 4)
    y = torch.zeros(1, 4)
    gate = torch.ones(2, 2)
    rows = torch.tensor([[0, -1], [-1, -1]])
    with pytest.raises(ValueError, match="must share D"):
        combine(x, torch.zeros(1, 5), gate, rows)
    with pytest.raises(ValueError, match="long tensor shaped like"):
        combine(x, y, gate, rows.int())
    with pytest.raises(ValueError, match="points past the 1 rows"):
        combine(x, y, gate, torch.tensor([[0, 1], [-1, -1]]))
    with pytest.raises(ValueError, match="unknown kernel backend"):
        combine(x, y, gate, rows, backend="cpu")  # type: ignore[arg-type]
