"""The paper's tables beside the simulator's numbers, with the error of each simulated value.

Error is relative, ``simulated / paper - 1``, for times, rates and prices; for shares (training
overlap) it is the difference in percentage points. Tables are plain cells; ``reports.html``
renders them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from longcat_sim.reports.inputs import (
    TABLE7_KEYS,
    check_memory,
    check_prefill,
    check_sdc,
    check_serving,
    check_table6,
    check_table7,
    check_training_overlap,
)

# Error bands for colouring: within GOOD is a match, within FAIR is close, beyond is a miss.
GOOD = 0.05
FAIR = 0.15

TABLE7_LABELS = {
    "attention_us": "attention / layer (µs)",
    "dispatch_us": "dispatch (µs)",
    "experts_us": "MoE: routed + shared experts (µs)",
    "combine_us": "combine (µs)",
    "tpot_ms": "TPOT (ms)",
    "cost_per_m_tokens": "$ / M output tokens",
}
_FORMATS = {
    "attention_us": "{:.0f}",
    "dispatch_us": "{:.0f}",
    "experts_us": "{:.0f}",
    "combine_us": "{:.0f}",
    "tpot_ms": "{:.1f}",
    "cost_per_m_tokens": "{:.3f}",
    "tgs": "{:,.0f}",
    "tps_per_user": "{:.1f}",
}
MODEL_LABELS = {
    "longcat-flash": "LongCat-Flash",
    "deepseek-v3": "DeepSeek-V3",
    "qwen3-235b-a22b": "Qwen3-235B-A22B",
}


@dataclass(frozen=True)
class Cell:
    text: str
    kind: str = ""  # "num", "good", "fair", "miss" (an error), or "" for text


@dataclass(frozen=True)
class Table:
    """``groups`` spans header cells over columns: (label, number of columns) pairs."""

    caption: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    groups: tuple[tuple[str, int], ...] = ()


def model_label(name: str) -> str:
    return MODEL_LABELS.get(name, name)


def relative_error(simulated: float, paper: float) -> float:
    return simulated / paper - 1.0


def error_kind(error: float) -> str:
    size = abs(error)
    return "good" if size <= GOOD else "fair" if size <= FAIR else "miss"


def signed_percent(fraction: float, unit: str = "%") -> str:
    """``+1.5 %``; a value that rounds to zero shows as ``+0.0``, never ``-0.0``."""
    return f"{round(fraction * 100, 1) + 0.0:+.1f} {unit}"


def error_cell(error: float) -> Cell:
    return Cell(signed_percent(error), error_kind(error))


def value_cell(key: str, value: float) -> Cell:
    return Cell(_FORMATS.get(key, "{:.4g}").format(value), "num")


# -- Table 7: theoretical decode ---------------------------------------------------------------


def table7_errors(section: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Model -> metric -> relative error of the simulated value."""
    check_table7(section)
    return {
        row["model"]: {
            key: relative_error(row["simulated"][key], row["paper"][key]) for key in TABLE7_KEYS
        }
        for row in section["rows"]
    }


def table7_table(section: Mapping[str, Any]) -> Table:
    """Metrics as rows and, per model, paper | simulated | error, as in the paper's Table 7."""
    errors = table7_errors(section)
    rows = section["rows"]
    body = [
        (
            Cell("overlap"),
            *(c for row in rows for c in (Cell(row["overlap"].upper()), Cell(""), Cell(""))),
        )
    ]
    for key in TABLE7_KEYS:
        cells = [Cell(TABLE7_LABELS[key])]
        for row in rows:
            cells += [
                value_cell(key, row["paper"][key]),
                value_cell(key, row["simulated"][key]),
                error_cell(errors[row["model"]][key]),
            ]
        body.append(tuple(cells))
    return Table(
        caption=(
            "Table 7 (theoretical decode, H800, EP128, batch 96 per GPU, MTP 1 draft at 80 % "
            f"acceptance; attention at an assumed context of {section['context']} tokens): "
            "paper vs simulator"
        ),
        columns=("", *(c for _ in rows for c in ("paper", "simulated", "error"))),
        rows=tuple(body),
        groups=(("", 1), *((model_label(row["model"]), 3) for row in rows)),
    )


