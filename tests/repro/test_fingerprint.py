"""Fingerprints, bitwise comparison, ULP distances, and localisation of a planted difference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longcat_sim.model.router import RouterOutput
from longcat_sim.repro.compare import Divergence, first_divergence, measured, ulp_difference
from longcat_sim.repro.fingerprint import (
    Entry,
    RunSpec,
    StepFingerprint,
    fingerprint_run,
    flatten_output,
    split_name,
)
from longcat_sim.repro.harness import check_determinism
from longcat_sim.repro.manifest import environment_manifest, manifest_differences

# a small, quick training run: tiny with short sequences
QUICK = dict(batch_size=4, seq_len=32)


# -- ULP distance ----------------------------------------------------------------------------------


def test_ulp_difference_counts_representable_values_between() -> None:
    one = torch.tensor([1.0])
    assert ulp_difference(one, torch.nextafter(one, torch.tensor([2.0]))) == (2.0**-23, 1)
    three_up = one.view(torch.int32).add(3).view(torch.float32)
    assert ulp_difference(one, three_up)[1] == 3
    tiny = torch.tensor([1e-45])  # smallest subnormal
    assert ulp_difference(tiny, -tiny)[1] == 2  # across zero: -min, 0, +min
    assert ulp_difference(torch.tensor([0.0]), torch.tensor([-0.0])) == (0.0, 0)
    a64 = torch.tensor([1.0], dtype=torch.float64)
    b64 = torch.nextafter(a64, torch.tensor([0.0], dtype=torch.float64))
    assert ulp_difference(a64, b64) == (2.0**-53, 1)
    assert ulp_difference(torch.tensor([3, 9]), torch.tensor([3, 2])) == (7.0, 7)
    nan = torch.tensor([math.nan])
    assert ulp_difference(nan, nan) == (0.0, 0)
    with pytest.raises(ValueError, match="cannot compare"):
        ulp_difference(torch.zeros(2), torch.zeros(3))


@settings(max_examples=50)
@given(
    value=st.floats(allow_nan=False, allow_infinity=False, width=32),
    steps=st.integers(0, 20),
)
def test_ulp_difference_of_k_steps_up_is_k(value, steps) -> None:
    a = torch.tensor([value], dtype=torch.float32)
    b = a.clone()
    for _ in range(steps):
        b = torch.nextafter(b, torch.tensor([math.inf]))
    if torch.isinf(b).any():
        return  # stepped past the largest float
    assert ulp_difference(a, b)[1] == steps


# -- stream comparison -----------------------------------------------------------------------------


def stream(*digests_per_step: tuple[str, ...]) -> list[StepFingerprint]:
    return [
        StepFingerprint(i, tuple(Entry(f"m{j}", "output", d) for j, d in enumerate(digests)))
        for i, digests in enumerate(digests_per_step)
    ]


def test_first_divergence_is_the_first_differing_entry_of_the_first_differing_step() -> None:
    a = stream(("x", "y", "z"), ("p", "q", "r"), ("s", "t", "u"))
    b = stream(("x", "y", "z"), ("p", "Q", "R"), ("S", "t", "u"))
    div = first_divergence(a, b)
    assert div == Divergence(step=1, module="m1", tensor="output", position=1)
    assert first_divergence(a, a) is None
    assert first_divergence(a, a[:2]) == Divergence(2, "<stream>", "length", 0)
    shorter = [a[0], StepFingerprint(1, a[1].entries[:2])]
    assert "missing" in first_divergence(a, shorter).tensor


def test_step_fingerprint_round_trips_through_dicts() -> None:
    fp = stream(("x", "y"))[0]
    again = StepFingerprint.from_dict(fp.to_dict())
    assert again == fp and again.digest == fp.digest


def test_flatten_output_reaches_tensors_in_tuples_and_dataclasses() -> None:
    t = torch.zeros(1)
    routing = RouterOutput(t, t, t, t)
    labels = [label for label, _ in flatten_output((t, routing, None))]
    assert labels == [
        "output[0]",
        "output[1].topk_idx_TK",
        "output[1].topk_gate_TK",
        "output[1].scores_TE",
        "output[1].counts_E",
    ]
    assert split_name("a.b.weight") == ("a.b", "weight") and split_name("bias") == ("", "bias")


def test_measured_fills_in_the_size_of_the_difference() -> None:
    div = Divergence(0, "m", "output", 0)
    a = torch.tensor([1.0, 2.0])
    b = a.clone()
    b[1] = torch.nextafter(b[1], torch.tensor(3.0))
    got = measured(div, a, b)
    assert got.max_ulp == 1 and got.max_abs == pytest.approx(2.0**-22)
    assert measured(div, None, b) == div


def test_manifest_differences_ignore_threads_only_in_deterministic_mode() -> None:
    a = environment_manifest(deterministic=True)
    b = {**a, "torch_flags": {**a["torch_flags"], "num_threads": 99}}
    assert manifest_differences(a, b) == []
    a_off, b_off = {**a, "deterministic": False}, {**b, "deterministic": False}
    assert manifest_differences(a_off, b_off) == ["num_threads"]
    assert "torch_version" in manifest_differences(a, {**a, "torch_version": "0"})


# -- whole runs (in this process, one thread) ------------------------------------------------------


@pytest.fixture(scope="module")
def quick_spec(data_cache) -> RunSpec:
    return RunSpec(model="tiny", steps=3, train=QUICK, byte_budget=2**18, data_cache=data_cache)


def test_a_run_fingerprints_activations_loss_gradients_parameters_and_optimizer_state(
    quick_spec,
) -> None:
    record = fingerprint_run(quick_spec)
    assert [f.step for f in record.fingerprints] == [0, 1, 2]
    labels = {e.tensor.split(".")[0] for e in record.fingerprints[0].entries}
    assert {"output", "grad", "param", "buffer", "state"} <= labels
    assert any(e.module == "loss" and e.tensor == "lm_loss" for e in record.fingerprints[0].entries)
    assert record.manifest["deterministic"] is True
    assert all(math.isfinite(v) for v in record.losses)
    again = fingerprint_run(quick_spec)
    assert first_divergence(record.fingerprints, again.fingerprints) is None


@pytest.mark.parametrize(
    ("fault", "module", "tensor"),
    [
        # a flipped lowest mantissa bit of a dense FFN's output at step 1
        (
            dict(site="activation", bit=0, step=1, target="model.layers.0.mlps.0"),
            "model.layers.0.mlps.0",
            "output",
        ),
        # a corrupted expert weight is first seen in the output of the MoE that reads it
        (
            dict(site="weight", bit=30, step=2, target="model.layers.1.mlp.experts.down_proj"),
            "model.layers.1.mlp",
            "output[0]",
        ),
        # a moment flipped after the last step's update is part of that step's state
        (
            dict(
                site="optimizer_state",
                bit=30,
                step=2,
                target="model.layers.0.mlp.experts.down_proj",
            ),
            "model.layers.0.mlp.experts",
            "state.exp_avg.down_proj",
        ),
    ],
)
def test_negative_control_a_planted_difference_is_localised(
    quick_spec, fault, module, tensor
) -> None:
    report = check_determinism(quick_spec, 2, [1], fault_in_run=(1, fault), runner=fingerprint_run)
    assert report.identical == 1 and report.divergent_run == 1
    div = report.first_divergence
    assert (div.step, div.module, div.tensor) == (fault["step"], module, tensor)
    assert div.max_ulp is not None and div.max_ulp >= 1
    if fault["bit"] == 0:
        assert div.max_ulp == 1
