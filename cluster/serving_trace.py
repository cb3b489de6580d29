"""A serving run -> Chrome / Perfetto trace JSON (open in ui.perfetto.dev or chrome://tracing).

One process per stage (pool: ``colocated``, or ``prefill`` and ``decode``), one track per
instance, one complete event (``"ph": "X"``) per step with its batch in ``args``, and counter
tracks of each pool's queued requests and held KV tokens. For a sample of requests spread over
the run, a flow (``"ph": "s"``/``"f"``) goes from the step that finished the request's prefill
to the first step that decodes it (the decode pool's, or the same instance's next step when
co-located), and an async slice on a ``requests`` process splits its life into queued, prefill,
KV transfer, decode queued and decode. Only the earliest ``max_steps`` steps are written; the
top-level ``metadata`` says how many there were. Times are in microseconds; the output is
deterministic and holds no NaN.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from longcat_sim.cluster.serving import ServingResult
from longcat_sim.cluster.serving_stats import json_ready
from longcat_sim.cluster.trace import chrome_trace, to_us

REQUESTS_PROCESS = "requests (sampled)"


def _name_events(pid: int, name: str, threads: Mapping[int, str]) -> list[dict[str, Any]]:
    """Metadata events naming process ``pid`` and its threads, in the order given."""
    events: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": pid, "tid": pid, "args": {"name": name}},
        {
            "ph": "M",
            "name": "process_sort_index",
            "pid": pid,
            "tid": pid,
            "args": {"sort_index": pid},
        },
    ]
    for order, (tid, thread) in enumerate(threads.items()):
        events.append(
            {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": thread}}
        )
        events.append(
            {
                "ph": "M",
                "name": "thread_sort_index",
                "pid": pid,
                "tid": tid,
                "args": {"sort_index": order},
            }
        )
    return events


def _kept(stages: Mapping[str, ServingResult], max_steps: int) -> dict[str, np.ndarray]:
    """Per stage, a mask of the steps written: the earliest ``max_steps`` over all stages."""
    starts = np.concatenate([res.step_start_s for res in stages.values()] or [np.empty(0)])
    mask = np.zeros(len(starts), dtype=bool)
    mask[np.argsort(starts, kind="stable")[: max(max_steps, 0)]] = True
    out, at = {}, 0
    for name, res in stages.items():
        out[name] = mask[at : at + len(res.step_s)]
        at += len(res.step_s)
    return out


def _step_name(decoding: int, prefill_tokens: int) -> str:
    if decoding and prefill_tokens:
        return "prefill+decode"
    return "prefill" if prefill_tokens else "decode"


def _step_events(
    res: ServingResult, keep: np.ndarray, stage: str, pid: int, tid0: int
) -> list[dict[str, Any]]:
    """One complete event per kept step, on its instance's track."""
    events = []
    for j in np.flatnonzero(keep):
        decoding, prefill = int(res.step_decoding[j]), int(res.step_prefill_tokens[j])
        args = {
            "decoding": decoding,
            "prefill_tokens": prefill,
            "batch": int(res.step_batch[j]),
            "queued": int(res.step_queue[j]),
            "kv_tokens": int(res.step_kv_tokens[j]),
        }
        events.append(
            {
                "name": _step_name(decoding, prefill),
                "cat": stage,
                "ph": "X",
                "ts": to_us(float(res.step_start_s[j])),
                "dur": to_us(float(res.step_s[j])),
                "pid": pid,
                "tid": tid0 + int(res.step_instance[j]),
                "args": args,
            }
        )
    return events


def _counter_events(res: ServingResult, keep: np.ndarray, pid: int) -> list[dict[str, Any]]:
    """The pool's queued requests and held KV tokens, summed over instances, at each kept step's
    start and whenever an instance goes idle (both drop to zero there)."""
    samples: list[tuple[float, int, int, int]] = []
    start, end, inst = res.step_start_s, res.step_start_s + res.step_s, res.step_instance
    following = np.full(len(start), np.inf)
    for k in np.unique(inst):
        steps = np.flatnonzero(inst == k)
        following[steps[:-1]] = start[steps[1:]]
    for j in np.flatnonzero(keep):
        k = int(inst[j])
        samples.append((float(start[j]), k, int(res.step_queue[j]), int(res.step_kv_tokens[j])))
        if following[j] > end[j] and end[j] < res.end_s:
            samples.append((float(end[j]), k, 0, 0))
    samples.sort(key=lambda s: s[0])
    queued = np.zeros(len(res.busy_share), dtype=np.int64)
    kv = np.zeros_like(queued)
    events = []
    for t, k, q, tokens in samples:
        queued[k], kv[k] = q, tokens
        ts = to_us(t)
        events.append(
            {
                "name": "queued",
                "ph": "C",
                "ts": ts,
                "pid": pid,
                "args": {"requests": int(queued.sum())},
            }
        )
        events.append(
            {"name": "KV", "ph": "C", "ts": ts, "pid": pid, "args": {"tokens": int(kv.sum())}}
        )
    return events


