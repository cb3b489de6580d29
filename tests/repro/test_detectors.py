"""The SDC guard on the real training step: ABFT checksums, sampled recompute, validators,
replay attribution and the policies (``model/abft.py``, ``longcat_sim/train/guard.py``)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longcat_sim.errors import UserError
from longcat_sim.model.abft import AbftProbe, CheckTally, RecomputeProbe, abft_lambda, moe_layers
from longcat_sim.model.determinism import DeterministicMode
from longcat_sim.model.experts import Checksum, column_checksum
from longcat_sim.model.probes import (
    GEMMS,
    CombineCall,
    ExpertCall,
    MoEProbe,
    add_probe,
    remove_probe,
)
from longcat_sim.repro.campaign import CampaignConfig, Rig, _genuine_state, attribution_trials
from longcat_sim.repro.inject import SITES, Fault, flip_bit_, trainer_faults
from longcat_sim.train.guard import (
    GuardSettings,
    RoutingValidator,
    SdcGuard,
    SpikeValidator,
    guarded,
)
from tests.repro.sdc_support import Run, full_digest, make_trainer, run_steps

STEPS = 3  # a transient fault lands in step 1; a persistent one in every step


@pytest.fixture(scope="module", autouse=True)
def deterministic():
    with DeterministicMode(threads=1):
        yield


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Run:
    """The unguarded, fault-free run every guarded run must end like."""
    return run_steps(tmp_path_factory.mktemp("plain"), STEPS)


# -- the guard on whole runs ---------------------------------------------------------------------
def test_a_guarded_clean_run_ends_bitwise_like_an_unguarded_one(plain, tmp_path) -> None:
    run = run_steps(tmp_path, STEPS, guard=GuardSettings())
    assert run.digest == plain.digest and run.param_hash == plain.param_hash
    assert [r["loss"] for r in run.records] == [r["loss"] for r in plain.records]
    assert run.events == []
    summary = run.guard.summary()
    assert summary["steps"] == summary["clean_steps"] == STEPS and summary["alarmed_steps"] == 0
    assert summary["abft_checks"] > 0 and summary["abft_alarms"] == 0
    assert 0 < summary["abft_worst_ratio"] < 1
    assert summary["recompute_checks"] > 0 and summary["routing_checks"] > 0


def test_negative_controls_a_planted_fault_changes_the_end_state(plain, tmp_path) -> None:
    fault = Fault(site="expert_gemm", bit=30, index=12345, step=1)
    unguarded = run_steps(tmp_path / "unguarded", STEPS, faults=[fault])
    assert unguarded.param_hash != plain.param_hash
    skipped = run_steps(
        tmp_path / "skip", STEPS, guard=GuardSettings(policy="skip"), faults=[fault]
    )
    assert [e["step"] for e in skipped.events] == [1]
    assert skipped.param_hash != plain.param_hash  # the step's update was dropped


@pytest.mark.parametrize("persistent", [False, True], ids=["transient", "persistent"])
@pytest.mark.parametrize("site", SITES)
def test_every_site_is_detected_attributed_and_repaired(site, persistent, plain, tmp_path) -> None:
    fault = Fault(site=site, bit=30, index=12345, step=1, persistent=persistent)
    run = run_steps(tmp_path, STEPS, guard=GuardSettings(), faults=[fault])
    if not persistent:
        expected = [1]
    elif site == "optimizer_state":  # no moments before the first step
        expected = list(range(1, STEPS))
    else:
        expected = list(range(STEPS))
    assert [e["step"] for e in run.events] == expected, run.events
    attribution = "persistent" if persistent else "transient"
    assert {e["attribution"] for e in run.events} == {attribution}
    assert all(e["detectors"] and e["action"] == "continue" for e in run.events)
    assert all(e["original_digest"] != e["replay_digest"] for e in run.events)
    assert run.digest == plain.digest  # the clean replay's result was kept
    assert [r["loss"] for r in run.records] == [r["loss"] for r in plain.records]


def test_abft_alone_catches_an_expert_weight_corrupted_at_rest(tmp_path) -> None:
    """The flip lands between steps: the encoding the optimizer step left no longer matches
    the weight the next forward reads."""
    abft_only = GuardSettings(detectors=("abft",))
    expert = Fault(site="weight", bit=30, index=12345, step=1,
                   target="model.layers.0.mlp.experts.down_proj")  # fmt: skip
    run = run_steps(tmp_path / "expert", STEPS, guard=abft_only, faults=[expert])
    assert [e["step"] for e in run.events] == [1] and "abft" in run.events[0]["detectors"]
    # negative control: a weight outside the experts (a flip that keeps the step finite) feeds
    # the expert GEMMs consistent inputs, and the loss moves unseen
    other = Fault(site="weight", bit=29, index=123, step=1,
                  target="model.layers.0.mlps.0.down_proj.weight")  # fmt: skip
    run = run_steps(tmp_path / "other", STEPS, guard=abft_only, faults=[other])
    clean = run_steps(tmp_path / "clean", STEPS, guard=abft_only)
    assert run.events == [] and run.records[1]["loss"] != clean.records[1]["loss"]


def test_a_scaled_output_head_is_a_genuine_spike_and_faults_are_not(tmp_path) -> None:
    cc = CampaignConfig(sites=("expert_gemm",), states=1, chain=8, attribution_events=1)
    rig = Rig(make_trainer, cc)
    try:
        rig.start(0)
        assert "sdc_events" not in rig.guard.step()  # the state itself raises nothing
        _genuine_state(rig, 0)
        record = rig.guard.step()
        (event,) = record["sdc_events"]
        assert event["attribution"] == "genuine" and "validators" in event["detectors"]
        assert event["original_digest"] == event["replay_digest"] and event["ranks"] == []
        scores = attribution_trials(rig, cc, None)
        assert scores["accuracy"] == {"transient": 1.0, "persistent": 1.0, "genuine": 1.0}
        assert scores["alarm_flagged"] == {"transient": 1, "persistent": 1, "genuine": 1}
    finally:
        rig.close()


def test_policy_skip_drops_the_update_and_moves_on(tmp_path) -> None:
    trainer = make_trainer(tmp_path)
    injector = trainer_faults(trainer, [Fault(site="expert_gemm", bit=30, index=7, step=1)])
    guard = SdcGuard(trainer, GuardSettings(policy="skip"), faults=injector)
    guard.step()
    after_first = full_digest(trainer)
    record = guard.step()
    assert record["sdc_skipped"] is True and trainer.step == 2
    (event,) = record["sdc_events"]
    assert event["action"] == "skip" and event["attribution"] == "transient"
    assert full_digest(trainer) == after_first  # the state before the step: not updated
    assert "sdc_events" not in guard.step() and trainer.step == 3  # then training goes on
    assert full_digest(trainer) != after_first
    guard.close()
    injector.close()


def test_policy_stop_ends_the_train_loop_with_the_state_before_the_step(tmp_path) -> None:
    trainer = make_trainer(tmp_path / "stopped")
    fault = Fault(site="expert_gemm", bit=30, index=7, step=2)
    injector = trainer_faults(trainer, [fault])
    guarded(trainer, GuardSettings(policy="stop"), injector)
    summary = trainer.train(stop_after=5)
    assert trainer.step == 2 and summary.stopped and "step 2" in summary.stopped
    assert trainer.stopped == summary.stopped and "transient" in summary.stopped
    assert summary.sdc_guard["alarmed_steps"] == 1 and summary.sdc_guard["steps"] == 3
    injector.close()
    two_steps = run_steps(tmp_path / "two", 2)
    assert full_digest(trainer) == two_steps.digest  # the state after step 1, as it was


# -- ABFT and recompute on captured MoE calls ----------------------------------------------------
class Capture(MoEProbe):
    """Keeps a copy of every call it sees."""

    def __init__(self) -> None:
        self.experts: list[ExpertCall] = []
        self.combines: list[CombineCall] = []

    def on_experts(self, call: ExpertCall) -> None:
        self.experts.append(_cloned(call))

    def on_combine(self, call: CombineCall) -> None:
        self.combines.append(_cloned(call))


def _cloned(call):
    changes = {}
    for f in dataclasses.fields(call):
        value = getattr(call, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = value.detach().clone()
        elif f.name == "weights":
            changes[f.name] = tuple(w.detach().clone() for w in value)
    return dataclasses.replace(call, **changes)


@pytest.fixture(scope="module")
def captured(tmp_path_factory) -> Capture:
    """Layer 0's calls in two training steps (the first step's forward included)."""
    trainer = make_trainer(tmp_path_factory.mktemp("capture"))
    capture = Capture()
    (_, moe), *_ = moe_layers(trainer.model)
    add_probe(moe, capture)
    for _ in range(2):
        trainer.train_step()
    remove_probe(moe, capture)
    assert capture.experts and capture.combines
    return capture


class FixedChecksums:
    """Encodings taken once, never refreshed (a checksummed ``GroupedExperts`` keeps its own
    up to date)."""

    def __init__(self, codes: dict[str, Checksum]) -> None:
        self.codes = codes

    def checksum(self, gemm: str) -> Checksum:
        return self.codes[gemm]


def checksums_of(call: ExpertCall) -> FixedChecksums:
    return FixedChecksums({g: column_checksum(w) for g, w in zip(GEMMS, call.weights, strict=True)})


class RowTally(CheckTally):
    """A tally that keeps each check's per-row alarms; ``scale`` multiplies the tolerance."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.rows: dict[str, torch.Tensor] = {}

    def verify(self, name: str, diff: torch.Tensor, tol: torch.Tensor) -> None:
        self.rows[name] = ~(diff <= tol * self.scale)
        super().verify(name, diff, tol * self.scale)