# -- Table 6: measured decode --------------------------------------------------------------------


def table6_errors(section: Mapping[str, Any]) -> list[dict[str, float]]:
    """Per row: relative error of the simulated tokens/GPU/s and TPS/user."""
    check_table6(section)
    return [
        {
            key: relative_error(row["simulated"][key], row["paper"][key])
            for key in ("tgs", "tps_per_user")
        }
        for row in section["rows"]
    ]


def table6_table(section: Mapping[str, Any]) -> Table:
    errors = table6_errors(section)
    body = []
    for row, err in zip(section["rows"], errors, strict=True):
        body.append(
            (
                Cell(row["label"]),
                Cell(row["schedule"].upper()),
                Cell(row["attention_dtype"]),
                Cell(f"{row['context']:,d}", "num"),
                Cell(f"{row['batch_per_device']:d}", "num"),
                value_cell("tgs", row["paper"]["tgs"]),
                value_cell("tgs", row["simulated"]["tgs"]),
                error_cell(err["tgs"]),
                value_cell("tps_per_user", row["paper"]["tps_per_user"]),
                value_cell("tps_per_user", row["simulated"]["tps_per_user"]),
                error_cell(err["tps_per_user"]),
            )
        )
    return Table(
        caption=(
            "Table 6 (measured decode on 128 Hopper GPUs) vs the simulator with the "
            f"{section['assumptions']!r} assumption set"
        ),
        columns=(
            "deployment",
            "overlap",
            "attention",
            "context",
            "batch / GPU",
            "paper",
            "simulated",
            "error",
            "paper",
            "simulated",
            "error",
        ),
        rows=tuple(body),
        groups=(("", 5), ("tokens / GPU / s", 3), ("TPS / user", 3)),
    )


# -- prefill and memory --------------------------------------------------------------------------


def prefill_profile_error(section: Mapping[str, Any]) -> float:
    """Relative error of the simulated prompt tokens/GPU/s on the measured profile row."""
    check_prefill(section)
    profile = section["profile"]
    return relative_error(profile["simulated_tgs"], profile["measured_tgs"])


def prefill_profile_table(section: Mapping[str, Any]) -> Table:
    """The measured prefill profile beside the closed-form forward of the same setting."""
    error = prefill_profile_error(section)
    p = section["profile"]
    row = (
        Cell(p["label"]),
        Cell(p["hardware"]),
        Cell(f"EP{p['ep']}"),
        Cell(f"{p['prompt_len']:,d}", "num"),
        Cell(f"{p['tokens_per_device']:,d}", "num"),
        Cell(p["schedule"].upper()),
        value_cell("tgs", p["measured_tgs"]),
        value_cell("tgs", p["simulated_tgs"]),
        error_cell(error),
    )
    return Table(
        caption=(
            "Prefill: measured prompt tokens/GPU/s (deepseek-ai/profile-data) vs the closed-form "
            f"forward with the {section['assumptions']!r} assumption set, "
            f"{p['routing']} routing"
        ),
        columns=(
            "deployment",
            "hardware",
            "parallelism",
            "prompt (tokens)",
            "tokens / GPU",
            "overlap",
            "measured",
            "simulated",
            "error",
        ),
        rows=(row,),
        groups=(("", 6), ("prompt tokens / GPU / s", 3)),
    )


def memory_table(section: Mapping[str, Any]) -> Table:
    """Per model: the largest batch per GPU that fits in HBM, and the batches shown that do not."""
    check_memory(section)
    rows = []
    for name, model in sorted(section["models"].items()):
        over = [p["batch_per_device"] for p in model["points"] if not p["fits"]]
        rows.append(
            (
                Cell(model_label(name)),
                Cell(model["schedule"].upper()),
                Cell(f"{model['max_batch_per_device']:d}", "num"),
                Cell(", ".join(str(b) for b in sorted(over)) or "none"),
            )
        )
    return Table(
        caption=(
            f"Largest decode batch per GPU that fits in {section['hbm_gb']:.0f} GB of "
            f"{section['hardware']} HBM (EP{section['gpus']}, {section['context']:,d}-token "
            "contexts)"
        ),
        columns=("model", "overlap", "largest batch / GPU", "batches shown that do not fit"),
        rows=tuple(rows),
    )


