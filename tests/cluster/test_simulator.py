"""simulate_decode / simulate_train: published anchors, metric definitions and properties that
any schedule on in-order streams must satisfy, with negative controls showing they can fail."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st

from longcat_sim.cluster import closedform, metrics
from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.cluster.schedules import bubble_1f1b, bubble_zb1p, decode_tasks
from longcat_sim.cluster.simulator import simulate_decode, simulate_train
from longcat_sim.cluster.streams import Task, run_tasks
from longcat_sim.cluster.workload import DecodeWorkload, StageTimes, TrainLayerTimes, TrainWorkload
from tests.cluster import make_decode_workload

US = 1e-6
micros = st.integers(min_value=0, max_value=500).map(lambda n: n * US)
RDMA = {"dispatch": "rdma", "combine": "rdma"}


@st.composite
def scmoe_layers(draw):
    compute = {
        n: draw(micros)
        for n in ("attn0", "ffn0", "attn1_qkv", "attn1_core", "ffn1", "router", "moe")
    }
    comm = {"dispatch": draw(micros), "combine": draw(micros)}
    links = dict(RDMA)
    if draw(st.booleans()):
        comm |= {"ffn0_tp": draw(micros), "ffn1_tp": draw(micros)}
        links |= {"ffn0_tp": "nvlink", "ffn1_tp": "nvlink"}
    return StageTimes("scmoe", compute, comm, links)


@st.composite
def moe_layers(draw):
    compute = {n: draw(micros) for n in ("attn_qkv", "attn_core", "shared", "router", "moe")}
    return StageTimes("moe", compute, {"dispatch": draw(micros), "combine": draw(micros)}, RDMA)


@st.composite
def workloads(draw):
    layers = draw(st.lists(st.one_of(scmoe_layers(), moe_layers()), min_size=1, max_size=4))
    layers[0] = dataclasses.replace(layers[0], compute={**layers[0].compute, "moe": 10 * US})
    return make_decode_workload(layers, overhead_s=draw(micros))


# ----------------------------------------------------------------------------- anchors


def test_table7_longcat_row():
    """LongCat-Flash Table 7 (arXiv 2509.01322): 28 layers of attention 264, dispatch 236,
    MoE 60, combine 472 us under SBO, MTP 1 draft at 80 % acceptance, batch 96, $2/GPU-hour:
    TPOT 16 ms and $0.09 per million output tokens (both rounded in the paper)."""
    layer = StageTimes(
        "scmoe",
        {
            "attn0": 264 * US,
            "ffn0": 100 * US,
            "attn1_qkv": 50 * US,
            "attn1_core": 200 * US,
            "ffn1": 150 * US,
            "moe": 60 * US,
        },
        {"dispatch": 236 * US, "combine": 472 * US},
        RDMA,
    )
    result = simulate_decode(make_decode_workload([layer] * 28), "sbo")
    assert result.tpl_us == pytest.approx(1032.0, rel=1e-12)
    assert result.tpot_ms == pytest.approx(28 * 1032 / 1000 / 1.8, rel=1e-12)
    assert round(result.tpot_ms) == 16
    assert round(result.cost_per_m_tokens, 2) == 0.09
    # Traffic longer than the dense work beside it stays exposed: (236 - 150) + (472 - 350).
    assert result.exposed_comm_us == pytest.approx(28 * (86 + 122), rel=1e-12)


def test_metric_definitions():
    """TPOT = step / (1 + draft x accept); TPS/user = 1000 / TPOT; tgs = batch / TPOT;
    $/M = $/h / (tgs x 3600) x 1e6."""
    layer = StageTimes("dense", {"attn_qkv": 100 * US, "ffn": 200 * US})
    result = simulate_decode(make_decode_workload([layer] * 10, overhead_s=1e-3), "sequential")
    assert result.step_ms == pytest.approx(4.0)
    assert result.tpl_us == pytest.approx(300.0)
    assert result.tpot_ms == pytest.approx(4.0 / 1.8)
    assert result.tps_per_user == pytest.approx(1000 / result.tpot_ms)
    assert result.tgs == pytest.approx(96 / (result.tpot_ms / 1000))
    assert result.cost_per_m_tokens == pytest.approx(2.0 / (result.tgs * 3600) * 1e6)
    assert result.per_layer_us["attention"] == pytest.approx(100.0)
    assert result.per_layer_us["dense_ffn"] == pytest.approx(200.0)
    assert result.exposed_comm_share == 0.0


def test_exposed_and_hidden_communication():
    """Sequential exposes all traffic; SBO hides min(dispatch, ffn0 + qkv) + min(combine, ...)."""
    layer = StageTimes(
        "scmoe",
        {"attn0": 50 * US, "ffn0": 30 * US, "attn1_qkv": 10 * US, "attn1_core": 40 * US,
         "ffn1": 30 * US, "moe": 20 * US},
        {"dispatch": 60 * US, "combine": 50 * US},
        RDMA,
    )  # fmt: skip
    seq = simulate_decode(make_decode_workload([layer]), "sequential")
    assert seq.exposed_comm_us == pytest.approx(110.0)
    sbo = simulate_decode(make_decode_workload([layer]), "sbo")
    assert sbo.hidden_comm_us == pytest.approx(40.0 + 50.0)
    assert sbo.exposed_comm_us == pytest.approx(20.0)
    assert sbo.exposed_comm_share == pytest.approx(20.0 / (sbo.step_ms * 1e3))


def test_unknown_schedule_names():
    w = make_decode_workload([StageTimes("dense", {"ffn": 1e-4})])
    with pytest.raises(ClusterInputError, match="sbo, sequential, tbo"):
        simulate_decode(w, "dualpipe")
    tw = _train_workload(1, chunks=1, microbatches=1, stages=1)
    with pytest.raises(ClusterInputError, match="baseline, conventional, scmoe"):
        simulate_train(tw, "sbo")
    with pytest.raises(ClusterInputError, match="1f1b, none, zb"):
        simulate_train(tw, "scmoe", "gpipe")


def test_jitter_needs_rng_and_valid_size():
    w = make_decode_workload([StageTimes("dense", {"ffn": 1e-4})])
    with pytest.raises(ClusterInputError, match="rng"):
        simulate_decode(w, "sbo", jitter=0.1)
    with pytest.raises(ClusterInputError, match="jitter"):
        simulate_decode(w, "sbo", rng=np.random.default_rng(0), jitter=-1.0)


# ----------------------------------------------------------------------------- properties


@settings(max_examples=40)
@given(workloads(), st.sampled_from(["sbo", "tbo"]))
def test_overlap_never_slower_than_sequential(workload, schedule):
    """With micro-batches costing exactly half (no overlap overhead modelled) overlapping can
    only help: some task runs at every instant of an in-order schedule, so the step is at most
    the total work, which is the sequential step."""
    sequential = simulate_decode(workload, "sequential").step_ms
    assert simulate_decode(workload, schedule).step_ms <= sequential * (1 + 1e-12)


def test_negative_control_costly_micro_batches_can_lose():
    """The premise matters: when each TBO micro-batch costs 0.9 of the full batch (small batches
    use the GPU poorly), TBO can be slower than running the batch in sequence."""

    def tbo_slower(layers):
        w = make_decode_workload(layers, half_factor=0.9)
        return simulate_decode(w, "tbo").step_ms > simulate_decode(w, "sequential").step_ms

    found = find(workloads(), lambda w: tbo_slower(list(w.layers)))
    assert tbo_slower(list(found.layers))


@settings(max_examples=40)
@given(workloads(), st.sampled_from(["sequential", "sbo", "tbo"]))
def test_step_at_least_busiest_stream(workload, schedule):
    result = simulate_decode(workload, schedule)
    busiest = max(metrics.stream_busy(result.records).values())
    assert result.step_ms * 1e-3 >= busiest * (1 - 1e-12)
    assert result.exposed_comm_us + result.hidden_comm_us == pytest.approx(result.comm_us)
    assert 0.0 <= result.exposed_comm_share <= 1.0


def _respects_dataflow(records) -> bool:
    """Every MoE GEMM starts after its micro-batch's dispatch of the same layer has ended."""
    dispatch_end = {(r.layer, r.microbatch): r.end for r in records if r.name == "dispatch"}
    return all(r.start >= dispatch_end[(r.layer, r.microbatch)] for r in records if r.name == "moe")


