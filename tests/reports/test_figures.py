"""Figures and tables from report data: they draw exactly the data given, Pareto fronts and SDC
rates match brute-force references, and malformed input names what is wrong."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longcat_sim.reports import figures, tables
from longcat_sim.reports.html import figure_json
from longcat_sim.reports.inputs import ReportInputError, check_report_data
from tests.reports import sample_report_data

# -- timelines ----------------------------------------------------------------------------------


def test_timeline_draws_every_event_once_at_its_time() -> None:
    section = sample_report_data()["timelines"]
    fig = figures.timeline_figure(section)
    drawn = []
    for trace in fig.data:
        for y, base, width, name in zip(trace.y, trace.base, trace.x, trace.text, strict=True):
            drawn.append((trace.name, y, base, width, name))
    expected = []
    for schedule in section["schedules"].values():
        t0 = min(e["start_us"] for e in schedule["events"])
        expected += [
            (e["group"], e["stream"], e["start_us"] - t0, e["end_us"] - e["start_us"], e["name"])
            for e in schedule["events"]
        ]
    assert Counter(drawn) == Counter(expected)
    # one subplot per schedule, sequential first; each legend entry shown once
    assert [a.text.split(":")[0] for a in fig.layout.annotations] == [
        figures.SCHEDULE_TITLES[s] for s in ("sequential", "tbo", "sbo")
    ]
    legend = [t.name for t in fig.data if t.showlegend]
    assert sorted(legend) == sorted({group for group, *_ in expected})


def test_timeline_rejects_an_event_that_ends_before_it_starts() -> None:
    data = sample_report_data()
    data["timelines"]["schedules"]["sbo"]["events"][2]["end_us"] = -1.0
    with pytest.raises(ReportInputError, match=r"timelines\.schedules\.sbo\.events\[2\] ends"):
        figures.timeline_figure(data["timelines"])


# -- Pareto front -------------------------------------------------------------------------------


def _dominates(q: dict, p: dict) -> bool:
    return (
        q["tps_per_user"] >= p["tps_per_user"]
        and q["tgs"] >= p["tgs"]
        and (q["tps_per_user"], q["tgs"]) != (p["tps_per_user"], p["tgs"])
    )


def _front_is_correct(points: list[dict], mask: list[bool]) -> bool:
    """Reference: front points are dominated by nobody; every other point by a front point."""
    front = [p for p, on in zip(points, mask, strict=True) if on]
    for p, on in zip(points, mask, strict=True):
        if on and any(_dominates(q, p) for q in points):
            return False
        if not on and not any(_dominates(q, p) for q in front):
            return False
    return True


values = st.integers(min_value=1, max_value=20).map(float)
point_lists = st.lists(
    st.builds(lambda a, b: {"tps_per_user": a, "tgs": b}, values, values), min_size=1, max_size=12
)


@settings(max_examples=50)
@given(point_lists)
def test_pareto_mask_matches_the_brute_force_definition(points: list[dict]) -> None:
    assert _front_is_correct(points, figures.pareto_mask(points))


def test_negative_control_a_wrong_front_fails_the_reference() -> None:
    points = [{"tps_per_user": 1.0, "tgs": 1.0}, {"tps_per_user": 2.0, "tgs": 2.0}]
    assert figures.pareto_mask(points) == [False, True]
    assert not _front_is_correct(points, [True, True])
    assert not _front_is_correct(points, [False, False])


def test_pareto_figure_plots_each_model_sorted_by_batch_with_front_markers() -> None:
    section = sample_report_data()["pareto"]
    fig = figures.pareto_figure(section)
    by_name: dict[str, list] = {}
    for trace in fig.data:
        by_name.setdefault(trace.legendgroup, []).append(trace)
    for name, model in section["models"].items():
        points = sorted(model["points"], key=lambda p: p["batch_per_device"])
        fitting = [p for p in points if p["fits"]]
        throughput, cost = (t for t in by_name[name] if t.opacity == 1.0)
        assert list(throughput.x) == [p["tps_per_user"] for p in fitting]
        assert list(throughput.y) == [p["tgs"] for p in fitting]
        assert list(cost.y) == [p["cost_per_m_tokens"] for p in fitting]
        mask = [on for p, on in zip(points, figures.pareto_mask(points), strict=True) if p["fits"]]
        assert list(throughput.marker.symbol) == ["circle" if on else "circle-open" for on in mask]
    # the LongCat sample has one dominated batch (32: slower and less throughput than 16)
    longcat = by_name["longcat-flash"][0]
    assert list(longcat.marker.symbol) == ["circle", "circle", "circle-open"]


def test_a_point_that_does_not_fit_is_greyed_and_never_on_the_front() -> None:
    """LongCat's batch 256 beats batches 16 and 32 on both axes but does not fit in HBM: it is
    drawn as faint crosses off the model's line, and 16 stays on the front."""
    section = sample_report_data()["pareto"]
    points = sorted(
        section["models"]["longcat-flash"]["points"], key=lambda p: p["batch_per_device"]
    )
    assert figures.pareto_mask(points) == [True, True, False, False]
    fitting_as_if = [p | {"fits": True} for p in points]
    assert figures.pareto_mask(fitting_as_if) == [True, False, False, True]  # negative control
    fig = figures.pareto_figure(section)
    faint = [t for t in fig.data if t.legendgroup == "longcat-flash" and t.opacity < 1.0]
    assert len(faint) == 2  # one per panel
    for trace in faint:
        assert trace.mode == "markers" and trace.marker.symbol == figures.INFEASIBLE_SYMBOL
        assert trace.x == (85.0,)
        assert "does not fit in HBM" in trace.hovertemplate
    solid = [t for t in fig.data if t.legendgroup == "longcat-flash" and t.opacity == 1.0]
    assert all(85.0 not in t.x for t in solid)


