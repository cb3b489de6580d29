"""A step's metrics: per-slice statistics packed into one vector, the batch's values computed
from every slice's vector (the same at any world size), ``metrics.jsonl`` and the run summary.

A slice's vector is float64: the :data:`~longcat_sim.train.losses.LOSS_TERMS` (NaN for an
absent term), then per layer the token count, the sum and the sum of squares of the FFN experts
per token, and the ``N + Z`` expert counts. Counts and their sums are exact in float64.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from longcat_sim.errors import UserError
from longcat_sim.model.balance import ffn_experts_per_token
from longcat_sim.model.router import RouterOutput
from longcat_sim.runs import write_text_atomic
from longcat_sim.train.losses import LOSS_TERMS

METRICS_NAME = "metrics.jsonl"


def slice_stats(
    terms: dict[str, torch.Tensor], router: list[RouterOutput], n_ffn: int
) -> torch.Tensor:
    """One slice's statistics vector (see the module docstring)."""
    values = [float(terms[name].item()) if name in terms else math.nan for name in LOSS_TERMS]
    for out in router:
        per_token = ffn_experts_per_token(out, n_ffn).to(torch.float64)
        counts = out.counts_E.detach().to(torch.float64)
        values += [per_token.numel(), per_token.sum().item(), per_token.square().sum().item()]
        values += counts.tolist()
    return torch.tensor(values, dtype=torch.float64)


def batch_stats(rows: torch.Tensor, weight: float, n_layers: int, n_ffn: int) -> dict[str, Any]:
    """Loss terms (slice values times ``weight``, summed in slice order) and per-layer routing
    statistics of the batch whose slices' vectors are ``rows`` ``[slices, K]``."""
    losses = rows[0, : len(LOSS_TERMS)] * weight
    for row in rows[1:]:
        losses = losses + row[: len(LOSS_TERMS)] * weight
    record: dict[str, Any] = {
        name: float(v) for name, v in zip(LOSS_TERMS, losses, strict=True) if not math.isnan(v)
    }
    layers = rows[:, len(LOSS_TERMS) :].sum(dim=0).view(n_layers, -1)
    stats: dict[str, list[float]] = {
        "ffn_experts_mean": [],
        "ffn_experts_std": [],
        "zero_slot_share": [],
        "max_load_ratio": [],
    }
    for tokens, total, squares, *counts in layers.tolist():
        mean = total / tokens
        ffn = counts[:n_ffn]
        mean_load = sum(ffn) / n_ffn
        stats["ffn_experts_mean"].append(mean)
        stats["ffn_experts_std"].append(math.sqrt(max(squares / tokens - mean * mean, 0.0)))
        stats["zero_slot_share"].append(sum(counts[n_ffn:]) / sum(counts))
        stats["max_load_ratio"].append(max(ffn) / mean_load if mean_load else 0.0)
    return {**record, **stats}


class MetricsLog:
    """``metrics.jsonl`` of a run: one JSON object per step."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / METRICS_NAME

    def read(self) -> list[dict[str, Any]]:
        return self.parse()[0]

    def parse(self) -> tuple[list[dict[str, Any]], bool]:
        """(the records, whether a torn last line, left by an interrupted write, was dropped);
        only a last line without its newline can be torn: any other line that is not a step
        record is a one-line error naming it."""
        if not self.path.exists():
            return [], False
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"{str(self.path)!r} is not UTF-8 text ({exc.reason})") from None
        except OSError as exc:  # a folder in its place, no permission
            raise UserError(
                f"{str(self.path)!r} cannot be read: {exc.strerror or exc}; move it away"
            ) from None
        *complete, tail = text.split("\n")  # tail: what follows the last newline
        records = [
            self._record(line, number)
            for number, line in enumerate(complete, start=1)
            if line.strip()
        ]
        if not tail.strip():
            return records, False
        try:
            records.append(self._record(tail, len(complete) + 1))
        except UserError:
            return records, True  # a write cut short before its newline
        return records, False

    def _record(self, line: str, number: int) -> dict[str, Any]:
        """Line ``number`` as a step record, or a one-line error naming it."""
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(
                f"{str(self.path)!r} line {number} is not a step record; the file is damaged "
                "(only a last line cut short before its newline is dropped); move it away"
            )
        return record

    def truncate(self, step: int) -> bool:
        """Drop records of steps at or past ``step`` (left by an interrupted run) and a torn
        last line; whether there was one."""
        records, torn = self.parse()
        kept = [r for r in records if r["step"] < step]
        write_text_atomic(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        return torn


@dataclass(frozen=True)
class TrainSummary:
    """What a run reports; the window statistics are read back from ``metrics.jsonl``."""

    start_step: int
    step: int
    final_loss: float
    val_loss: float
    val_unigram_entropy: float  # plug-in entropy of the validation targets themselves
    val_unigram_cross_entropy: float  # a unigram model fitted on train, scored on them
    train_unigram_entropy: float
    avg_ffn_experts_per_token: list[float]
    ffn_experts_std_per_token: list[float]
    target_ffn_experts: float
    stats_window: int
    tokens_per_s: float
    param_hash: str
    checkpoint: str
    nproc: int = 1
    data: dict[str, Any] = field(default_factory=dict)
    grown_from: str | None = None
    sdc_guard: dict[str, Any] | None = None  # the SDC guard's summary, when the run had one
    stopped: str | None = None  # why the SDC guard stopped the run before its last step


def window_means(records: list[dict[str, Any]], key: str, layers: int) -> list[float]:
    """Per layer, the mean of ``key`` over ``records`` (empty when there are none)."""
    if not records:
        return []
    return [sum(r[key][i] for r in records) / len(records) for i in range(layers)]
