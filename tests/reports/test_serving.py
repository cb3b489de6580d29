"""The serving section's renderer: latency CDFs per run, load over time per layout and pool, the
table of percentiles, goodput, SLO attainment and cost, and the checks of its input."""

from __future__ import annotations

import pytest

from longcat_sim.reports import figures, tables
from longcat_sim.reports.inputs import ReportInputError, check_report_data, check_serving
from longcat_sim.reports.page import build_report
from tests.reports import sample_report_data

RUN_LABELS = [
    "co-located, recorded rate",
    "co-located, 10x rate",
    "disaggregated, recorded rate",
    "disaggregated, 10x rate",
]


def _serving() -> dict:
    return sample_report_data()["serving"]


def test_latency_figure_has_a_cdf_per_run_and_metric_on_log_ms_axes() -> None:
    section = _serving()
    fig = figures.serving_latency_figure(section)
    curves = [t for t in fig.data if t.legendgroup]
    assert len(curves) == 4 * 3
    assert [t.name for t in curves if t.showlegend] == RUN_LABELS
    for trace in curves:
        assert list(trace.y) == list(range(101))
        assert list(trace.x) == sorted(trace.x)
    # each run's three curves, in the panel order TTFT, TPOT, E2E
    first = section["runs"][0]
    assert [list(t.x) for t in curves[:3]] == [
        first["ttft_cdf_ms"],
        first["tpot_cdf_ms"],
        first["e2e_cdf_ms"],
    ]
    layout = fig.layout
    axes = [layout.xaxis, layout.xaxis2, layout.xaxis3]
    assert [a.title.text for a in axes] == ["TTFT (ms)", "TPOT (ms)", "E2E (ms)"]
    assert all(a.type == "log" for a in axes)
    assert layout.yaxis.title.text == "percentile of finished requests"
    assert tuple(layout.yaxis.range) == (0, 100)
    targets = [t for t in fig.data if not t.legendgroup]
    assert [t.name for t in targets] == ["TTFT target 2000 ms", "TPOT target 50 ms"]
    assert [t.xaxis for t in targets] == ["x", "x2"]


def test_load_figure_plots_every_pool_and_the_kv_cache_share_of_capacity() -> None:
    section = _serving()
    fig = figures.serving_load_figure(section)
    layout = fig.layout
    y_titles = [layout.yaxis.title.text, layout.yaxis3.title.text]
    y_titles += [layout.yaxis5.title.text, layout.yaxis7.title.text]
    assert y_titles == ["queued (requests)", "running (requests)", "KV cache share", "busy share"]
    assert layout.xaxis7.title.text == layout.xaxis8.title.text == "time (s)"
    names = sorted({t.name for t in fig.data})
    assert names == sorted(
        [
            "co-located, recorded rate",
            "co-located, 10x rate",
            *(
                f"disaggregated {pool} pool, {rate}"
                for pool in ("prefill", "decode")
                for rate in ("recorded rate", "10x rate")
            ),
        ]
    )
    # co-located: 4 rows per run; disaggregated: the prefill pool holds no KV cache (3 rows)
    assert len(fig.data) == 2 * 4 + 2 * (3 + 4)
    kv = [t for t in fig.data if t.yaxis in ("y5", "y6")]
    assert sorted({t.name.split(" pool")[0] for t in kv}) == [
        "co-located, 10x rate",
        "co-located, recorded rate",
        "disaggregated decode",
    ]
    run = section["runs"][1]  # co-located at 10x
    pool = run["pools"]["colocated"]
    (trace,) = [t for t in kv if t.name == "co-located, 10x rate"]
    expected = [k / pool["kv_capacity_tokens"] for k in pool["timeline"]["kv_tokens"]]
    assert list(trace.y) == pytest.approx(expected)
    assert list(trace.x) == pool["timeline"]["t_s"]
    # one legend entry per run and pool
    assert sum(bool(t.showlegend) for t in fig.data) == len(names)


def test_serving_table_has_a_row_per_run() -> None:
    table = tables.serving_table(_serving())
    assert [f"{r[0].text}, {r[1].text}" for r in table.rows] == RUN_LABELS
    assert [g[0] for g in table.groups] == ["", "TTFT (ms)", "TPOT (ms)", "E2E (ms)", ""]
    first = table.rows[0]
    assert [c.text for c in first[5:8]] == ["55.0", "99.0", "220.0"]  # TTFT P50/P90/P99
    assert [c.text for c in first[-4:]] == ["3.04", "100.0 %", "met", "25.000"]
    assert "P90 TTFT within 2000 ms" in table.caption


def test_undefined_figures_show_as_n_a() -> None:
    section = _serving()
    section["runs"][0]["cost_per_m_tokens"] = None
    assert tables.serving_table(section).rows[0][-1].text == "n/a"


def test_the_page_has_the_serving_section_with_its_source() -> None:
    report = build_report(sample_report_data())
    html = report.html
    assert '<section id="serving">' in html and '<a href="#serving">' in html
    ids = [f.div_id for f in report.figures]
    assert ids.index("fig-serving-latency") + 1 == ids.index("fig-serving-load")
    assert "Azure LLM inference trace 2023, conversation" in html
    assert "CC-BY 4.0" in html and "time-scaled to 10x" in html
    # a trace from a file names the file, without the Azure attribution
    data = sample_report_data()
    data["serving"]["trace"] = "mine.csv"
    other = build_report(data).html
    assert "trace mine.csv" in other and "CC-BY" not in other


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda s: s["runs"][0]["ttft_cdf_ms"].pop(), r"ttft_cdf_ms must hold 101 percentiles"),
        (
            lambda s: s["runs"][1]["e2e_cdf_ms"].__setitem__(50, 0.0),
            r"runs\[1\]\.e2e_cdf_ms decreases at percentile 50",
        ),
        (
            lambda s: s["runs"][2]["pools"]["decode"]["timeline"]["queued"].pop(),
            r"pools\.decode\.timeline lists differ in length",
        ),
        (lambda s: s["runs"][2]["pools"].pop("prefill"), r"must name the pools prefill, decode"),
        (lambda s: s["runs"][0].update(layout="mixed"), r"layout must be one of"),
        (lambda s: s["runs"].clear(), r"serving\.runs must not be empty"),
        (lambda s: s["runs"][3].update(tpot_p90_ms="fast"), r"tpot_p90_ms must be a finite"),
    ],
)
def test_malformed_serving_data_is_named(mutate, needle: str) -> None:
    data = sample_report_data()
    mutate(data["serving"])
    with pytest.raises(ReportInputError, match=needle):
        check_report_data(data)


def test_sample_serving_data_passes() -> None:
    check_serving(_serving())
