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
    CDF_POINTS,
    MEMORY_PARTS,
    SERVE_LAYOUTS,
    SERVE_POOLS,
    ReportInputError,
    check_memory,
    check_pareto,
    check_prefill,
    check_sdc,
    check_serving,
    check_timelines,
    check_training_overlap,
    check_training_run,
)
from longcat_sim.reports.tables import (
    LAYOUT_LABELS,
    SCHEDULE_LABELS,
    model_label,
    rate_label,
    serve_run_label,
    trace_label,
)

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
MEMORY_COLORS = {
    "weights": "#4c78a8",
    "kv_cache": "#f58518",
    "activations": "#54a24b",
    "reserve": "#bab0ac",
}
MEMORY_LABELS = {
    "weights": "weights",
    "kv_cache": "KV cache",
    "activations": "activations",
    "reserve": "reserve",
}
INFEASIBLE_OPACITY = 0.35  # points and bars that do not fit in HBM
INFEASIBLE_SYMBOL = "x"
INFEASIBLE_PATTERN = "/"
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
    """True for points that fit in HBM (``fits``, true when absent) and that no other fitting
    point beats on both TPS/user and tokens/GPU/s (ties allowed)."""
    feasible = [p for p in points if p.get("fits", True)]
    mask = []
    for p in points:
        dominated = any(
            q["tps_per_user"] >= p["tps_per_user"]
            and q["tgs"] >= p["tgs"]
            and (q["tps_per_user"] > p["tps_per_user"] or q["tgs"] > p["tgs"])
            for q in feasible
        )
        mask.append(bool(p.get("fits", True)) and not dominated)
    return mask


def _pareto_hover(label: str, fits: bool, y_text: str, cost_text: str) -> str:
    lines = [
        label,
        "batch %{customdata[0]} per GPU" + ("" if fits else ", does not fit in HBM"),
        "%{x:.1f} TPS/user, TPOT %{customdata[2]:.1f} ms",
        y_text,
        cost_text,
    ]
    return "<br>".join(line for line in lines if line) + "<extra></extra>"


def _pareto_traces(
    fig: go.Figure, name: str, label: str, color: str, points: list[Mapping[str, Any]]
) -> None:
    """One model's points in both panels: the ones that fit as a line (filled markers on the
    front, open ones dominated), the ones that do not as faint crosses off the line."""
    front = pareto_mask(points)
    fitting = [(p, on) for p, on in zip(points, front, strict=True) if p["fits"]]
    over = [p for p in points if not p["fits"]]
    panels = (
        (1, "tgs", "%{y:,.0f} tokens/GPU/s", "$%{customdata[1]:.3f} per M tokens", "solid", 9),
        (2, "cost_per_m_tokens", "", "$%{y:.3f} per M tokens", "dot", 8),
    )
    for col, key, y_text, cost_text, dash, size in panels:
        for chosen, fits in (([p for p, _ in fitting], True), (over, False)):
            if not chosen:
                continue
            symbols = (
                ["circle" if on else "circle-open" for _, on in fitting]
                if fits
                else INFEASIBLE_SYMBOL
            )
            fig.add_trace(
                go.Scatter(
                    x=[p["tps_per_user"] for p in chosen],
                    y=[p[key] for p in chosen],
                    name=label if fits else f"{label}: does not fit in HBM",
                    legendgroup=name,
                    showlegend=col == 1 and fits,
                    mode="lines+markers" if fits else "markers",
                    line={"color": color, "dash": dash},
                    marker={"color": color, "symbol": symbols, "size": size},
                    opacity=1.0 if fits else INFEASIBLE_OPACITY,
                    customdata=[
                        [p["batch_per_device"], p["cost_per_m_tokens"], p["tpot_ms"]]
                        for p in chosen
                    ],
                    hovertemplate=_pareto_hover(label, fits, y_text, cost_text),
                ),
                row=1,
                col=col,
            )


def pareto_figure(section: Mapping[str, Any]) -> go.Figure:
    """Per model over batch sizes: tokens/GPU/s (left) and $/M tokens (right) against TPS/user.
    Filled markers lie on the model's Pareto front, open ones are dominated; faint crosses do
    not fit in HBM and are never on the front."""
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
        label = f"{model_label(name)} ({model['schedule'].upper()})"
        _pareto_traces(fig, name, label, MODEL_COLORS[i % len(MODEL_COLORS)], points)
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