@settings(max_examples=50)
@given(st.lists(st.builds(lambda a, b, f: {"tps_per_user": a, "tgs": b, "fits": f}, values,
                          values, st.booleans()), min_size=1, max_size=12))  # fmt: skip
def test_the_front_is_the_front_of_the_points_that_fit(points: list[dict]) -> None:
    mask = figures.pareto_mask(points)
    fitting = [p for p in points if p["fits"]]
    on_front = iter(figures.pareto_mask(fitting))
    assert mask == [next(on_front) if p["fits"] else False for p in points]


# -- memory and prefill -------------------------------------------------------------------------


def test_memory_figure_stacks_every_part_and_greys_what_does_not_fit() -> None:
    section = sample_report_data()["memory"]
    fig = figures.memory_figure(section)
    bars = [t for t in fig.data if t.type == "bar"]
    lines = [t for t in fig.data if t.type == "scatter"]
    assert len(bars) == 4 * len(section["models"]) and len(lines) == len(section["models"])
    assert fig.layout.barmode == "stack"
    for line in lines:
        assert set(line.y) == {section["hbm_gb"]}
    i = sorted(section["models"]).index("longcat-flash")  # models in name order
    longcat = bars[4 * i : 4 * i + 4]
    points = section["models"]["longcat-flash"]["points"]
    assert list(longcat[0].x) == ["8", "64", "192"]
    for trace, part in zip(longcat, figures.MEMORY_PARTS, strict=True):
        assert list(trace.y) == [p["hbm_breakdown_gb"][part] for p in points]
        # batch 192 does not fit: faint and hatched; the others solid
        assert list(trace.marker.opacity) == [1.0, 1.0, figures.INFEASIBLE_OPACITY]
        assert list(trace.marker.pattern.shape) == ["", "", figures.INFEASIBLE_PATTERN]
    stacked = [sum(t.y[j] for t in longcat) for j in range(3)]
    assert stacked == pytest.approx([p["hbm_used_gb"] for p in points])
    assert stacked[2] > section["hbm_gb"] > stacked[1]
    titles = [a.text for a in fig.layout.annotations]
    assert titles[i] == "LongCat-Flash (SBO): fits up to 141 per GPU"


