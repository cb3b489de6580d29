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
from longcat_sim.runs import read_run


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


def determinism_input(result: Any) -> Any:
    """``longcat-sim determinism`` results (``identical``, ``runs``, ``first_divergence`` with
    ``module``, ``tensor`` and ``max_ulp``) in the report's determinism shape; results already in
    that shape pass unchanged."""
    if not isinstance(result, dict) or "verdict" in result or "identical" not in result:
        return result
    adapted = {k: v for k, v in result.items() if k not in ("identical", "first_divergence")}
    adapted["verdict"] = "identical" if result["identical"] is True else "diverged"
    divergence = result.get("first_divergence")
    if isinstance(divergence, dict):
        divergence = dict(divergence)
        module = divergence.pop("module", None)
        if module and isinstance(divergence.get("tensor"), str):
            divergence["tensor"] = f"{module}: {divergence['tensor']}"
        divergence = {
            k: v for k, v in divergence.items() if k in ("step", "tensor", "max_abs_diff")
        }
    adapted["first_divergence"] = divergence
    return adapted


def sdc_input(result: Any) -> Any:
    """``longcat-sim sdc`` results (``results``: per site, bit and detector, counts of detected,
    masked and missed flips) as the report's per-trial records: masked flips change nothing a
    detector compares, so each detector's share is detected / (detected + missed)."""
    if not isinstance(result, dict) or "trials" in result or "results" not in result:
        return result
    trials = []
    detectors: list[str] = []
    for row in result["results"]:
        if not isinstance(row, dict):
            return result  # let the shape check name what is wrong
        detector = row.get("detector")
        if detector not in detectors:
            detectors.append(detector)
        for hit, count in ((True, row.get("detected", 0)), (False, row.get("missed", 0))):
            trials.extend(
                {"site": row.get("site"), "bit": row.get("bit"), "detected": {detector: hit}}
                for _ in range(int(count))
            )
    return {"trials": trials, "detectors": detectors}


def load_determinism(path: Path) -> dict[str, Any]:
    return load_result(path, "--determinism-run", check_determinism, determinism_input)


def load_sdc(path: Path) -> dict[str, Any]:
    return load_result(path, "--sdc-run", check_sdc, sdc_input)
