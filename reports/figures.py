"""Plotly figures from report data (shapes in ``reports.inputs``). Pure: same data, same figure.

Every figure names its template, colours and sizes itself, so nothing depends on plotly's
global defaults.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from longcat_sim.reports.inputs import (
    ReportInputError,
    check_pareto,
    check_sdc,
    check_timelines,
    check_training_overlap,
    check_training_run,
)
from longcat_sim.reports.tables import SCHEDULE_LABELS, model_label

TEMPLATE = "plotly_white"
FONT = {"family": "Helvetica, Arial, sans-serif", "size": 12}
SCHEDULE_ORDER = ("sequential", "tbo", "sbo")
SCHEDULE_TITLES = {
    "sequential": "sequential (no overlap)",
    "tbo": "TBO (two-batch overlap)",
    "sbo": "SBO (single-batch overlap)",
}
STREAM_ORDER = ("compute", "nvlink", "rdma")
GROUP_COLORS = {
    "attention": "#4c78a8",
    "dense_ffn": "#72b7b2",
    "shared_experts": "#54a24b",
    "router": "#b279a2",
    "routed_experts": "#f58518",
    "dispatch": "#e45756",
    "combine": "#9d755d",
    "tp_comm": "#ff9da6",
    "overhead": "#bab0ac",
}
MODEL_COLORS = ("#e45756", "#4c78a8", "#54a24b", "#f58518", "#b279a2", "#72b7b2")
PAPER_COLOR = "#9d9d9d"
SIM_COLOR = "#4c78a8"
MAX_CURVE_POINTS = 2000
COST_TICKS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)


def _layout(fig: go.Figure, *, height: int, **extra: Any) -> go.Figure:
    layout = {
        "template": TEMPLATE,
        "font": FONT,
        "height": height,
        "margin": {"l": 70, "r": 20, "t": 50, "b": 50},
    }
    fig.update_layout(**(layout | extra))
    return fig


# -- per-layer timelines ------------------------------------------------------------------------


def _ordered(names: Sequence[str], preferred: Sequence[str]) -> list[str]:
    return [n for n in preferred if n in names] + sorted(n for n in names if n not in preferred)


def timeline_figure(section: Mapping[str, Any]) -> go.Figure:
    """Gantt charts, one row per schedule: tasks on the compute and link streams over time (µs
    from the first task shown), coloured by stage group; a second micro-batch (TBO) is paler."""
    check_timelines(section)
    schedules = section["schedules"]
    names = _ordered(list(schedules), SCHEDULE_ORDER)
    titles = [
        f"{SCHEDULE_TITLES.get(n, n)}: {schedules[n]['tpl_us']:.0f} µs/layer, "
        f"TPOT {schedules[n]['tpot_ms']:.1f} ms, "
        f"exposed comm {schedules[n]['exposed_comm_share'] * 100:.0f} %"
        for n in names
    ]
    fig = make_subplots(
        rows=len(names), cols=1, shared_xaxes=True, vertical_spacing=0.09, subplot_titles=titles
    )
    shown: set[str] = set()
    for row, name in enumerate(names, start=1):
        events = schedules[name]["events"]
        t0 = min(e["start_us"] for e in events)
        streams = _ordered(sorted({e["stream"] for e in events}), STREAM_ORDER)
        groups = _ordered(sorted({e["group"] for e in events}), tuple(GROUP_COLORS))
        for group in groups:
            mine = [e for e in events if e["group"] == group]
            fig.add_trace(
                go.Bar(
                    orientation="h",
                    name=group,
                    legendgroup=group,
                    showlegend=group not in shown,
                    y=[e["stream"] for e in mine],
                    base=[e["start_us"] - t0 for e in mine],
                    x=[e["end_us"] - e["start_us"] for e in mine],
                    text=[e["name"] for e in mine],
                    customdata=[[e["layer"], e["microbatch"], e["start_us"] - t0] for e in mine],
                    hovertemplate=(
                        "%{text}<br>layer %{customdata[0]}, micro-batch %{customdata[1]}"
                        "<br>start %{customdata[2]:.1f} µs, %{x:.1f} µs<extra></extra>"
                    ),
                    textposition="inside",
                    insidetextanchor="middle",
                    textangle=0,
                    marker={
                        "color": GROUP_COLORS.get(group, "#777777"),
                        "opacity": [1.0 if e["microbatch"] == 0 else 0.6 for e in mine],
                        "line": {"color": "#ffffff", "width": 1},
                    },
                ),
                row=row,
                col=1,
            )
            shown.add(group)
        fig.update_yaxes(categoryorder="array", categoryarray=streams[::-1], row=row, col=1)
    fig.update_xaxes(title_text="µs from the first task shown", row=len(names), col=1)
    layers = ", ".join(str(i) for i in section["layers"])
    return _layout(
        fig,
        height=150 + 170 * len(names),
        barmode="overlay",
        bargap=0.25,
        uniformtext={"mode": "hide", "minsize": 9},
        title={
            "text": (
                f"{model_label(section['model'])}, batch {section['batch_per_device']} per GPU: "
                f"layers {layers} under each schedule"
            ),
            "x": 0.01,
        },
        legend={"orientation": "h", "y": -0.12, "x": 0.0},
        margin={"l": 70, "r": 20, "t": 80, "b": 50},
    )


# -- Pareto front -------------------------------------------------------------------------------


def pareto_mask(points: Sequence[Mapping[str, Any]]) -> list[bool]:
    """True for points no other point beats on both TPS/user and tokens/GPU/s (ties allowed)."""
    mask = []
    for p in points:
        dominated = any(
            q["tps_per_user"] >= p["tps_per_user"]
            and q["tgs"] >= p["tgs"]
            and (q["tps_per_user"] > p["tps_per_user"] or q["tgs"] > p["tgs"])
            for q in points
        )
        mask.append(not dominated)
    return mask


def pareto_figure(section: Mapping[str, Any]) -> go.Figure:
    """Per model over batch sizes: tokens/GPU/s (left) and $/M tokens (right) against TPS/user.
    Filled markers lie on the model's Pareto front, open ones are dominated."""
    check_pareto(section)
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.1,
        subplot_titles=("throughput vs interactivity", "cost vs interactivity"),
    )
    for i, name in enumerate(_ordered(list(section["models"]), ())):
        model = section["models"][name]
        points = sorted(model["points"], key=lambda p: p["batch_per_device"])
        front = pareto_mask(points)
        color = MODEL_COLORS[i % len(MODEL_COLORS)]
        label = f"{model_label(name)} ({model['schedule'].upper()})"
        symbols = ["circle" if on else "circle-open" for on in front]
        custom = [[p["batch_per_device"], p["cost_per_m_tokens"], p["tpot_ms"]] for p in points]
        hover = (
            f"{label}<br>batch %{{customdata[0]}} per GPU<br>%{{x:.1f}} TPS/user, "
            "TPOT %{customdata[2]:.1f} ms<br>%{y:,.0f} tokens/GPU/s<br>"
            "$%{customdata[1]:.3f} per M tokens<extra></extra>"
        )
        common = {"mode": "lines+markers", "legendgroup": name, "customdata": custom}
        fig.add_trace(
            go.Scatter(
                x=[p["tps_per_user"] for p in points],
                y=[p["tgs"] for p in points],
                name=label,
                line={"color": color},
                marker={"color": color, "symbol": symbols, "size": 9},
                hovertemplate=hover,
                **common,
            ),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=[p["tps_per_user"] for p in points],
                y=[p["cost_per_m_tokens"] for p in points],
                name=label,
                showlegend=False,
                line={"color": color, "dash": "dot"},
                marker={"color": color, "symbol": symbols, "size": 8},
                hovertemplate=hover.replace("%{y:,.0f} tokens/GPU/s", "").replace(
                    "$%{customdata[1]:.3f}", "$%{y:.3f}"
                ),
                **common,
            ),
            row=1,
            col=2,
        )
    fig.update_xaxes(title_text="TPS per user (tokens/s)", row=1, col=1)
    fig.update_xaxes(title_text="TPS per user (tokens/s)", row=1, col=2)
    fig.update_yaxes(title_text="tokens / GPU / s", row=1, col=1)
    fig.update_yaxes(
        title_text="$ per M output tokens",
        type="log",
        tickvals=COST_TICKS,
        tickformat=".2f",
        row=1,
        col=2,
    )
    return _layout(fig, height=460, legend={"orientation": "h", "y": -0.18, "x": 0.0})


