"""The plain results a report is built from, and checks that name the first thing wrong.

Everything is JSON: mappings with string keys, lists, numbers, strings, booleans and null.
Times are in the unit their key names (``_us``, ``_ms``); shares are fractions in [0, 1].

Report data (one mapping; ``longcat_sim.report.sections`` assembles it)::

    meta:      {"title": str, "config_hash": str, "config": {str: scalar | list}}
    table7:    {"context": int, "rows": [ROW]}   ROW = {"model": str, "overlap": str,
               "paper": {KEY: number}, "simulated": {KEY: number}} with KEY in attention_us,
               dispatch_us, experts_us (routed plus shared experts: the paper's "MoE"),
               combine_us, tpot_ms, cost_per_m_tokens
    table6:    {"assumptions": str, "rows": [{"label": str, "model": str, "schedule": str,
               "attention_dtype": str, "context": int, "batch_per_device": int,
               "paper": {"tgs", "tps_per_user"}, "simulated": {"tgs", "tps_per_user",
               "tpot_ms"}}]}
    timelines: {"model": str, "batch_per_device": int, "layers": [int], "schedules":
               {schedule: {"tpl_us": number, "tpot_ms": number, "exposed_comm_share": number,
               "events": [EVENT]}}}  EVENT = {"name": str, "group": str, "stream": str,
               "start_us": number, "end_us": number, "layer": int, "microbatch": int}
    pareto:    {"models": {model: {"schedule": str, "points": [{"batch_per_device": int,
               "tps_per_user", "tgs", "cost_per_m_tokens", "tpot_ms", "hbm_used_gb": number,
               "fits": bool}]}}}  (a point that does not fit in HBM is never on the front)
    memory:    {"hardware": str, "hbm_gb": number, "gpus": int, "context": int, "models":
               {model: {"schedule": str, "max_batch_per_device": int, "points":
               [{"batch_per_device": int, "hbm_used_gb": number, "fits": bool,
               "hbm_breakdown_gb": {"weights", "kv_cache", "activations", "reserve": number}}]}}}
    prefill:   {"hardware": str, "gpus": int, "tokens_per_device": int, "assumptions": str,
               "models": {model: {"schedule": str, "points": [{"prompt_len": int,
               "tokens_per_device": int, "forward_ms", "ttft_ms", "input_tgs",
               "cost_per_m_input_tokens", "hbm_used_gb": number, "fits": bool}]}},
               "profile": {"label", "model", "hardware", "schedule", "routing": str, "ep",
               "prompt_len", "tokens_per_device": int, "measured_tgs", "simulated_tgs": number}}
    training_overlap: {"paper": {"baseline": share, "scmoe": share}, "simulated":
               {"baseline": SUMMARY, "scmoe": SUMMARY}}  SUMMARY = {"exposed_comm_share",
               "step_ms", "comm_ms", "exposed_comm_ms": number}
    serving:   {"model", "hardware", "trace": str, "recorded_rate", "duration_s": number,
               "gpus", "prefill_gpus": int, "slo_ttft_ms", "slo_tpot_ms", "slo_percentile":
               number, "runs": [SERVE_RUN]}  SERVE_RUN = {"layout": "colocated" | "disagg",
               "rate_scale", "rate": number (requests/s offered), "requests",
               "requests_finished", "total_gpus", "kv_capacity_tokens": int, "slo_met": bool,
               "ttft_cdf_ms", "tpot_cdf_ms", "e2e_cdf_ms": [101 numbers, non-decreasing: the
               percentiles 0..100], SERVE_FIGURE: number | null (undefined, e.g. no request
               finished), "pools": {pool: {"instances": int, "busy_share": number,
               "kv_capacity_tokens": int | null (a prefill pool holds no KV cache),
               "timeline": {"t_s", "queued", "running", "kv_tokens", "busy_share": [number],
               one length}}}}; pool is colocated, or prefill and decode (disagg)
    training_runs: [TRAIN_RUN]   (may be empty)
    determinism:   DETERMINISM | null
    sdc:           SDC | null
    provenance:    PROVENANCE (optional)

Results of other commands, read from their run directories:

TRAIN_RUN (``longcat-sim train``: ``results.json`` and the records of ``metrics.jsonl``)::

    {"name": str, "model": str, "target_ffn_experts": number,
     "records": [{"step": int, "lm_loss": number, "ffn_experts_mean": [number per MoE layer],
                  "val_loss": number (optional), ...other keys ignored}]}

DETERMINISM (``results.json`` of a determinism run; the verdict is the only required key)::

    {"verdict": "identical" | "diverged",
     "runs": int,                      # optional: runs compared
     "steps": int,                     # optional: steps per run
     "first_divergence": null | {"step": int, "tensor": str,
                                 "max_abs_diff": number | null,  # optional; null: not finite
                                 "max_ulp": int | null,          # optional
                                 "run": int},                    # optional: the run that differs
     "injected": null | {"site": str, "bit": int, "step": int, "run": int, ...},
                                       # optional: a negative control, the fault planted in run
                                       # ``run`` (default the last); it must be found
     "fingerprints": [str],            # optional: final parameter hash of each run
     "non_finite": {path: str},        # optional: values stored as null (``runs.json_safe``)
     ...}                              # other scalar keys are listed as they are

SDC (``results.json`` of a silent-data-corruption campaign: one record per injected bit flip)::

    {"trials": [{"site": str, "bit": int, "detected": {detector: bool}}],
     "detectors": [str],               # optional: panel order (default: sorted names seen)
     "counts": {detector: {"detected", "missed", "masked", "crashed": int}},   # optional
     "false_positives": {detector: int | null},  # optional, over "clean_runs": int | null steps
     "overhead": {detector: number | null},      # optional: extra time over the plain step
     "attribution": {"events_per_class": int, "accuracy": {class: number | null}}}  # optional

Detector and site names are free: a detector or site the page has not seen before is drawn
like the others. A null number is one the run could not give (no trial, or not finite).

PROVENANCE (optional top-level ``provenance``: where each of determinism and sdc came from)::

    {"determinism" | "sdc": {"source": "report" | "run" | "skipped" | "failed",
        "command": str,        # optional: the command line that gave the result
        "full_command": str,   # optional: the full-size command to run instead
        "seconds": number | null, "path": str, "error": str}}   # optional

``report``: computed by the report itself with quick settings; ``run``: read from the run
directory ``path``; ``skipped``: not computed (``--no-repro``); ``failed``: the quick run
raised ``error``.

Each detector's heat map shows, per (site, bit), the share of trials it detected.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

TABLE7_KEYS = (
    "attention_us",
    "dispatch_us",
    "experts_us",
    "combine_us",
    "tpot_ms",
    "cost_per_m_tokens",
)
TABLE6_PAPER_KEYS = ("tgs", "tps_per_user")
PARETO_KEYS = ("tps_per_user", "tgs", "cost_per_m_tokens", "tpot_ms")
MEMORY_PARTS = ("weights", "kv_cache", "activations", "reserve")
PREFILL_KEYS = (
    "forward_ms",
    "ttft_ms",
    "input_tgs",
    "cost_per_m_input_tokens",
    "hbm_used_gb",
)
EVENT_KEYS = ("name", "group", "stream", "start_us", "end_us", "layer", "microbatch")
SERVE_LAYOUTS = ("colocated", "disagg")
SERVE_POOLS = {"colocated": ("colocated",), "disagg": ("prefill", "decode")}
SERVE_FIGURES = (
    "ttft_p50_ms",
    "ttft_p90_ms",
    "ttft_p99_ms",
    "tpot_p50_ms",
    "tpot_p90_ms",
    "tpot_p99_ms",
    "e2e_p50_ms",
    "e2e_p90_ms",
    "e2e_p99_ms",
    "goodput_requests_per_s",
    "slo_attainment",
    "tgs",
    "input_tgs",
    "cost_per_m_tokens",
)
SERVE_CDFS = ("ttft_cdf_ms", "tpot_cdf_ms", "e2e_cdf_ms")
CDF_POINTS = 101  # percentiles 0, 1, ..., 100
TIMELINE_KEYS = ("t_s", "queued", "running", "kv_tokens", "busy_share")
OVERLAP_KEYS = ("exposed_comm_share", "step_ms", "comm_ms", "exposed_comm_ms")
VERDICTS = ("identical", "diverged")
SOURCES = ("report", "run", "skipped", "failed")
SDC_OUTCOMES = ("detected", "missed", "masked", "crashed")


class ReportInputError(ValueError):
    """A result does not have the documented shape; the message names where and what."""


def _where(path: str, key: str | int) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}"


def mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ReportInputError(f"{path} must be a JSON object, got {type(value).__name__}")
    return value


def items(value: Any, path: str, *, non_empty: bool = False) -> Sequence[Any]:
    if not isinstance(value, list | tuple):
        raise ReportInputError(f"{path} must be a JSON list, got {type(value).__name__}")
    if non_empty and not value:
        raise ReportInputError(f"{path} must not be empty")
    return value


def field(obj: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in obj:
        raise ReportInputError(f"{path} lacks the key {key!r}")
    return obj[key]


def number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ReportInputError(f"{path} must be a finite number, got {value!r}")
    return float(value)


def integer(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ReportInputError(f"{path} must be an integer, got {value!r}")
    return value


def boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ReportInputError(f"{path} must be true or false, got {value!r}")
    return value


def text(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise ReportInputError(f"{path} must be a string, got {value!r}")
    return value


def numbers_at(obj: Mapping[str, Any], keys: Sequence[str], path: str) -> dict[str, float]:
    return {k: number(field(obj, k, path), _where(path, k)) for k in keys}


def _rows(
    section: Mapping[str, Any], path: str, key: str = "rows"
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(path, mapping) of each entry of a section's non-empty ``key`` list."""
    rows = items(field(section, key, path), _where(path, key), non_empty=True)
    for i, row in enumerate(rows):
        where = _where(_where(path, key), i)
        yield where, mapping(row, where)