def abft_rows(call: ExpertCall, gemm: str, scale: float = 1.0) -> torch.Tensor:
    """Which rows of ``call`` the ABFT check of ``gemm`` flags."""
    tally = RowTally(scale)
    AbftProbe(checksums_of(call), 0, tally).on_experts(call)
    return tally.rows[f"layer 0 expert_gemm.{gemm}"]


OUTPUT = {"gate": "pre_gate_RI", "up": "pre_up_RI", "down": "y_RD"}


def flipped_in_every_row(call: ExpertCall, gemm: str, column: int, bit: int) -> ExpertCall:
    """``call`` with bit ``bit`` of column ``column`` of every row of ``gemm``'s output flipped."""
    out = getattr(call, OUTPUT[gemm]).clone()
    width = out.shape[1]
    for row in range(out.shape[0]):
        flip_bit_(out, row * width + column % width, bit)
    return dataclasses.replace(call, **{OUTPUT[gemm]: out})


def test_abft_raises_no_alarm_on_clean_calls_and_alarms_with_a_shrunken_tolerance(captured):
    for call in captured.experts:
        tally = CheckTally()
        AbftProbe(checksums_of(call), 0, tally).on_experts(call)
        assert tally.checks == 3 * call.y_RD.shape[0] and tally.alarms == 0
        assert 0 < tally.worst_ratio < 0.1
    # negative control: the same clean data fails a tolerance a million times tighter
    assert abft_rows(captured.experts[0], "down", scale=1e-6).float().mean() > 0.5


