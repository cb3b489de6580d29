"""Chrome / Perfetto trace export: schema, units, and byte-for-byte determinism."""

from __future__ import annotations

import json
import random

import pytest

from longcat_sim.cluster.simulator import simulate_decode, simulate_train
from longcat_sim.cluster.streams import EventRecord
from longcat_sim.cluster.trace import STREAM_TIDS, chrome_trace, chrome_trace_json
from longcat_sim.cluster.workload import StageTimes, TrainLayerTimes, TrainWorkload
from tests.cluster import make_decode_workload

US = 1e-6


def _decode_records():
    layer = StageTimes(
        "scmoe",
        {"attn0": 264 * US, "ffn0": 100 * US, "attn1_qkv": 50 * US, "moe": 60 * US},
        {"dispatch": 236 * US, "combine": 472 * US, "ffn0_tp": 20 * US},
        {"dispatch": "rdma", "combine": "rdma", "ffn0_tp": "nvlink"},
    )
    no_mtp = dict(batch_per_device=8, tokens_per_step=8, mtp_draft_tokens=0, mtp_accept=0.0)
    w = make_decode_workload([layer] * 2, half_factor=1.0, overhead_s=30 * US, **no_mtp)
    return simulate_decode(w, "sbo").records


def test_complete_events_in_microseconds():
    records = _decode_records()
    trace = chrome_trace(records)
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == len(records)
    dispatch = next(e for e in spans if e["name"] == "dispatch" and e["args"]["layer"] == 1)
    record = next(r for r in records if r.name == "dispatch" and r.layer == 1)
    assert dispatch["ts"] == pytest.approx(record.start * 1e6, abs=1e-3)
    assert dispatch["dur"] == pytest.approx(236.0, abs=1e-3)
    assert dispatch["pid"] == 0
    assert dispatch["tid"] == STREAM_TIDS["rdma"]
    assert sum(e["dur"] for e in spans) == pytest.approx(
        sum(r.duration for r in records) * 1e6, abs=1e-2
    )


def test_metadata_names_processes_and_streams():
    trace = chrome_trace(_decode_records(), gpu_names={0: "decode rank"}, metadata={"run": "x"})
    meta = [e for e in trace["traceEvents"] if e["ph"] == "M"]
    assert {
        "name": "process_name",
        "ph": "M",
        "pid": 0,
        "tid": 0,
        "args": {"name": "decode rank"},
    } in meta
    threads = {e["args"]["name"]: e["tid"] for e in meta if e["name"] == "thread_name"}
    assert threads == {"compute": 0, "nvlink": 1, "rdma": 2}
    assert trace["metadata"] == {"run": "x"}


def test_deterministic_and_order_independent():
    records = list(_decode_records())
    text = chrome_trace_json(records)
    assert chrome_trace_json(records) == text
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    assert chrome_trace_json(shuffled) == text
    assert json.loads(text) == chrome_trace(records)
    starts = [e["ts"] for e in json.loads(text)["traceEvents"] if e["ph"] == "X" and e["tid"] == 0]
    assert starts == sorted(starts)


def test_pipeline_records_use_one_process_per_stage():
    layer = StageTimes("dense", {"attn_qkv": 1e-3, "ffn": 2e-3})
    w = TrainWorkload(
        layers=(TrainLayerTimes(layer, layer),),
        moe_chunks=1,
        microbatches=4,
        pipeline_stages=3,
        tokens_per_step=4096,
        gpus=3,
        gpu_hour_usd=2.0,
    )
    trace = chrome_trace(simulate_train(w, "scmoe", "1f1b").pipeline_records)
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == {0, 1, 2}
    assert {e["cat"] for e in spans} == {"fwd", "bwd"}
    assert sum(e["name"] == "F" for e in spans) == 3 * 4


def test_empty_records_give_an_empty_trace():
    assert chrome_trace([])["traceEvents"] == []
    one = EventRecord("x", "compute", 0.0, 1e-6, -1, 0, 0, 0, "")
    assert chrome_trace_json([one]).count('"ph":"X"') == 1