def _entries(
    section: Mapping[str, Any], key: str, path: str
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(path, mapping) of each entry of a section's ``key`` mapping (plural noun), which must
    name at least one."""
    entries = mapping(field(section, key, path), _where(path, key))
    if not entries:
        raise ReportInputError(f"{path}.{key} must name at least one {key.removesuffix('s')}")
    for name, entry in entries.items():
        where = _where(_where(path, key), name)
        yield where, mapping(entry, where)


# -- checks of each section ----------------------------------------------------------------------


def check_table7(section: Any, path: str = "table7") -> None:
    section = mapping(section, path)
    integer(field(section, "context", path), _where(path, "context"))
    for where, row in _rows(section, path):
        text(field(row, "model", where), _where(where, "model"))
        text(field(row, "overlap", where), _where(where, "overlap"))
        for side in ("paper", "simulated"):
            numbers_at(mapping(field(row, side, where), _where(where, side)), TABLE7_KEYS, where)


def check_table6(section: Any, path: str = "table6") -> None:
    section = mapping(section, path)
    text(field(section, "assumptions", path), _where(path, "assumptions"))
    for where, row in _rows(section, path):
        for key in ("label", "model", "schedule", "attention_dtype"):
            text(field(row, key, where), _where(where, key))
        for key in ("context", "batch_per_device"):
            integer(field(row, key, where), _where(where, key))
        paper = mapping(field(row, "paper", where), _where(where, "paper"))
        numbers_at(paper, TABLE6_PAPER_KEYS, _where(where, "paper"))
        simulated = mapping(field(row, "simulated", where), _where(where, "simulated"))
        numbers_at(simulated, (*TABLE6_PAPER_KEYS, "tpot_ms"), _where(where, "simulated"))


def check_event(event: Any, path: str) -> None:
    event = mapping(event, path)
    for key in ("name", "group", "stream"):
        text(field(event, key, path), _where(path, key))
    start = number(field(event, "start_us", path), _where(path, "start_us"))
    end = number(field(event, "end_us", path), _where(path, "end_us"))
    if end < start:
        raise ReportInputError(f"{path} ends ({end}) before it starts ({start})")
    for key in ("layer", "microbatch"):
        integer(field(event, key, path), _where(path, key))


def check_timelines(section: Any, path: str = "timelines") -> None:
    section = mapping(section, path)
    text(field(section, "model", path), _where(path, "model"))
    integer(field(section, "batch_per_device", path), _where(path, "batch_per_device"))
    for i, layer in enumerate(items(field(section, "layers", path), _where(path, "layers"))):
        integer(layer, _where(_where(path, "layers"), i))
    for where, schedule in _entries(section, "schedules", path):
        numbers_at(schedule, ("tpl_us", "tpot_ms", "exposed_comm_share"), where)
        events = items(field(schedule, "events", where), _where(where, "events"), non_empty=True)
        for j, event in enumerate(events):
            check_event(event, _where(_where(where, "events"), j))


def _points(model: Mapping[str, Any], where: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(path, mapping) of each entry of a model's non-empty ``points`` list."""
    points = items(field(model, "points", where), _where(where, "points"), non_empty=True)
    for j, point in enumerate(points):
        p = _where(_where(where, "points"), j)
        yield p, mapping(point, p)


def check_pareto(section: Any, path: str = "pareto") -> None:
    section = mapping(section, path)
    for where, model in _entries(section, "models", path):
        text(field(model, "schedule", where), _where(where, "schedule"))
        for p, point in _points(model, where):
            integer(field(point, "batch_per_device", p), _where(p, "batch_per_device"))
            numbers_at(point, (*PARETO_KEYS, "hbm_used_gb"), p)
            boolean(field(point, "fits", p), _where(p, "fits"))


def check_memory(section: Any, path: str = "memory") -> None:
    section = mapping(section, path)
    text(field(section, "hardware", path), _where(path, "hardware"))
    number(field(section, "hbm_gb", path), _where(path, "hbm_gb"))
    for key in ("gpus", "context"):
        integer(field(section, key, path), _where(path, key))
    for where, model in _entries(section, "models", path):
        text(field(model, "schedule", where), _where(where, "schedule"))
        largest = field(model, "max_batch_per_device", where)
        integer(largest, _where(where, "max_batch_per_device"))
        for p, point in _points(model, where):
            integer(field(point, "batch_per_device", p), _where(p, "batch_per_device"))
            number(field(point, "hbm_used_gb", p), _where(p, "hbm_used_gb"))
            boolean(field(point, "fits", p), _where(p, "fits"))
            parts = _where(p, "hbm_breakdown_gb")
            numbers_at(mapping(field(point, "hbm_breakdown_gb", p), parts), MEMORY_PARTS, parts)


def check_prefill(section: Any, path: str = "prefill") -> None:
    section = mapping(section, path)
    for key in ("hardware", "assumptions"):
        text(field(section, key, path), _where(path, key))
    for key in ("gpus", "tokens_per_device"):
        integer(field(section, key, path), _where(path, key))
    for where, model in _entries(section, "models", path):
        text(field(model, "schedule", where), _where(where, "schedule"))
        for p, point in _points(model, where):
            for key in ("prompt_len", "tokens_per_device"):
                integer(field(point, key, p), _where(p, key))
            numbers_at(point, PREFILL_KEYS, p)
            boolean(field(point, "fits", p), _where(p, "fits"))
    where = _where(path, "profile")
    profile = mapping(field(section, "profile", path), where)
    for key in ("label", "model", "hardware", "schedule", "routing"):
        text(field(profile, key, where), _where(where, key))
    for key in ("ep", "prompt_len", "tokens_per_device"):
        integer(field(profile, key, where), _where(where, key))
    measured = numbers_at(profile, ("measured_tgs", "simulated_tgs"), where)["measured_tgs"]
    if measured <= 0:
        raise ReportInputError(f"{where}.measured_tgs must be positive, got {measured}")


def check_training_overlap(section: Any, path: str = "training_overlap") -> None:
    section = mapping(section, path)
    paper = mapping(field(section, "paper", path), _where(path, "paper"))
    numbers_at(paper, ("baseline", "scmoe"), _where(path, "paper"))
    simulated = mapping(field(section, "simulated", path), _where(path, "simulated"))
    for schedule in ("baseline", "scmoe"):
        where = _where(_where(path, "simulated"), schedule)
        numbers_at(mapping(field(simulated, schedule, where), where), OVERLAP_KEYS, where)


def check_cdf(values: Any, path: str) -> list[float]:
    """Percentiles 0..100: CDF_POINTS finite numbers, non-decreasing."""
    values = items(values, path)
    if len(values) != CDF_POINTS:
        raise ReportInputError(f"{path} must hold {CDF_POINTS} percentiles, got {len(values)}")
    out = [number(v, _where(path, i)) for i, v in enumerate(values)]
    for i in range(1, len(out)):
        if out[i] < out[i - 1]:
            raise ReportInputError(f"{path} decreases at percentile {i}")
    return out


def _serve_pool(pool: Mapping[str, Any], where: str) -> None:
    integer(field(pool, "instances", where), _where(where, "instances"))
    number(field(pool, "busy_share", where), _where(where, "busy_share"))
    capacity = field(pool, "kv_capacity_tokens", where)
    if capacity is not None:
        integer(capacity, _where(where, "kv_capacity_tokens"))
    t = _where(where, "timeline")
    timeline = mapping(field(pool, "timeline", where), t)
    lengths = set()
    for key in TIMELINE_KEYS:
        values = items(field(timeline, key, t), _where(t, key), non_empty=True)
        for i, value in enumerate(values):
            number(value, _where(_where(t, key), i))
        lengths.add(len(values))
    if len(lengths) > 1:
        raise ReportInputError(f"{t} lists differ in length: {sorted(lengths)}")


def check_serving(section: Any, path: str = "serving") -> None:
    section = mapping(section, path)
    for key in ("model", "hardware", "trace"):
        text(field(section, key, path), _where(path, key))
    for key in ("gpus", "prefill_gpus"):
        integer(field(section, key, path), _where(path, key))
    keys = ("recorded_rate", "duration_s", "slo_ttft_ms", "slo_tpot_ms", "slo_percentile")
    numbers_at(section, keys, path)
    for where, run in _rows(section, path, "runs"):
        layout = text(field(run, "layout", where), _where(where, "layout"))
        if layout not in SERVE_LAYOUTS:
            raise ReportInputError(
                f"{where}.layout must be one of {', '.join(SERVE_LAYOUTS)}, got {layout!r}"
            )
        numbers_at(run, ("rate_scale", "rate"), where)
        for key in ("requests", "requests_finished", "total_gpus", "kv_capacity_tokens"):
            integer(field(run, key, where), _where(where, key))
        boolean(field(run, "slo_met", where), _where(where, "slo_met"))
        for key in SERVE_FIGURES:
            value = field(run, key, where)
            if value is not None:
                number(value, _where(where, key))
        for key in SERVE_CDFS:
            check_cdf(field(run, key, where), _where(where, key))
        p = _where(where, "pools")
        pools = mapping(field(run, "pools", where), p)
        if sorted(pools) != sorted(SERVE_POOLS[layout]):
            raise ReportInputError(
                f"{p} must name the pools {', '.join(SERVE_POOLS[layout])}, got {sorted(pools)}"
            )
        for name in SERVE_POOLS[layout]:
            _serve_pool(mapping(pools[name], _where(p, name)), _where(p, name))


def check_training_run(run: Any, path: str) -> None:
    run = mapping(run, path)
    text(field(run, "name", path), _where(path, "name"))
    text(field(run, "model", path), _where(path, "model"))
    number(field(run, "target_ffn_experts", path), _where(path, "target_ffn_experts"))
    records = items(field(run, "records", path), _where(path, "records"), non_empty=True)
    layers: int | None = None
    for i, record in enumerate(records):
        where = _where(_where(path, "records"), i)
        record = mapping(record, where)
        integer(field(record, "step", where), _where(where, "step"))
        number(field(record, "lm_loss", where), _where(where, "lm_loss"))
        if "val_loss" in record:
            number(record["val_loss"], _where(where, "val_loss"))
        means = items(field(record, "ffn_experts_mean", where), _where(where, "ffn_experts_mean"))
        for j, value in enumerate(means):
            number(value, _where(_where(where, "ffn_experts_mean"), j))
        if layers is not None and len(means) != layers:
            raise ReportInputError(
                f"{where}.ffn_experts_mean has {len(means)} layers, earlier records {layers}"
            )
        layers = len(means)


def _maybe_number(value: Any, path: str) -> float | None:
    """A finite number, or null (a value the run could not give)."""
    return None if value is None else number(value, path)


def _maybe_integer(value: Any, path: str) -> int | None:
    return None if value is None else integer(value, path)


def _check_divergence(divergence: Any, where: str) -> None:
    divergence = mapping(divergence, where)
    integer(field(divergence, "step", where), _where(where, "step"))
    text(field(divergence, "tensor", where), _where(where, "tensor"))
    if "max_abs_diff" in divergence:
        _maybe_number(divergence["max_abs_diff"], _where(where, "max_abs_diff"))
    for key in ("max_ulp", "run"):
        if key in divergence:
            _maybe_integer(divergence[key], _where(where, key))


def _check_injected(injected: Any, where: str) -> None:
    injected = mapping(injected, where)
    text(field(injected, "site", where), _where(where, "site"))
    integer(field(injected, "bit", where), _where(where, "bit"))
    for key in ("step", "run"):
        if key in injected:
            integer(injected[key], _where(where, key))


def check_determinism(result: Any, path: str = "determinism") -> None:
    result = mapping(result, path)
    verdict = text(field(result, "verdict", path), _where(path, "verdict"))
    if verdict not in VERDICTS:
        raise ReportInputError(
            f"{path}.verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}"
        )
    for key in ("runs", "steps"):
        if key in result:
            integer(result[key], _where(path, key))
    if result.get("first_divergence") is not None:
        _check_divergence(result["first_divergence"], _where(path, "first_divergence"))
    if result.get("injected") is not None:
        _check_injected(result["injected"], _where(path, "injected"))
    for i, fingerprint in enumerate(items(result.get("fingerprints", []), f"{path}.fingerprints")):
        text(fingerprint, _where(_where(path, "fingerprints"), i))


def check_sdc(result: Any, path: str = "sdc") -> None:
    result = mapping(result, path)
    trials = items(field(result, "trials", path), _where(path, "trials"), non_empty=True)
    for i, trial in enumerate(trials):
        where = _where(_where(path, "trials"), i)
        trial = mapping(trial, where)
        text(field(trial, "site", where), _where(where, "site"))
        bit = integer(field(trial, "bit", where), _where(where, "bit"))
        if bit < 0:
            raise ReportInputError(f"{where}.bit must be >= 0, got {bit}")
        detected = mapping(field(trial, "detected", where), _where(where, "detected"))
        if not detected:
            raise ReportInputError(f"{where}.detected must name at least one detector")
        for name, hit in detected.items():
            if not isinstance(hit, bool):
                raise ReportInputError(
                    f"{where}.detected.{name} must be true or false, got {hit!r}"
                )
    if "detectors" in result:
        for i, name in enumerate(items(result["detectors"], f"{path}.detectors", non_empty=True)):
            text(name, _where(_where(path, "detectors"), i))
    _check_sdc_extras(result, path)


def _per_detector(result: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    """The optional ``key`` mapping of an SDC result (detector -> value); empty when absent."""
    return mapping(result[key], _where(path, key)) if key in result else {}


def _check_sdc_extras(result: Mapping[str, Any], path: str) -> None:
    """The optional per-detector totals, false positives, overheads and attribution."""
    for detector, tally in _per_detector(result, "counts", path).items():
        where = _where(_where(path, "counts"), detector)
        tally = mapping(tally, where)
        for outcome in SDC_OUTCOMES:
            if integer(field(tally, outcome, where), _where(where, outcome)) < 0:
                raise ReportInputError(f"{where}.{outcome} must be >= 0")
    for detector, count in _per_detector(result, "false_positives", path).items():
        _maybe_integer(count, _where(_where(path, "false_positives"), detector))
    for detector, share in _per_detector(result, "overhead", path).items():
        _maybe_number(share, _where(_where(path, "overhead"), detector))
    if "clean_runs" in result:
        _maybe_integer(result["clean_runs"], _where(path, "clean_runs"))
    if "attribution" in result:
        where = _where(path, "attribution")
        attribution = mapping(result["attribution"], where)
        integer(field(attribution, "events_per_class", where), _where(where, "events_per_class"))
        for name, share in _per_detector(attribution, "accuracy", where).items():
            _maybe_number(share, _where(_where(where, "accuracy"), name))


def check_provenance(provenance: Any, path: str = "provenance") -> None:
    provenance = mapping(provenance, path)
    for section, origin in provenance.items():
        where = _where(path, section)
        if section not in ("determinism", "sdc"):
            raise ReportInputError(f"{path} names {section!r}; only determinism and sdc")
        origin = mapping(origin, where)
        source = text(field(origin, "source", where), _where(where, "source"))
        if source not in SOURCES:
            raise ReportInputError(
                f"{where}.source must be one of {', '.join(SOURCES)}, got {source!r}"
            )
        for key in ("command", "full_command", "path", "error"):
            if key in origin:
                text(origin[key], _where(where, key))
        if "seconds" in origin:
            _maybe_number(origin["seconds"], _where(where, "seconds"))


_SECTION_CHECKS = {
    "table7": check_table7,
    "table6": check_table6,
    "timelines": check_timelines,
    "pareto": check_pareto,
    "memory": check_memory,
    "prefill": check_prefill,
    "training_overlap": check_training_overlap,
    "serving": check_serving,
}


def check_report_data(data: Any) -> None:
    """Raise ReportInputError naming the first value that breaks the documented shape."""
    data = mapping(data, "report data")
    meta = mapping(field(data, "meta", "report data"), "meta")
    text(field(meta, "title", "meta"), "meta.title")
    text(field(meta, "config_hash", "meta"), "meta.config_hash")
    mapping(field(meta, "config", "meta"), "meta.config")
    for key, check in _SECTION_CHECKS.items():
        check(field(data, key, "report data"), key)
    runs = items(field(data, "training_runs", "report data"), "training_runs")
    for i, run in enumerate(runs):
        check_training_run(run, f"training_runs[{i}]")
    if field(data, "determinism", "report data") is not None:
        check_determinism(data["determinism"])
    if field(data, "sdc", "report data") is not None:
        check_sdc(data["sdc"])
    if data.get("provenance") is not None:
        check_provenance(data["provenance"])
