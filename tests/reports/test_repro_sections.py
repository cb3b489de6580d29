"""The report's own quick determinism and SDC runs: parsed by the commands' own parsers, cached
by command line and code, generic over detector and site names, and a failure is a note."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from longcat_sim.commands import report as report_command
from longcat_sim.errors import UserError
from longcat_sim.report import repro, sections
from longcat_sim.reports.page import build_report
from tests.reports import sample_report_data

# the only sdc options the report may rely on (the command is being rewritten)
SDC_FLAGS = {
    "--model", "--sites", "--bits", "--trials", "--clean-runs", "--attribution-events",
    "--seed", "--threads", "--overhead-rounds",
}  # fmt: skip


def _determinism_results() -> dict[str, Any]:
    return {
        "identical": True,
        "runs": 2,
        "identical_runs": 2,
        "steps": 2,
        "first_divergence": None,
        "injected": None,
        "model": "tiny",
    }


def _sdc_results() -> dict[str, Any]:
    """The documented shape, with a detector and a site the page has never seen and a NaN."""
    rows = [
        {"site": site, "bit": bit, "detector": det, "detected": int(bit > 10), "masked": 0,
         "missed": int(bit <= 10), "crashed": 0}
        for site in ("weight", "loss")
        for bit in (0, 30)
        for det in ("replay", "validators")
    ]  # fmt: skip
    return {
        "results": rows,
        "false_positives": {"replay": 0, "validators": 1},
        "clean_runs": 4,
        "overhead": {"replay": 1.0, "validators": math.nan},
        "attribution": {"events_per_class": 2, "correct": {}, "accuracy": {"transient": 0.5}},
        "summary": {"detection_rate": {"replay": {"weight": 0.5, "loss": None}}},
    }


class Stub:
    """A runner that records the command lines it was given."""

    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.fail = fail

    def __call__(self, argv: Sequence[str]) -> dict[str, Any]:
        self.calls.append(tuple(argv))
        if self.fail == argv[0]:
            raise UserError("--bits selects no bit of the chosen sites")
        return _determinism_results() if argv[0] == "determinism" else _sdc_results()


def _page(result: sections._Repro) -> str:
    data = sample_report_data(**result.data, provenance=result.provenance)
    return build_report(data).html


def test_quick_runs_use_the_command_lines_and_are_cached(tmp_path: Path, monkeypatch) -> None:
    stub = Stub()
    first = sections._repro_results(tmp_path, {}, stub)
    assert stub.calls == [repro.QUICK_DETERMINISM, repro.QUICK_SDC]
    assert first.computed == ["determinism", "sdc"] and first.reused == []
    assert first.data["determinism"]["verdict"] == "identical"
    sdc = first.data["sdc"]
    assert sdc["detectors"] == ["replay", "validators"]
    assert {t["site"] for t in sdc["trials"]} == {"weight", "loss"}
    assert sdc["overhead"]["validators"] is None  # NaN in the results: null on the page
    second = sections._repro_results(tmp_path, {}, stub)
    assert len(stub.calls) == 2 and second.reused == ["determinism", "sdc"]
    assert second.data == first.data
    # the code they run is part of the key: an edit reruns them
    monkeypatch.setattr(repro, "repro_fingerprint", lambda: "edited")
    third = sections._repro_results(tmp_path, {}, stub)
    assert len(stub.calls) == 4 and third.computed == ["determinism", "sdc"]


def test_the_page_says_the_report_computed_them_and_how_to_run_the_full_ones(
    tmp_path: Path,
) -> None:
    html = _page(sections._repro_results(tmp_path, {}, Stub()))
    assert html.count("Computed by this report with quick settings") == 2
    assert repro.command_line(repro.QUICK_SDC) in html
    assert repro.FULL["determinism"] in html and repro.FULL["sdc"] in html
    assert "validators" in html and "loss" in html  # names it never saw before
    assert "overhead.validators (nan)" in html


def test_a_failed_quick_run_is_a_note_and_a_warning_not_a_failed_report(tmp_path: Path) -> None:
    result = sections._repro_results(tmp_path, {}, Stub(fail="sdc"))
    assert result.data["sdc"] is None and result.provenance["sdc"]["source"] == "failed"
    assert result.computed == ["determinism"]
    (warning,) = result.warnings
    assert "quick sdc run failed (--bits selects no bit" in warning
    html = _page(result)
    assert "The report's quick run failed: --bits selects no bit" in html
    assert not list(tmp_path.glob("cache/sdc-*.json"))  # a failure is never cached


def test_without_a_runner_they_are_skipped_and_the_page_says_how_to_get_them(
    tmp_path: Path,
) -> None:
    result = sections._repro_results(tmp_path, {}, None)
    assert result.data == {"determinism": None, "sdc": None}
    assert result.computed == result.reused == []
    html = _page(result)
    assert html.count("--no-repro") == 2 and repro.FULL["sdc"] in html


def test_a_given_run_wins_over_the_quick_run(tmp_path: Path) -> None:
    stub = Stub()
    given = {"sdc": (tmp_path / "sdc-run", sample_report_data()["sdc"])}
    result = sections._repro_results(tmp_path, given, stub)
    assert stub.calls == [repro.QUICK_DETERMINISM]
    assert result.provenance["sdc"] == {"source": "run", "path": str(tmp_path / "sdc-run")}
    assert "From --sdc-run" in _page(result)


def test_the_quick_sdc_line_uses_only_the_options_the_report_may_rely_on() -> None:
    flags = {arg for arg in repro.QUICK_SDC if arg.startswith("--")}
    assert flags <= SDC_FLAGS, flags - SDC_FLAGS


def test_command_lines_go_through_the_commands_own_parser(monkeypatch) -> None:
    from longcat_sim.commands import sdc

    seen = {}

    def fake_run(args):
        seen.update(vars(args))
        return type("Output", (), {"results": {"ok": True}})()

    monkeypatch.setattr(sdc, "run", fake_run)
    assert report_command.run_command(repro.QUICK_SDC) == {"ok": True}
    assert seen["bits"] == "0,20,23,30,31" and seen["trials"] == 1 and seen["seed"] == 0
    assert seen["threads"] == 1 and seen["clean_runs"] == 10  # converted by its own parser
    assert seen["run_dir"] is None and seen["command"] == "sdc"
    with pytest.raises(UserError, match=r"^longcat-sim sdc: unrecognized arguments: --nope"):
        report_command.run_command(["sdc", "--nope"])


@pytest.mark.slow
def test_the_real_quick_campaign_fits_the_report(tmp_path: Path) -> None:
    """The sdc command as it is, run in process with the report's quick settings (seconds)."""
    result = repro.quick_run("sdc", report_command.run_command, tmp_path, "code")
    assert result.origin["source"] == "report", result.origin
    sdc = result.result
    assert set(sdc["counts"]) == set(sdc["detectors"]) and "replay" in sdc["detectors"]
    assert sdc["clean_runs"] == 10 and sdc["attribution"]["events_per_class"] == 3
    assert {t["bit"] for t in sdc["trials"]} <= {0, 20, 23, 30, 31}