def test_memory_table_states_the_largest_batch_per_model() -> None:
    table = tables.memory_table(sample_report_data()["memory"])
    assert [[c.text for c in row] for row in table.rows] == [
        ["DeepSeek-V3", "TBO", "142", "192"],
        ["LongCat-Flash", "SBO", "141", "192"],
    ]


def test_prefill_figure_has_ttft_and_throughput_on_a_log2_axis() -> None:
    section = sample_report_data()["prefill"]
    fig = figures.prefill_figure(section)
    curves = [t for t in fig.data if t.mode == "lines+markers"]
    crosses = [t for t in fig.data if t.mode == "markers"]
    assert len(curves) == 2 * len(section["models"])
    longcat = section["models"]["longcat-flash"]["points"]
    ttft, tgs = (t for t in curves if t.legendgroup == "longcat-flash")
    assert list(ttft.x) == [p["prompt_len"] for p in longcat]
    assert list(ttft.y) == [p["ttft_ms"] for p in longcat]
    assert list(tgs.y) == [p["input_tgs"] for p in longcat]
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis2.type == "log"
    assert list(fig.layout.xaxis.ticktext) == ["1K", "2K", "4K", "8K", "16K", "32K"]
    # the 32K-token forwards of both models do not fit: a cross per panel and model
    assert len(crosses) == 4 and all(t.x == (32768,) for t in crosses)
    assert all(t.marker.symbol == figures.INFEASIBLE_SYMBOL for t in crosses)


def test_prefill_profile_table_and_error() -> None:
    section = sample_report_data()["prefill"]
    assert tables.prefill_profile_error(section) == pytest.approx(8021 / 7839 - 1)
    (row,) = tables.prefill_profile_table(section).rows
    assert [c.text for c in row[-3:]] == ["7,839", "8,021", "+2.3 %"]
    assert row[-1].kind == "good"


# -- training overlap and training runs -----------------------------------------------------------


def test_overlap_figure_shows_paper_and_simulated_percentages() -> None:
    section = sample_report_data()["training_overlap"]
    fig = figures.overlap_figure(section)
    paper, simulated = fig.data
    assert list(paper.y) == pytest.approx([25.3, 8.4])
    assert list(simulated.y) == pytest.approx([30.0, 10.0])


def test_training_figure_has_a_curve_per_layer_and_the_target() -> None:
    run = sample_report_data()["training_runs"][0]
    fig = figures.training_figure(run)
    names = [t.name for t in fig.data]
    assert names == ["train LM loss", "validation loss", "layer 0", "layer 1", "target 2"]
    layer0 = fig.data[2]
    assert list(layer0.y) == [r["ffn_experts_mean"][0] for r in run["records"]]
    assert list(fig.data[-1].y) == [2.0, 2.0]
    assert list(fig.data[1].x) == [4, 9]


def test_long_training_curves_are_thinned_keeping_the_last_step() -> None:
    n = figures.MAX_CURVE_POINTS * 2 + 7
    run = {
        "name": "long",
        "model": "tiny",
        "target_ffn_experts": 2.0,
        "records": [{"step": s, "lm_loss": 1.0, "ffn_experts_mean": [2.0]} for s in range(n)],
    }
    fig = figures.training_figure(run)
    steps = list(fig.data[0].x)
    assert len(steps) <= figures.MAX_CURVE_POINTS + 1
    assert steps[0] == 0 and steps[-1] == n - 1
    assert steps == sorted(steps)


