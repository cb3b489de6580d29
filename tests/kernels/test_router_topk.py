"""Fused router top-k with expert bias.

Tolerances: selection exact and counts exact; Triton scores and gates within
``rtol=1e-5, atol=1e-6`` of ``torch.softmax`` (exp and the sum differ in the last bits).
Selections are compared where the K-th and (K+1)-th biased scores are more than 1e-5 apart;
exact ties follow the documented rule (lower expert id first), checked separately. The torch
backend is ``TopkRouter``'s arithmetic and must match it bitwise.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from longcat_sim.model.config import get_preset
from longcat_sim.model.kernels import torch_ref
from longcat_sim.model.kernels.reference import reference_route
from longcat_sim.model.kernels.router_topk import route, router_topk
from longcat_sim.model.kernels.torch_ref import TopkOptions
from longcat_sim.model.router import TopkRouter
from tests.kernels import BACKENDS, DEVICE, requires_triton

SCORE_TOL = dict(rtol=1e-5, atol=1e-6)


@st.composite
def router_problems(draw: st.DrawFn):
    n = draw(st.integers(1, 24))
    z = draw(st.integers(0, 12))
    k = draw(st.integers(1, min(n + z, 8)))
    t = draw(st.integers(0, 20))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    spread = draw(st.sampled_from([0.1, 1.0, 8.0]))
    logits = (torch.randn(t, n + z, generator=gen) * spread).to(DEVICE)
    bias = (torch.randn(n + z, generator=gen) * draw(st.sampled_from([0.0, 0.01, 0.3]))).to(DEVICE)
    scaling = draw(st.sampled_from([1.0, 2.5, 6.0]))
    return logits, bias, dict(topk=k, n_routed=n, routed_scaling_factor=scaling)


def kth_margin(scores: torch.Tensor, bias: torch.Tensor, k: int) -> float:
    """Smallest gap, over tokens, between the K-th and (K+1)-th biased scores."""
    if scores.shape[0] == 0 or k >= scores.shape[1]:
        return float("inf")
    top = torch.topk(scores + bias, k + 1, dim=-1).values
    return (top[:, k - 1] - top[:, k]).min().item()


@requires_triton
@pytest.mark.parametrize("scale_zero", [True, False])
@settings(max_examples=25)
@given(problem=router_problems())
def test_triton_matches_reference(scale_zero: bool, problem) -> None:
    logits, bias, kw = problem
    ref = torch_ref.router_topk_ref(
        logits, bias, TopkOptions(scale_zero_expert_gates=scale_zero, **kw)
    )
    assume(kth_margin(ref[2], bias, kw["topk"]) > 1e-5)
    out = router_topk(logits, bias, scale_zero_expert_gates=scale_zero, backend="triton", **kw)
    assert torch.equal(out.topk_idx_TK, ref[0])
    torch.testing.assert_close(out.topk_gate_TK, ref[1], **SCORE_TOL)
    torch.testing.assert_close(out.scores_TE, ref[2], **SCORE_TOL)
    assert torch.equal(out.counts_E, ref[3])
    assert out.counts_E.dtype == torch.int64 and out.topk_idx_TK.dtype == torch.int64


def is_ranked_with_low_id_ties(idx: torch.Tensor, biased: torch.Tensor) -> bool:
    """Picks are the first K of experts ordered by (-biased score, expert id)."""
    for row, values in zip(idx.tolist(), biased.tolist(), strict=True):
        order = sorted(range(len(values)), key=lambda e: (-values[e], e))
        if row != order[: len(row)]:
            return False
    return True


@requires_triton
def test_triton_breaks_exact_ties_towards_lower_expert_id() -> None:
    logits = torch.tensor(
        [[0.0] * 16, [1.0, 2.0, 2.0, 0.0, 2.0, 1.0, 1.0, 2.0] * 2, [3.0, 3.0] + [0.0] * 14]
    ).to(DEVICE)
    bias = torch.zeros(16, device=DEVICE)
    out = router_topk(logits, bias, topk=5, n_routed=12, routed_scaling_factor=2.0,
                      scale_zero_expert_gates=True, backend="triton")  # fmt: skip
    assert out.topk_idx_TK.tolist()[0] == [0, 1, 2, 3, 4]
    assert is_ranked_with_low_id_ties(out.topk_idx_TK.cpu(), (out.scores_TE + bias).cpu())
    ref_idx = torch_ref.router_topk_ref(logits, bias, TopkOptions(5, 12, 2.0, True))[0]
    # torch.topk picks equally good experts, but in its own order (the negative control:
    # the tie-rule check rejects it on CPU, where it does not favour low ids)
    ref_biased = logits.softmax(-1) + bias
    torch.testing.assert_close(ref_biased.gather(1, ref_idx).sort(dim=1).values,
                               ref_biased.gather(1, out.topk_idx_TK).sort(dim=1).values)  # fmt: skip
    if DEVICE.type == "cpu":
        assert not is_ranked_with_low_id_ties(ref_idx.cpu(), ref_biased.cpu())


@requires_triton
def test_triton_matches_float64_oracle_tie_rule() -> None:
    """``model.kernels.reference.reference_route`` ranks by (-biased, id) as well."""
    cfg = get_preset("tiny")
    router = TopkRouter(cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        router.classifier.weight[:, :] = router.classifier.weight[0]  # every expert ties
        router.classifier.weight[5] += 0.1  # ... except one favourite
    x = torch.randn(6, cfg.hidden_size, generator=torch.Generator().manual_seed(1)).abs()
    oracle = reference_route(x, cfg, classifier_weight=router.classifier.weight,
                             e_score_correction_bias=router.e_score_correction_bias)  # fmt: skip
    out = route(router.to(DEVICE), x.to(DEVICE), backend="triton")
    assert torch.equal(out.topk_idx_TK.cpu(), oracle.topk_idx_TK)
    torch.testing.assert_close(out.topk_gate_TK.double().cpu(), oracle.topk_gate_TK, **SCORE_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale_zero", [True, False])
def test_route_reproduces_topk_router(backend: str, scale_zero: bool) -> None:
    cfg = get_preset("small").replace(scale_zero_expert_gates=scale_zero)
    router = TopkRouter(cfg, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        router.e_score_correction_bias.normal_(
            0.0, 0.01, generator=torch.Generator().manual_seed(3)
        )
    x = torch.randn(40, cfg.hidden_size, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    want = router(x)
    got = route(router, x, backend=backend)
    assert torch.equal(got.topk_idx_TK, want.topk_idx_TK)
    assert torch.equal(got.counts_E, want.counts_E)
    if backend == "torch":
        for a, b in ((got.topk_gate_TK, want.topk_gate_TK), (got.scores_TE, want.scores_TE)):
            assert torch.equal(a, b)
    torch.testing.assert_close(got.topk_gate_TK, want.topk_gate_TK, **SCORE_TOL)
    torch.testing.assert_close(got.scores_TE, want.scores_TE, **SCORE_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale_zero", [True, False])
def test_gradients_reach_the_logits(backend: str, scale_zero: bool) -> None:
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(30, 20, generator=gen).to(DEVICE)
    bias = (torch.randn(20, generator=gen) * 0.05).to(DEVICE)
    w_gate = torch.randn(30, 4, generator=gen).to(DEVICE)
    w_scores = torch.randn(30, 20, generator=gen).to(DEVICE)
    kw = dict(topk=4, n_routed=14, routed_scaling_factor=3.0, scale_zero_expert_gates=scale_zero)
    leaf = logits.clone().requires_grad_()
    out = router_topk(leaf, bias, backend=backend, **kw)
    ((out.topk_gate_TK * w_gate).sum() + (out.scores_TE * w_scores).sum()).backward()
    ref_leaf = logits.double().requires_grad_()
    ref = torch_ref.router_topk_ref(ref_leaf, bias.double(), TopkOptions(**kw))
    ref_scores = ref_leaf.softmax(-1)  # float64 for the oracle
    ref_gate = ref_scores.gather(1, ref[0]) * torch.where((ref[0] < 14) | scale_zero, 3.0, 1.0)
    ((ref_gate * w_gate.double()).sum() + (ref_scores * w_scores.double()).sum()).backward()
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rerun_is_bitwise_equal(backend: str) -> None:
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(100, 24, generator=gen).to(DEVICE)
    bias = (torch.randn(24, generator=gen) * 0.01).to(DEVICE)
    kw = dict(topk=6, n_routed=16, routed_scaling_factor=6.0, scale_zero_expert_gates=False)
    a = router_topk(logits, bias, backend=backend, **kw)
    b = router_topk(logits, bias, backend=backend, **kw)
    for x, y in zip((a.topk_idx_TK, a.topk_gate_TK, a.scores_TE, a.counts_E),
                    (b.topk_idx_TK, b.topk_gate_TK, b.scores_TE, b.counts_E), strict=True):  # fmt: skip
        assert torch.equal(x, y)


def test_bad_inputs_raise_clear_errors() -> None:
    logits, bias = torch.zeros(3, 8), torch.zeros(8)
    kw = dict(n_routed=6, routed_scaling_factor=1.0, scale_zero_expert_gates=True)
    with pytest.raises(ValueError, match="topk <= 8"):
        router_topk(logits, bias, topk=9, **kw)
    with pytest.raises(ValueError, match="bias_E"):
        router_topk(logits, torch.zeros(7), topk=2, **kw)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        router_topk(logits, bias, topk=2, backend="fast", **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"flattened to \[T, D\]"):
        route(TopkRouter(get_preset("tiny")), torch.zeros(2, 3, 64))