# -- memory -----------------------------------------------------------------------------------


def memory_figure(section: Mapping[str, Any]) -> go.Figure:
    """Per model, a stacked bar of per-GPU HBM (weights, KV cache, activations, reserve) at each
    batch size, with the HBM capacity as a dashed line; bars that do not fit are faint and
    hatched."""
    check_memory(section)
    names = _ordered(list(section["models"]), ())
    models = section["models"]
    titles = [
        f"{model_label(n)} ({models[n]['schedule'].upper()}): "
        f"fits up to {models[n]['max_batch_per_device']} per GPU"
        for n in names
    ]
    fig = make_subplots(
        rows=1, cols=len(names), shared_yaxes=True, horizontal_spacing=0.04, subplot_titles=titles
    )
    hbm = section["hbm_gb"]
    for col, name in enumerate(names, start=1):
        points = sorted(models[name]["points"], key=lambda p: p["batch_per_device"])
        x = [str(p["batch_per_device"]) for p in points]
        fits = [p["fits"] for p in points]
        for part in MEMORY_PARTS:
            fig.add_trace(
                go.Bar(
                    x=x,
                    y=[p["hbm_breakdown_gb"][part] for p in points],
                    name=MEMORY_LABELS[part],
                    legendgroup=part,
                    showlegend=col == 1,
                    marker={
                        "color": MEMORY_COLORS[part],
                        "opacity": [1.0 if f else INFEASIBLE_OPACITY for f in fits],
                        "pattern": {"shape": ["" if f else INFEASIBLE_PATTERN for f in fits]},
                        "line": {"color": "#ffffff", "width": 0.5},
                    },
                    customdata=[
                        [p["hbm_used_gb"], "" if p["fits"] else " (does not fit)"] for p in points
                    ],
                    hovertemplate=(
                        f"{model_label(name)}, batch %{{x}} per GPU%{{customdata[1]}}<br>"
                        f"{MEMORY_LABELS[part]} %{{y:.1f}} GB of %{{customdata[0]:.1f}} GB"
                        "<extra></extra>"
                    ),
                ),
                row=1,
                col=col,
            )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=[hbm] * len(x),
                name=f"HBM {hbm:.0f} GB",
                legendgroup="hbm",
                showlegend=col == 1,
                mode="lines",
                line={"color": "#000000", "dash": "dash", "width": 1.5},
                hovertemplate=f"HBM {hbm:.0f} GB per GPU<extra></extra>",
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(title_text="requests per GPU", type="category", row=1, col=col)
    fig.update_yaxes(title_text="HBM per GPU (GB)", row=1, col=1)
    return _layout(
        fig,
        height=440,
        barmode="stack",
        bargap=0.2,
        legend={"orientation": "h", "y": -0.2, "x": 0.0},
    )


# -- prefill ------------------------------------------------------------------------------------


def _tokens_label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def prefill_figure(section: Mapping[str, Any]) -> go.Figure:
    """Per model against prompt length (log 2): TTFT without queueing (left) and prompt tokens per
    GPU per second (right); a cross marks a forward that does not fit in HBM."""
    check_prefill(section)
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.1,
        subplot_titles=("time to first token (no queueing)", "prompt tokens / GPU / s"),
    )
    lengths: set[int] = set()
    for i, name in enumerate(_ordered(list(section["models"]), ())):
        model = section["models"][name]
        points = sorted(model["points"], key=lambda p: p["prompt_len"])
        lengths.update(p["prompt_len"] for p in points)
        color = MODEL_COLORS[i % len(MODEL_COLORS)]
        label = f"{model_label(name)} ({model['schedule'].upper()})"
        over = [p for p in points if not p["fits"]]
        for col, key, unit in ((1, "ttft_ms", "ms TTFT"), (2, "input_tgs", "tokens/GPU/s")):
            hover = f"{label}<br>%{{x:,}}-token prompts<br>%{{y:,.0f}} {unit}"
            fig.add_trace(
                go.Scatter(
                    x=[p["prompt_len"] for p in points],
                    y=[p[key] for p in points],
                    name=label,
                    legendgroup=name,
                    showlegend=col == 1,
                    mode="lines+markers",
                    line={"color": color},
                    marker={"color": color, "size": 8},
                    customdata=[[p["tokens_per_device"]] for p in points],
                    hovertemplate=hover + "<br>%{customdata[0]:,} tokens per GPU<extra></extra>",
                ),
                row=1,
                col=col,
            )
            if over:
                fig.add_trace(
                    go.Scatter(
                        x=[p["prompt_len"] for p in over],
                        y=[p[key] for p in over],
                        name=f"{label}: does not fit in HBM",
                        legendgroup=name,
                        showlegend=False,
                        mode="markers",
                        marker={"color": "#000000", "symbol": INFEASIBLE_SYMBOL, "size": 13},
                        hovertemplate=hover + "<br>does not fit in HBM<extra></extra>",
                    ),
                    row=1,
                    col=col,
                )
    ticks = sorted(lengths)
    for col in (1, 2):
        fig.update_xaxes(
            title_text="prompt length (tokens)",
            type="log",
            tickvals=ticks,
            ticktext=[_tokens_label(n) for n in ticks],
            row=1,
            col=col,
        )
    fig.update_yaxes(title_text="TTFT (ms)", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="prompt tokens / GPU / s", rangemode="tozero", row=1, col=2)
    return _layout(fig, height=420, legend={"orientation": "h", "y": -0.2, "x": 0.0})


