"""The grouped MoE (router + FFN experts + zero experts) against a naive per-slot oracle.

Tolerances: float32 results are compared with the float64 oracle at rtol = atol = 1e-5
(values are O(1); float32 rounding over these short dot products stays near 1e-6).
bfloat16 activations are compared at rtol = 2e-2 and atol = 2e-2 x max|oracle| (about five bf16
ulps of the output's scale: every GEMM output and the SwiGLU product are rounded to bf16 before
the float32 combine, and errors measured on 300 random configs stay below 0.7e-2).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from longcat_sim.model.config import ModelConfig, get_preset
from longcat_sim.model.experts import GroupedExperts
from longcat_sim.model.kernels.batch_invariant import ROWS
from longcat_sim.model.kernels.reference import (
    ReferenceRouting,
    moe_reference_from_module,
    reference_route,
)
from longcat_sim.model.moe import MoE, plan_dispatch
from longcat_sim.model.router import TopkRouter
from tests.strategies import forced_bias, moe_configs, routing_cases, seeds, token_counts

F32_TOL = dict(rtol=1e-5, atol=1e-5)
BF16_RTOL = 2e-2
MIN_MARGIN = 1e-5  # skip near-ties, where float32 and float64 rankings may legitimately differ


def make_moe(cfg: ModelConfig, seed: int, bias: list[float] | None = None) -> MoE:
    moe = MoE(cfg, generator=torch.Generator().manual_seed(seed))
    if bias is not None:
        moe.router.e_score_correction_bias.copy_(torch.tensor(bias))
    return moe


def make_x(cfg: ModelConfig, tokens: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randn(tokens, cfg.hidden_size, generator=gen).to(dtype)


def oracle_routing(moe: MoE, cfg: ModelConfig, x: torch.Tensor) -> ReferenceRouting:
    return reference_route(
        x,
        cfg,
        classifier_weight=moe.router.classifier.weight,
        e_score_correction_bias=moe.router.e_score_correction_bias,
    )


def sorted_by_expert(idx_TK: torch.Tensor, gate_TK: torch.Tensor):
    order = idx_TK.argsort(dim=-1)
    return idx_TK.gather(1, order), gate_TK.gather(1, order)


def is_close(a: torch.Tensor, b: torch.Tensor, tol: dict) -> bool:
    return torch.allclose(a.double(), b.double(), **tol)


# -- the grouped path equals the oracle ------------------------------------------------------


@settings(max_examples=40)
@given(cfg=moe_configs(), tokens=token_counts(), seed=seeds, data=st.data())
def test_grouped_moe_matches_naive_oracle(cfg, tokens, seed, data):
    case = data.draw(routing_cases(cfg))
    moe = make_moe(cfg, seed, case.bias)
    x = make_x(cfg, tokens, seed)
    with torch.no_grad():
        out, routing = moe(x)
        ref_routing = oracle_routing(moe, cfg, x)
        assume(bool((ref_routing.margin_T > MIN_MARGIN).all()))
        ref = moe_reference_from_module(x, cfg, moe, routing=ref_routing)

    idx, gate = sorted_by_expert(routing.topk_idx_TK, routing.topk_gate_TK)
    ref_idx, ref_gate = sorted_by_expert(ref_routing.topk_idx_TK, ref_routing.topk_gate_TK)
    assert torch.equal(idx, ref_idx), f"selection differs ({case.kind})"
    torch.testing.assert_close(gate.double(), ref_gate, **F32_TOL)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out.double(), ref, **F32_TOL)


@settings(max_examples=30)
@given(cfg=moe_configs(min_topk=1), tokens=token_counts(), seed=seeds)
def test_negative_control_wrong_oracles_are_detected(cfg, tokens, seed):
    """Renormalised gates, or the bias leaking into the gates, fail the same comparison."""
    e_total = cfg.num_experts_total
    assume(cfg.moe_topk < e_total)
    bias = [0.02 + 0.01 * (e % 3) for e in range(e_total)]  # nonzero everywhere
    moe = make_moe(cfg, seed, bias)
    x = make_x(cfg, tokens, seed)
    with torch.no_grad():
        out, _ = moe(x)
        good = oracle_routing(moe, cfg, x)
        assume(bool((good.margin_T > MIN_MARGIN).all()))
        bias_t = torch.tensor(bias, dtype=torch.float64)
        scale_TK = torch.where(
            (good.topk_idx_TK >= cfg.n_routed_experts) & (not cfg.scale_zero_expert_gates),
            1.0,
            cfg.routed_scaling_factor,
        ).double()
        probs_TK = good.topk_gate_TK / scale_TK
        renormalised = probs_TK / probs_TK.sum(-1, keepdim=True) * scale_TK
        biased = (probs_TK + bias_t[good.topk_idx_TK]) * scale_TK
        wrong = {
            "renormalised gates": renormalised,
            "bias in gates": biased,
        }
        assert is_close(out, moe_reference_from_module(x, cfg, moe, routing=good), F32_TOL)
        for name, gates in wrong.items():
            routing = ReferenceRouting(good.topk_idx_TK, gates, good.margin_T)
            ref = moe_reference_from_module(x, cfg, moe, routing=routing)
            assert not is_close(out, ref, F32_TOL), f"oracle with {name} was not detected"


@settings(max_examples=15)
@given(cfg=moe_configs(max_experts=4, max_zero=3, max_topk=3), tokens=token_counts(8), seed=seeds)
def test_bfloat16_activations_match_oracle(cfg, tokens, seed):
    moe = make_moe(cfg, seed).to(torch.bfloat16)
    assert moe.router.classifier.weight.dtype == torch.float32
    assert moe.router.e_score_correction_bias.dtype == torch.float32
    assert moe.experts.gate_proj.dtype == torch.bfloat16
    x = make_x(cfg, tokens, seed, torch.bfloat16)
    with torch.no_grad():
        out, routing = moe(x)
        ref_routing = oracle_routing(moe, cfg, x)
        assume(bool((ref_routing.margin_T > MIN_MARGIN).all()))
        ref = moe_reference_from_module(x, cfg, moe, routing=ref_routing)
    assert out.dtype == torch.bfloat16
    assert routing.scores_TE.dtype == torch.float32 and routing.topk_gate_TK.dtype == torch.float32
    assert torch.equal(
        sorted_by_expert(routing.topk_idx_TK, routing.topk_gate_TK)[0],
        sorted_by_expert(ref_routing.topk_idx_TK, ref_routing.topk_gate_TK)[0],
    )
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(out.double(), ref, rtol=BF16_RTOL, atol=BF16_RTOL * scale)


def test_router_keeps_exact_float32_values_under_module_casts():
    cfg = get_preset("tiny")
    moe = make_moe(cfg, 0, [0.01 * e for e in range(cfg.num_experts_total)])
    weight = moe.router.classifier.weight.detach().clone()
    bias = moe.router.e_score_correction_bias.clone()
    moe.half()
    assert moe.experts.gate_proj.dtype == torch.float16
    assert torch.equal(moe.router.classifier.weight, weight)
    assert torch.equal(moe.router.e_score_correction_bias, bias)
    assert isinstance(moe.router.classifier.weight, torch.nn.Parameter)


# -- zero-computation experts ----------------------------------------------------------------


@settings(max_examples=30)
@given(cfg=moe_configs(min_zero=1), tokens=token_counts(), seed=seeds, data=st.data())
def test_all_zero_routing_returns_x_times_summed_gates_exactly(cfg, tokens, seed, data):
    n, z = cfg.n_routed_experts, cfg.zero_expert_num
    k = data.draw(st.integers(1, z))
    cfg = cfg.replace(moe_topk=k, target_ffn_experts=0.0)
    chosen = data.draw(st.permutations(range(n, n + z)))[:k]
    moe = make_moe(cfg, seed, forced_bias(n + z, chosen))
    x = make_x(cfg, tokens, seed)
    out, routing = moe(x)
    assert bool((routing.topk_idx_TK >= n).all())
    expected = x * routing.topk_gate_TK.sum(dim=-1, keepdim=True)
    assert torch.equal(out, expected)


@settings(max_examples=30)
@given(cfg=moe_configs(), tokens=token_counts(), seed=seeds, data=st.data())
def test_zero_expert_slots_never_reach_an_expert_gemm(cfg, tokens, seed, data):
    """The rows dispatched to the experts are exactly the FFN slots' tokens, and the layer's
    matmul FLOPs are the router's plus those of the FFN slots: zero-expert slots add none."""
    case = data.draw(routing_cases(cfg))
    moe = make_moe(cfg, seed, case.bias)
    x = make_x(cfg, tokens, seed)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        _, routing = moe(x)

    n, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.expert_ffn_hidden_size
    idx = routing.topk_idx_TK
    plan = plan_dispatch(idx, routing.counts_E, n)
    expected_tokens = [t for e in range(n) for t in range(tokens) if e in idx[t].tolist()]
    ffn_slots = int((idx < n).sum())
    assert plan.token_S.tolist() == expected_tokens
    assert plan.num_rows == ffn_slots == int(routing.counts_E[:n].sum())
    assert plan.counts_N == routing.counts_E[:n].tolist()
    router_flops = 2 * tokens * h * cfg.num_experts_total
    expert_flops = ffn_slots * 3 * 2 * h * i
    assert counter.get_total_flops() == router_flops + expert_flops


