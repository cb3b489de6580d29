"""Event records -> Chrome / Perfetto trace JSON (open in ui.perfetto.dev or chrome://tracing).

One complete event (``"ph": "X"``) per record, ``ts``/``dur`` in microseconds, ``pid`` = GPU
class, ``tid`` = stream, with metadata events naming both. The output is deterministic: events
are sorted and numbers rounded to nanoseconds. Callers write the string atomically.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from longcat_sim.cluster.streams import STREAM_NAMES, EventRecord

STREAM_TIDS = {name: i for i, name in enumerate(STREAM_NAMES)}


def to_us(seconds: float) -> float:
    """Seconds as trace-event microseconds (rounded to the nanosecond)."""
    return round(seconds * 1e6, 3)


def chrome_trace(
    records: Iterable[EventRecord],
    *,
    gpu_names: Mapping[int, str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The trace as a dict: ``traceEvents`` plus optional top-level ``metadata``."""
    rows = sorted(
        records, key=lambda r: (r.gpu, STREAM_TIDS[r.stream], r.start, r.end, r.name, r.layer)
    )
    events: list[dict[str, Any]] = []
    for gpu in sorted({r.gpu for r in rows}):
        name = (gpu_names or {}).get(gpu, f"GPU class {gpu}")
        events.append(
            {"ph": "M", "name": "process_name", "pid": gpu, "tid": 0, "args": {"name": name}}
        )
        for stream in sorted({r.stream for r in rows if r.gpu == gpu}, key=STREAM_TIDS.get):
            events.append(
                {
                    "ph": "M",
                    "name": "thread_name",
                    "pid": gpu,
                    "tid": STREAM_TIDS[stream],
                    "args": {"name": stream},
                }
            )
    for r in rows:
        args: dict[str, Any] = {"layer": r.layer, "microbatch": r.microbatch, "chunk": r.chunk}
        if r.phase:
            args["phase"] = r.phase
        events.append(
            {
                "name": r.name,
                "cat": r.phase or r.stream,
                "ph": "X",
                "ts": to_us(r.start),
                "dur": to_us(r.end - r.start),
                "pid": r.gpu,
                "tid": STREAM_TIDS[r.stream],
                "args": args,
            }
        )
    trace: dict[str, Any] = {"traceEvents": events, "displayTimeUnit": "ms"}
    if metadata:
        trace["metadata"] = dict(metadata)
    return trace


def chrome_trace_json(records: Iterable[EventRecord], **kwargs: Any) -> str:
    """:func:`chrome_trace` serialised with sorted keys: equal records give equal bytes."""
    return json.dumps(chrome_trace(records, **kwargs), sort_keys=True, separators=(",", ":"))