@settings(max_examples=40)
@given(workloads(), st.sampled_from(["sequential", "sbo", "tbo"]))
def test_schedules_respect_dataflow(workload, schedule):
    assert _respects_dataflow(simulate_decode(workload, schedule).records)


def _drop_moe_dependency(tasks: list[Task]) -> list[Task]:
    """A broken SBO: the MoE GEMM forgets to wait for its dispatch."""
    dispatch = {i for i, t in enumerate(tasks) if t.name == "dispatch"}
    return [
        dataclasses.replace(t, deps=tuple(d for d in t.deps if d not in dispatch))
        if t.name == "moe"
        else t
        for t in tasks
    ]


def _broken_sbo(w: DecodeWorkload):
    tasks = decode_tasks(w.layers, w.layers_half, "sbo", w.overhead_s)
    return run_tasks(_drop_moe_dependency(tasks))


def test_negative_control_broken_schedule_violates_dataflow_and_closed_form():
    """The checks above catch a schedule that ignores a dependency: it beats the SBO closed
    form, which no schedule honouring the dataflow can."""

    def beats_closed_form(w: DecodeWorkload) -> bool:
        broken = _broken_sbo(w)
        closed = sum(closedform.sbo_layer_time(layer) for layer in w.layers) + w.overhead_s
        return max(r.end for r in broken) < closed * (1 - 1e-9)

    found = find(workloads(), beats_closed_form)
    assert not _respects_dataflow(_broken_sbo(found))
    assert simulate_decode(found, "sbo").step_ms * 1e-3 == pytest.approx(
        sum(closedform.sbo_layer_time(layer) for layer in found.layers) + found.overhead_s
    )


