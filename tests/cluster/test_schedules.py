"""Streams and schedules: exact timelines against hand computation, an independent longest-path
sweep, the closed forms of each decode schedule and the published pipeline bubbles."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st

from longcat_sim.cluster import closedform
from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.cluster.schedules import (
    _moe_positions,
    bubble_1f1b,
    bubble_dualpipe,
    bubble_zb1p,
    decode_tasks,
    pipeline_tasks,
    train_forward_program,
    train_layer_tasks,
)
from longcat_sim.cluster.streams import STREAM_NAMES, Task, earliest_start_times, run_tasks
from longcat_sim.cluster.workload import StageTimes, TrainLayerTimes

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
def dense_layers(draw, tp: bool = True):
    compute = {n: draw(micros) for n in ("attn_qkv", "attn_core", "ffn")}
    if not tp:
        return StageTimes("dense", compute)
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

tp_free_layer = st.one_of(scmoe_layers(tp=False), moe_layers(), dense_layers(tp=False))
RDMA = {"dispatch": "rdma", "combine": "rdma"}


def _moe_layer(a: float, d: float, m: float, c: float, s: float = 0.0) -> StageTimes:
    compute = {"attn_qkv": a, "moe": m} | ({"shared": s} if s else {})
    return StageTimes("moe", compute, {"dispatch": d, "combine": c}, RDMA)


def test_tbo_hand_computed_timeline():
    """Two MoE layers, a = 2, shared s = 1, dispatch 3, MoE 1, combine 4 (one micro-batch).
    Micro-batch 1's attention runs under micro-batch 0's combine; each micro-batch's dispatch,
    MoE and combine follow one another and the two chains alternate on the link."""
    layer = _moe_layer(2.0, 3.0, 1.0, 4.0, s=1.0)
    records = run_tasks(decode_tasks([], [layer, layer], "tbo"))
    spans = {(r.layer, r.microbatch, r.name): (r.start, r.end) for r in records}
    expected = {
        (0, 0, "attn_qkv"): (0, 2), (0, 0, "dispatch"): (2, 5), (0, 0, "shared"): (2, 3),
        (0, 0, "moe"): (5, 6), (0, 0, "combine"): (6, 10), (0, 1, "attn_qkv"): (6, 8),
        (0, 1, "dispatch"): (10, 13), (0, 1, "shared"): (8, 9), (0, 1, "moe"): (13, 14),
        (0, 1, "combine"): (14, 18), (1, 0, "attn_qkv"): (14, 16), (1, 0, "dispatch"): (18, 21),
        (1, 0, "shared"): (16, 17), (1, 0, "moe"): (21, 22), (1, 0, "combine"): (22, 26),
        (1, 1, "attn_qkv"): (22, 24), (1, 1, "dispatch"): (26, 29), (1, 1, "shared"): (24, 25),
        (1, 1, "moe"): (29, 30), (1, 1, "combine"): (30, 34),
    }  # fmt: skip
    assert spans == {k: (float(a), float(b)) for k, (a, b) in expected.items()}
    link = [(r.layer, r.microbatch, r.name) for r in records if r.stream == "rdma"]
    assert link == [
        (lay, mb, n) for lay in (0, 1) for mb in (0, 1) for n in ("dispatch", "combine")
    ]
    # closed form: u = 2 + max(3, 1) = 5; layer 0: max(0 + 3, 5) + max(4 + 3, 5) + 2 x 1 = 14,
    # layer 1: max(4 + 3, 5) + max(4 + 3, 5) + 2 = 16; plus the last combine 4
    assert closedform.tbo_step_time([layer, layer]) == 34.0


@settings(max_examples=60)
@given(st.lists(tp_free_layer, min_size=1, max_size=5))
def test_tbo_equals_closed_form(layers):
    """SimPy timeline == closedform.tbo_step_time for any mix of ScMoE, MoE (with shared
    experts) and dense layers without tensor-parallel collectives."""
    expected = closedform.tbo_step_time(layers)
    assert _step([], "tbo", layers) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def _without_tp(layer: StageTimes) -> StageTimes:
    keep = {k: v for k, v in layer.comm.items() if not k.endswith("_tp")}
    return StageTimes(layer.kind, layer.compute, keep, {k: layer.comm_link[k] for k in keep})


@settings(max_examples=60)
@given(st.lists(st.one_of(scmoe_layers(), dense_layers()), min_size=1, max_size=4))
def test_tbo_with_tp_collectives_is_bracketed(layers):
    """With TP collectives on NVLink the closed form counts them as serial work beside the
    experts: an upper bound; dropping them gives a lower bound."""
    simulated = _step([], "tbo", layers)
    upper = closedform.tbo_step_time(layers)
    lower = closedform.tbo_step_time([_without_tp(layer) for layer in layers])
    assert lower * (1 - 1e-12) <= simulated <= upper * (1 + 1e-12)


def test_negative_control_tbo_without_link_order_misses():
    """A closed form that forgets the dispatch queues behind the other micro-batch's combine
    (max(d, u) in place of max(c + d, u)) disagrees with the simulation: the property above can
    fail."""

    def no_queue(layers):
        total = 0.0
        for half in layers:
            t = closedform.tbo_stages(half)
            total += 2 * (t.a + max(t.d, t.s) + t.m)
        return total + closedform.tbo_stages(layers[-1]).c

    found = find(
        st.lists(tp_free_layer, min_size=1, max_size=3),
        lambda layers: _step([], "tbo", layers) != pytest.approx(no_queue(layers), rel=1e-9),
    )
    assert _step([], "tbo", found) == pytest.approx(closedform.tbo_step_time(found))


@pytest.mark.parametrize(
    ("a", "d", "m", "c", "per_layer"),
    [
        (1.0, 2.0, 0.5, 4.0, "attention under the combine: 2 (d + m + c)"),
        (5.0, 1.0, 0.5, 2.0, "attention-bound: 2 (a + d + m)"),
    ],
)
def test_tbo_steady_state(a, d, m, c, per_layer):
    layer = _moe_layer(a, d, m, c)
    tasks = decode_tasks([], [layer] * 20, "tbo")
    starts = [r.start for r in run_tasks(tasks) if r.name == "attn_qkv" and r.microbatch == 0]
    periods = [later - earlier for earlier, later in itertools.pairwise(starts)]
    expected = closedform.tbo_steady_layer_time(layer)
    assert periods[-5:] == [expected] * 5, per_layer
    assert expected == (2 * (d + m + c) if a <= c else 2 * (a + d + m))


def test_tbo_paper_form_table7_qwen3():
    """Qwen3-235B-A22B in Table 7 (arXiv 2509.01322): dispatch 157, MoE 29, combine 315 us for
    the batch, attention 314 us (TP4) hidden, 94 layers, MTP divisor 1.8 -> 26.2 ms. Per
    micro-batch every stage takes half; attention (157) fits under the combine (157.5)."""
    half = _moe_layer(157e-6, 78.5e-6, 14.5e-6, 157.5e-6)
    step = closedform.tbo_step_time([half] * 94)
    assert closedform.tbo_steady_layer_time(half) == pytest.approx((157 + 29 + 315) * 1e-6)
    assert step / 1.8 * 1e3 == pytest.approx(26.2, rel=0.01)
    assert _step([], "tbo", [half] * 94) == pytest.approx(step, rel=1e-12)


def test_tbo_needs_micro_batch_times():
    with pytest.raises(ClusterInputError, match="micro_batches including 2"):
        decode_tasks([_moe_layer(1, 1, 1, 1)], [], "tbo")
    with pytest.raises(ClusterInputError, match="micro_batches including 1"):
        decode_tasks([], [_moe_layer(1, 1, 1, 1)], "sbo")


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
@given(scmoe_layers())
def test_one_chunk_baseline_forward_is_sequential(layer):
    """With one token chunk the serial baseline runs every stage in turn."""
    fwd, _, _ = train_layer_tasks([_train_layer(layer)], "baseline", 1, defer_weight_grad=False)
    expected = closedform.sequential_layer_time(layer)
    assert _makespan(run_tasks(fwd)) == pytest.approx(expected, rel=1e-12)


@settings(max_examples=40)
@given(scmoe_layers(tp=False, drop=False))
def test_one_chunk_baseline_backward_is_sequential(layer):
    """The serial dataflow reversed is serial too: backward takes the sum of its stage times."""
    lt = _train_layer(layer)
    _, bwd, _ = train_layer_tasks([lt], "baseline", 1, defer_weight_grad=False)
    expected = sum(lt.backward.compute.values()) + sum(lt.backward.comm.values())
    assert _makespan(run_tasks(bwd)) == pytest.approx(expected, rel=1e-12)


@settings(max_examples=40)
@given(scmoe_layers())
def test_one_chunk_conventional_forward_matches_closed_form(layer):
    """With one token chunk the conventional topology (model/block.py
    ``topology="conventional"``) runs attn0, ffn0 and attn1 in turn, then FFN_1 beside
    dispatch -> MoE -> combine."""
    fwd, _, _ = train_layer_tasks([_train_layer(layer)], "conventional", 1, defer_weight_grad=False)
    expected = closedform.conventional_layer_time(layer)
    assert _makespan(run_tasks(fwd)) == pytest.approx(expected, rel=1e-12)


def test_conventional_closed_form_is_not_sequential():
    """Negative control: FFN_1 beside the dispatch makes the conventional topology differ from
    the serial baseline, so the two checks above can tell them apart."""
    layer = find(
        scmoe_layers(tp=False, drop=False),
        lambda s: closedform.conventional_layer_time(s) < closedform.sequential_layer_time(s),
    )
    lt = _train_layer(layer)
    conventional, _, _ = train_layer_tasks([lt], "conventional", 1, defer_weight_grad=False)
    baseline, _, _ = train_layer_tasks([lt], "baseline", 1, defer_weight_grad=False)
    assert _makespan(run_tasks(conventional)) < closedform.sequential_layer_time(layer)
    assert _makespan(run_tasks(baseline)) == pytest.approx(
        closedform.sequential_layer_time(layer), rel=1e-12
    )


@settings(max_examples=40)
@given(scmoe_layers(tp=False, drop=False))
def test_one_chunk_conventional_backward_reverses_its_dataflow(layer):
    """Backward issues the forward in reverse: combine, MoE, then FFN_1 beside the dispatch's
    gradient, then the router, attn1, ffn0 and attn0 in turn (backward stage times)."""
    lt = _train_layer(layer)
    _, bwd, _ = train_layer_tasks([lt], "conventional", 1, defer_weight_grad=False)
    g = lt.backward.get
    expected = (
        g("combine")
        + g("moe")
        + max(g("ffn1"), g("dispatch"))
        + g("router")
        + g("attn1_core")
        + g("attn1_qkv")
        + g("ffn0")
        + g("attn0")
    )
    assert _makespan(run_tasks(bwd)) == pytest.approx(expected, rel=1e-12)


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


def test_baseline_is_the_serial_dataflow():
    """The serial baseline, written out by hand for three chunks: attn0, every chunk's router
    and dispatch, every chunk's MoE and combine, then the dense branch, FFN_0 reading attn0 and
    every combine; the MoE reads the first attention's output."""
    program = train_forward_program("scmoe", "baseline", 3)
    combines = tuple(("combine", c) for c in range(3))
    expected = [
        ("attn0", -1, (), True),
        *(op for c in range(3) for op in (
            ("router", c, (("attn0", -1),), False),
            ("dispatch", c, (("router", c),), False),
        )),
        *(op for c in range(3) for op in (
            ("moe", c, (("dispatch", c),), False),
            ("combine", c, (("moe", c),), False),
        )),
        ("ffn0", -1, (("attn0", -1), *combines), False),
        ("ffn0_tp", -1, (("ffn0", -1),), False),
        ("attn1_qkv", -1, (("ffn0_tp", -1),), False),
        ("attn1_core", -1, (("attn1_qkv", -1),), False),
        ("ffn1", -1, (("attn1_core", -1),), False),
        ("ffn1_tp", -1, (("ffn1", -1),), False),
    ]  # fmt: skip
    assert [(o.stage, o.chunk, o.deps, o.reads_input) for o in program.ops] == expected
    assert program.out == (("ffn1_tp", -1), *combines)


