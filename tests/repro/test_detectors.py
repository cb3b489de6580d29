"""The SDC workload and detectors: the MoE step is LongCat's MoE, replays are bitwise, ABFT's
tolerance holds on clean data and catches large flips, recompute catches flips in what it
recomputes, attribution names the fault class, and a small campaign adds up."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longcat_sim.model.config import get_preset
from longcat_sim.model.moe import MoE
from longcat_sim.repro.campaign import (
    DETECTORS,
    CampaignConfig,
    draw_fault,
    run_campaign,
    state_pool,
    total_units,
)
from longcat_sim.repro.detectors import (
    GENUINE,
    PERSISTENT,
    TRANSIENT,
    AbftMonitor,
    RecomputeMonitor,
    RerunStateMachine,
    SpikeValidator,
    abft_lambda,
    replay_detects,
    unit_roundoff,
)
from longcat_sim.repro.inject import Fault, FaultPlan, StepInjector
from longcat_sim.repro.moe_step import (
    CHECK_ROWS,
    ExpertGemms,
    ExpertRows,
    MoEStepConfig,
    StepCrash,
    encode_checksums,
    grouped_gemm,
    initial_state,
    moe_step,
    plain_weight,
    stable_topk,
)
from tests.repro.conftest import threads
from tests.strategies import seeds

SC = MoEStepConfig(get_preset("tiny").replace(deterministic=True), tokens=64)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with threads(1):
        yield


def test_the_step_is_lonCat_moe_forward_and_backward() -> None:
    """Output, routing and gradients against ``model.moe.MoE`` with the same weights
    (rtol = atol = 1e-5: the two sum the K slots in different orders)."""
    state = initial_state(SC, 3)
    moe = MoE(SC.model)
    with torch.no_grad():
        moe.router.classifier.weight.copy_(state.params["router"])
        gate, up = plain_weight(state.params["gate_up"]).chunk(2, dim=1)
        moe.experts.gate_proj.copy_(gate)
        moe.experts.up_proj.copy_(up)
        moe.experts.down_proj.copy_(plain_weight(state.params["down"]))
    out, routing = moe(state.x_TD)
    out.backward(state.grad_out_TD)
    result = moe_step(state, SC)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.tensors["out"], out.detach(), **tol)
    assert torch.equal(result.tensors["routing.idx"], routing.topk_idx_TK)
    assert torch.equal(result.tensors["routing.counts"], routing.counts_E)
    grads = {
        "router": moe.router.classifier.weight.grad,
        "gate_up": torch.cat((moe.experts.gate_proj.grad, moe.experts.up_proj.grad), dim=1),
        "down": moe.experts.down_proj.grad,
    }
    for name, grad in grads.items():
        mine = result.tensors[f"grad.{name}"]
        if name != "router":  # encoded weights: the checksum rows get no gradient
            assert not mine[:, -CHECK_ROWS:].any()
            mine = plain_weight(mine)
        torch.testing.assert_close(mine, grad, **tol)


def test_the_step_is_bitwise_reproducible_and_leaves_its_state_alone() -> None:
    state = initial_state(SC, 0)
    snapshot = state.clone()
    first, second = moe_step(state, SC), moe_step(state, SC)
    assert first.digest() == second.digest()
    assert all(torch.equal(state.params[k], snapshot.params[k]) for k in state.params)
    chained = moe_step(first.next_state, SC)
    assert chained.next_state.step == 2 and chained.digest() != first.digest()
    for name in ("gate_up", "down"):  # the optimizer keeps the weights checksum-encoded
        encoded = chained.next_state.params[name]
        assert torch.equal(encoded[:, -CHECK_ROWS], plain_weight(encoded).sum(dim=1))
        assert not encoded[:, -CHECK_ROWS + 1 :].any()


def test_stable_topk_gives_exact_ties_to_the_lower_index() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.2, 0.5]])
    assert stable_topk(scores, 2).tolist() == [[1, 2]]
    assert stable_topk(scores.flip(-1), 3).tolist() == [[0, 2, 3]]


def test_the_deterministic_router_gives_exact_ties_to_the_lower_expert_id() -> None:
    """A zero classifier makes all N + Z scores equal: every token picks experts 0..K-1."""
    cfg = get_preset("tiny").replace(deterministic=True)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.classifier.weight.zero_()
    routing = moe.router(torch.randn(50, cfg.hidden_size))
    assert routing.topk_idx_TK.tolist() == [list(range(cfg.moe_topk))] * 50


# -- ABFT ------------------------------------------------------------------------------------------


def test_abft_lambda_and_unit_roundoff_follow_the_formulas() -> None:
    lam = abft_lambda(64, 1e-7)
    assert 2 * 64 * math.exp(-(lam**2) / 2) == pytest.approx(1e-7)
    assert unit_roundoff(torch.float32) == 2.0**-24
    assert unit_roundoff(torch.bfloat16) == 2.0**-8


@settings(max_examples=30)
@given(seed=seeds, rows=st.integers(1, 40), k=st.sampled_from([8, 64, 256]))
def test_abft_tolerance_covers_float32_rounding_of_a_gemm(seed, rows, k) -> None:
    """The float32 GEMM against its float64 value: the row-checksum error stays within the
    tolerance (with a wide margin: worst ratios seen are a few percent)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, k, generator=gen) * torch.exp(torch.randn(rows, 1, generator=gen))
    w = torch.randn(1, 48, k, generator=gen)
    c = a @ w[0].t()
    rows_of = ExpertRows([0], [rows], torch.zeros(rows, dtype=torch.int64))
    monitor = AbftMonitor()
    encoded, scale = encode_checksums(w)
    with torch.no_grad():
        c_enc, reference, padding = grouped_gemm(a, encoded, rows_of)
    assert padding.shape == (rows, CHECK_ROWS - 1) and not padding.any()
    monitor.on_expert_gemm(ExpertGemms(("gate",), a, (c,), (reference,), rows_of, (scale,)))
    monitor.on_expert_gemm(
        ExpertGemms(("gate",), a, (c_enc,), (reference,), rows_of, (scale,), paddings=(padding,))
    )
    assert monitor.alarms == 0 and monitor.checks == 2 * rows
    assert monitor.worst_ratio < 0.5