@settings(max_examples=40)
@given(
    workloads(),
    st.sampled_from(["sequential", "sbo", "tbo"]),
    st.integers(0, 50),
    st.sampled_from(["attn0", "attn_qkv", "moe", "dispatch", "combine", "ffn0", "router"]),
    st.integers(1, 300),
)
def test_more_stage_time_never_faster(workload, schedule, layer_index, stage, extra_us):
    index = layer_index % len(workload.layers)

    def slower(layer: StageTimes) -> StageTimes:
        table = "comm" if stage in layer.comm else "compute"
        if stage not in getattr(layer, table):
            return layer
        grown = {**getattr(layer, table), stage: getattr(layer, table)[stage] + extra_us * US}
        return dataclasses.replace(layer, **{table: grown})

    layers = list(workload.layers)
    halves = list(workload.layers_half)
    layers[index] = slower(layers[index])
    halves[index] = slower(halves[index])
    grown = dataclasses.replace(workload, layers=tuple(layers), layers_half=tuple(halves))
    base = simulate_decode(workload, schedule).step_ms
    assert simulate_decode(grown, schedule).step_ms >= base * (1 - 1e-12)


@settings(max_examples=25)
@given(workloads(), st.integers(0, 2**32 - 1))
def test_same_seed_same_result(workload, seed):
    def run(s):
        return simulate_decode(workload, "sbo", rng=np.random.default_rng(s), jitter=0.2)

    first, again = run(seed), run(seed)
    assert first == again
    assert first.records == again.records


