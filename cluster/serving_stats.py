"""Load over time of a serving run (queue, batch, KV cache held and busy share per time bin),
and its figures made JSON-ready."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from longcat_sim.cluster.serving import ServingResult


def timeline(result: ServingResult, bins: int = 120, instances: int | None = None) -> dict:
    """Per time bin of [0, end): requests queued and running and KV tokens held (each
    instance's step samples in the bin averaged, summed over instances; an instance with no
    step in a bin holds nothing) and the share of instance time spent in steps.

    ``instances``: how many instances the run had (default: those that ran a step)."""
    end = result.end_s
    n = int(instances if instances is not None else len(result.busy_share))
    if end <= 0 or not len(result.step_s):
        return {"t_s": [], "queued": [], "running": [], "kv_tokens": [], "busy_share": []}
    width = end / bins
    start, dur, k = result.step_start_s, result.step_s, result.step_instance
    cell = np.minimum((start / width).astype(np.int64), bins - 1)
    count = np.zeros((n, bins))
    np.add.at(count, (k, cell), 1.0)
    seen = np.maximum(count, 1.0)

    def mean_sum(values: np.ndarray) -> list[float]:
        total = np.zeros((n, bins))
        np.add.at(total, (k, cell), values.astype(np.float64))
        return (total / seen).sum(axis=0).tolist()

    edges = np.arange(bins + 1) * width
    stop = np.minimum(start + dur, end)
    last = np.minimum((np.maximum(stop - 1e-12, start) / width).astype(np.int64), bins - 1)
    busy = np.zeros(bins)
    inside = last == cell
    np.add.at(busy, cell[inside], (stop - start)[inside])
    for i in np.flatnonzero(~inside):  # the few steps that cross a bin edge
        for b in range(cell[i], last[i] + 1):
            busy[b] += max(0.0, min(stop[i], edges[b + 1]) - max(start[i], edges[b]))
    return {
        "t_s": edges[:-1].tolist(),
        "queued": mean_sum(result.step_queue),
        "running": mean_sum(result.step_batch),
        "kv_tokens": mean_sum(result.step_kv_tokens),
        "busy_share": (busy / (width * n)).tolist(),
    }


def json_ready(value: Any) -> Any:
    """``value`` with numpy scalars made plain and NaN or infinite floats made None (JSON has
    neither), through mappings, lists and tuples."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value