def test_abft_has_no_false_alarm_on_clean_steps_and_catches_big_flips() -> None:
    for state in state_pool(SC, 12, 4, seed=1):
        monitor = AbftMonitor()
        moe_step(state, SC, monitors=(monitor,))
        assert monitor.alarms == 0 and monitor.checks > 0
    state = initial_state(SC, 2)
    for site, target in (("expert_gemm", "gate_up"), ("expert_gemm", "down"), ("combine", "")):
        monitor = AbftMonitor()
        fault = Fault(site=site, bit=30, index=3, target=target)
        moe_step(state, SC, injector=StepInjector([fault], 0, 0), monitors=(monitor,))
        assert monitor.alarms >= 1, site


def active_expert(state, sc: MoEStepConfig) -> int:
    """An FFN expert the step's routing sends rows to."""
    counts = moe_step(state, sc).tensors["routing.counts"][: sc.model.n_routed_experts]
    return int(torch.nonzero(counts).flatten()[0])


def check_row_index(state, name: str, expert: int, row: int, col: int) -> int:
    """Flat index of element ``col`` of check row ``row`` (0: checksum, 1..7: padding) of
    ``expert``'s encoded weight ``name``."""
    _, height, width = state.params[name].shape
    return (expert * height + height - CHECK_ROWS + row) * width + col