def test_different_seeds_differ_and_jitter_zero_is_deterministic():
    layer = StageTimes("moe", {"attn_qkv": 1e-4, "moe": 1e-4}, {"dispatch": 1e-4}, RDMA)
    w = make_decode_workload([layer] * 4)
    a = simulate_decode(w, "tbo", rng=np.random.default_rng(1), jitter=0.2)
    b = simulate_decode(w, "tbo", rng=np.random.default_rng(2), jitter=0.2)
    assert a.step_ms != b.step_ms
    plain = simulate_decode(w, "tbo")
    assert simulate_decode(w, "tbo", rng=np.random.default_rng(3)) == plain


def test_records_carry_layers_and_streams():
    layer = StageTimes(
        "scmoe",
        {"attn0": 1e-4, "ffn0": 1e-4, "moe": 1e-4},
        {"dispatch": 1e-4, "ffn0_tp": 1e-5},
        {"dispatch": "rdma", "ffn0_tp": "nvlink"},
    )
    result = simulate_decode(make_decode_workload([layer] * 3, overhead_s=1e-4), "tbo")
    assert {r.stream for r in result.records} == {"compute", "rdma", "nvlink"}
    assert {r.layer for r in result.records if r.name != "overhead"} == {0, 1, 2}
    assert {r.microbatch for r in result.records} == {0, 1}
    assert result.records[-1].name == "overhead"


# ----------------------------------------------------------------------------- training


SCMOE_STAGES = ("attn0", "router", "ffn0", "attn1_qkv", "attn1_core", "ffn1", "moe")


def _scmoe_forward(compute: tuple[float, ...], dispatch: float, combine: float) -> StageTimes:
    """A ScMoE layer's forward: ``compute`` in the order of ``SCMOE_STAGES``, RDMA links."""
    compute_times = dict(zip(SCMOE_STAGES, compute, strict=True))
    return StageTimes("scmoe", compute_times, {"dispatch": dispatch, "combine": combine}, RDMA)


def _train(
    layers: tuple[TrainLayerTimes, ...], chunks: int, mb: int, stages: int, tokens: int
) -> TrainWorkload:
    """A training workload on one GPU per pipeline stage, at $2 per GPU-hour."""
    return TrainWorkload(layers, chunks, mb, stages, tokens, gpus=stages, gpu_hour_usd=2.0)


def _train_workload(n_layers, *, chunks, microbatches, stages, weight_share=0.0):
    fwd = _scmoe_forward((1.0, 0.125, 1.5, 0.25, 0.75, 1.5, 2.0), dispatch=1.5, combine=1.5)
    bwd = StageTimes("scmoe", {k: 2 * v for k, v in fwd.compute.items()}, fwd.comm, RDMA)
    weight = {k: weight_share * v for k, v in bwd.compute.items() if k != "attn1_core"}
    if weight_share:
        bwd = dataclasses.replace(
            bwd, compute={k: v - weight.get(k, 0.0) for k, v in bwd.compute.items()}
        )
    layer = TrainLayerTimes(fwd, bwd, weight)
    return _train((layer,) * n_layers, chunks, microbatches, stages, 4096 * microbatches)


@pytest.mark.parametrize("schedule", ["scmoe", "conventional", "baseline"])
def test_train_pipeline_bubbles_match_closed_forms(schedule):
    w = _train_workload(3, chunks=2, microbatches=8, stages=4, weight_share=0.25)
    one = simulate_train(w, schedule, "1f1b")
    expected = bubble_1f1b(4, one.forward_ms, one.backward_ms)
    assert one.bubble_ms == pytest.approx(expected, rel=1e-12)
    zb = simulate_train(w, schedule, "zb")
    assert zb.weight_grad_ms > 0
    full_backward = zb.backward_ms + zb.weight_grad_ms
    expected = bubble_zb1p(4, zb.forward_ms, full_backward, zb.weight_grad_ms)
    assert zb.bubble_ms == pytest.approx(expected, rel=1e-12)
    none = simulate_train(w, schedule, "none")
    assert none.bubble_ms == 0.0
    assert none.step_ms == pytest.approx(8 * (none.forward_ms + none.backward_ms))