# -- serving ------------------------------------------------------------------------------------

# colour per pool (a co-located run's one pool in the co-located colour), dash per rate
POOL_COLORS = {"colocated": "#4c78a8", "decode": "#f58518", "prefill": "#54a24b"}
LAYOUT_COLORS = {"colocated": POOL_COLORS["colocated"], "disagg": POOL_COLORS["decode"]}
SLO_COLOR = "#777777"
LATENCIES = (
    ("ttft_cdf_ms", "TTFT", "time to first token"),
    ("tpot_cdf_ms", "TPOT", "time per output token"),
    ("e2e_cdf_ms", "E2E", "end-to-end latency"),
)
# load rows: (timeline key or "kv_share", y-axis title, hover unit, tick format)
LOAD_ROWS = (
    ("queued", "queued (requests)", "%{y:,.0f} requests queued", ""),
    ("running", "running (requests)", "%{y:,.0f} requests running", ""),
    ("kv_share", "KV cache share", "KV cache share %{y:.2%}", ".1%"),
    ("busy_share", "busy share", "busy share %{y:.0%}", ".0%"),
)


def _dash(run: Mapping[str, Any]) -> str:
    return "solid" if run["rate_scale"] == 1.0 else "dash"


def _serving_title(section: Mapping[str, Any], what: str) -> dict[str, Any]:
    return {
        "text": (
            f"{model_label(section['model'])} on {section['hardware']}, "
            f"{trace_label(section['trace'])}: {what}"
        ),
        "x": 0.01,
    }


def serving_latency_figure(section: Mapping[str, Any]) -> go.Figure:
    """Per serving run, the CDF of TTFT, TPOT and E2E (ms, log axis) over the finished requests,
    with the TTFT and TPOT targets as dotted lines."""
    check_serving(section)
    fig = make_subplots(
        rows=1,
        cols=len(LATENCIES),
        shared_yaxes=True,
        horizontal_spacing=0.05,
        subplot_titles=[f"{short}: {long}" for _, short, long in LATENCIES],
    )
    percentiles = list(range(CDF_POINTS))
    for run in section["runs"]:
        label = serve_run_label(run)
        group = f"{run['layout']}-{run['rate_scale']:g}"
        for col, (key, short, _) in enumerate(LATENCIES, start=1):
            fig.add_trace(
                go.Scatter(
                    x=run[key],
                    y=percentiles,
                    name=label,
                    legendgroup=group,
                    showlegend=col == 1,
                    mode="lines",
                    line={"color": LAYOUT_COLORS[run["layout"]], "dash": _dash(run), "width": 2},
                    hovertemplate=(
                        f"{label}<br>{short} %{{x:,.1f}} ms at percentile %{{y}}<extra></extra>"
                    ),
                ),
                row=1,
                col=col,
            )
    for col, (short, target) in enumerate(
        (("TTFT", section["slo_ttft_ms"]), ("TPOT", section["slo_tpot_ms"])), start=1
    ):
        fig.add_trace(
            go.Scatter(
                x=[target, target],
                y=[0, 100],
                name=f"{short} target {target:g} ms",
                showlegend=True,
                mode="lines",
                line={"color": SLO_COLOR, "dash": "dot", "width": 1.5},
                hovertemplate=f"{short} target {target:g} ms<extra></extra>",
            ),
            row=1,
            col=col,
        )
    for col, (_, short, _) in enumerate(LATENCIES, start=1):
        fig.update_xaxes(title_text=f"{short} (ms)", type="log", row=1, col=col)
    fig.update_yaxes(title_text="percentile of finished requests", range=[0, 100], row=1, col=1)
    return _layout(
        fig,
        height=430,
        title=_serving_title(section, "latency CDFs"),
        legend={"orientation": "h", "y": -0.22, "x": 0.0},
        margin={"l": 70, "r": 20, "t": 80, "b": 50},
    )