@pytest.mark.parametrize("name", ["gate_up", "down"])
@pytest.mark.parametrize("bit", [25, 30])
def test_abft_catches_a_weight_fault_in_a_padding_row(name, bit) -> None:
    """A flipped bit in a zero padding row turns 0.0 into 2^-123 (bit 25) or 2.0 (bit 30):
    the padding column the GEMM computes for it is no longer zero."""
    state = initial_state(SC, 2)
    expert = active_expert(state, SC)
    for row, col in ((1, 0), (CHECK_ROWS - 1, 5)):
        index = check_row_index(state, name, expert, row, col)
        fault = Fault(site="weight", bit=bit, index=index, target=name)
        injector = StepInjector([fault], 0, 0)
        monitor = AbftMonitor()
        moe_step(state, SC, injector=injector, monitors=(monitor,))
        assert injector.fired == [fault]
        assert monitor.alarms >= 1 and monitor.alarm_sites == [f"expert_gemm.{name}.padding"]


def test_negative_control_without_the_padding_check_a_padding_fault_is_invisible() -> None:
    """The row checksum alone never reads the padding columns."""
    state = initial_state(SC, 2)
    index = check_row_index(state, "down", active_expert(state, SC), 3, 1)
    fault = Fault(site="weight", bit=30, index=index, target="down")

    class RowChecksumOnly(AbftMonitor):
        def on_expert_gemm(self, gemms: ExpertGemms) -> None:
            super().on_expert_gemm(dataclasses.replace(gemms, paddings=None))

    monitor = RowChecksumOnly()
    moe_step(state, SC, injector=StepInjector([fault], 0, 0), monitors=(monitor,))
    assert monitor.alarms == 0 and monitor.checks > 0


def assert_encoded(state) -> None:
    """Checksum rows hold the row sums, padding rows and the moments' check rows are zero."""
    for name in ("gate_up", "down"):
        encoded = state.params[name]
        assert torch.equal(encoded[:, -CHECK_ROWS], plain_weight(encoded).sum(dim=1)), name
        assert not encoded[:, -CHECK_ROWS + 1 :].any(), name
        for moments in (state.exp_avg, state.exp_avg_sq):
            assert not moments[name][:, -CHECK_ROWS:].any(), name


@pytest.mark.parametrize("name", ["gate_up", "down"])
@pytest.mark.parametrize(
    ("site", "target"), [("weight", ""), ("gradient", ""), ("optimizer_state", ":exp_avg_sq")]
)
def test_a_fault_in_a_check_row_does_not_outlive_the_next_step(name, site, target) -> None:
    """Weights, gradients and moments of the checksum and padding rows: after the next step
    the state is encoded again and equals the clean run's bit for bit."""
    state = initial_state(SC, 6)
    expert = active_expert(state, SC)
    for row in (0, 2, CHECK_ROWS - 1):
        index = check_row_index(state, name, expert, row, 3)
        fault = Fault(site=site, bit=30, index=index, target=name + target)
        injector = StepInjector([fault], 0, 0)
        faulty = moe_step(state, SC, injector=injector)
        assert injector.fired == [fault]
        clean = moe_step(state, SC)
        if site == "optimizer_state":  # injected after the update: at rest until the next step
            assert faulty.next_state.exp_avg_sq[name][expert, -CHECK_ROWS + row, 3] != 0
            faulty, clean = moe_step(faulty.next_state, SC), moe_step(clean.next_state, SC)
        assert_encoded(faulty.next_state)
        assert faulty.digest() == clean.digest()


def test_abft_misses_what_it_does_not_checksum() -> None:
    """A corrupted SwiGLU output feeds the down GEMM consistently: ABFT cannot see it."""
    state = initial_state(SC, 2)
    monitor = AbftMonitor()
    fault = Fault(site="activation", bit=30, index=3)
    result = moe_step(state, SC, injector=StepInjector([fault], 0, 0), monitors=(monitor,))
    assert monitor.alarms == 0
    assert result.digest() != moe_step(state, SC).digest()


# -- recompute and replay --------------------------------------------------------------------------