@settings(max_examples=25)
@given(cfg=moe_configs(), seed=seeds, data=st.data())
def test_grouped_experts_match_per_row_reference(cfg, seed, data):
    """``GroupedExperts.forward`` (rows sorted by expert) and its gradients, row by row."""
    n, h = cfg.n_routed_experts, cfg.hidden_size
    counts = data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    experts = GroupedExperts(cfg, generator=torch.Generator().manual_seed(seed))
    x = make_x(cfg, sum(counts), seed).requires_grad_()
    owner = [e for e, c in enumerate(counts) for _ in range(c)]
    weights = [experts.gate_proj, experts.up_proj, experts.down_proj]
    y = experts(x, counts)
    w64 = [w.double() for w in weights]
    ref = torch.stack(
        [
            w64[2][e] @ (F.silu(w64[0][e] @ row) * (w64[1][e] @ row))
            for e, row in zip(owner, x.double(), strict=True)
        ]
        + [torch.zeros(h, dtype=torch.float64)]
    )[: len(owner)]
    torch.testing.assert_close(y.double(), ref, **F32_TOL)
    if not owner:
        return
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad((y * upstream).sum(), [x, *weights])
    ref_grads = torch.autograd.grad(
        (ref * upstream.double()).sum(), [x, *weights], allow_unused=True, materialize_grads=True
    )
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-5)