@pytest.mark.parametrize("schedule", ["baseline", "conventional", "scmoe"])
def test_standard_moe_layers_alike_under_every_schedule(schedule):
    """Standard MoE layers have no shortcut: every schedule issues the shared experts, then the
    chunks' MoE GEMMs and combines."""
    assert train_forward_program("moe", schedule, 2) == train_forward_program("moe", "scmoe", 2)
    stages = [(o.stage, o.chunk) for o in train_forward_program("moe", schedule, 2).ops]
    assert stages.index(("shared", -1)) < stages.index(("moe", 0))


def test_chunked_conventional_forward_hand_computed():
    """Two chunks, conventional topology, two layers. Whole-batch stages take 2 x the per-chunk
    time: attn0 [0, 2], ffn0 [2, 4], attn1 [4, 6]; then both routers (0 s) and the dispatches
    d0 [6, 9], d1 [9, 12] beside FFN_1 [6, 9]; m0 [9, 10], m1 [12, 13]; the combines queue on
    the link: c0 [12, 15], c1 [15, 18]. The next layer waits for FFN_1 and both combines."""
    layer = StageTimes(
        "scmoe",
        {"attn0": 1.0, "router": 0.0, "ffn0": 1.0, "attn1_qkv": 0.5, "attn1_core": 0.5,
         "ffn1": 1.5, "moe": 1.0},
        {"dispatch": 3.0, "combine": 3.0},
        {"dispatch": "rdma", "combine": "rdma"},
    )  # fmt: skip
    lt = _train_layer(layer)
    fwd, _, _ = train_layer_tasks([lt, lt], "conventional", 2, defer_weight_grad=False)
    spans = {(r.layer, r.name, r.chunk): (r.start, r.end) for r in run_tasks(fwd)}
    expected = {
        "attn0": (0.0, 2.0),
        "ffn0": (2.0, 4.0),
        "attn1_qkv": (4.0, 5.0),
        "attn1_core": (5.0, 6.0),
        "ffn1": (6.0, 9.0),
    }
    for stage, span in expected.items():
        assert spans[(0, stage, 0)] == span
    assert spans[(0, "router", 0)] == spans[(0, "router", 1)] == (6.0, 6.0)
    assert spans[(0, "dispatch", 0)] == (6.0, 9.0)
    assert spans[(0, "dispatch", 1)] == (9.0, 12.0)
    assert spans[(0, "moe", 0)] == (9.0, 10.0)
    assert spans[(0, "moe", 1)] == (12.0, 13.0)
    assert spans[(0, "combine", 0)] == (12.0, 15.0)
    assert spans[(0, "combine", 1)] == (15.0, 18.0)
    assert spans[(1, "attn0", 0)] == (18.0, 20.0)