def test_recompute_of_every_expert_catches_every_effective_expert_gemm_flip() -> None:
    state = initial_state(SC, 4)
    golden = moe_step(state, SC).digest()
    rng = np.random.default_rng(0)
    effective = 0
    for _ in range(20):
        fault = draw_fault("expert_gemm", int(rng.integers(32)), rng, 0)
        monitor = RecomputeMonitor(experts_per_step=SC.model.n_routed_experts)
        result = moe_step(state, SC, injector=StepInjector([fault], 0, 0), monitors=(monitor,))
        if result.digest() != golden:
            effective += 1
            assert monitor.alarms == 1
    assert effective > 10
    clean = RecomputeMonitor(experts_per_step=SC.model.n_routed_experts)
    moe_step(state, SC, monitors=(clean,))
    assert clean.alarms == 0 and clean.checks == len(set(clean.sampled))


def test_replay_from_the_snapshot_on_another_device_detects_transient_and_persistent_faults():
    state = initial_state(SC, 5)
    for persistent in (False, True):
        plan = FaultPlan([Fault(site="combine", bit=25, index=7, persistent=persistent)])
        original = moe_step(state, SC, injector=plan.injector(0, 0)).digest()
        assert replay_detects(
            original, lambda p=plan: moe_step(state, SC, injector=p.injector(0, 1)).digest()
        )
    clean = moe_step(state, SC).digest()
    assert not replay_detects(clean, lambda: moe_step(state.clone(), SC).digest())


def test_a_corrupted_routing_index_outside_the_table_crashes_the_step() -> None:
    fault = Fault(site="routing_indices", bit=40, index=0)
    with pytest.raises(StepCrash, match="outside the expert table"):
        moe_step(initial_state(SC, 0), SC, injector=StepInjector([fault], 0, 0))


# -- attribution -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("results", "expected"),
    [
        ({0: ["b"], 1: ["a"]}, TRANSIENT),  # the same device gives another answer
        ({0: ["a"], 1: ["b"]}, PERSISTENT),  # reproducible there, not elsewhere
        ({0: ["a"], 1: ["a"]}, GENUINE),  # reproducible everywhere
    ],
)
def test_rerun_state_machine_decides_by_where_the_result_reproduces(results, expected) -> None:
    machine = RerunStateMachine(lambda device: results[device].pop(0))
    assert machine.attribute("a", device=0, other_device=1) == expected
    with pytest.raises(ValueError, match="different device"):
        machine.attribute("a", device=0, other_device=0)


def test_spike_validator_flags_non_finite_and_outlying_losses() -> None:
    v = SpikeValidator(factor=10.0, history=[1.0, 1.2, 0.9])
    assert not v.suspicious(3.0) and v.suspicious(20.0) and v.suspicious(math.nan)
    assert not SpikeValidator().suspicious(1e9)  # no history yet


# -- a small campaign ------------------------------------------------------------------------------


def test_a_small_campaign_adds_up() -> None:
    cc = CampaignConfig(
        sites=("expert_gemm", "combine", "gradient", "routing_counts"),
        bits=(0, 12, 23, 30, 31, 40),
        trials=2,
        clean_runs=12,
        attribution_events=4,
        states=4,
        chain=3,
    )
    result = run_campaign(SC, cc).to_json()
    rows = result["results"]
    assert {r["detector"] for r in rows} == set(DETECTORS)
    for r in rows:
        assert r["detected"] + r["masked"] + r["missed"] == cc.trials
        if r["detector"] == "replay":
            assert r["missed"] == 0
        if r["bit"] == 40:
            assert r["site"] == "routing_counts"  # 64-bit site only
    assert result["false_positives"] == {"replay": 0, "recompute": 0, "abft": 0}
    assert result["clean_runs"] == 12 and result["abft_checks"] > 0
    assert set(result["overhead"]) == set(DETECTORS)
    assert all(acc == 1.0 for acc in result["attribution"]["accuracy"].values())
    # 5 bits of the float sites, 6 of the 64-bit routing counts; clean runs; 3 event classes
    assert total_units(cc) == (3 * 5 + 6) * 2 + 12 + 3 * 4
