"""Streams and schedules: exact timelines against hand computation, an independent longest-path
sweep, the closed forms of each decode schedule and the published pipeline bubbles."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster import closedform
from cluster.errors import ClusterInputError
from cluster.schedules import (
    bubble_1f1b,
    bubble_dualpipe,
    bubble_zb1p,
    decode_tasks,
    pipeline_tasks,
    tbo_layer_stages,
    tbo_steady_layer_time,
    train_layer_tasks,
)
from cluster.streams import STREAM_NAMES, Task, earliest_start_times, run_tasks
from cluster.workload import StageTimes, TrainLayerTimes

US = 1e-6
micros = st.integers(min_value=0, max_value=1000).map(lambda n: n * US)


def _makespan(records) -> float:
    return max(r.end for r in records)


# ----------------------------------------------------------------------------- executor


def test_hand_computed_timeline():
    """Two GPUs, three streams; every start/end below was worked out by hand."""
    tasks = [
        Task("A", "compute", 2.0),  # 0: [0, 2]
        Task("X", "rdma", 3.0, (0,)),  # 1: after A: [2, 5]
        Task("B", "compute", 1.0, (0,)),  # 2: [2, 3]
        Task("C", "compute", 2.0, (1,)),  # 3: waits for X: [5, 7]
        Task("Y", "nvlink", 1.5, (2,)),  # 4: after B: [3, 4.5]
        Task("Z", "rdma", 1.0, (4,)),  # 5: Y done at 4.5 but rdma busy until 5: [5, 6]
        Task("D", "compute", 0.5, (5, 3)),  # 6: after C and Z: [7, 7.5]
        Task("E", "compute", 1.0, (2,), gpu=1),  # 7: another GPU's compute is free: [3, 4]
        Task("F", "compute", 1.0),  # 8: ready at 0 but issued after D: [7.5, 8.5]
    ]
    expected = [
        (0.0, 2.0),
        (2.0, 5.0),
        (2.0, 3.0),
        (5.0, 7.0),
        (3.0, 4.5),
        (5.0, 6.0),
        (7.0, 7.5),
        (3.0, 4.0),
        (7.5, 8.5),
    ]
    records = run_tasks(tasks)
    assert [(r.start, r.end) for r in records] == expected
    assert [r.name for r in records] == list("AXBCYZDEF")
    assert records[7].gpu == 1


@st.composite
def random_dags(draw):
    n = draw(st.integers(1, 25))
    tasks = []
    for i in range(n):
        deps = draw(st.sets(st.integers(0, i - 1), max_size=3)) if i else set()
        tasks.append(
            Task(
                f"t{i}",
                draw(st.sampled_from(STREAM_NAMES)),
                draw(st.integers(0, 50)) * 0.125,
                tuple(sorted(deps)),
                gpu=draw(st.integers(0, 1)),
            )
        )
    return tasks


@settings(max_examples=60)
@given(random_dags())
def test_simpy_matches_longest_path_sweep(tasks):
    """The SimPy executor and a plain longest-path sweep agree on every start and end."""
    starts, ends = earliest_start_times(tasks)
    records = run_tasks(tasks)
    assert [r.start for r in records] == starts
    assert [r.end for r in records] == ends


def test_executor_rejects_bad_tasks():
    with pytest.raises(ClusterInputError, match="unknown stream"):
        run_tasks([Task("a", "pcie", 1.0)])
    with pytest.raises(ClusterInputError, match="durations must be >= 0"):
        run_tasks([Task("a", "compute", -1.0)])
    with pytest.raises(ClusterInputError, match="depends on 5"):
        run_tasks([Task("a", "compute", 1.0, (5,))])


def test_executor_reports_deadlock():
    # b is issued before a on the same stream but needs a's result.
    with pytest.raises(ClusterInputError, match="deadlocks"):
        run_tasks([Task("b", "compute", 1.0, (1,)), Task("a", "compute", 1.0)])


# ----------------------------------------------------------------------------- decode layers


@st.composite
def scmoe_layers(draw, tp: bool = True, drop: bool = True):
    names = ["attn0", "ffn0", "attn1_qkv", "attn1_core", "ffn1", "router", "moe"]
    compute = {n: draw(micros) for n in names}
    comm = {"dispatch": draw(micros), "combine": draw(micros)}
    link = {"dispatch": "rdma", "combine": "rdma"}
    if tp and draw(st.booleans()):
        comm |= {"ffn0_tp": draw(micros), "ffn1_tp": draw(micros)}
        link |= {"ffn0_tp": "nvlink", "ffn1_tp": "nvlink"}
    if drop:
        # Absent stages impose no waits, unlike zero-second ones, so drop only stages whose
        # absence equals zero time: not attn1_qkv (it makes compute wait for ffn0_tp), and ffn0
        # only together with its TP traffic.
        for name in draw(st.sets(st.sampled_from(["router", "ffn0", "attn1_core"]))):
            del compute[name]
            if name == "ffn0" and "ffn0_tp" in comm:
                del comm["ffn0_tp"], link["ffn0_tp"]
    return StageTimes("scmoe", compute, comm, link)


@st.composite
def moe_layers(draw, shared: bool = True):
    compute = {n: draw(micros) for n in ("attn_qkv", "attn_core", "router", "moe")}
    if shared:
        compute["shared"] = draw(micros)
    comm = {"dispatch": draw(micros), "combine": draw(micros)}
    return StageTimes("moe", compute, comm, {"dispatch": "rdma", "combine": "rdma"})


@st.composite
def dense_layers(draw):
    compute = {n: draw(micros) for n in ("attn_qkv", "attn_core", "ffn")}
    return StageTimes("dense", compute, {"ffn_tp": draw(micros)}, {"ffn_tp": "nvlink"})


any_layer = st.one_of(scmoe_layers(), moe_layers(), dense_layers())


def _step(layers, schedule, half=None):
    return _makespan(run_tasks(decode_tasks(layers, half or layers, schedule)))


@settings(max_examples=60)
@given(st.lists(any_layer, min_size=1, max_size=4))
def test_sequential_equals_sum_of_stages(layers):
    expected = sum(closedform.sequential_layer_time(layer) for layer in layers)
    assert _step(layers, "sequential") == pytest.approx(expected, rel=1e-12, abs=1e-15)


@settings(max_examples=60)
@given(st.lists(any_layer, min_size=1, max_size=4))
def test_sbo_equals_closed_form(layers):
    """attn0 + max(dispatch, ffn0 + attn1_qkv) + moe + max(combine, attn1_core + ffn1), with
    router and TP traffic, per ScMoE layer; the analogues for moe and dense layers."""
    expected = sum(closedform.sbo_layer_time(layer) for layer in layers)
    assert _step(layers, "sbo") == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_sbo_table7_longcat_layer():
    """LongCat-Flash Table 7 (arXiv 2509.01322): attention 264, dispatch 236, MoE 60,
    combine 472 us give 1032 us per layer when the dense branch hides under the traffic."""
    layer = StageTimes(
        "scmoe",
        {
            "attn0": 264 * US,
            "ffn0": 120 * US,
            "attn1_qkv": 40 * US,
            "attn1_core": 150 * US,
            "ffn1": 120 * US,
            "moe": 60 * US,
        },
        {"dispatch": 236 * US, "combine": 472 * US},
        {"dispatch": "rdma", "combine": "rdma"},
    )
    assert _step([layer], "sbo") == pytest.approx(1032 * US, rel=1e-12)


def test_sbo_stage_order_on_streams():
    layer = StageTimes(
        "scmoe",
        {n: 10 * US for n in ("attn0", "ffn0", "attn1_qkv", "attn1_core", "ffn1", "moe")},
        {"dispatch": 30 * US, "combine": 30 * US},
        {"dispatch": "rdma", "combine": "rdma"},
    )
    records = run_tasks(decode_tasks([layer], [layer], "sbo"))
    compute = [r.name for r in records if r.stream == "compute"]
    assert compute == ["attn0", "ffn0", "attn1_qkv", "moe", "attn1_core", "ffn1"]
    by_name = {r.name: r for r in records}
    assert by_name["dispatch"].start == by_name["attn0"].end
    assert by_name["moe"].start == by_name["dispatch"].end  # dispatch (30) > ffn0 + qkv (20)
    assert by_name["combine"].start == by_name["moe"].end


# ----------------------------------------------------------------------------- TBO


def _moe_layer(a: float, d: float, m: float, c: float) -> StageTimes:
    return StageTimes(
        "moe",
        {"attn_qkv": a, "moe": m},
        {"dispatch": d, "combine": c},
        {"dispatch": "rdma", "combine": "rdma"},
    )


def _tbo_periods(layer: StageTimes, n_layers: int) -> list[float]:
    tasks = decode_tasks([layer] * n_layers, [layer] * n_layers, "tbo")
    starts = [r.start for r in run_tasks(tasks) if r.name == "attn_qkv" and r.microbatch == 0]
    return [b - a for a, b in itertools.pairwise(starts)]


@pytest.mark.parametrize(
    ("a", "d", "m", "c", "bound"),
    [
        (3.0, 1.0, 2.0, 1.0, "compute stream 2(a + m)"),
        (1.0, 3.0, 0.5, 3.0, "communication stream 2(d + c)"),
        (4.0, 1.0, 0.5, 3.0, "cross cycle a + d + 2c: S + max - min"),
    ],
)
def test_tbo_steady_state_regimes(a, d, m, c, bound):
    periods = _tbo_periods(_moe_layer(a, d, m, c), 30)
    assert periods[-10:] == [tbo_steady_layer_time(a, d, m, c)] * 10, bound


@settings(max_examples=40)
@given(st.tuples(*[st.integers(0, 20)] * 4).filter(lambda t: sum(t) > 0))
def test_tbo_converges_to_closed_form(times):
    """Max-plus systems become periodic; the mean period over the last cycle is the closed form."""
    a, d, m, c = (float(x) for x in times)
    tail = _tbo_periods(_moe_layer(a, d, m, c), 120)[-36:]
    period = next(
        p for p in range(1, 7) if all(tail[i] == tail[i + p] for i in range(len(tail) - p))
    )
    assert sum(tail[-period:]) / period == pytest.approx(tbo_steady_layer_time(a, d, m, c))


def test_tbo_closed_form_inputs():
    layer = StageTimes(
        "moe",
        {"attn_qkv": 1.0, "attn_core": 2.0, "router": 0.5, "moe": 3.0},
        {"dispatch": 4.0, "combine": 5.0},
        {"dispatch": "rdma", "combine": "rdma"},
    )
    assert tbo_layer_stages(layer) == (3.5, 4.0, 3.0, 5.0)
    with pytest.raises(ClusterInputError, match="shared"):
        tbo_layer_stages(StageTimes("moe", {"shared": 1.0}))


# ----------------------------------------------------------------------------- training layers


def _train_layer(fwd: StageTimes, weight_grad=None) -> TrainLayerTimes:
    bwd = StageTimes(fwd.kind, {k: 2 * v for k, v in fwd.compute.items()}, fwd.comm, fwd.comm_link)
    return TrainLayerTimes(fwd, bwd, weight_grad or {})


@settings(max_examples=40)
@given(scmoe_layers(tp=False, drop=False))
def test_one_chunk_scmoe_forward_is_sbo(layer):
    """With one token chunk the ScMoE training layer issues exactly the SBO order."""
    fwd, _, _ = train_layer_tasks([_train_layer(layer)], "scmoe", 1, defer_weight_grad=False)
    assert _makespan(run_tasks(fwd)) == pytest.approx(closedform.sbo_layer_time(layer), rel=1e-12)


@settings(max_examples=40)
@given(scmoe_layers(tp=False, drop=False))
def test_one_chunk_baseline_forward_is_sequential(layer):
    fwd, _, _ = train_layer_tasks([_train_layer(layer)], "baseline", 1, defer_weight_grad=False)
    expected = closedform.sequential_layer_time(layer)
    assert _makespan(run_tasks(fwd)) == pytest.approx(expected, rel=1e-12)


@settings(max_examples=40)
@given(scmoe_layers(tp=False, drop=False))
def test_one_chunk_scmoe_backward_mirrors_sbo(layer):
    """Backward reverses the dataflow: max(ffn1 + attn1_core, combine) + moe
    + max(attn1_qkv + ffn0, dispatch) + router + attn0, on the backward stage times."""
    lt = _train_layer(layer)
    _, bwd, _ = train_layer_tasks([lt], "scmoe", 1, defer_weight_grad=False)
    g = lt.backward.get
    expected = (
        max(g("ffn1") + g("attn1_core"), g("combine"))
        + g("moe")
        + max(g("attn1_qkv") + g("ffn0"), g("dispatch"))
        + g("router")
        + g("attn0")
    )
    assert _makespan(run_tasks(bwd)) == pytest.approx(expected, rel=1e-12)


def test_chunked_baseline_forward_hand_computed():
    """Two chunks, no shortcut: attn0 (2 x 1) and both routers, then d0 | m0 + d1 | c0 + m1 | c1
    on the MoE path (d = 3, m = 1, c = 3 per chunk), then the dense branch (2 x 1 each)."""
    layer = StageTimes(
        "scmoe",
        {"attn0": 1.0, "router": 0.0, "moe": 1.0, "ffn0": 1.0},
        {"dispatch": 3.0, "combine": 3.0},
        {"dispatch": "rdma", "combine": "rdma"},
    )
    fwd, _, _ = train_layer_tasks([_train_layer(layer)], "baseline", 2, defer_weight_grad=False)
    records = run_tasks(fwd)
    spans = {(r.name, r.chunk): (r.start, r.end) for r in records}
    assert spans[("attn0", 0)] == (0.0, 2.0)
    assert spans[("dispatch", 0)] == (2.0, 5.0)
    assert spans[("dispatch", 1)] == (5.0, 8.0)
    assert spans[("moe", 0)] == (5.0, 6.0)
    assert spans[("combine", 0)] == (8.0, 11.0)
    assert spans[("moe", 1)] == (8.0, 9.0)
    assert spans[("combine", 1)] == (11.0, 14.0)
    assert spans[("ffn0", 0)] == (14.0, 16.0)


def test_weight_gradients_inline_or_deferred():
    layer = StageTimes("dense", {"attn_qkv": 1.0, "ffn": 2.0})
    lt = TrainLayerTimes(layer, layer, weight_grad={"ffn": 0.75})
    _, inline, w = train_layer_tasks([lt, lt], "scmoe", 2, defer_weight_grad=False)
    assert w == 0.0
    assert [r.phase for r in run_tasks(inline)].count("wgrad") == 2
    _, split, w = train_layer_tasks([lt, lt], "scmoe", 2, defer_weight_grad=True)
    assert w == pytest.approx(2 * 2 * 0.75)  # two layers, whole micro-batch = 2 chunks
    assert _makespan(run_tasks(inline)) == pytest.approx(_makespan(run_tasks(split)) + w)


def test_unknown_stage_and_schedule_rejected():
    bad = StageTimes("scmoe", {"attn": 1.0})
    with pytest.raises(ClusterInputError, match="unknown stages"):
        decode_tasks([bad], [bad], "sbo")
    good = StageTimes("dense", {"ffn": 1.0})
    with pytest.raises(ClusterInputError, match="sbo, sequential, tbo"):
        decode_tasks([good], [good], "dbo")
    with pytest.raises(ClusterInputError, match="baseline, scmoe"):
        train_layer_tasks([_train_layer(good)], "shortcut", 1, defer_weight_grad=False)


# ----------------------------------------------------------------------------- pipelines

quarters = st.integers(1, 16).map(lambda n: n * 0.25)


def _bubble(pipeline, stages, microbatches, f, b, w=0.0) -> float:
    records = run_tasks(pipeline_tasks(pipeline, stages, microbatches, f, b, w))
    return _makespan(records) - microbatches * (f + b + w)


@pytest.mark.parametrize(("stages", "microbatches"), [(2, 2), (4, 8), (8, 8), (8, 19)])
def test_1f1b_bubble_exact(stages, microbatches):
    """DualPipe README: 1F1B bubble (PP - 1)(F + B)."""
    f, b = 1.25, 2.5
    assert _bubble("1f1b", stages, microbatches, f, b) == bubble_1f1b(stages, f, b)


@settings(max_examples=50)
@given(st.integers(1, 8), st.integers(1, 24), quarters, quarters)
def test_1f1b_bubble_property(stages, microbatches, f, b):
    assert _bubble("1f1b", stages, microbatches, f, b) == bubble_1f1b(stages, f, b)


@pytest.mark.parametrize(("stages", "microbatches"), [(2, 2), (4, 8), (8, 8), (8, 19)])
def test_zb1p_bubble_exact(stages, microbatches):
    """DualPipe README: ZB1P bubble (PP - 1)(F + B - 2W), B the whole backward (input + W)."""
    f, b_input, w = 1.25, 1.5, 0.75
    bubble = _bubble("zb", stages, microbatches, f, b_input, w)
    assert bubble == bubble_zb1p(stages, f, b_input + w, w)
    assert bubble < bubble_1f1b(stages, f, b_input + w) or stages == 1


@settings(max_examples=50)
@given(st.integers(1, 8), st.integers(0, 16), quarters, quarters, quarters)
def test_zb1p_bubble_property(stages, extra, f, b_input, w):
    """Exact whenever W <= min(F, B_input) and micro-batches >= stages."""
    w = min(w, f, b_input)
    microbatches = stages + extra
    bubble = _bubble("zb", stages, microbatches, f, b_input, w)
    assert bubble == bubble_zb1p(stages, f, b_input + w, w)


def test_pipeline_none_has_no_bubble():
    assert _bubble("none", 8, 5, 1.0, 2.0, 0.5) == 0.0


def test_dualpipe_closed_form():
    # (8/2 - 1) x (3 + 2 - 3 x 0.5) = 3 x 3.5
    assert bubble_dualpipe(8, 3.0, 2.0, 0.5) == 10.5
    with pytest.raises(ClusterInputError, match="even"):
        bubble_dualpipe(5, 3.0, 2.0, 0.5)
    with pytest.raises(ClusterInputError, match="1f1b, none, zb"):
        pipeline_tasks("gpipe", 2, 2, 1.0, 1.0)