def test_abft_checks_the_combine(captured) -> None:
    tally = CheckTally()
    combine = captured.combines[0]
    probe = AbftProbe(checksums_of(captured.experts[0]), 0, tally)
    probe.on_combine(combine)
    assert tally.checks == combine.out_TD.shape[0] and tally.alarms == 0
    out = combine.out_TD.clone()
    flip_bit_(out, 5, 31)
    probe.on_combine(dataclasses.replace(combine, out_TD=out))
    assert tally.alarms == 1 and tally.where == ["layer 0 combine"]


@settings(max_examples=40)
@given(
    gemm=st.sampled_from(["gate", "up", "down"]),
    bit=st.integers(23, 31),
    column=st.integers(0, 127),
    which=st.integers(0, 7),
)
def test_abft_flags_exponent_and_sign_flips_larger_than_its_bound(
    captured, gemm, bit, column, which
) -> None:
    """Every row whose flipped value moved by more than twice the row's bound is flagged, none
    that moved by less than half of it."""
    call = captured.experts[which % len(captured.experts)]
    bad = flipped_in_every_row(call, gemm, column, bit)
    delta = (getattr(bad, OUTPUT[gemm]) - getattr(call, OUTPUT[gemm])).abs().sum(dim=1)
    probe_tol = _tolerances(call, gemm)
    flagged = abft_rows(bad, gemm)
    big = ~torch.isfinite(delta) | (delta > 2 * probe_tol)
    small = delta < 0.5 * probe_tol
    assert bool(big.any()) and bool(flagged[big].all()) and not bool(flagged[small].any())


