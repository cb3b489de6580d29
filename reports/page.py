"""The report: report data (``reports.inputs``) -> one HTML page and the figures drawn in it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from longcat_sim.reports import figures, tables
from longcat_sim.reports.html import Figure, esc, figure_div, page, table_html
from longcat_sim.reports.inputs import check_report_data

SECTIONS = (
    ("table7", "Table 7: theoretical decode"),
    ("table6", "Table 6: measured decode"),
    ("timelines", "Per-layer timelines"),
    ("pareto", "Throughput, interactivity and cost"),
    ("memory", "Memory per GPU"),
    ("prefill", "Prefill"),
    ("serving", "Serving a real trace"),
    ("training-overlap", "Training overlap"),
    ("training-runs", "Training runs"),
    ("determinism", "Determinism"),
    ("sdc", "Silent data corruption"),
    ("configuration", "Configuration"),
)

_TITLES = dict(SECTIONS)


@dataclass(frozen=True)
class Report:
    html: str
    figures: tuple[Figure, ...]


def _section(anchor: str, title: str, *blocks: str) -> str:
    return "\n".join([f'<section id="{anchor}">', f"<h2>{esc(title)}</h2>", *blocks, "</section>"])


def _note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def _divergence_text(where: Mapping[str, Any] | None) -> str:
    if not where:
        return ""
    out = f", first at step {where['step']} in {where['tensor']}"
    if where.get("max_abs_diff") is not None:
        out += f" (max |diff| {where['max_abs_diff']:.3g})"
    elif "max_abs_diff" in where:
        out += " (max |diff| not finite)"
    return out


def _fault_text(fault: Mapping[str, Any]) -> str:
    step = f" step {fault['step']}" if "step" in fault else ""
    run = f" of run {fault['run']}" if "run" in fault else ""
    return f"fault injected at {fault['site']} bit {fault['bit']}{step}{run}"


def _verdict(result: Mapping[str, Any]) -> tuple[str, str]:
    """(CSS class, headline) of a determinism result; an injected run is a negative control:
    its divergence is expected and its absence is the alarm."""
    runs = f"{result['runs']} runs" if "runs" in result else "the runs"
    where = result.get("first_divergence")
    fault = result.get("injected")
    if fault is not None:
        if result["verdict"] == "identical":
            return "control-failed", (
                f"Negative control FAILED: {_fault_text(fault)}, yet {runs} matched bit for "
                "bit. The check did not see a planted fault; its verdicts cannot be trusted."
            )
        other = where and "run" in where and "run" in fault and where["run"] != fault["run"]
        if not other:
            return "control", (
                f"Negative control: {_fault_text(fault)}; divergence found (expected)"
                f"{_divergence_text(where)}."
            )
        return "diverged", (
            f"Diverged before the negative control: run {where['run']} differs from run 0"
            f"{_divergence_text(where)}, though only run {fault['run']} had a fault."
        )
    if result["verdict"] == "identical":
        return "identical", f"Bitwise identical: {runs} produced the same parameters and metrics."
    return "diverged", f"Diverged: {runs} differ{_divergence_text(where)}."


def _non_finite_note(result: Mapping[str, Any]) -> list[str]:
    flagged = result.get("non_finite")
    if not isinstance(flagged, Mapping) or not flagged:
        return []
    listed = ", ".join(f"{path} ({value})" for path, value in sorted(flagged.items()))
    return [_note(f"Values that were not finite numbers, stored as null: {listed}.")]


def _determinism_blocks(result: Mapping[str, Any] | None) -> list[str]:
    if result is None:
        return []
    kind, headline = _verdict(result)
    blocks = [f'<div class="verdict {esc(kind)}">{esc(headline)}</div>']
    blocks.append(table_html(tables.key_value_table("Determinism result", result, ("verdict",))))
    prints = result.get("fingerprints") or []
    if prints:
        items = "".join(f"<li><code>{esc(p)}</code></li>" for p in prints)
        blocks.append(f"<p>Final parameter fingerprints:</p><ul>{items}</ul>")
    return blocks + _non_finite_note(result)


FLAGS = {"determinism": "--determinism-run", "sdc": "--sdc-run"}
MISSING = {
    "determinism": "No determinism result given: pass --determinism-run DIR.",
    "sdc": "No silent-data-corruption result given: pass --sdc-run DIR.",
}


def _code(command: str) -> str:
    return f"<code>{esc(command)}</code>"


def _origin_blocks(section: str, origin: Mapping[str, Any] | None) -> list[str]:
    """Where a determinism or SDC result came from, and how to run the full-size version."""
    if origin is None:
        return []
    source, flag = origin["source"], FLAGS[section]
    full = origin.get("full_command")
    then = (
        f"The full-size run: {_code(full)}, then <code>longcat-sim report {flag} DIR</code> "
        "with its run directory."
        if full
        else ""
    )
    if source == "run":
        return [f'<p class="note">From {esc(flag)} {_code(origin.get("path", "?"))}.</p>']
    if source == "report":
        seconds = origin.get("seconds")
        took = f" in {seconds:.1f} s" if seconds is not None else ""
        text = (
            "Computed by this report with quick settings (a smoke test, not the full check)"
            f"{took}: {_code(origin.get('command', '?'))}. {then}"
        )
    elif source == "skipped":
        text = f"Not computed: the report ran with --no-repro. {then}"
    else:
        text = (
            f"The report's quick run failed: {esc(origin.get('failure', 'unknown error'))} "
            f"(command {_code(origin.get('command', '?'))}). {then}"
        )
    return [f'<p class="note">{text.rstrip()}</p>']


class _Figures:
    """Collects the page's figures in order; ``add`` returns the div that shows one."""

    def __init__(self) -> None:
        self.items: list[Figure] = []

    def add(self, div_id: str, fig: Any) -> str:
        self.items.append(Figure(div_id, fig))
        return figure_div(div_id)


