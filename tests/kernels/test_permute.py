"""Token permutation by expert: index maps, gathered rows, inverse and backward.

Tolerance: exact. Permutation only moves values, so both backends must agree bitwise with
the reference and with ``model.moe.plan_dispatch``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from longcat_sim.model.kernels import torch_ref
from longcat_sim.model.kernels.permute import Permutation, permute, plan_permutation, unpermute
from longcat_sim.model.moe import plan_dispatch
from tests.kernels import BACKENDS, DEVICE, Routing, routings

EXAMPLES = settings(max_examples=25)


def _x(routing: Routing, width: int = 8, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(routing.num_tokens)
    return torch.randn(routing.num_tokens, width, generator=gen).to(DEVICE, dtype)


def is_stable_expert_order(slot_S: torch.Tensor, topk_idx_TK: torch.Tensor, n_routed: int) -> bool:
    """Rows list every FFN slot once, ordered by (expert, flat slot id)."""
    flat = topk_idx_TK.reshape(-1).cpu()
    slots = slot_S.cpu().tolist()
    ffn_slots = [s for s in range(flat.numel()) if flat[s] < n_routed]
    keys = [(int(flat[s]), s) for s in slots]
    return sorted(slots) == ffn_slots and keys == sorted(keys)


@pytest.mark.parametrize("backend", BACKENDS)
@EXAMPLES
@given(routing=routings())
def test_plan_is_a_stable_sort_by_expert(backend: str, routing: Routing) -> None:
    idx = routing.topk_idx_TK.to(DEVICE)
    perm = plan_permutation(idx, routing.n_routed, backend=backend)
    assert is_stable_expert_order(perm.slot_S, idx, routing.n_routed)
    flat = idx.reshape(-1)
    assert torch.equal(
        perm.counts_N.cpu(),
        torch.bincount(flat[flat < routing.n_routed].cpu(), minlength=routing.n_routed),
    )
    assert torch.equal(perm.token_S, perm.slot_S // routing.topk)
    rows = perm.row_of_slot_TK.reshape(-1)
    assert torch.equal(rows >= 0, flat < routing.n_routed)
    assert torch.equal(rows[perm.slot_S], torch.arange(perm.num_rows, device=DEVICE))


def test_stable_order_check_rejects_unstable_order() -> None:
    """Negative control: the property above fails for a sort that is not stable."""
    idx = torch.tensor([[0, 1], [0, 2], [1, 0]])
    perm = plan_permutation(idx, n_routed=2)
    assert is_stable_expert_order(perm.slot_S, idx, 2)
    swapped = perm.slot_S.clone()
    swapped[[0, 1]] = swapped[[1, 0]]  # two expert-0 slots out of slot order
    assert not is_stable_expert_order(swapped, idx, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@EXAMPLES
@given(routing=routings())
def test_permute_matches_reference_and_moe_dispatch(backend: str, routing: Routing) -> None:
    idx = routing.topk_idx_TK.to(DEVICE)
    x = _x(routing)
    x_SD, perm = permute(x, idx, routing.n_routed, backend=backend)
    slot_ref, row_ref, counts_ref = torch_ref.plan_rows_ref(idx, routing.n_routed)
    assert torch.equal(perm.slot_S, slot_ref)
    assert torch.equal(perm.row_of_slot_TK, row_ref)
    assert torch.equal(perm.counts_N, counts_ref)
    assert torch.equal(x_SD, x[perm.token_S])
    counts_E = torch.bincount(idx.reshape(-1), minlength=routing.n_routed + routing.n_zero)
    plan = plan_dispatch(idx, counts_E, routing.n_routed)
    assert torch.equal(perm.slot_S, plan.slot_S)
    assert torch.equal(perm.token_S, plan.token_S)
    assert perm.counts_N.tolist() == list(plan.counts_N)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@settings(max_examples=10)
@given(routing=routings())
def test_unpermute_inverts_permute(backend: str, dtype: torch.dtype, routing: Routing) -> None:
    idx = routing.topk_idx_TK.to(DEVICE)
    x = _x(routing, dtype=dtype)
    x_SD, perm = permute(x, idx, routing.n_routed, backend=backend)
    back_TKD = unpermute(x_SD, perm, backend=backend)
    expected = x.unsqueeze(1).expand(-1, routing.topk, -1)
    is_ffn = (idx < routing.n_routed).unsqueeze(-1)
    assert back_TKD.dtype == dtype
    assert torch.equal(back_TKD, torch.where(is_ffn, expected, torch.zeros_like(expected)))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=15)
@given(routing=routings())
def test_backward_gathers_and_sums_slot_gradients(backend: str, routing: Routing) -> None:
    idx = routing.topk_idx_TK.to(DEVICE)
    x = _x(routing).requires_grad_()
    x_SD, perm = permute(x, idx, routing.n_routed, backend=backend)
    gen = torch.Generator().manual_seed(7)
    w_SD = torch.randn(x_SD.shape, generator=gen).to(DEVICE)
    y_TKD = unpermute(x_SD * w_SD, perm, backend=backend)
    w_TKD = torch.randn(y_TKD.shape, generator=gen).to(DEVICE)
    (y_TKD * w_TKD).sum().backward()
    # Oracle: d/dx_t of sum_k [slot k of t is FFN] * w_SD[row] * w_TKD[t, k] * x_t
    is_ffn = (idx < routing.n_routed).unsqueeze(-1)
    w_row_TKD = torch_ref.unpermute_ref(w_SD, perm.row_of_slot_TK)
    expected = torch.where(is_ffn, w_row_TKD * w_TKD, 0.0).sum(dim=1)
    torch.testing.assert_close(x.grad, expected, rtol=1e-6, atol=1e-6)


def test_permute_backward_adds_rows_in_ascending_expert_order() -> None:
    """A token's gradient is ``0 + g_row1 + g_row2 + ...`` over its rows in ascending order."""
    gen = torch.Generator().manual_seed(3)
    idx = torch.stack([torch.randperm(9, generator=gen)[:4] for _ in range(40)])
    x = torch.randn(40, 16, generator=gen, requires_grad=True)
    x_SD, perm = permute(x, idx, n_routed=6)
    grad_SD = torch.randn(x_SD.shape, generator=gen) * torch.logspace(-3, 3, 16)
    (x_SD * grad_SD).sum().backward()
    for t in range(40):
        expected = torch.zeros(16)
        for row in sorted(r for r in perm.row_of_slot_TK[t].tolist() if r >= 0):
            expected = expected + grad_SD[row]
        assert torch.equal(x.grad[t], expected), t