def test_training_run_with_inconsistent_layers_is_rejected() -> None:
    run = sample_report_data()["training_runs"][0]
    run["records"][3]["ffn_experts_mean"] = [2.0]
    with pytest.raises(ReportInputError, match=r"records\[3\]\.ffn_experts_mean has 1 layers"):
        figures.training_figure(run)


# -- silent data corruption -------------------------------------------------------------------


trials = st.lists(
    st.fixed_dictionaries(
        {
            "site": st.sampled_from(["a", "b", "c"]),
            "bit": st.integers(0, 7),
            "detected": st.fixed_dictionaries({"replay": st.booleans(), "checksum": st.booleans()}),
        }
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=40)
@given(trials)
def test_sdc_rates_are_detected_over_tried_per_cell(trials: list[dict]) -> None:
    rates = figures.sdc_rates({"trials": trials})
    assert list(rates) == ["checksum", "replay"]
    for detector, (sites, bits, z) in rates.items():
        tried = Counter((t["site"], t["bit"]) for t in trials)
        hit = Counter((t["site"], t["bit"]) for t in trials if t["detected"][detector])
        for i, site in enumerate(sites):
            for j, bit in enumerate(bits):
                if tried[(site, bit)]:
                    assert z[i][j] == hit[(site, bit)] / tried[(site, bit)]
                else:
                    assert z[i][j] is None


def test_sdc_figure_has_a_heat_map_per_detector_on_one_scale() -> None:
    result = sample_report_data()["sdc"]
    fig = figures.sdc_figure(result)
    assert [t.name for t in fig.data] == ["checksum", "replay"]
    checksum = fig.data[0]
    assert list(checksum.y) == ["layers.0.attn", "layers.0.moe"]
    assert list(checksum.x) == ["0", "10", "20", "30"]
    assert [list(row) for row in checksum.z] == [[0.0, 0.0, 1.0, 1.0]] * 2
    assert fig.layout.coloraxis.cmin == 0.0 and fig.layout.coloraxis.cmax == 1.0


def test_sdc_detector_order_must_cover_the_trials() -> None:
    result = sample_report_data()["sdc"] | {"detectors": ["replay"]}
    with pytest.raises(ReportInputError, match="omits detectors"):
        figures.sdc_rates(result)
    ordered = figures.sdc_rates(sample_report_data()["sdc"] | {"detectors": ["replay", "checksum"]})
    assert list(ordered) == ["replay", "checksum"]


@pytest.mark.parametrize(
    ("trial", "needle"),
    [
        ({"site": "x", "bit": -1, "detected": {"r": True}}, "bit must be >= 0"),
        ({"site": "x", "bit": 1, "detected": {"r": 1}}, "detected.r must be true or false"),
        ({"site": "x", "bit": 1, "detected": {}}, "at least one detector"),
        ({"bit": 1, "detected": {"r": True}}, "lacks the key 'site'"),
    ],
)
def test_bad_sdc_trials_name_the_problem(trial: dict, needle: str) -> None:
    with pytest.raises(ReportInputError, match=needle):
        figures.sdc_rates({"trials": [trial]})


# -- tables ----------------------------------------------------------------------------------


def test_table7_errors_and_cells() -> None:
    section = sample_report_data()["table7"]
    errors = tables.table7_errors(section)
    assert errors["longcat-flash"]["attention_us"] == pytest.approx(220 / 264 - 1)
    assert errors["deepseek-v3"]["combine_us"] == 0.0
    table = tables.table7_table(section)
    assert table.groups == (("", 1), ("LongCat-Flash", 3), ("DeepSeek-V3", 3))
    attention = table.rows[1]
    assert [c.text for c in attention[:4]] == ["attention / layer (µs)", "264", "220", "-16.7 %"]
    assert attention[3].kind == "miss"  # beyond 15 %
    tpot = next(r for r in table.rows if r[0].text == "TPOT (ms)")
    assert tpot[3].text == "-3.1 %" and tpot[3].kind == "good"


@pytest.mark.parametrize(
    ("error", "kind"),
    [(0.0, "good"), (0.05, "good"), (-0.1, "fair"), (0.15, "fair"), (0.2, "miss")],
)
def test_error_bands(error: float, kind: str) -> None:
    assert tables.error_kind(error) == kind


def test_errors_that_round_to_zero_have_no_minus_sign() -> None:
    assert tables.error_cell(-1e-4).text == "+0.0 %"
    assert tables.error_cell(-0.0016).text == "-0.2 %"
    assert tables.signed_percent(0.0123, "pp") == "+1.2 pp"


def test_table6_and_overlap_tables() -> None:
    data = sample_report_data()
    (row,) = tables.table6_table(data["table6"]).rows
    assert [c.text for c in row[5:8]] == ["3,785", "4,011", "+6.0 %"]
    diffs = tables.overlap_errors(data["training_overlap"])
    assert diffs == pytest.approx({"baseline": 0.3 - 0.253, "scmoe": 0.1 - 0.084})
    baseline = tables.overlap_table(data["training_overlap"]).rows[0]
    assert [c.text for c in baseline[:4]] == ["without ScMoE", "25.3 %", "30.0 %", "+4.7 pp"]


# -- input checks and determinism of the figures ------------------------------------------------


def test_sample_data_has_the_documented_shape() -> None:
    check_report_data(sample_report_data())


@pytest.mark.parametrize(
    ("section", "mutate", "needle"),
    [
        ("table7", lambda s: s["rows"][0]["paper"].pop("tpot_ms"), r"lacks the key 'tpot_ms'"),
        ("table6", lambda s: s["rows"][0].update(context="5k"), r"context must be an integer"),
        ("pareto", lambda s: s["models"].clear(), r"at least one model"),
        (
            "pareto",
            lambda s: s["models"]["deepseek-v3"]["points"][1].pop("fits"),
            r"pareto\.models\.deepseek-v3\.points\[1\] lacks the key 'fits'",
        ),
        (
            "memory",
            lambda s: s["models"]["longcat-flash"]["points"][0].update(fits=1),
            r"points\[0\]\.fits must be true or false",
        ),
        (
            "memory",
            lambda s: s["models"]["deepseek-v3"]["points"][2]["hbm_breakdown_gb"].pop("reserve"),
            r"hbm_breakdown_gb lacks the key 'reserve'",
        ),
        ("prefill", lambda s: s["profile"].update(measured_tgs=0.0), r"must be positive"),
        (
            "prefill",
            lambda s: s["models"]["longcat-flash"]["points"][3].update(ttft_ms=None),
            r"prefill\.models\.longcat-flash\.points\[3\]\.ttft_ms must be a finite number",
        ),
        ("determinism", lambda s: s.update(verdict="same"), r"verdict must be one of"),
        (
            "training_overlap",
            lambda s: s["simulated"]["scmoe"].update(step_ms=float("nan")),
            r"step_ms must be a finite number",
        ),
    ],
)
def test_malformed_sections_are_named(section: str, mutate, needle: str) -> None:
    data = sample_report_data()
    mutate(data[section])
    with pytest.raises(ReportInputError, match=needle):
        check_report_data(data)


def test_same_data_gives_the_same_figure_json_and_different_data_does_not() -> None:
    first = figure_json(figures.pareto_figure(sample_report_data()["pareto"]))
    second = figure_json(figures.pareto_figure(sample_report_data()["pareto"]))
    assert first == second
    changed = sample_report_data()
    changed["pareto"]["models"]["deepseek-v3"]["points"][0]["tgs"] = 321.0
    assert figure_json(figures.pareto_figure(changed["pareto"])) != first
    # canonical: keys sorted at every level
    parsed = json.loads(first)
    assert json.dumps(parsed, sort_keys=True, separators=(",", ":")) == first.replace(
        "\\u003c", "<"
    ).replace("\\u003e", ">").replace("\\u0026", "&")
