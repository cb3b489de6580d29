"""Other commands' results for the report: ``train``, ``determinism`` and ``sdc`` run
directories, read, put into the report's input shapes (``reports.inputs``) and checked."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from longcat_sim.errors import UserError
from longcat_sim.reports.inputs import (
    ReportInputError,
    check_determinism,
    check_sdc,
    check_training_run,
)
from longcat_sim.runs import NON_FINITE_KEY, json_safe, read_run


def _read_json(path: Path, flag: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{flag}: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UserError(f"{flag}: {str(path)!r} is not valid JSON: {exc}") from None


def load_training_run(run_dir: Path) -> dict[str, Any]:
    """A completed ``longcat-sim train`` run directory -> TRAIN_RUN (``reports.inputs``): the
    loss and FFN-experts columns of ``metrics.jsonl`` and the target from its committed
    ``results.json``. A last line without its newline (a write cut short) is left out."""
    flag = f"--train-run {str(run_dir)!r}"
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise UserError(f"{flag} holds no metrics.jsonl; pass a longcat-sim train run directory")
    records = []
    try:
        text = metrics_path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise UserError(f"{flag}: cannot read metrics.jsonl: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{flag}: metrics.jsonl is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
            f"offset {exc.start}); pass the directory a longcat-sim train run wrote"
        ) from None
    lines = text.split("\n")
    for number, line in enumerate(lines[:-1], start=1):  # the last is "" or a torn line
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise UserError(f"{flag}: metrics.jsonl line {number} is not JSON: {exc}") from None
        if not isinstance(record, dict):
            raise UserError(f"{flag}: metrics.jsonl line {number} is not a JSON object")
        keep = ("step", "lm_loss", "ffn_experts_mean", "val_loss")
        records.append({k: record[k] for k in keep if k in record})
    _, results = read_run(run_dir, "--train-run")
    model, target = results.get("model"), results.get("target_ffn_experts")
    run = {
        "name": run_dir.resolve().name,
        "model": model,
        "target_ffn_experts": target,
        "records": records,
    }
    try:
        check_training_run(run, flag)
    except ReportInputError as exc:
        raise UserError(str(exc)) from None
    return run


def load_result(
    path: Path,
    flag: str,
    check: Callable[[Any, str], None],
    adapt: Callable[[Any], Any] = lambda result: result,
) -> dict[str, Any]:
    """``results.json`` of a run directory (or the JSON file itself), put into the report's
    input shape by ``adapt`` and checked against it."""
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{flag} {str(path)!r}: no results.json there; pass a run directory")
    result = adapt(read_run(path, flag)[1] if path.is_dir() else _read_json(file, flag))
    try:
        check(result, f"{flag} {str(path)!r}")
    except ReportInputError as exc:
        raise UserError(str(exc)) from None
    return result


DIVERGENCE_KEYS = ("step", "tensor", "max_abs_diff", "max_ulp", "run")


def _divergence(divergence: Any) -> Any:
    """``first_divergence`` of the determinism command in the report's shape: the module joins
    the tensor's name, ``max_abs`` becomes ``max_abs_diff``."""
    if not isinstance(divergence, dict):
        return divergence
    divergence = dict(divergence)
    module = divergence.pop("module", None)
    if module and isinstance(divergence.get("tensor"), str):
        divergence["tensor"] = f"{module}: {divergence['tensor']}"
    if "max_abs" in divergence and "max_abs_diff" not in divergence:
        divergence["max_abs_diff"] = divergence.pop("max_abs")
    return {k: v for k, v in divergence.items() if k in DIVERGENCE_KEYS}


def determinism_input(result: Any) -> Any:
    """``longcat-sim determinism`` results (``identical``, ``runs``, ``first_divergence`` with
    ``module``, ``tensor``, ``max_abs`` and ``max_ulp``, ``injected``: the planted fault of a
    negative control, in the last run) in the report's determinism shape; results already in
    that shape pass unchanged. NaN and infinities (older files) become null."""
    if not isinstance(result, dict):
        return result
    result = json_safe(result)
    if "verdict" in result or "identical" not in result:
        return result
    adapted = {k: v for k, v in result.items() if k not in ("identical", "first_divergence")}
    adapted["verdict"] = "identical" if result["identical"] is True else "diverged"
    adapted["first_divergence"] = _divergence(result.get("first_divergence"))
    if isinstance(result.get("injected"), dict) and isinstance(result.get("runs"), int):
        adapted["injected"] = {"run": result["runs"] - 1, **result["injected"]}
    return adapted


SDC_OUTCOMES = ("detected", "missed", "masked", "crashed")


def _count(row: dict[str, Any], outcome: str) -> int:
    """A row's count of ``outcome`` (0 when absent or not a count)."""
    value = row.get(outcome, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _sdc_extras(result: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-detector totals of the campaign's rows, false positives, overheads and the
    attribution accuracy, as far as the result holds them."""
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        tally = counts.setdefault(str(row.get("detector")), dict.fromkeys(SDC_OUTCOMES, 0))
        for outcome in SDC_OUTCOMES:
            tally[outcome] += _count(row, outcome)
    extras: dict[str, Any] = {"counts": counts}
    for key in ("false_positives", "overhead", "clean_runs", NON_FINITE_KEY):
        if key in result:
            extras[key] = result[key]
    attribution = result.get("attribution")
    if isinstance(attribution, dict) and attribution.get("events_per_class"):
        extras["attribution"] = {
            k: attribution[k] for k in ("events_per_class", "accuracy") if k in attribution
        }
    return extras


def sdc_input(result: Any) -> Any:
    """``longcat-sim sdc`` results (``results``: per site, bit and detector, counts of detected,
    masked, missed and crashed flips) as the report's per-trial records: masked flips change
    nothing a detector compares, so each detector's share is detected / (detected + missed).
    Per-detector totals, false positives, overheads and attribution come along when present;
    NaN and infinities (older files) become null."""
    if not isinstance(result, dict):
        return result
    result = json_safe(result)
    if "trials" in result or "results" not in result:
        return result
    trials = []
    detectors: list[str] = []
    rows = result["results"]
    if not isinstance(rows, list):
        return result
    for row in rows:
        if not isinstance(row, dict):
            return result  # let the shape check name what is wrong
        detector = row.get("detector")
        if detector not in detectors:
            detectors.append(detector)
        for hit, count in ((True, _count(row, "detected")), (False, _count(row, "missed"))):
            trials.extend(
                {"site": row.get("site"), "bit": row.get("bit"), "detected": {detector: hit}}
                for _ in range(count)
            )
    return {"trials": trials, "detectors": detectors, **_sdc_extras(result, rows)}


def load_determinism(path: Path) -> dict[str, Any]:
    return load_result(path, "--determinism-run", check_determinism, determinism_input)


def load_sdc(path: Path) -> dict[str, Any]:
    return load_result(path, "--sdc-run", check_sdc, sdc_input)