def test_conventional_is_the_models_conventional_dataflow():
    """The conventional program reads what model/block.py's conventional layer reads: the router
    after attn1 (n = norm(c)), FFN_1 independent of the MoE, the layer output from both."""
    program = train_forward_program("scmoe", "conventional", 2)
    deps = {op.key: set(op.deps) for op in program.ops}
    assert deps[("router", 0)] == deps[("router", 1)] == {("attn1_core", -1)}
    assert deps[("ffn1", -1)] == {("attn1_core", -1)}
    assert deps[("ffn0", -1)] == {("attn0", -1)}
    assert set(program.out) == {("ffn1_tp", -1), ("combine", 0), ("combine", 1)}
    shortcut = train_forward_program("scmoe", "scmoe", 2)
    assert {op.key: set(op.deps) for op in shortcut.ops}[("router", 0)] == {("attn0", -1)}


@pytest.mark.parametrize(("chunks", "blocks", "expected"), [
    (1, 4, [2]), (2, 4, [1, 3]), (4, 4, [1, 2, 2, 3]), (8, 4, [1, 1, 1, 2, 2, 3, 3, 4]),
    (1, 1, [1]), (2, 1, [1, 1]),
])  # fmt: skip
def test_moe_chunk_positions(chunks, blocks, expected):
    """Chunks spread evenly over the dense blocks beside the MoE, never before the first."""
    assert _moe_positions(chunks, blocks) == expected


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
    with pytest.raises(ClusterInputError, match="baseline, conventional, scmoe"):
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