# -- router semantics ------------------------------------------------------------------------


@settings(max_examples=40)
@given(cfg=moe_configs(), tokens=token_counts(), seed=seeds, data=st.data())
def test_bias_changes_selection_but_never_gate_values(cfg, tokens, seed, data):
    case = data.draw(routing_cases(cfg))
    router = TopkRouter(cfg, generator=torch.Generator().manual_seed(seed))
    x = make_x(cfg, tokens, seed)
    with torch.no_grad():
        plain = router(x)
        router.e_score_correction_bias.copy_(torch.tensor(case.bias))
        biased = router(x)
    n, rsf = cfg.n_routed_experts, cfg.routed_scaling_factor
    assert torch.equal(plain.scores_TE, biased.scores_TE)
    for out in (plain, biased):
        probs = out.scores_TE.gather(1, out.topk_idx_TK)
        scaled = probs * rsf
        if not cfg.scale_zero_expert_gates:
            scaled = torch.where(out.topk_idx_TK >= n, probs, scaled)
        assert torch.equal(out.topk_gate_TK, scaled)  # unbiased, not renormalised
    for t in range(tokens):
        gate_plain = dict(
            zip(plain.topk_idx_TK[t].tolist(), plain.topk_gate_TK[t].tolist(), strict=True)
        )
        gate_biased = dict(
            zip(biased.topk_idx_TK[t].tolist(), biased.topk_gate_TK[t].tolist(), strict=True)
        )
        for e in gate_plain.keys() & gate_biased.keys():
            assert gate_plain[e] == gate_biased[e]
    forced = [e for e, b in enumerate(case.bias) if b > 1.0]
    for e in forced:
        assert bool((biased.topk_idx_TK == e).any(dim=-1).all()), "a forced expert was not selected"
    excluded = [e for e, b in enumerate(case.bias) if b < -1.0]
    for e in excluded:
        assert not bool((biased.topk_idx_TK == e).any()), "an excluded expert was selected"


def test_bias_does_change_selection():
    """The property above is not vacuous: forcing an expert moves tokens onto it."""
    cfg = get_preset("tiny")
    router = TopkRouter(cfg, generator=torch.Generator().manual_seed(3))
    x = make_x(cfg, 64, 3)
    with torch.no_grad():
        plain = router(x)
        target = int(plain.counts_E.argmin())
        router.e_score_correction_bias.copy_(
            torch.tensor(forced_bias(cfg.num_experts_total, [target]))
        )
        biased = router(x)
    assert int(plain.counts_E[target]) < 64
    assert int(biased.counts_E[target]) == 64
    assert not torch.equal(plain.topk_idx_TK, biased.topk_idx_TK)