def build_report(data: Mapping[str, Any]) -> Report:
    """The whole report. Raises ``reports.inputs.ReportInputError`` on malformed data."""
    check_report_data(data)
    meta = data["meta"]
    figs = _Figures()
    parts = [
        *_header(meta),
        *_simulated_sections(data, figs),
        *_result_sections(data, figs),
        _configuration_section(meta),
    ]
    body = "\n".join(parts)
    return Report(html=page(meta["title"], body, figs.items), figures=tuple(figs.items))


def _header(meta: Mapping[str, Any]) -> list[str]:
    nav = " ".join(f'<a href="#{anchor}">{esc(title)}</a>' for anchor, title in SECTIONS)
    return [
        f"<h1>{esc(meta['title'])}</h1>",
        f'<p class="subtitle">{esc(_subtitle(meta["config"]))}; config hash '
        f"<code>{esc(meta['config_hash'][:12])}</code></p>",
        f"<nav>{nav}</nav>",
    ]


NOTES = {
    "table7": (
        "The paper's theoretical decode (arXiv 2509.01322, Table 7) rebuilt from the "
        "models' op counts under the 'table7' assumption set (FlashMLA 660 TFLOPS, MoE at "
        "the FP8 dense peak, DeepEP 40 GB/s, no overheads). TPOT and cost come from the "
        "simulated schedule; the per-layer rows from the priced stages of one MoE layer. "
        "Green within 5 %, amber within 15 %."
    ),
    "table6": (
        "Measured throughput (paper Table 6 and the DeepSeek-V3 profile data) against the "
        "simulator at the same batch per GPU, context and attention precision."
    ),
    "timelines": (
        "Each row is one GPU's compute stream and the link streams that carry the expert "
        "dispatch and combine. Sequential execution waits for every transfer; TBO hides "
        "one micro-batch's transfers behind the other's compute; SBO hides them behind the "
        "shortcut branch of the same batch."
    ),
    "pareto": (
        "One point per batch size per GPU; filled markers lie on a model's Pareto front "
        "(no other batch that fits gives both more TPS per user and more tokens per GPU per "
        "second). Faint crosses do not fit in HBM and are never on the front."
    ),
    "memory": (
        "Per-GPU HBM of the decode deployment at each batch size of the Pareto section: "
        "weights, KV cache, activations of one step and a reserve (CUDA context, "
        "fragmentation). Faint, hatched bars exceed the HBM capacity (dashed line)."
    ),
    "prefill": (
        "One prefill forward per prompt length from the schedule's closed form, each model "
        "on its own overlap, EP over all prefill GPUs, the section's tokens per GPU (or one "
        "prompt when longer). TTFT counts the forwards a prompt needs, without queueing. "
        "A cross marks a forward that does not fit in HBM."
    ),
    "serving": (
        "The first {duration} s of the {trace}, replayed through longcat-sim serve on the "
        "timeline model: first at the trace's recorded arrival times ({rate:.1f} requests/s "
        "on average over its hour), then time-scaled to {scale:g}x that rate. Co-located "
        "instances mix chunked prefill into decode steps; the disaggregated layout computes "
        "prompts on a prefill pool and moves their KV cache to a decode pool. TTFT is the time "
        "to the first token, TPOT the time per output token after it, E2E arrival to last "
        "token; the CDFs and percentiles count the finished requests. Load is averaged per "
        "time bin: requests queued and running, the KV cache share of the pool's capacity and "
        "the busy share of its time spent in steps. {license}"
    ),
    "training-overlap": (
        "Paper §5: EP 32, 200 Gb/s RDMA per GPU, context parallelism 8, the MoE split into "
        "2 token chunks; 25.3 % of step time is exposed communication without ScMoE, "
        "8.4 % with it."
    ),
}