# -- serving ------------------------------------------------------------------------------------

LAYOUT_LABELS = {"colocated": "co-located", "disagg": "disaggregated"}
TRACE_LABELS = {
    "azure-conv": "Azure LLM inference trace 2023, conversation",
    "azure-code": "Azure LLM inference trace 2023, code",
}


def trace_label(trace: str) -> str:
    return TRACE_LABELS.get(trace, trace)


def rate_label(run: Mapping[str, Any]) -> str:
    """``recorded rate`` or ``10x rate``, for legends and rows."""
    scale = run["rate_scale"]
    return "recorded rate" if scale == 1.0 else f"{scale:g}x rate"


def serve_run_label(run: Mapping[str, Any]) -> str:
    return f"{LAYOUT_LABELS[run['layout']]}, {rate_label(run)}"


def _maybe(value: float | None, spec: str) -> Cell:
    return Cell("n/a" if value is None else format(value, spec), "num")


def serving_table(section: Mapping[str, Any]) -> Table:
    """Per serving run: the traffic, TTFT/TPOT/E2E percentiles, goodput, SLO attainment and
    $ per M output tokens."""
    check_serving(section)
    rows = []
    for run in section["runs"]:
        cells = [
            Cell(LAYOUT_LABELS[run["layout"]]),
            Cell(rate_label(run)),
            Cell(f"{run['rate']:.1f}", "num"),
            Cell(f"{run['requests']:,d}", "num"),
            Cell(f"{run['total_gpus']:d}", "num"),
        ]
        for metric in ("ttft", "tpot", "e2e"):
            spec = ",.0f" if metric == "e2e" else ".1f"
            cells += [_maybe(run[f"{metric}_p{q}_ms"], spec) for q in (50, 90, 99)]
        attainment = run["slo_attainment"]
        cells += [
            _maybe(run["goodput_requests_per_s"], ".2f"),
            Cell("n/a" if attainment is None else f"{attainment * 100:.1f} %", "num"),
            Cell("met" if run["slo_met"] else "missed"),
            _maybe(run["cost_per_m_tokens"], ".3f"),
        ]
        rows.append(tuple(cells))
    q = f"{section['slo_percentile']:g}"
    return Table(
        caption=(
            f"Serving {section['duration_s']:g} s of the {trace_label(section['trace'])}: "
            f"latency percentiles (ms) of the finished requests; SLO: P{q} TTFT within "
            f"{section['slo_ttft_ms']:g} ms and P{q} TPOT within {section['slo_tpot_ms']:g} ms; "
            "goodput counts the requests that met both"
        ),
        columns=(
            "layout",
            "traffic",
            "requests / s",
            "requests",
            "GPUs",
            *(f"P{q}" for _ in range(3) for q in (50, 90, 99)),
            "goodput (requests / s)",
            "SLO attainment",
            f"P{q} SLO",
            "$ / M output tokens",
        ),
        rows=tuple(rows),
        groups=(("", 5), ("TTFT (ms)", 3), ("TPOT (ms)", 3), ("E2E (ms)", 3), ("", 4)),
    )


# -- training overlap ------------------------------------------------------------------------


SCHEDULE_LABELS = {"baseline": "without ScMoE", "scmoe": "with ScMoE"}


def overlap_errors(section: Mapping[str, Any]) -> dict[str, float]:
    """Schedule -> simulated minus paper exposed communication share (fraction)."""
    check_training_overlap(section)
    return {
        s: section["simulated"][s]["exposed_comm_share"] - section["paper"][s]
        for s in ("baseline", "scmoe")
    }