def _load_values(pool: Mapping[str, Any], key: str) -> list[float] | None:
    """A pool's timeline row; the KV cache share is kv_tokens over the pool's KV capacity
    (None for a pool without one: prefill)."""
    timeline = pool["timeline"]
    if key != "kv_share":
        return timeline[key]
    capacity = pool["kv_capacity_tokens"]
    if not capacity:
        return None
    return [tokens / capacity for tokens in timeline["kv_tokens"]]


def _layout_title(section: Mapping[str, Any], layout: str) -> str:
    if layout == "disagg":
        return (
            f"{LAYOUT_LABELS[layout]}: {section['prefill_gpus']} prefill + "
            f"{section['gpus']} decode GPUs"
        )
    return f"{LAYOUT_LABELS[layout]}: {section['gpus']} GPUs"


def serving_load_figure(section: Mapping[str, Any]) -> go.Figure:
    """Load over time, one column per layout: requests queued and running, the KV cache share
    of capacity and the busy share of each pool; the recorded rate solid, the scaled one
    dashed."""
    check_serving(section)
    layouts = [x for x in SERVE_LAYOUTS if any(r["layout"] == x for r in section["runs"])]
    fig = make_subplots(
        rows=len(LOAD_ROWS),
        cols=len(layouts),
        shared_xaxes=True,
        vertical_spacing=0.05,
        horizontal_spacing=0.08,
        subplot_titles=[_layout_title(section, x) for x in layouts]
        + [""] * (len(LOAD_ROWS) - 1) * len(layouts),
    )
    for run in section["runs"]:
        col = layouts.index(run["layout"]) + 1
        for pool_name in SERVE_POOLS[run["layout"]]:
            pool = run["pools"][pool_name]
            label = serve_run_label(run)
            if run["layout"] == "disagg":
                label = f"{LAYOUT_LABELS['disagg']} {pool_name} pool, {rate_label(run)}"
            shown = False
            for row, (key, _, hover, _) in enumerate(LOAD_ROWS, start=1):
                values = _load_values(pool, key)
                if values is None:
                    continue
                fig.add_trace(
                    go.Scatter(
                        x=pool["timeline"]["t_s"],
                        y=values,
                        name=label,
                        legendgroup=f"{run['layout']}-{pool_name}-{run['rate_scale']:g}",
                        showlegend=not shown,
                        mode="lines",
                        line={
                            "color": POOL_COLORS[pool_name],
                            "dash": _dash(run),
                            "width": 1.5,
                            "shape": "hv",
                        },
                        hovertemplate=f"{label}<br>%{{x:.1f}} s: {hover}<extra></extra>",
                    ),
                    row=row,
                    col=col,
                )
                shown = True
    for row, (_, title, _, tickformat) in enumerate(LOAD_ROWS, start=1):
        for col in range(1, len(layouts) + 1):
            fig.update_yaxes(
                title_text=title if col == 1 else None,
                tickformat=tickformat or None,
                rangemode="tozero",
                row=row,
                col=col,
            )
    for col in range(1, len(layouts) + 1):
        fig.update_xaxes(title_text="time (s)", row=len(LOAD_ROWS), col=col)
    return _layout(
        fig,
        height=160 + 150 * len(LOAD_ROWS),
        title=_serving_title(section, "load over time"),
        legend={"orientation": "h", "y": -0.08, "x": 0.0},
        margin={"l": 80, "r": 20, "t": 90, "b": 50},
    )


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