def _steps_on(res: ServingResult, inst: np.ndarray, t: np.ndarray, before: bool) -> np.ndarray:
    """Per row, the step on instance ``inst`` that ends at ``t`` (the last one starting before
    it, ``before``) or the first one starting at or after ``t``; -1 where there is none."""
    out = np.full(len(t), -1, dtype=np.int64)
    valid = np.isfinite(t) & (inst >= 0)
    for k in np.unique(inst[valid]):
        rows = np.flatnonzero(valid & (inst == k))
        steps = np.flatnonzero(res.step_instance == k)
        at = np.searchsorted(res.step_start_s[steps], t[rows], side="left") - int(before)
        ok = (at >= 0) & (at < len(steps))
        out[rows[ok]] = steps[at[ok]]
    return out


def _positions(rows: np.ndarray, n: int) -> np.ndarray:
    """For each of ``n`` requests, its row in a stage (-1 where the stage never saw it)."""
    pos = np.full(n, -1, dtype=np.int64)
    pos[np.asarray(rows, dtype=np.int64)] = np.arange(len(rows))
    return pos


def _links(
    stages: Mapping[str, ServingResult],
    stage_requests: Mapping[str, np.ndarray],
    kept: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Per request: its row and prefill-ending step in the first stage, and its row and first
    decoding step in the decoding stage; ``ok`` where both steps exist and are written."""
    names = list(stages)
    first, last = names[0], ("decode" if "decode" in stages and names[0] != "decode" else names[0])
    pre, dec = stages[first], stages[last]
    n = int(max(int(np.max(r, initial=-1)) for r in stage_requests.values()) + 1)
    p_row = _positions(stage_requests[first], n)
    d_row = _positions(stage_requests[last], n) if last in stage_requests else np.full(n, -1)
    has_p = p_row >= 0
    ft = np.where(has_p, pre.first_token_s[p_row], np.nan)
    src = _steps_on(pre, np.where(has_p, pre.instance[p_row], -1), ft, before=True)
    has_d = d_row >= 0
    if last == first:
        fin = np.where(has_p, pre.finish_s[p_row], np.nan)
        t0 = np.where(np.isnan(fin) | (fin > ft), ft, np.nan)
    else:
        t0 = np.where(has_d, dec.start_s[d_row], np.nan)
    d_inst = np.where(has_d, dec.instance[d_row], -1)
    dst = _steps_on(dec, d_inst, t0, before=False)
    ok = (src >= 0) & (dst >= 0)
    ok[ok] &= kept[first][src[ok]] & kept[last][dst[ok]]
    return {"p_row": p_row, "d_row": d_row, "src": src, "dst": dst, "ok": ok}


def _sample(ok: np.ndarray, sample: int) -> np.ndarray:
    """Up to ``sample`` of the requests where ``ok``, evenly spread over them in arrival order."""
    cand = np.flatnonzero(ok)
    if not len(cand) or sample <= 0:
        return cand[:0]
    picks = np.linspace(0, len(cand) - 1, min(sample, len(cand))).round().astype(np.int64)
    return cand[np.unique(picks)]


def _mid_us(res: ServingResult, j: int) -> float:
    return to_us(float(res.step_start_s[j] + res.step_s[j] / 2))


def _flow_events(
    r: int, src: tuple[ServingResult, int, int, int], dst: tuple[ServingResult, int, int, int]
) -> list[dict[str, Any]]:
    """A flow from step ``src`` to step ``dst``, each given as (result, step, pid, tid0)."""
    events = []
    for ph, (res, j, pid, tid0) in (("s", src), ("f", dst)):
        event = {
            "name": "prefill -> decode",
            "cat": "request",
            "ph": ph,
            "id": int(r),
            "ts": _mid_us(res, j),
            "pid": pid,
            "tid": tid0 + int(res.step_instance[j]),
            "args": {"request": int(r)},
        }
        if ph == "f":
            event["bp"] = "e"
        events.append(event)
    return events


def _request_events(
    r: int, phases: list[tuple[str, float, float]], args: dict[str, Any], pid: int
) -> list[dict[str, Any]]:
    """A nestable async slice for request ``r`` spanning ``phases``, one child per phase."""
    base = {"cat": "request", "id": int(r), "pid": pid, "tid": pid}
    first, last = phases[0][1], max(phases[-1][2], phases[0][1])
    events = [base | {"name": f"request {r}", "ph": "b", "ts": to_us(first), "args": args}]
    for name, t0, t1 in phases:
        if t1 > t0:
            events.append(base | {"name": name, "ph": "b", "ts": to_us(t0)})
            events.append(base | {"name": name, "ph": "e", "ts": to_us(t1)})
    events.append(base | {"name": f"request {r}", "ph": "e", "ts": to_us(last)})
    return events


def _phases(
    pre: ServingResult, dec: ServingResult, p: int, d: int, two: bool
) -> tuple[list[tuple[str, float, float]], dict[str, Any]]:
    """The phases of one request, its first-stage row ``p`` and decoding row ``d``, and args."""
    arrival, start, first = (float(a[p]) for a in (pre.arrival_s, pre.start_s, pre.first_token_s))
    phases = [("queued", arrival, start), ("prefill", start, first)]
    decode_start, ttft = first, first - arrival
    if two:
        handed, decode_start = float(dec.arrival_s[d]), float(dec.start_s[d])
        phases += [("kv transfer", first, handed), ("decode queued", handed, decode_start)]
        ttft = handed - arrival
    finish = float(dec.finish_s[d])
    end = finish if math.isfinite(finish) else max(float(dec.end_s), decode_start)
    phases.append(("decode", decode_start, end))
    args = {
        "queue_wait_ms": round((start - arrival) * 1e3, 6),
        "ttft_ms": round(ttft * 1e3, 6),
        "finished": math.isfinite(finish),
    }
    return phases, args


def serving_trace(
    stages: Mapping[str, ServingResult],
    stage_requests: Mapping[str, np.ndarray],
    *,
    sample: int = 64,
    max_steps: int = 50_000,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The trace as a dict: ``traceEvents`` plus top-level ``metadata``."""
    kept = _kept(stages, max_steps)
    events: list[dict[str, Any]] = []
    places: dict[str, tuple[int, int]] = {}
    tid0 = 1
    for pid, (name, res) in enumerate(stages.items(), start=1):
        count = len(res.busy_share)
        places[name] = (pid, tid0)
        threads = {tid0 + k: f"{name} instance {k}" for k in range(count)}
        events += _name_events(pid, f"{name} pool", threads)
        events += _step_events(res, kept[name], name, pid, tid0)
        events += _counter_events(res, kept[name], pid)
        tid0 += count
    sampled = np.empty(0, dtype=np.int64)
    if stages:
        names = list(stages)
        first = names[0]
        last = "decode" if "decode" in stages and first != "decode" else first
        links = _links(stages, stage_requests, kept)
        sampled = _sample(links["ok"], sample)
        pre, dec = stages[first], stages[last]
        req_pid = len(stages) + 1
        events += _name_events(req_pid, REQUESTS_PROCESS, {})
        for r in sampled.tolist():
            src = (pre, int(links["src"][r]), *places[first])
            dst = (dec, int(links["dst"][r]), *places[last])
            events += _flow_events(r, src, dst)
            p, d = int(links["p_row"][r]), int(links["d_row"][r])
            phases, args = _phases(pre, dec, p, d, two=last != first)
            events += _request_events(r, phases, args, req_pid)
    total = sum(len(res.step_s) for res in stages.values())
    written = int(sum(int(m.sum()) for m in kept.values()))
    meta = dict(metadata or {})
    meta |= {
        "stages": list(stages),
        "steps_total": total,
        "steps_written": written,
        "max_steps": max_steps,
        "sampled_requests": sampled.tolist(),
    }
    if written < total:
        meta["steps_note"] = (
            f"only the earliest {written} of {total} steps are written (max_steps); flows and "
            "request slices are drawn for sampled requests within them"
        )
    return chrome_trace((), metadata=json_ready(meta)) | {"traceEvents": events}


def serving_trace_json(
    stages: Mapping[str, ServingResult],
    stage_requests: Mapping[str, np.ndarray],
    *,
    sample: int = 64,
    max_steps: int = 50_000,
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """:func:`serving_trace` serialised with sorted keys; equal runs give equal bytes."""
    trace = serving_trace(
        stages, stage_requests, sample=sample, max_steps=max_steps, metadata=metadata
    )
    return json.dumps(trace, sort_keys=True, separators=(",", ":"), allow_nan=False)
