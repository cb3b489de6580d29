"""The bit-flip campaign of the public library on a user experiment (an entry point)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from longcat_sim.errors import UserError
from longcat_sim.repro import describe_campaign, run_campaign, run_entry_campaign
from longcat_sim.repro.targets import check_target
from tests.repro.entry_models import two_layer

ENTRY = "tests.repro.entry_models:two_layer"


@pytest.fixture(scope="module")
def report() -> dict:
    return run_entry_campaign(ENTRY, bits=[0, 23, 30, 31], trials=2)


def test_report_is_plain_json_with_one_row_per_site_bit_and_detector(report) -> None:
    json.dumps(report, allow_nan=False)
    assert len(report["results"]) == 4 * 4 * 2
    for row in report["results"]:
        assert row["crashed"] == 0
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


def _refusing(limit: float, from_step: int = 0):
    """two_layer whose loss raises above ``limit`` (a user's own guard) from ``from_step`` on."""
    exp = two_layer(0)
    step = exp.step

    def guarded(i: int) -> torch.Tensor:
        loss = step(i)
        if i >= from_step and not float(loss) <= limit:
            raise FloatingPointError("loss out of range")
        return loss

    return dataclasses.replace(exp, step=guarded)


def test_a_step_that_raises_on_a_fault_counts_as_crashed_apart() -> None:
    """Bit 30 of a weight in [1, 2) makes it infinite: the user's step raises."""
    exp = _refusing(limit=50.0)
    with torch.no_grad():
        exp.model.out.weight.fill_(1.5)
    got = run_campaign(exp, sites=["weight"], bits=[30], trials=2, targets={"weight": "out.weight"})
    json.dumps(got, allow_nan=False)
    for row in got["results"]:
        assert row["crashed"] == 2 and row["detected"] == row["missed"] == row["masked"] == 0
    assert "crashed 2" in describe_campaign(got)


def test_a_clean_step_that_raises_is_a_one_line_user_error() -> None:
    with pytest.raises(
        UserError, match="step 1 raised FloatingPointError: loss out of range"
    ) as err:
        run_campaign(_refusing(limit=-1.0, from_step=1), sites=["weight"], bits=[0])
    assert "\n" not in str(err.value)


def test_optimizer_state_takes_either_adam_moment() -> None:
    model = two_layer(0).model
    for target in ("inp.weight", "inp.weight:exp_avg", "inp.weight:exp_avg_sq"):
        check_target(model, "optimizer_state", target)
    with pytest.raises(UserError, match="moment 'nu'"):
        check_target(model, "optimizer_state", "inp.weight:nu")
    with pytest.raises(UserError, match=r"'inp\.weight:exp_avg' is not in the model"):
        check_target(model, "weight", "inp.weight:exp_avg")
    got = run_campaign(
        two_layer(0),
        sites=["optimizer_state"],
        bits=[31],
        targets={"optimizer_state": "inp.weight:exp_avg_sq"},
    )
    replay = next(r for r in got["results"] if r["detector"] == "replay")
    assert replay["detected"] == 1  # a negative second moment changes the update
