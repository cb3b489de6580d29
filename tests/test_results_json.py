"""NaN and infinities in a command's results: stored as null and listed, never a crash."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from longcat_sim.commands.base import CommandOutput
from longcat_sim.runs import dumps_json, json_safe, read_run, write_run


def _results() -> dict:
    return {
        "loss": math.nan,
        "rates": {"abft": {"router": math.inf, "combine": 0.5}},
        "losses": [1.0, -math.inf],
        "count": 3,
    }


def test_raw_non_finite_results_are_not_json() -> None:
    """Negative control: what happened before, and would happen again without json_safe."""
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        dumps_json(_results())


def test_write_run_stores_null_and_lists_what_was_not_finite(tmp_path: Path) -> None:
    write_run(tmp_path, {"command": "sdc", "config": {"x": math.nan}}, _results())
    manifest, results = read_run(tmp_path)
    assert results["loss"] is None and results["losses"] == [1.0, None]
    assert results["rates"]["abft"] == {"router": None, "combine": 0.5}
    assert results["non_finite"] == {
        "loss": "nan",
        "rates.abft.router": "inf",
        "losses[1]": "-inf",
    }
    assert manifest["config"]["x"] is None and manifest["non_finite"] == {"config.x": "nan"}
    assert "NaN" not in (tmp_path / "results.json").read_text()  # strict JSON


def test_finite_results_are_left_as_they_are() -> None:
    results = {"a": [1.5, {"b": 2}], "c": None}
    assert json_safe(results) is results and "non_finite" not in results


def test_command_output_results_are_safe_to_print_and_merge_earlier_flags() -> None:
    output = CommandOutput(
        results={"x": math.nan, "non_finite": {"y": "inf"}, "y": None},
        text="",
        config={},
        config_hash="0",
    )
    assert json.loads(dumps_json(output.results)) == {
        "x": None,
        "y": None,
        "non_finite": {"x": "nan", "y": "inf"},
    }