# -- training overlap ---------------------------------------------------------------------------


def overlap_figure(section: Mapping[str, Any]) -> go.Figure:
    """Share of step time in exposed dispatch/combine, without and with ScMoE: paper vs simulated."""
    check_training_overlap(section)
    schedules = ("baseline", "scmoe")
    labels = [SCHEDULE_LABELS[s] for s in schedules]
    paper = [section["paper"][s] * 100 for s in schedules]
    simulated = [section["simulated"][s]["exposed_comm_share"] * 100 for s in schedules]
    fig = go.Figure()
    for name, values, color in (
        ("paper §5", paper, PAPER_COLOR),
        ("simulated", simulated, SIM_COLOR),
    ):
        fig.add_trace(
            go.Bar(
                x=labels,
                y=values,
                name=name,
                marker={"color": color},
                text=[f"{v:.1f} %" for v in values],
                textposition="outside",
                hovertemplate=f"{name}<br>%{{x}}: %{{y:.1f}} %<extra></extra>",
            )
        )
    top = max(*paper, *simulated)
    fig.update_yaxes(title_text="exposed communication (% of step)", range=[0, top * 1.2])
    return _layout(fig, height=340, barmode="group", legend={"orientation": "h", "y": 1.12})


# -- training runs ------------------------------------------------------------------------------


