"""Simulator speed: one LongCat-Flash decode step (28 layers, SBO) within 50 ms, and a rate that
runs a 1,000-point sweep within 60 s on 2 cores. Assertions use the best of a few timed runs
(the machine is shared); pytest-benchmark reports the distribution."""

from __future__ import annotations

import time

from longcat_sim.cluster.simulator import simulate_decode, simulate_train
from longcat_sim.cluster.workload import DecodeWorkload, StageTimes, TrainLayerTimes, TrainWorkload
from tests.cluster import make_decode_workload

US = 1e-6
STEP_BUDGET_S = 0.050
SWEEP_POINTS, SWEEP_BUDGET_S, SWEEP_CORES = 1000, 60.0, 2


def longcat_layer(scale: float = 1.0) -> StageTimes:
    """LongCat-Flash Table 7 magnitudes (attention 264, dispatch 236, MoE 60, combine 472 us)
    with the dense branch, router and TP2 traffic filled in."""
    return StageTimes(
        "scmoe",
        {
            "attn0": 264 * US * scale,
            "router": 6 * US * scale,
            "ffn0": 90 * US * scale,
            "attn1_qkv": 40 * US * scale,
            "attn1_core": 224 * US * scale,
            "ffn1": 90 * US * scale,
            "moe": 60 * US * scale,
        },
        {
            "dispatch": 236 * US * scale,
            "combine": 472 * US * scale,
            "ffn0_tp": 15 * US * scale,
            "ffn1_tp": 15 * US * scale,
        },
        {"dispatch": "rdma", "combine": "rdma", "ffn0_tp": "nvlink", "ffn1_tp": "nvlink"},
    )


def longcat_workload(scale: float = 1.0) -> DecodeWorkload:
    half = (longcat_layer(0.55 * scale),) * 28
    return make_decode_workload([longcat_layer(scale)] * 28, layers_half=half, overhead_s=500 * US)


def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def test_longcat_decode_step_sbo(benchmark):
    workload = longcat_workload()
    result = benchmark(simulate_decode, workload, "sbo")
    seconds = best_of(lambda: simulate_decode(workload, "sbo"))
    events = len(result.records)
    benchmark.extra_info["event_records"] = events
    benchmark.extra_info["event_records_per_s"] = events / seconds
    assert result.n_layers == 28
    assert seconds <= STEP_BUDGET_S


def test_sweep_rate(benchmark):
    """A sweep point is one decode simulation; mix schedules and stage times as a sweep does."""
    points = [
        (longcat_workload(1 + i / 10), s) for i in range(4) for s in ("sbo", "tbo", "sequential")
    ]

    def sweep_slice():
        for workload, schedule in points:
            simulate_decode(workload, schedule)

    benchmark(sweep_slice)
    per_point = best_of(sweep_slice, repeats=3) / len(points)
    benchmark.extra_info["simulations_per_s"] = 1 / per_point
    benchmark.extra_info["sweep_1000_on_2_cores_s"] = SWEEP_POINTS * per_point / SWEEP_CORES
    assert SWEEP_POINTS * per_point / SWEEP_CORES <= SWEEP_BUDGET_S


def test_training_step_rate(benchmark):
    """A 1F1B step over 8 stages x 32 micro-batches with 7 layers of 2 chunks per stage."""
    fwd = longcat_layer(10.0)
    bwd = StageTimes("scmoe", {k: 2 * v for k, v in fwd.compute.items()}, fwd.comm, fwd.comm_link)
    layer = TrainLayerTimes(fwd, bwd, {"ffn0": 1e-3, "moe": 1e-3})
    workload = TrainWorkload(
        layers=(layer,) * 7,
        moe_chunks=2,
        microbatches=32,
        pipeline_stages=8,
        tokens_per_step=8 * 32 * 4096,
        gpus=8 * 32,
        gpu_hour_usd=2.0,
    )
    result = benchmark(simulate_train, workload, "scmoe", "zb")
    benchmark.extra_info["pipeline_blocks"] = len(result.pipeline_records)
    assert best_of(lambda: simulate_train(workload, "scmoe", "zb"), repeats=3) <= STEP_BUDGET_S