@settings(max_examples=30)
@given(cfg=moe_configs(min_zero=1), tokens=token_counts(), seed=seeds, data=st.data())
def test_scale_zero_expert_gates_changes_only_the_identity_term(cfg, tokens, seed, data):
    case = data.draw(routing_cases(cfg))
    hf = make_moe(cfg.replace(scale_zero_expert_gates=True), seed, case.bias)
    sgl = make_moe(cfg.replace(scale_zero_expert_gates=False), seed, case.bias)
    x = make_x(cfg, tokens, seed)
    with torch.no_grad():
        out_hf, r_hf = hf(x)
        out_sgl, r_sgl = sgl(x)
    n, rsf = cfg.n_routed_experts, cfg.routed_scaling_factor
    assert torch.equal(r_hf.topk_idx_TK, r_sgl.topk_idx_TK)
    is_zero = r_hf.topk_idx_TK >= n
    assert torch.equal(r_hf.topk_gate_TK[~is_zero], r_sgl.topk_gate_TK[~is_zero])
    assert torch.equal(r_hf.topk_gate_TK[is_zero], r_sgl.topk_gate_TK[is_zero] * rsf)
    zero_prob_T = torch.where(is_zero, r_sgl.topk_gate_TK, 0.0).sum(-1, keepdim=True)
    torch.testing.assert_close(out_hf - out_sgl, (rsf - 1.0) * zero_prob_T * x, **F32_TOL)
    if not bool(is_zero.any()) or rsf == 1.0:
        assert torch.equal(out_hf, out_sgl)


# -- gradients, counts, determinism ----------------------------------------------------------


