"""The report reads what the determinism and sdc commands write."""

from __future__ import annotations

from longcat_sim.report.results import determinism_input, sdc_input
from longcat_sim.reports.figures import sdc_rates
from longcat_sim.reports.inputs import check_determinism


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
    assert diverged["first_divergence"] == {"step": 3, "tensor": "model.layers.0.mlp: output"}


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
