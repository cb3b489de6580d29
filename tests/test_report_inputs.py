"""The report reads what the determinism and sdc commands write."""

from __future__ import annotations

import pytest

from longcat_sim.report.results import determinism_input, sdc_input
from longcat_sim.reports.figures import sdc_rates
from longcat_sim.reports.inputs import ReportInputError, check_determinism, check_sdc


def test_determinism_command_output_becomes_a_verdict() -> None:
    same = determinism_input({"identical": True, "runs": 20, "first_divergence": None})
    check_determinism(same)
    assert same["verdict"] == "identical" and same["runs"] == 20
    diverged = determinism_input(
        {
            "identical": False,
            "runs": 2,
            "first_divergence": {
                "step": 3,
                "module": "model.layers.0.mlp",
                "tensor": "output",
                "max_ulp": 4,
            },
        }
    )
    check_determinism(diverged)
    assert diverged["verdict"] == "diverged"
    assert diverged["first_divergence"] == {
        "step": 3,
        "tensor": "model.layers.0.mlp: output",
        "max_ulp": 4,
    }


def test_sdc_counts_give_each_detectors_detected_share() -> None:
    result = {
        "results": [
            {
                "site": "combine",
                "bit": 30,
                "detector": "abft",
                "detected": 3,
                "masked": 5,
                "missed": 1,
            },
            {
                "site": "combine",
                "bit": 30,
                "detector": "replay",
                "detected": 4,
                "masked": 5,
                "missed": 0,
            },
            {
                "site": "combine",
                "bit": 0,
                "detector": "abft",
                "detected": 0,
                "masked": 0,
                "missed": 2,
            },
        ],
        "false_positives": {},
    }
    rates = sdc_rates(sdc_input(result))
    sites, bits, abft = rates["abft"]
    assert sites == ["combine"] and bits == [0, 30]
    assert abft == [[0.0, 0.75]]
    assert rates["replay"][2] == [[None, 1.0]]


def _injected_run(identical: bool) -> dict:
    """What ``longcat-sim determinism --runs 2 --inject weight:30:1`` writes (in part)."""
    return {
        "identical": identical,
        "runs": 2,
        "steps": 2,
        "first_divergence": None
        if identical
        else {
            "step": 1,
            "module": "model.layers.0.mlp",
            "tensor": "output[0]",
            "max_abs": None,  # infinite in the run: stored as null
            "max_ulp": 3095455744,
            "run": 1,
        },
        "injected": {"site": "weight", "bit": 30, "step": 1, "target": "", "persistent": False},
        "non_finite": {"first_divergence.max_abs": "inf"},
    }


def test_an_injected_run_keeps_its_fault_and_the_divergent_run() -> None:
    control = determinism_input(_injected_run(identical=False))
    check_determinism(control)
    assert control["injected"]["site"] == "weight" and control["injected"]["run"] == 1
    assert control["first_divergence"] == {
        "step": 1,
        "tensor": "model.layers.0.mlp: output[0]",
        "max_abs_diff": None,
        "max_ulp": 3095455744,
        "run": 1,
    }
    assert determinism_input(_injected_run(identical=True))["injected"]["bit"] == 30


def test_not_finite_values_of_older_files_read_as_null() -> None:
    """A results.json written before NaN was stored as null holds a NaN token: the report
    reads it as null instead of refusing the file."""
    raw = _injected_run(identical=False)
    raw["first_divergence"]["max_abs"] = float("inf")
    adapted = determinism_input(raw)
    check_determinism(adapted)
    assert adapted["first_divergence"]["max_abs_diff"] is None
    assert adapted["non_finite"]["first_divergence.max_abs"] == "inf"
    sdc = sdc_input({"results": [], "overhead": {"abft": float("nan")}, "clean_runs": 3})
    assert sdc["overhead"] == {"abft": None}


def test_null_numbers_pass_the_checks_where_a_run_may_not_give_them() -> None:
    check_determinism(
        {
            "verdict": "diverged",
            "first_divergence": {"step": 0, "tensor": "w", "max_abs_diff": None},
        }
    )
    trials = [{"site": "loss", "bit": 3, "detected": {"validators": True}}]
    check_sdc({"trials": trials, "overhead": {"validators": None}, "false_positives": {"x": None}})
    # negative controls: a string is not a number, and a missing site is still refused
    with pytest.raises(ReportInputError, match=r"max_abs_diff must be a finite number"):
        check_determinism(
            {
                "verdict": "diverged",
                "first_divergence": {"step": 0, "tensor": "w", "max_abs_diff": "inf"},
            }
        )
    with pytest.raises(ReportInputError, match=r"injected lacks the key 'site'"):
        check_determinism({"verdict": "diverged", "injected": {"bit": 3}})
