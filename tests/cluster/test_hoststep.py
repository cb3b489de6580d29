"""The calibrated-host step model: the SimPy task DAG against its closed form, the ScMoE
windows, and the profile file."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.cluster.hoststep import (
    EpModelTerms,
    EpStep,
    HostProfile,
    WorldTerms,
    host_profile_from_dict,
    load_host_profile,
    simulate_step,
    step_closed_form,
    step_tasks,
)
from longcat_sim.cluster.streams import earliest_start_times

positive = st.floats(min_value=1e-4, max_value=1.0)


def _terms(sync_us=1000.0, window_s=0.0035, slowdown=1.5, gb_s=0.05) -> WorldTerms:
    # windows: FFN_0 + MLA_1 computes 3 ms alone, FFN_1 0.75 ms
    return WorldTerms(slowdown, sync_us, gb_s, 300.0, 10 * gb_s, 800.0, 0.02,
                      window_s, 0.003, window_s / 4, 0.00075)  # fmt: skip


def _model(**kw) -> EpModelTerms:
    values = dict(seq_len=64, hidden=64, layers=2, n_routed_experts=8, ffn_slots_per_token=2.0,
                  t_slice_s=0.04, t_fixed_s=0.01, t_dispatch_hide_s=0.002,
                  t_combine_hide_s=0.0005, grad_bytes_per_slice=400_000,
                  expert_weight_bytes=65536)  # fmt: skip
    values.update(kw)
    return EpModelTerms(**values)


@st.composite
def profiles(draw) -> HostProfile:
    terms = WorldTerms(
        draw(st.floats(1.0, 3.0)),
        draw(st.floats(10.0, 1e4)),
        draw(st.floats(1e-3, 10.0)),
        draw(st.floats(10.0, 1e4)),
        draw(st.floats(1e-3, 10.0)),
        draw(st.floats(10.0, 1e4)),
        draw(st.floats(1e-3, 10.0)),
        draw(st.floats(0.0, 0.02)),
        draw(st.floats(0.0, 0.02)),
        draw(st.floats(0.0, 0.02)),
        draw(st.floats(0.0, 0.02)),
    )
    model = _model(
        layers=draw(st.integers(1, 4)),
        t_slice_s=draw(positive),
        t_fixed_s=draw(positive),
        t_dispatch_hide_s=draw(st.floats(0.0, 0.02)),
        t_combine_hide_s=draw(st.floats(0.0, 0.02)),
    )
    return HostProfile({2: terms, 4: terms}, model)


@settings(max_examples=40)
@given(profiles(), st.sampled_from([(2, 2), (2, 8), (4, 4), (4, 8)]), st.booleans())
def test_simulated_step_equals_the_closed_form(profile, shape, scmoe):
    step = EpStep(*shape, scmoe)
    simulated = simulate_step(profile, step)["step_s"]
    assert math.isclose(simulated, step_closed_form(profile, step)["step"], rel_tol=1e-9)
    # and the longest-path sweep, a second implementation of the same timeline
    _, ends = earliest_start_times(step_tasks(profile, step))
    assert math.isclose(simulated, max(ends), rel_tol=1e-9)


def test_scmoe_windows_cost_the_larger_of_exchange_and_measured_window():
    m = _model()
    profile = HostProfile({2: _terms(sync_us=5000.0)}, m)
    t = profile.worlds[2]
    sync = t.seconds("a2a", m.row_bytes)
    on = simulate_step(profile, EpStep(2, 8, True))["step_s"]
    off = simulate_step(profile, EpStep(2, 8, False))["step_s"]
    per_layer_gain = (2 * sync + t.dispatch_compute_s + t.combine_compute_s) - (
        max(sync, t.dispatch_window_s) + max(sync, t.combine_window_s)
    )
    assert off - on == pytest.approx(4 * 2 * per_layer_gain)
    assert off > on  # negative control below: windows slower than waiting turn the gain over
    slow_overlap = HostProfile({2: _terms(sync_us=200.0, window_s=0.02)}, m)
    gain = (
        simulate_step(slow_overlap, EpStep(2, 8, False))["step_s"]
        - simulate_step(slow_overlap, EpStep(2, 8, True))["step_s"]
    )
    assert gain < 0


def test_one_process_is_compute_only_and_contention_scales_compute():
    profile = HostProfile({2: _terms(slowdown=2.0)}, _model())
    one = simulate_step(profile, EpStep(1, 4, True))
    assert one["step_s"] == pytest.approx(4 * 0.04 + 0.01) and one["link_busy_s"] == 0
    two = simulate_step(profile, EpStep(2, 4, False))
    assert two["compute_busy_s"] == pytest.approx(2.0 * (2 * 0.04 + 0.01))


def test_profile_round_trip_and_one_line_errors(tmp_path):
    profile = HostProfile({2: _terms()}, _model())
    data = {"host": {"worlds": {"2": vars(_terms())}}, "ep_model": vars(_model())}
    assert host_profile_from_dict(data) == profile
    with pytest.raises(ClusterInputError, match="no measurements for 4 processes"):
        simulate_step(profile, EpStep(4, 8, True))
    with pytest.raises(ClusterInputError, match="split evenly"):
        simulate_step(profile, EpStep(2, 5, True))
    with pytest.raises(ClusterInputError, match="not a calibrate profile"):
        host_profile_from_dict({"hardware": {}})
    with pytest.raises(ClusterInputError, match=r"\[ep_model\] lacks hidden, layers"):
        host_profile_from_dict({**data, "ep_model": {"seq_len": 64}})
    with pytest.raises(ClusterInputError, match="does not exist"):
        load_host_profile(tmp_path / "missing.toml")


def test_overlap_changes_no_compute_only_where_the_time_goes():
    profile = HostProfile({2: _terms(sync_us=5000.0, window_s=0.006)}, _model())
    on = simulate_step(profile, EpStep(2, 8, True))
    off = simulate_step(profile, EpStep(2, 8, False))
    assert on["compute_busy_s"] == pytest.approx(off["compute_busy_s"])
    assert on["compute_busy_s"] == pytest.approx(
        step_closed_form(profile, EpStep(2, 8, True))["compute"]
    )


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("world", "a2a_gb_s", 0.0, "a2a_gb_s = 0.0 must be a finite number > 0"),
        ("world", "gather_gb_s", "fast", "gather_gb_s = 'fast' must be a finite number"),
        ("world", "dispatch_window_s", float("nan"), "dispatch_window_s = nan"),
        ("model", "layers", 2.5, "layers = 2.5 must be a positive integer"),
        ("model", "t_slice_s", -1.0, "t_slice_s = -1.0 must be a finite number"),
    ],
)
def test_bad_profile_values_are_one_line_errors(section, key, value, message):
    world, model = dict(vars(_terms())), dict(vars(_model()))
    (world if section == "world" else model)[key] = value
    with pytest.raises(ClusterInputError, match=re.escape(message)):
        host_profile_from_dict({"host": {"worlds": {"2": world}}, "ep_model": model})


def test_bad_profile_shapes_and_steps_are_one_line_errors():
    good = {"host": {"worlds": {"2": vars(_terms())}}, "ep_model": vars(_model())}
    with pytest.raises(ClusterInputError, match="world sizes are positive integers"):
        host_profile_from_dict({**good, "host": {"worlds": {"two": vars(_terms())}}})
    with pytest.raises(ClusterInputError, match="not a calibrate profile"):
        host_profile_from_dict({**good, "host": 3})
    with pytest.raises(ClusterInputError, match="must be positive"):
        simulate_step(host_profile_from_dict(good), EpStep(0, 8, True))
