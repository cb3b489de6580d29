"""The bit-flip campaign of the public library on a user experiment (an entry point)."""

from __future__ import annotations

import json

import pytest
import torch

from longcat_sim.errors import UserError
from longcat_sim.repro import run_campaign, run_entry_campaign
from tests.repro.entry_models import two_layer

ENTRY = "tests.repro.entry_models:two_layer"


@pytest.fixture(scope="module")
def report() -> dict:
    return run_entry_campaign(ENTRY, bits=[0, 23, 30, 31], trials=2)


def test_report_is_plain_json_with_one_row_per_site_bit_and_detector(report) -> None:
    json.dumps(report, allow_nan=False)
    assert len(report["results"]) == 4 * 4 * 2
    for row in report["results"]:
        assert row["detected"] + row["masked"] + row["missed"] == row["trials"] == 2
    assert report["targets"] == {
        "weight": "inp.weight",
        "activation": "inp",
        "gradient": "inp.weight",
        "optimizer_state": "inp.weight",
    }
    assert report["clean"]["false_positives"] == {"replay": False, "validators": False}


def test_replay_misses_no_fault_that_changed_the_state(report) -> None:
    replay = [r for r in report["results"] if r["detector"] == "replay"]
    assert all(r["missed"] == 0 for r in replay)
    sign = [r for r in replay if r["bit"] == 31]
    assert all(r["detected"] == 2 for r in sign)  # a sign flip always changes the update


def test_masked_is_the_same_for_every_detector(report) -> None:
    by_fault: dict = {}
    for row in report["results"]:
        by_fault.setdefault((row["site"], row["bit"]), set()).add(row["masked"])
    assert all(len(masked) == 1 for masked in by_fault.values())


def test_validators_flag_a_weight_turned_infinite() -> None:
    """Bit 30 of a weight in [1, 2) makes it infinite: the loss is no longer finite."""
    exp = two_layer(0)
    with torch.no_grad():
        exp.model.out.weight.fill_(1.5)
    got = run_campaign(exp, sites=["weight"], bits=[30], targets={"weight": "out.weight"})
    rows = {r["detector"]: r for r in got["results"]}
    assert rows["validators"]["detected"] == 1 and rows["replay"]["detected"] == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sites": ["combine"]}, "unknown sites"),
        ({"bits": [32]}, "bits must be in 0..31"),
        ({"trials": 0}, "must be positive"),
        ({"targets": {"weight": "nope"}, "sites": ["weight"]}, "parameter 'nope' is not"),
    ],
)
def test_bad_campaign_input_is_a_user_error(options, message) -> None:
    with pytest.raises(UserError, match=message):
        run_entry_campaign(ENTRY, **options)


def test_the_text_form_has_one_line_per_row(report) -> None:
    from longcat_sim.repro import describe_campaign

    text = describe_campaign(report).splitlines()
    assert len(text) == 2 + len(report["results"])
    assert text[1].split()[:4] == ["weight", "bit", "0", "replay"]