def _tolerances(call: ExpertCall, gemm: str) -> torch.Tensor:
    """The per-row bound of ``gemm``'s check on ``call`` (read from a recording tally)."""
    seen: dict[str, torch.Tensor] = {}

    class Keep(CheckTally):
        def verify(self, name: str, diff: torch.Tensor, tol: torch.Tensor) -> None:
            seen[name] = tol

    AbftProbe(checksums_of(call), 0, Keep()).on_experts(call)
    return seen[f"layer 0 expert_gemm.{gemm}"]


@pytest.mark.parametrize("gemm", ["gate", "up", "down"])
def test_abft_catches_high_bits_and_is_blind_to_the_lowest_mantissa_bit(captured, gemm) -> None:
    call = captured.experts[0]
    rate = {
        bit: float(abft_rows(flipped_in_every_row(call, gemm, 3, bit), gemm).float().mean())
        for bit in (0, 30, 31)
    }
    assert rate[30] == 1.0 and rate[31] >= 0.9
    assert rate[0] == 0.0  # a 1-ulp change is far inside the rounding bound


def test_checksums_follow_the_weights_through_optimizer_steps(tmp_path) -> None:
    trainer = make_trainer(tmp_path)
    layers = moe_layers(trainer.model)
    kept, stale = CheckTally(), CheckTally()
    for index, (_, moe) in enumerate(layers):
        codes = {gemm: moe.experts.checksum(gemm) for gemm in GEMMS}
        initial = {g: Checksum(c.sums_NX.clone(), c.scales_N.clone()) for g, c in codes.items()}
        add_probe(moe, AbftProbe(moe.experts, index, kept))
        add_probe(moe, AbftProbe(FixedChecksums(initial), index, stale))
    trainer.train_step()  # reads the initial weights
    assert kept.checks > 0 and kept.alarms == stale.alarms == 0
    for _ in range(2):
        trainer.train_step()
    assert kept.alarms == 0
    assert stale.alarms > 0  # negative control: the weights moved; an encoding left behind fails
    for _, moe in layers:  # the buffers are the encoding of the weights as they are now
        for gemm, weight in zip(GEMMS, (moe.experts.gate_proj, moe.experts.up_proj,
                                        moe.experts.down_proj), strict=True):  # fmt: skip
            assert torch.equal(moe.experts.checksum(gemm).sums_NX, column_checksum(weight).sums_NX)


def test_the_abft_detector_needs_a_model_built_with_checksums(tmp_path) -> None:
    trainer = make_trainer(tmp_path, None)
    assert not any(moe.experts.expert_checksums for _, moe in moe_layers(trainer.model))
    with pytest.raises(ValueError, match="guarded_config"):
        SdcGuard(trainer, GuardSettings())
    SdcGuard(trainer, GuardSettings(detectors=("validators", "at_rest"))).close()


