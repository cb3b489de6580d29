"""The serving trace: valid JSON, one track per instance, flows from a request's prefill step to
its first decode step, and the step cap; each with a control that the check can fail."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict

import numpy as np

from longcat_sim.cluster.serving import ServingConfig, ServingResult, simulate_serving
from longcat_sim.cluster.serving_trace import serving_trace, serving_trace_json
from longcat_sim.cluster.traffic import Requests, synthetic_requests


def _step(
    batch_decoding: int, prefill_tokens: int, context_tokens: int = 0, largest_chunk: int = 0
) -> float:
    return 0.01 + 0.0005 * batch_decoding + 2e-6 * prefill_tokens


def _requests() -> Requests:
    return synthetic_requests(40.0, 2.0, 300.0, 20.0, 3, prompt_cv=1.0, output_cv=1.0)


def _colocated(horizon: float | None = None) -> tuple[dict, dict]:
    req = _requests()
    cfg = ServingConfig(instances=3, batch_cap=8, chunk_tokens=128, prefill_budget_tokens=256,
                        horizon_s=horizon)  # fmt: skip
    res = simulate_serving(req, _step, cfg)
    return {"colocated": res}, {"colocated": np.arange(len(req))}


def _disagg() -> tuple[dict, dict]:
    """A prefill pool, then a decode pool fed 2 ms after each first token."""
    req = _requests()
    prompts = dataclasses.replace(req, output_tokens=np.ones(len(req), dtype=np.int64))
    pre_cfg = ServingConfig(instances=2, batch_cap=64, chunk_tokens=512, prefill_budget_tokens=512)
    pre = simulate_serving(prompts, _step, pre_cfg)
    first = pre.first_token_s + 0.002
    go = np.flatnonzero(np.isfinite(first) & (req.output_tokens > 1))
    go = go[np.argsort(first[go], kind="stable")]
    held = req.cached[go] + req.prompt_tokens[go] + 1
    moved = Requests(first[go], np.zeros(len(go), dtype=np.int64), req.output_tokens[go] - 1, held)
    dec = simulate_serving(moved, _step, ServingConfig(instances=3, batch_cap=8))
    return {"prefill": pre, "decode": dec}, {"prefill": np.arange(len(req)), "decode": go}


def _pids(trace: dict) -> dict[str, int]:
    return {
        e["args"]["name"]: e["pid"]
        for e in trace["traceEvents"]
        if e["ph"] == "M" and e["name"] == "process_name"
    }


def _inside(trace: dict, pid: int, tid: int, ts: float) -> bool:
    return any(
        e["ph"] == "X" and e["pid"] == pid and e["tid"] == tid
        and e["ts"] <= ts <= e["ts"] + e["dur"]
        for e in trace["traceEvents"]
    )  # fmt: skip


def _flows(trace: dict) -> dict[int, dict[str, dict]]:
    flows: dict[int, dict[str, dict]] = defaultdict(dict)
    for e in trace["traceEvents"]:
        if e["ph"] in ("s", "f"):
            assert e["ph"] not in flows[e["id"]]
            flows[e["id"]][e["ph"]] = e
    return flows


def _check(stages: dict[str, ServingResult], rows: dict, first: str, last: str) -> dict:
    text = serving_trace_json(stages, rows, sample=16)
    trace = json.loads(text, parse_constant=lambda c: math.nan)
    assert "NaN" not in text and "Infinity" not in text
    pids = _pids(trace)
    for name, res in stages.items():
        pid = pids[f"{name} pool"]
        named = {
            e["tid"]: e["args"]["name"]
            for e in trace["traceEvents"]
            if e["ph"] == "M" and e["name"] == "thread_name" and e["pid"] == pid
        }
        instances = len(res.busy_share)
        assert sorted(named.values()) == sorted(f"{name} instance {k}" for k in range(instances))
        used = {e["tid"] for e in trace["traceEvents"] if e["ph"] == "X" and e["pid"] == pid}
        assert used <= set(named) and len(used) == len(np.unique(res.step_instance))
        assert sum(e["ph"] == "X" and e["pid"] == pid for e in trace["traceEvents"]) == len(
            res.step_s
        )
    flows = _flows(trace)
    assert 0 < len(flows) <= 16
    for pair in flows.values():
        s, f = pair["s"], pair["f"]
        assert f["ts"] >= s["ts"] and f["bp"] == "e"
        assert s["pid"] == pids[f"{first} pool"] and f["pid"] == pids[f"{last} pool"]
        assert _inside(trace, s["pid"], s["tid"], s["ts"])
        assert _inside(trace, f["pid"], f["tid"], f["ts"])
    # control: the same check fails for a time before any step
    s = next(iter(flows.values()))["s"]
    assert not _inside(trace, s["pid"], s["tid"], -1.0)
    return trace


def test_colocated_trace_tracks_and_flows():
    stages, rows = _colocated()
    trace = _check(stages, rows, "colocated", "colocated")
    res = stages["colocated"]
    for r in trace["metadata"]["sampled_requests"]:
        # the flow ends in the step after the one that emitted the first token
        f = _flows(trace)[r]["f"]
        assert f["ts"] / 1e6 > res.first_token_s[r]


def test_disagg_trace_flows_go_from_prefill_to_decode():
    stages, rows = _disagg()
    trace = _check(stages, rows, "prefill", "decode")
    dec, pos = stages["decode"], {int(r): i for i, r in enumerate(rows["decode"])}
    for r, pair in _flows(trace).items():
        start = dec.start_s[pos[r]]
        assert pair["f"]["ts"] / 1e6 >= start  # decoded once admitted to the decode pool
    async_ids = {e["id"] for e in trace["traceEvents"] if e["ph"] == "b"}
    assert async_ids == set(_flows(trace))


def test_unfinished_run_writes_valid_json_and_nan_metadata_as_null():
    stages, rows = _colocated(horizon=1.0)
    assert np.isnan(stages["colocated"].finish_s).any()
    text = serving_trace_json(stages, rows, metadata={"rate": math.nan})
    trace = json.loads(text)  # strict: allow_nan is off in the writer, so no NaN got through
    assert trace["metadata"]["rate"] is None


def test_steps_capped_at_max_steps_earliest_first():
    stages, rows = _disagg()
    total = sum(len(res.step_s) for res in stages.values())
    capped = serving_trace(stages, rows, max_steps=20)
    steps = [e for e in capped["traceEvents"] if e["ph"] == "X"]
    assert len(steps) == 20 < total
    assert capped["metadata"]["steps_written"] == 20 and "steps_note" in capped["metadata"]
    starts = np.sort(np.concatenate([res.step_start_s for res in stages.values()]))
    assert max(e["ts"] for e in steps) <= round(starts[19] * 1e6, 3)
    # control: a larger cap writes more
    full = serving_trace(stages, rows, max_steps=10**6)
    assert sum(e["ph"] == "X" for e in full["traceEvents"]) == total > 20
    assert "steps_note" not in full["metadata"]
    # flows only bind to written steps
    for pair in _flows(capped).values():
        assert _inside(capped, pair["s"]["pid"], pair["s"]["tid"], pair["s"]["ts"])
        assert _inside(capped, pair["f"]["pid"], pair["f"]["tid"], pair["f"]["ts"])


def test_sample_is_deterministic_and_spread():
    stages, rows = _colocated()
    a = serving_trace_json(stages, rows, sample=5)
    assert a == serving_trace_json(stages, rows, sample=5)
    picked = json.loads(a)["metadata"]["sampled_requests"]
    assert len(picked) == 5 and picked == sorted(picked)
    assert picked[-1] - picked[0] > len(rows["colocated"]) // 2
    assert (
        json.loads(serving_trace_json(stages, rows, sample=0))["metadata"]["sampled_requests"] == []
    )


def test_scenario_disagg_run():
    from longcat_sim.config.serving import ServeDeployment
    from longcat_sim.scenarios.serve import load_requests, resolve_serve, run_serve

    dep = ServeDeployment(layout="disagg", duration_s=5, rate=5)
    req = load_requests(dep)
    run = run_serve(resolve_serve(dep, req), req)
    _check(run.stages, run.stage_requests, "prefill", "decode")