def _thin(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """At most MAX_CURVE_POINTS records, evenly strided, always keeping the last."""
    if len(records) <= MAX_CURVE_POINTS:
        return list(records)
    stride = -(-len(records) // MAX_CURVE_POINTS)
    kept = list(records[::stride])
    if kept[-1] is not records[-1]:
        kept.append(records[-1])
    return kept


def training_figure(run: Mapping[str, Any]) -> go.Figure:
    """Loss curves (left) and each layer's average FFN experts per token against the target."""
    check_training_run(run, "training run")
    records = sorted(run["records"], key=lambda r: r["step"])
    shown = _thin(records)
    steps = [r["step"] for r in shown]
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.1,
        subplot_titles=("loss (nats/token)", "average FFN experts per token, per layer"),
    )
    curves = (
        ("lm_loss", shown, "train LM loss", "lines", "#4c78a8"),
        ("val_loss", [r for r in records if "val_loss" in r], "validation loss", "lines+markers",
         "#f58518"),
    )  # fmt: skip
    for key, rows, name, mode, color in curves:
        if rows:
            x, y = [r["step"] for r in rows], [r[key] for r in rows]
            line = {"color": color}
            fig.add_trace(go.Scatter(x=x, y=y, name=name, mode=mode, line=line), row=1, col=1)
    n_layers = len(records[0]["ffn_experts_mean"])
    for layer in range(n_layers):
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=[r["ffn_experts_mean"][layer] for r in shown],
                name=f"layer {layer}",
                mode="lines",
                line={"color": MODEL_COLORS[layer % len(MODEL_COLORS)], "width": 1.5},
            ),
            row=1,
            col=2,
        )
    target = run["target_ffn_experts"]
    fig.add_trace(
        go.Scatter(
            x=[steps[0], steps[-1]],
            y=[target, target],
            name=f"target {target:g}",
            mode="lines",
            line={"color": "#000000", "dash": "dash"},
        ),
        row=1,
        col=2,
    )
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_xaxes(title_text="step", row=1, col=2)
    return _layout(
        fig,
        height=400,
        title={"text": f"{run['name']}: {run['model']}", "x": 0.01},
        legend={"orientation": "h", "y": -0.2, "x": 0.0},
    )


# -- silent data corruption ---------------------------------------------------------------------


def sdc_rates(result: Mapping[str, Any]) -> dict[str, tuple[list[str], list[int], list[list]]]:
    """Detector -> (sites, bits, detected share per [site][bit], None where nothing was tried)."""
    check_sdc(result)
    trials = result["trials"]
    seen = sorted({name for t in trials for name in t["detected"]})
    detectors = list(result.get("detectors", seen))
    missing = [d for d in seen if d not in detectors]
    if missing:
        raise ReportInputError(f"sdc.detectors omits detectors the trials name: {missing}")
    sites = sorted({t["site"] for t in trials})
    bits = sorted({t["bit"] for t in trials})
    out = {}
    for detector in detectors:
        hits: dict[tuple[str, int], list[int]] = {}
        for t in trials:
            if detector in t["detected"]:
                cell = hits.setdefault((t["site"], t["bit"]), [0, 0])
                cell[0] += int(t["detected"][detector])
                cell[1] += 1
        z = [
            [hits[(s, b)][0] / hits[(s, b)][1] if (s, b) in hits else None for b in bits]
            for s in sites
        ]
        out[detector] = (sites, bits, z)
    return out


def sdc_figure(result: Mapping[str, Any]) -> go.Figure:
    """One heat map per detector: share of injected bit flips detected, site x bit."""
    rates = sdc_rates(result)
    detectors = list(rates)
    fig = make_subplots(
        rows=1,
        cols=len(detectors),
        shared_yaxes=True,
        horizontal_spacing=0.04,
        subplot_titles=detectors,
    )
    for col, detector in enumerate(detectors, start=1):
        sites, bits, z = rates[detector]
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=[str(b) for b in bits],
                y=sites,
                coloraxis="coloraxis",
                name=detector,
                hovertemplate=(
                    f"{detector}<br>%{{y}}, bit %{{x}}<br>detected %{{z:.0%}}<extra></extra>"
                ),
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(title_text="flipped bit", type="category", row=1, col=col)
    sites = rates[detectors[0]][0]
    return _layout(
        fig,
        height=160 + 26 * len(sites),
        coloraxis={
            "cmin": 0.0,
            "cmax": 1.0,
            "colorscale": "Viridis",
            "colorbar": {"title": {"text": "detected"}, "tickformat": ".0%"},
        },
        margin={"l": 160, "r": 20, "t": 50, "b": 50},
    )