@settings(max_examples=20)
@given(cfg=moe_configs(), tokens=token_counts(12), seed=seeds, data=st.data())
def test_gradients_match_oracle(cfg, tokens, seed, data):
    """Gradients reach the input, every routed expert and the router classifier (through the
    gates), and equal the oracle's; experts that received no token get zero gradient."""
    case = data.draw(routing_cases(cfg))
    moe = make_moe(cfg, seed, case.bias)
    x = make_x(cfg, tokens, seed).requires_grad_()
    weight = torch.randn(tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
    params = [
        moe.router.classifier.weight,
        moe.experts.gate_proj,
        moe.experts.up_proj,
        moe.experts.down_proj,
    ]
    with torch.no_grad():
        assume(bool((oracle_routing(moe, cfg, x).margin_T > MIN_MARGIN).all()))
    out, routing = moe(x)
    grads = torch.autograd.grad((out * weight).sum(), [x, *params])
    ref = moe_reference_from_module(x, cfg, moe)
    ref_grads = torch.autograd.grad(
        (ref * weight.double()).sum(), [x, *params], allow_unused=True, materialize_grads=True
    )
    names = ["x", "classifier", "gate_proj", "up_proj", "down_proj"]
    for name, g, r in zip(names, grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-5, msg=name)
    used = routing.counts_E[: cfg.n_routed_experts] > 0
    for g in grads[2:]:
        assert bool((g[~used] == 0).all())
        assert bool((g[used].abs().sum(dim=(1, 2)) > 0).all())
    assert grads[0].abs().sum() > 0
    if cfg.num_experts_total > 1:  # a softmax over one logit has constant output
        assert grads[1].abs().sum() > 0


@settings(max_examples=30)
@given(cfg=moe_configs(), tokens=token_counts(), seed=seeds, data=st.data())
def test_counts_sum_to_tokens_times_topk(cfg, tokens, seed, data):
    case = data.draw(routing_cases(cfg))
    moe = make_moe(cfg, seed, case.bias)
    with torch.no_grad():
        _, routing = moe(make_x(cfg, tokens, seed))
    counts = routing.counts_E
    assert counts.dtype == torch.long and counts.shape == (cfg.num_experts_total,)
    assert int(counts.sum()) == tokens * cfg.moe_topk
    assert torch.equal(counts, torch.bincount(routing.topk_idx_TK.flatten(), minlength=len(counts)))
    assert bool((routing.topk_idx_TK.sort(-1).values.diff(dim=-1) > 0).all())  # distinct per token


def test_forward_and_backward_are_bitwise_reproducible():
    cfg = get_preset("small")
    outs = []
    for _ in range(2):
        moe = make_moe(cfg, 7)
        x = make_x(cfg, 96, 7).requires_grad_()
        out, _ = moe(x)
        out.square().sum().backward()
        outs.append([out.detach(), x.grad, *(p.grad for p in moe.parameters())])
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


# -- deterministic mode: padded dispatch, no repeated index in any indexed write ------------


@settings(max_examples=40)
@given(cfg=moe_configs(), tokens=token_counts(40), seed=seeds, data=st.data())
def test_padded_dispatch_gives_every_row_its_own_slot(cfg, tokens, seed, data):
    """Each expert's rows padded to a multiple of ROWS: real rows as in the unpadded plan,
    padding rows with slots T*K, T*K + 1, ... in row order, tokens distinct within an expert."""
    case = data.draw(routing_cases(cfg))
    moe = make_moe(cfg, seed, case.bias)
    with torch.no_grad():
        _, routing = moe(make_x(cfg, tokens, seed))
    n, k = cfg.n_routed_experts, cfg.moe_topk
    plain = plan_dispatch(routing.topk_idx_TK, routing.counts_E, n)
    plan = plan_dispatch(routing.topk_idx_TK, routing.counts_E, n, ROWS)
    assert plan.slot_S.unique().numel() == plan.num_rows  # no slot twice
    assert all(c % ROWS == 0 for c in plan.counts_N)
    assert plan.padding == plan.num_rows - plain.num_rows
    is_pad = plan.slot_S >= tokens * k
    assert plan.slot_S[is_pad].tolist() == list(range(tokens * k, tokens * k + plan.padding))
    assert torch.equal(plan.slot_S[~is_pad], plain.slot_S)
    assert torch.equal(plan.token_S[~is_pad], plain.token_S)
    assert bool((plan.token_S[is_pad] >= tokens).all())
    assert bool((plan.token_S < tokens + ROWS).all())
    start = 0
    for count, real in zip(plan.counts_N, plain.counts_N, strict=True):
        rows = slice(start, start + count)
        assert plan.token_S[rows].unique().numel() == count
        assert int(is_pad[rows].sum()) == count - real and not is_pad[start : start + real].any()
        start += count


_INDEXED_WRITES = {
    "index_add",
    "index_add_",
    "index_copy",
    "index_copy_",
    "index_reduce",
    "index_reduce_",
    "scatter",
    "scatter_",
    "scatter_add",
    "scatter_add_",
    "scatter_reduce",
    "scatter_reduce_",
    "index_put",
    "index_put_",
    "_index_put_impl_",
}


class IndexedWrites(TorchDispatchMode):
    """Records every ATen op that writes through an index (name, whether two of its writes
    land on the same element): ``index_add`` / ``scatter_add`` / ``index_put`` with a repeated
    target add in an order the kernel chooses."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _INDEXED_WRITES:
            self.calls.append((name, _repeats(name, args)))
        return func(*args, **kwargs)


def _repeats(name: str, args) -> bool:
    target = args[0]
    if name.startswith("index_put") or name == "_index_put_impl_":
        hits = torch.zeros(target.shape, dtype=torch.int64)
        hits.index_put_(tuple(args[1]), torch.ones((), dtype=torch.int64), accumulate=True)
    else:
        dim, index = args[1], args[2]
        if name.startswith("index_"):  # one index per slice along dim
            return index.unique().numel() != index.numel()
        hits = torch.zeros(target.shape, dtype=torch.int64)
        hits.scatter_add_(dim, index, torch.ones_like(index))
    return bool((hits > 1).any())


def test_indexed_writes_recorder_sees_a_repeated_index():
    """Negative control: the recorder flags repeats, and the gather-then-backward pattern the
    deterministic MoE uses for its gates repeats an index exactly when a slot is gathered
    twice (as the padding rows' shared slot once was)."""
    gates = torch.rand(5, requires_grad=True)
    with IndexedWrites() as rec:
        gates.index_select(0, torch.tensor([0, 4, 4])).sum().backward()
        torch.zeros(3).scatter_add_(0, torch.tensor([1, 1]), torch.ones(2))
        torch.zeros(3).index_put_((torch.tensor([2, 2]),), torch.ones(2), accumulate=True)
        torch.zeros(3).index_add_(0, torch.tensor([0, 2]), torch.ones(2))
    assert rec.calls == [
        ("index_add", True),
        ("scatter_add_", True),
        ("index_put_", True),
        ("index_add_", False),
    ]


@settings(max_examples=25)
@given(cfg=moe_configs(), tokens=token_counts(40), seed=seeds, data=st.data())
def test_deterministic_moe_never_writes_through_a_repeated_index(cfg, tokens, seed, data):
    """Forward and backward of the deterministic MoE (padded dispatch): every index_add,
    scatter, index_put and index_copy it issues hits each target element at most once, so
    none depends on the order in which a kernel adds repeated targets."""
    case = data.draw(routing_cases(cfg))
    moe = make_moe(cfg.replace(deterministic=True), seed, case.bias)
    x = make_x(cfg, tokens, seed).requires_grad_()
    with IndexedWrites() as rec:
        out, routing = moe(x)
        out.backward(make_x(cfg, tokens, seed + 7))
    assert [c for c in rec.calls if c[1]] == []
    if int((routing.topk_idx_TK < cfg.n_routed_experts).sum()):
        names = {name for name, _ in rec.calls}
        assert {"index_add", "index_add_"} <= names  # the gates' backward and the combine


def test_output_keeps_leading_dimensions():
    cfg = get_preset("tiny")
    moe = make_moe(cfg, 0)
    x = make_x(cfg, 12, 0).reshape(3, 4, cfg.hidden_size)
    out, routing = moe(x)
    flat, _ = moe(x.reshape(12, -1))
    assert out.shape == x.shape and routing.topk_idx_TK.shape == (12, cfg.moe_topk)
    assert torch.equal(out.reshape(12, -1), flat)


# -- initialisation and input errors ---------------------------------------------------------


def test_initialisation_uses_only_the_given_generator():
    cfg = get_preset("tiny")
    rng_before = torch.random.get_rng_state()
    a = MoE(cfg, generator=torch.Generator().manual_seed(5))
    b = MoE(cfg, generator=torch.Generator().manual_seed(5))
    c = MoE(cfg, generator=torch.Generator().manual_seed(6))
    d = MoE(cfg)
    e = MoE(cfg)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    for name, p in a.state_dict().items():
        assert torch.equal(p, b.state_dict()[name])
        assert torch.equal(d.state_dict()[name], e.state_dict()[name])
    assert not torch.equal(a.experts.gate_proj, c.experts.gate_proj)
    std = a.experts.gate_proj.std().item()
    assert abs(std - cfg.initializer_range) < 0.1 * cfg.initializer_range
    assert torch.equal(a.router.e_score_correction_bias, torch.zeros(cfg.num_experts_total))


def test_state_dict_names_follow_the_contract():
    cfg = get_preset("tiny")
    sd = MoE(cfg).state_dict()
    n, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.expert_ffn_hidden_size
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "router.classifier.weight": (cfg.num_experts_total, h),
        "router.e_score_correction_bias": (cfg.num_experts_total,),
        "experts.gate_proj": (n, i, h),
        "experts.up_proj": (n, i, h),
        "experts.down_proj": (n, h, i),
    }


def test_bad_inputs_raise_clear_errors():
    cfg = get_preset("tiny")
    moe = make_moe(cfg, 0)
    with pytest.raises(ValueError, match="router expects tokens flattened"):
        moe.router(torch.zeros(2, 3, cfg.hidden_size))
    with pytest.raises(ValueError, match="counts_N must give"):
        moe.experts(torch.zeros(4, cfg.hidden_size), [4])
    with pytest.raises(ValueError, match="x_SD must be"):
        moe.experts(torch.zeros(4, cfg.hidden_size + 1), [4] + [0] * (cfg.n_routed_experts - 1))


def test_routing_counts_that_do_not_add_up_fail_before_sizing_buffers() -> None:
    """Counts are what the dispatch sizes its buffers from: a corrupted count (a bit flip of
    2^30) fails at once instead of allocating rows for a billion tokens."""
    idx = torch.tensor([[0, 1], [1, 2]])
    counts = torch.bincount(idx.reshape(-1), minlength=4)
    assert plan_dispatch(idx, counts, 3, 8).counts_N  # the control: consistent counts plan
    bad = counts.clone()
    bad[1] ^= 1 << 30
    with pytest.raises(RuntimeError, match="routing counts add up to"):
        plan_dispatch(idx, bad, 3, 8)