def _simulated_sections(data: Mapping[str, Any], figs: _Figures) -> list[str]:
    """The sections the simulator fills: the paper's tables, timelines, Pareto, memory, prefill,
    overlap; each its table or figure, then its note."""
    overlap = data["training_overlap"]
    serving = data["serving"]
    blocks = {
        "table7": [table_html(tables.table7_table(data["table7"]))],
        "table6": [table_html(tables.table6_table(data["table6"]))],
        "timelines": [figs.add("fig-timelines", figures.timeline_figure(data["timelines"]))],
        "pareto": [figs.add("fig-pareto", figures.pareto_figure(data["pareto"]))],
        "memory": [
            figs.add("fig-memory", figures.memory_figure(data["memory"])),
            table_html(tables.memory_table(data["memory"])),
        ],
        "prefill": [
            figs.add("fig-prefill", figures.prefill_figure(data["prefill"])),
            table_html(tables.prefill_profile_table(data["prefill"])),
        ],
        "serving": [
            figs.add("fig-serving-latency", figures.serving_latency_figure(serving)),
            figs.add("fig-serving-load", figures.serving_load_figure(serving)),
            table_html(tables.serving_table(serving)),
        ],
        "training-overlap": [
            figs.add("fig-training-overlap", figures.overlap_figure(overlap)),
            table_html(tables.overlap_table(overlap)),
        ],
    }
    notes = {**NOTES, "serving": _serving_note(serving)}
    return [
        _section(anchor, title, *blocks[anchor], _note(notes[anchor]))
        for anchor, title in SECTIONS
        if anchor in blocks
    ]


AZURE_LICENSE = (
    "The trace is the Azure LLM inference trace of 2023 (Azure Public Dataset; Patel et al., "
    "Splitwise, ISCA 2024), shipped with the package under CC-BY 4.0."
)


def _serving_note(section: Mapping[str, Any]) -> str:
    trace = section["trace"]
    return (
        NOTES["serving"]
        .format(
            duration=f"{section['duration_s']:g}",
            trace=tables.trace_label(trace) if trace in tables.TRACE_LABELS else f"trace {trace}",
            rate=section["recorded_rate"],
            scale=max((r["rate_scale"] for r in section["runs"]), default=1.0),
            license=AZURE_LICENSE if trace in tables.TRACE_LABELS else "",
        )
        .rstrip()
    )


def _sdc_blocks(result: Mapping[str, Any] | None, figs: _Figures) -> list[str]:
    if result is None:
        return []
    blocks = [
        figs.add("fig-sdc", figures.sdc_figure(result)),
        _note(
            "Share of injected bit flips each detector caught, per site and bit position, over "
            "the flips that changed something it compares (masked flips are left out; a blank "
            "cell had none)."
        ),
    ]
    for table in (tables.sdc_detector_table(result), tables.sdc_attribution_table(result)):
        if table is not None:
            blocks.append(table_html(table))
    return blocks + _non_finite_note(result)


def _repro_section(anchor: str, blocks: list[str], origin: Mapping[str, Any] | None) -> str:
    """A determinism or SDC section: its result, or a note saying why there is none, and
    where it came from."""
    if not blocks and origin is None:
        blocks = [_note(MISSING[anchor])]
    return _section(anchor, _TITLES[anchor], *blocks, *_origin_blocks(anchor, origin))


def _result_sections(data: Mapping[str, Any], figs: _Figures) -> list[str]:
    """The sections other commands' results fill: training runs, determinism, SDC."""
    run_blocks = [
        figs.add(f"fig-training-run-{i}", figures.training_figure(run))
        for i, run in enumerate(data["training_runs"], start=1)
    ] or [_note("No training run given: pass --train-run DIR (a longcat-sim train run).")]
    provenance = data.get("provenance") or {}
    determinism = _determinism_blocks(data["determinism"])
    sdc = _sdc_blocks(data["sdc"], figs)
    return [
        _section("training-runs", _TITLES["training-runs"], *run_blocks),
        _repro_section("determinism", determinism, provenance.get("determinism")),
        _repro_section("sdc", sdc, provenance.get("sdc")),
    ]


def _configuration_section(meta: Mapping[str, Any]) -> str:
    settings = {k: _scalar(v) for k, v in meta["config"].items()}
    table = tables.key_value_table(
        "Report configuration", {**settings, "config_hash": meta["config_hash"]}
    )
    return _section("configuration", _TITLES["configuration"], table_html(table))


def _subtitle(config: Mapping[str, Any]) -> str:
    """The deployment in words, from the settings a report config usually has; the full
    configuration is listed at the end of the page."""
    parts = []
    if "gpus" in config:
        parts.append(f"EP{config['gpus']}")
    if "timeline_batch_per_device" in config:
        parts.append(f"{config['timeline_batch_per_device']} requests per GPU")
    if "context" in config:
        parts.append(f"{config['context']}-token contexts")
    if "attention_dtype" in config:
        parts.append(f"{str(config['attention_dtype']).upper()} attention")
    if config.get("mtp_draft_tokens"):
        accept = config.get("mtp_accept")
        rate = f" accepted {accept:.0%}" if isinstance(accept, int | float) else ""
        parts.append(f"MTP {config['mtp_draft_tokens']} draft token{rate}")
    if "assumptions" in config:
        parts.append(f"assumption set '{config['assumptions']}'")
    if "seed" in config:
        parts.append(f"seed {config['seed']}")
    return ", ".join(parts) or "report"


def _scalar(value: Any) -> Any:
    return ", ".join(str(v) for v in value) if isinstance(value, list) else value