def overlap_table(section: Mapping[str, Any]) -> Table:
    errors = overlap_errors(section)
    body = []
    for schedule in ("baseline", "scmoe"):
        sim = section["simulated"][schedule]
        diff = errors[schedule]
        body.append(
            (
                Cell(SCHEDULE_LABELS[schedule]),
                Cell(f"{section['paper'][schedule] * 100:.1f} %", "num"),
                Cell(f"{sim['exposed_comm_share'] * 100:.1f} %", "num"),
                Cell(signed_percent(diff, "pp"), error_kind(diff / section["paper"][schedule])),
                Cell(f"{sim['step_ms']:.1f}", "num"),
                Cell(f"{sim['comm_ms']:.1f}", "num"),
                Cell(f"{sim['exposed_comm_ms']:.1f}", "num"),
            )
        )
    return Table(
        caption="Share of training step time in dispatch/combine not hidden by compute",
        columns=(
            "",
            "paper §5",
            "simulated",
            "difference",
            "step (ms)",
            "communication (ms)",
            "exposed (ms)",
        ),
        rows=tuple(body),
    )


def key_value_table(caption: str, values: Mapping[str, Any], order: Sequence[str] = ()) -> Table:
    """Two columns, one row per scalar value (keys in ``order`` first, then sorted)."""
    keys = [k for k in order if k in values] + sorted(k for k in values if k not in order)
    rows = []
    for key in keys:
        value = values[key]
        if isinstance(value, dict | list):
            continue
        shown = "null" if value is None else f"{value:.6g}" if isinstance(value, float) else value
        rows.append((Cell(key), Cell(str(shown))))
    return Table(caption=caption, columns=("", ""), rows=tuple(rows))


# -- silent data corruption ---------------------------------------------------------------------


def _share(part: int, whole: int) -> Cell:
    return Cell("n/a" if whole == 0 else f"{part / whole:.1%}", "num")


def sdc_detector_table(result: Mapping[str, Any]) -> Table | None:
    """Per detector: flips detected of those not masked, masked and crashed flips, false alarms
    over the clean steps and overhead; None when the result holds no per-detector totals."""
    check_sdc(result)
    counts = result.get("counts") or {}
    if not counts:
        return None
    false_positives = result.get("false_positives") or {}
    overhead = result.get("overhead") or {}
    clean = result.get("clean_runs")
    rows = []
    order = list(result.get("detectors", []))
    for detector in sorted(counts, key=lambda d: (order.index(d) if d in order else len(order), d)):
        tally = counts[detector]
        seen = tally["detected"] + tally["missed"]
        alarms = false_positives.get(detector)
        rows.append(
            (
                Cell(detector),
                Cell(f"{tally['detected']} / {seen}", "num"),
                _share(tally["detected"], seen),
                Cell(str(tally["masked"]), "num"),
                Cell(str(tally["crashed"]), "num"),
                Cell("n/a" if alarms is None else str(alarms), "num"),
                _maybe(overhead.get(detector), "+.1%"),
            )
        )
    return Table(
        caption="Detectors over the campaign (detected of the flips that changed something)",
        columns=(
            "detector",
            "detected / not masked",
            "detection rate",
            "masked",
            "crashed",
            f"false alarms ({'n/a' if clean is None else clean} clean steps)",
            "overhead",
        ),
        rows=tuple(rows),
    )


def sdc_attribution_table(result: Mapping[str, Any]) -> Table | None:
    """Rerun attribution: the share of synthetic events of each class attributed correctly;
    None when the result holds none."""
    check_sdc(result)
    attribution = result.get("attribution")
    if not attribution or not attribution.get("accuracy"):
        return None
    rows = tuple(
        (Cell(name), _maybe(share, ".1%"))
        for name, share in sorted(attribution["accuracy"].items())
    )
    return Table(
        caption=f"Rerun attribution ({attribution['events_per_class']} events per class)",
        columns=("event class", "attributed correctly"),
        rows=rows,
    )