def test_abft_lambda_grows_with_the_rounding_count_and_falls_with_the_alarm_rate() -> None:
    assert abft_lambda(10) < abft_lambda(10_000)
    assert abft_lambda(100, 1e-3) < abft_lambda(100, 1e-9)
    assert abft_lambda(1, 2e-7) ** 2 == pytest.approx(2 * torch.log(torch.tensor(1e7)).item())


def _recompute_alarms(call: ExpertCall, blocks_per_call: int) -> int:
    tally = CheckTally()
    RecomputeProbe(0, tally, seed=3, blocks_per_call=blocks_per_call).on_experts(call)
    assert tally.checks == min(blocks_per_call, len(call.blocks))
    return tally.alarms


def test_recompute_sees_a_flip_in_its_sampled_block_and_only_there(captured) -> None:
    call = next(c for c in captured.experts if len(c.blocks) > 2)
    assert _recompute_alarms(call, 1) == 0 and _recompute_alarms(call, len(call.blocks)) == 0
    caught = []
    for number, (_, rows) in enumerate(call.blocks):
        for name in ("pre_gate_RI", "y_RD"):
            out = getattr(call, name).clone()
            flip_bit_(out, rows.start * out.shape[1], 0)  # the lowest mantissa bit
            bad = dataclasses.replace(call, **{name: out})
            assert _recompute_alarms(bad, len(call.blocks)) == 1  # every block recomputed
            if _recompute_alarms(bad, 1):
                caught.append((number, name))
    sampled = {number for number, _ in caught}
    assert len(sampled) == 1 and len(caught) == 2  # one sampled block, both its outputs


def test_recompute_takes_any_63_bit_seed(captured) -> None:
    tally = CheckTally()
    for seed in (0, 2**63 - 1):
        RecomputeProbe(1, tally, seed=seed).on_experts(captured.experts[0])
    assert tally.checks == 2 and tally.alarms == 0


def test_routing_validator_checks_ids_and_counts() -> None:
    tally = CheckTally()
    check = RoutingValidator(tally)
    ids = torch.tensor([[0, 3], [3, 11]])
    counts = torch.bincount(ids.reshape(-1), minlength=12)
    check(None, None, SimpleNamespace(topk_idx_TK=ids, counts_E=counts))
    assert tally.checks == 1 and tally.alarms == 0
    check(None, None, SimpleNamespace(topk_idx_TK=ids.clone().fill_(12), counts_E=counts))
    check(None, None, SimpleNamespace(topk_idx_TK=ids - 1, counts_E=counts))
    wrong = counts.clone()
    wrong[3] += 1
    check(None, None, SimpleNamespace(topk_idx_TK=ids, counts_E=wrong))
    swapped = torch.tensor([[0, 3], [11, 3]])  # the same histogram: passes
    check(None, None, SimpleNamespace(topk_idx_TK=swapped, counts_E=counts))
    assert tally.checks == 5 and tally.alarms == 3 and tally.where == ["routing"] * 3


def test_spike_validator() -> None:
    check = SpikeValidator(factor=10.0, window=4, min_history=3)
    assert check.suspicious(float("nan")) and check.suspicious(float("inf"))
    assert not check.suspicious(1e9)  # too little history to judge a magnitude
    for value in (1.0, 2.0, 3.0):
        check.observe(value)
    assert not check.suspicious(20.0) and check.suspicious(20.1)  # median 2
    assert check.suspicious(-20.1)  # magnitudes are compared
    for value in (100.0, 100.0, 100.0):
        check.observe(value)
    assert check.history == [3.0, 100.0, 100.0, 100.0]  # the window keeps the last 4
    assert not check.suspicious(1000.0) and check.suspicious(1000.1)


def test_guard_settings_refuse_unknown_detectors_and_policies() -> None:
    with pytest.raises(ValueError, match="unknown guard detectors"):
        GuardSettings(detectors=("abft", "magic"))
    with pytest.raises(UserError, match="--sdc-policy"):
        GuardSettings(policy="retry")