@pytest.mark.parametrize("backend", BACKENDS)
def test_rerun_is_bitwise_equal(backend: str) -> None:
    gen = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(12, generator=gen)[:4] for _ in range(300)]).to(DEVICE)
    x = torch.randn(300, 32, generator=gen).to(DEVICE)
    runs = [permute(x, idx, 8, backend=backend) for _ in range(2)]
    (a, pa), (b, pb) = runs
    assert torch.equal(a, b) and torch.equal(pa.row_of_slot_TK, pb.row_of_slot_TK)
    assert torch.equal(unpermute(a, pa, backend=backend), unpermute(b, pb, backend=backend))


def test_triton_plan_spans_several_blocks() -> None:
    """More slots than one planning block: ranks carry across blocks."""
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 3, (700, 1), generator=gen).to(DEVICE)  # 700 slots > 128 per block
    perm = plan_permutation(idx, 2, backend="triton")
    slot_ref, row_ref, counts_ref = torch_ref.plan_rows_ref(idx, 2)
    assert torch.equal(perm.slot_S, slot_ref) and torch.equal(perm.row_of_slot_TK, row_ref)
    assert torch.equal(perm.counts_N, counts_ref)


def test_bad_inputs_raise_clear_errors() -> None:
    idx = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        plan_permutation(idx, 2, backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative expert ids"):
        plan_permutation(torch.tensor([[0, -1]]), 2)
    with pytest.raises(ValueError, match="long"):
        plan_permutation(idx.int(), 2)
    with pytest.raises(ValueError, match="T = 1 routed tokens"):
        permute(torch.zeros(2, 4), idx, 2)
    perm = plan_permutation(idx, 2)
    assert isinstance(perm, Permutation)
    with pytest.raises(ValueError, match="S = 2 permuted rows"):
        unpermute(torch.zeros(3, 4), perm)
