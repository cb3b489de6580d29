"""The HTML page: self-contained (plotly.js inlined, nothing fetched), byte-identical for the same
data in any process, escaped, and with a section for every result given."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from longcat_sim.reports.html import Figure, figure_json, page, plotly_js
from longcat_sim.reports.page import build_report
from tests.reports import sample_report_data

ROOT = Path(__file__).resolve().parents[2]
FULL_IDS = [
    "fig-timelines",
    "fig-pareto",
    "fig-memory",
    "fig-prefill",
    "fig-serving-latency",
    "fig-serving-load",
    "fig-training-overlap",
    "fig-training-run-1",
    "fig-sdc",
]


def test_page_is_self_contained_and_draws_every_figure() -> None:
    report = build_report(sample_report_data())
    html = report.html
    assert [f.div_id for f in report.figures] == FULL_IDS
    assert plotly_js() in html  # the bundle of the installed plotly package
    ours = html.replace(plotly_js(), "")
    assert "<script src" not in ours.replace(" ", "")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", ours)
    assert "cdn.plot.ly" not in ours
    for div_id in FULL_IDS:
        assert html.count(f'<div id="{div_id}" class="figure"></div>') == 1
        assert html.count(f'Plotly.newPlot("{div_id}"') == 1


def test_same_data_same_bytes_different_data_different_bytes() -> None:
    first = build_report(sample_report_data()).html
    assert build_report(sample_report_data()).html == first
    changed = sample_report_data()
    changed["table6"]["rows"][0]["simulated"]["tgs"] = 4012.0
    assert build_report(changed).html != first


_HASH_SCRIPT = """
import hashlib, sys
from longcat_sim.reports.page import build_report
from tests.reports import sample_report_data
sys.stdout.write(hashlib.sha256(build_report(sample_report_data()).html.encode()).hexdigest())
"""


def test_bytes_do_not_depend_on_the_process_or_its_hash_seed() -> None:
    """Set and dict iteration order varies with PYTHONHASHSEED; the page must not."""
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    out = subprocess.run(
        [sys.executable, "-c", _HASH_SCRIPT],
        cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": seed},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    here = hashlib.sha256(build_report(sample_report_data()).html.encode()).hexdigest()
    assert out.stdout == here


def test_reports_import_no_engine() -> None:
    """reports/ renders plain results: no torch, simpy, model or cluster behind it."""
    script = (
        "import sys\n"
        "import longcat_sim.reports.page, longcat_sim.reports.figures\n"
        "import longcat_sim.reports.tables, longcat_sim.reports.inputs\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'simpy') "
        "or m.startswith(('longcat_sim.model', 'longcat_sim.cluster'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_figure_json_is_canonical_and_script_safe() -> None:
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=[1], y=[2], name="</script><script>alert(1)</script>"))
    text = figure_json(fig)
    assert "</script>" not in text and "<" not in text
    assert json.loads(text)["data"][0]["name"] == "</script><script>alert(1)</script>"
    html = page("t", '<div id="fig-x" class="figure"></div>', [Figure("fig-x", fig)])
    assert html.count("</script>") == 2  # the plotly bundle and the drawing script only


def test_text_from_results_is_escaped() -> None:
    data = sample_report_data()
    data["training_runs"][0]["name"] = "<b>run</b>"
    data["determinism"]["note"] = "<img src=x onerror=alert(1)>"
    html = build_report(data).html
    assert "<b>run</b>" not in html and "<img src=x" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html


def test_figure_ids_must_be_unique_and_plain() -> None:
    import plotly.graph_objects as go

    with pytest.raises(ValueError, match="lower-case letters"):
        Figure('x" onload="alert(1)', go.Figure())
    with pytest.raises(ValueError, match="unique"):
        page("t", "", [Figure("fig-a", go.Figure()), Figure("fig-a", go.Figure())])


def test_missing_results_leave_a_note_instead_of_a_figure() -> None:
    data = sample_report_data(training_runs=[], determinism=None, sdc=None)
    report = build_report(data)
    assert [f.div_id for f in report.figures] == FULL_IDS[:7]
    for flag in ("--train-run DIR", "--determinism-run DIR", "--sdc-run DIR"):
        assert flag in report.html


def test_determinism_verdicts() -> None:
    same = build_report(sample_report_data()).html
    assert 'class="verdict identical"' in same and "Bitwise identical: 2 runs" in same
    diverged = sample_report_data(
        determinism={
            "verdict": "diverged",
            "runs": 2,
            "first_divergence": {"step": 7, "tensor": "layers.1.moe.w1", "max_abs_diff": 0.5},
        }
    )
    html = build_report(diverged).html
    assert 'class="verdict diverged"' in html
    assert "first at step 7 in layers.1.moe.w1 (max |diff| 0.5)" in html


def _control(verdict: str, divergent_run: int = 1) -> dict:
    """A determinism result of 2 runs with a fault planted in run 1 (a negative control)."""
    return {
        "verdict": verdict,
        "runs": 2,
        "first_divergence": None
        if verdict == "identical"
        else {"step": 1, "tensor": "layers.0.mlp: output[0]", "max_abs_diff": None,
              "run": divergent_run},
        "injected": {"site": "weight", "bit": 30, "step": 1, "run": 1},
    }  # fmt: skip


def test_an_injected_run_is_a_negative_control_not_a_plain_divergence() -> None:
    html = build_report(sample_report_data(determinism=_control("diverged"))).html
    assert 'class="verdict control"' in html and 'class="verdict diverged"' not in html
    assert (
        "Negative control: fault injected at weight bit 30 step 1 of run 1; divergence found "
        "(expected), first at step 1 in layers.0.mlp: output[0] (max |diff| not finite)."
    ) in html


def test_a_negative_control_that_finds_nothing_is_the_alarm() -> None:
    html = build_report(sample_report_data(determinism=_control("identical"))).html
    assert 'class="verdict control-failed"' in html and "Negative control FAILED" in html
    assert 'class="verdict identical"' not in html and "Bitwise identical" not in html


def test_a_divergence_before_the_planted_run_is_a_real_one() -> None:
    result = _control("diverged") | {"runs": 3}
    result["first_divergence"]["run"] = 1
    result["injected"]["run"] = 2
    html = build_report(sample_report_data(determinism=result)).html
    assert 'class="verdict diverged"' in html and "Diverged before the negative control" in html