def test_train_result_accounting():
    w = _train_workload(2, chunks=2, microbatches=4, stages=1)
    result = simulate_train(w, "baseline")
    assert result.exposed_comm_share == pytest.approx(result.exposed_comm_ms / result.step_ms)
    assert 0 < result.exposed_comm_ms <= result.comm_ms
    assert result.tgs == pytest.approx(w.tokens_per_step / w.gpus / (result.step_ms / 1e3))
    phases = {r.phase for r in result.records}
    assert phases == {"fwd", "bwd"}
    first_backward = min(r.start for r in result.records if r.phase == "bwd")
    assert first_backward == pytest.approx(result.forward_ms / 1e3)


eighths = st.integers(0, 40).map(lambda n: n * 0.125)


@st.composite
def train_layers(draw):
    def times(kind):
        names = ("attn0", "router", "ffn0", "attn1_qkv", "attn1_core", "ffn1", "moe")
        compute = {n: draw(eighths) for n in names}
        compute["ffn1"] = compute["ffn0"]  # FFN_0 and FFN_1 have one shape (model/block.py)
        return StageTimes(
            kind, compute, {"dispatch": draw(eighths), "combine": draw(eighths)}, RDMA
        )

    fwd, bwd = times("scmoe"), times("scmoe")
    weight = {"ffn0": draw(eighths), "moe": draw(eighths)}
    return TrainLayerTimes(fwd, bwd, weight)


@settings(max_examples=30)
@given(
    st.lists(train_layers(), min_size=1, max_size=3),
    st.integers(1, 4),
    st.sampled_from(["none", "1f1b", "zb"]),
)
def test_scmoe_never_slower_than_conventional(layers, chunks, pipeline):
    """Same stage times; the shortcut lets the MoE chunks' traffic run beside the whole dense
    branch, the conventional topology only beside FFN_1; the serial baseline hides none of it
    in the forward. Not a theorem, since the issue orders differ: it needs FFN_0 and FFN_1 to
    cost the same, as they do in the model (with independent FFN times 2 of 1,500 random trials
    broke it; see the control below); with equal FFNs it held in 2,100 random trials. Against
    the serial baseline only the forward is compared: its whole step lost in 4 of 600 random
    trials (the backward issue orders differ more)."""
    first = layers[0].forward
    longer = dataclasses.replace(
        first, compute={**first.compute, "attn0": 1.0 + first.get("attn0")}
    )
    layers[0] = dataclasses.replace(layers[0], forward=longer)  # a step never takes no time
    w = _train(tuple(layers), chunks, mb=4, stages=2, tokens=1024)
    scmoe = simulate_train(w, "scmoe", pipeline)
    conventional = simulate_train(w, "conventional", pipeline)
    assert scmoe.step_ms <= conventional.step_ms * (1 + 1e-12)
    baseline = simulate_train(w, "baseline", pipeline)
    assert scmoe.forward_ms <= baseline.forward_ms * (1 + 1e-12)


def test_scmoe_can_lose_when_ffn1_outweighs_ffn0():
    """Negative control for the property above: with no FFN_0 or attn1 work to hide the dispatch
    under the shortcut but an FFN_1 as long as the dispatch, the conventional topology hides it
    and the shortcut does not. One chunk: ScMoE 1 + 4 + 4 = 9 s (SBO order), conventional
    1 + max(4, 4) = 5 s, serial baseline 1 + 4 + 4 = 9 s."""
    fwd = _scmoe_forward((1.0, 0.0, 0.0, 0.0, 0.0, 4.0, 0.0), dispatch=4.0, combine=0.0)
    layer = TrainLayerTimes(fwd, fwd)
    w = _train((layer,), chunks=1, mb=1, stages=1, tokens=1024)
    assert simulate_train(w, "scmoe").forward_ms == pytest.approx(9e3)
    assert simulate_train(w, "conventional").forward_ms == pytest.approx(5e3)
    assert simulate_train(w, "baseline").forward_ms == pytest.approx(9e3)
