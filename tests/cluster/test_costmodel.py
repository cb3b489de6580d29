"""Cost model on hand-written op records: published anchors, properties, errors."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from longcat_sim.cluster import closedform
from longcat_sim.cluster.assumptions import (
    DEFAULT,
    FITTED_EXPERT_POPULARITY_SIGMA,
    TABLE7,
    TABLE7_CONTEXT,
    assumption_names,
    get_assumptions,
)
from longcat_sim.cluster.costmodel import (
    collective_time,
    compute_time,
    context_imbalance,
    decode_workload,
    ep_comm_time,
    ep_traffic_shares,
    expert_time,
    layer_imbalance,
    layer_stage_times,
    train_layer_times,
)
from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.cluster.hardware import Hardware, get_hardware
from longcat_sim.cluster.ops import CommOp, ComputeOp, ExpertOp, LayerOps
from longcat_sim.cluster.placement import (
    imbalance_factor,
    imbalance_factors,
    rank_loads,
    rank_loads_batch,
    replica_counts,
    slots_per_rank,
)
from longcat_sim.cluster.workload import StageTimes

H800 = get_hardware("H800")
MOE_TOKENS = 192  # Table 7: batch 96 per device x (1 + 1 MTP draft token)


def dispatch(tokens: float, k: float, hidden: int, per_elem: float = 1.0) -> CommOp:
    return CommOp("dispatch", "dispatch", "dispatch", tokens * k * hidden * per_elem)


def combine(tokens: float, k: float, hidden: int) -> CommOp:
    return CommOp("combine", "combine", "combine", tokens * k * hidden * 2)


def experts(tokens: float, k: float, hidden: int, inter: int, n: int) -> ExpertOp:
    """All three expert GEMMs of a SwiGLU expert as one op (FP8 weights)."""
    return ExpertOp(
        "experts",
        "moe",
        pairs=tokens * k,
        flops_per_pair=2 * 3 * hidden * inter,
        act_bytes_per_pair=2 * (hidden + 3 * inter),
        expert_weight_bytes=3 * hidden * inter,
        n_experts=n,
    )


# -- V1: LongCat-Flash Table 7 communication and MoE rows (arXiv 2509.01322, Table 7) --------
# (model, hidden, FFN experts per token, expert intermediate, routed experts, shared experts,
#  published dispatch / MoE / combine in microseconds)
TABLE7_ROWS = [
    ("deepseek-v3", 7168, 8, 2048, 256, 1, 275, 77, 551),
    ("qwen3-235b-a22b", 4096, 8, 1536, 128, 0, 157, 29, 315),
    ("longcat-flash", 6144, 8, 2048, 512, 0, 236, 60, 472),
]


@pytest.mark.parametrize(
    ("model", "hidden", "k", "inter", "n", "shared", "disp_us", "moe_us", "comb_us"),
    TABLE7_ROWS,
)
def test_table7_comm_and_moe_rows_from_hand_ops(
    model: str,
    hidden: int,
    k: int,
    inter: int,
    n: int,
    shared: int,
    disp_us: float,
    moe_us: float,
    comb_us: float,
) -> None:
    ops: list = [experts(MOE_TOKENS, k, hidden, inter, n)]
    if shared:
        ops.append(
            ComputeOp(
                "shared",
                "shared",
                "gemm",
                flops=MOE_TOKENS * shared * 2 * 3 * hidden * inter,
                weight_bytes=shared * 3 * hidden * inter,
                precision="fp8",
            )
        )
    layer = LayerOps(
        0,
        "moe",
        tuple(ops),
        (dispatch(MOE_TOKENS, k, hidden), combine(MOE_TOKENS, k, hidden)),
    )
    st_ = layer_stage_times(layer, H800, TABLE7, ep=128)
    assert st_.get("dispatch") * 1e6 == pytest.approx(disp_us, rel=0.03)
    assert (st_.get("moe") + st_.get("shared")) * 1e6 == pytest.approx(moe_us, rel=0.03)
    assert st_.get("combine") * 1e6 == pytest.approx(comb_us, rel=0.03)


def test_table7_assumption_figures() -> None:
    a = get_assumptions("table7")
    # FlashMLA 660 TFLOPS and DeepEP 40 GB/s on H800 (paper sec. 6.2)
    assert H800.peak_flops("bf16") * a.attention_flop_fraction == pytest.approx(660e12)
    assert H800.rdma_bytes_per_s * a.ep_rdma_fraction == pytest.approx(40e9)
    assert a.kernel_overhead_s == 0 and a.ep_call_latency_s == 0 and a.routing == "balanced"
    assert TABLE7_CONTEXT == 5000
    assert set(assumption_names()) == {"table7", "default", "train"}


def test_train_set_is_default_plus_one_fitted_term() -> None:
    """``train`` differs from ``default`` in its name, description, BF16 precisions (training
    weights) and the one fitted term, the collectives' achieved link fraction."""
    from longcat_sim.cluster.assumptions import FITTED_TRAIN_LINK_FRACTION

    train = get_assumptions("train")
    differs = {
        f.name
        for f in dataclasses.fields(train)
        if getattr(train, f.name) != getattr(DEFAULT, f.name)
    }
    assert differs == {
        "name",
        "description",
        "linear_precision",
        "expert_precision",
        "ep_collective_fraction",
    }
    assert train.ep_collective_fraction == FITTED_TRAIN_LINK_FRACTION
    assert train.tp_link_fraction == DEFAULT.tp_link_fraction
    assert train.linear_precision == train.expert_precision == "bf16"


def test_table7_longcat_tpot_closed_form_from_stage_times() -> None:
    """The paper's SBO sum: 28 x (264 + 236 + 60 + 472) us / 1.8 = 16 ms; $0.09 per M."""
    g = {"attn0": 264e-6, "ffn0": 50e-6, "attn1_qkv": 20e-6, "attn1_core": 250e-6}
    g |= {"ffn1": 50e-6, "moe": 60e-6}
    layer = StageTimes(
        "scmoe",
        g,
        {"dispatch": 236e-6, "combine": 472e-6},
        {"dispatch": "rdma", "combine": "rdma"},
    )
    assert closedform.sbo_layer_time(layer) == pytest.approx(1032e-6)
    from longcat_sim.cluster.workload import DecodeWorkload

    w = DecodeWorkload((layer,) * 28, (layer,) * 28, 96, 192, 1, 0.8, 2.0)
    assert closedform.tpot_s(w, "sbo") * 1e3 == pytest.approx(16.05, rel=0.01)
    assert closedform.cost_per_m_tokens(w, "sbo") == pytest.approx(0.09, rel=0.05)


# -- V4: DeepEP low-latency kernels on H800 (deepseek-ai/DeepEP README) ---------------------
# 128 tokens, hidden 7168, top-8, FP8 dispatch / BF16 combine; microseconds per EP size.
DEEPEP_LOW_LATENCY = {
    8: (77, 114),
    16: (118, 195),
    32: (155, 273),
    64: (173, 314),
    128: (192, 369),
    256: (194, 360),
}


@pytest.mark.parametrize("ep", sorted(DEEPEP_LOW_LATENCY))
def test_deepep_low_latency_fit(ep: int) -> None:
    """One alpha-beta model: 33 us per call plus the link latency (1 us NVLink, 3 us RDMA);
    same-node copies at 78 % of 200 GB/s NVLink, other nodes at 90 % of 50 GB/s RDMA."""
    ref_dispatch, ref_combine = DEEPEP_LOW_LATENCY[ep]
    disp = ep_comm_time(dispatch(128, 8, 7168), H800, DEFAULT, ep=ep) * 1e6
    comb = ep_comm_time(combine(128, 8, 7168), H800, DEFAULT, ep=ep) * 1e6
    assert disp == pytest.approx(ref_dispatch, rel=0.15)
    assert comb == pytest.approx(ref_combine, rel=0.15)


def test_deepep_fit_terms_are_physical() -> None:
    assert DEFAULT.ep_nvlink_fraction * H800.nvlink_gb_s == pytest.approx(156.0)
    assert DEFAULT.ep_rdma_fraction * H800.rdma_gb_s == pytest.approx(45.0)
    assert 10e-6 < DEFAULT.ep_call_latency_s < 60e-6


def test_locality_shares() -> None:
    assert ep_traffic_shares(8, H800, DEFAULT) == (7 / 8, 0.0)  # one node: NVLink only
    nv, rdma = ep_traffic_shares(128, H800, DEFAULT)
    assert nv == pytest.approx(7 / 128) and rdma == pytest.approx(120 / 128)
    assert ep_traffic_shares(128, H800, TABLE7) == (0.0, 1.0)  # Table 7: all on the network


def test_zero_expert_tokens_send_nothing() -> None:
    # Only FFN experts travel: 12 routed slots of which 8 FFN experts -> 8/12 of the bytes.
    assert ep_comm_time(dispatch(192, 8, 6144), H800, TABLE7, ep=128) == pytest.approx(
        ep_comm_time(dispatch(192, 12, 6144), H800, TABLE7, ep=128) * 8 / 12
    )


# -- roofline --------------------------------------------------------------------------------


def test_roofline_compute_and_memory_bound() -> None:
    a = DEFAULT.replace(kernel_overhead_s=0.0)
    big = ComputeOp("big", "ffn0", "gemm", flops=1e15, weight_bytes=1.0, precision="fp8")
    assert compute_time(big, H800, a) == pytest.approx(1e15 / (1979e12 * 0.7))
    weights = ComputeOp("w", "ffn0", "gemm", flops=1.0, weight_bytes=1e9)
    assert compute_time(weights, H800, a) == pytest.approx(1e9 / (3.35e12 * 0.7))
    empty = ComputeOp("e", "ffn0", "vector", flops=0.0)
    assert compute_time(empty, H800, DEFAULT) == DEFAULT.kernel_overhead_s


def test_expert_weights_read_once_per_touched_expert() -> None:
    a = DEFAULT.replace(kernel_overhead_s=0.0, activation_traffic=False)
    few = dataclasses.replace(experts(1, 1, 6144, 2048, 512), flops_per_pair=0.0)
    # one pair over 4 resident experts touches 4 (1 - e^(-1/4)) of them on average
    touched = 4 * (1 - math.exp(-0.25))
    assert expert_time(few, H800, a, ep=128) == pytest.approx(
        touched * few.expert_weight_bytes / (3.35e12 * 0.7)
    )


def test_ring_collectives() -> None:
    a = DEFAULT.replace(kernel_overhead_s=0.0)
    tp4 = CommOp("ag", "ffn0_tp", "all_gather", 3e6, group=4)
    expected = 3 * H800.nvlink_latency_s + 3e6 / (H800.nvlink_bytes_per_s * a.tp_link_fraction)
    assert collective_time(tp4, H800, a) == pytest.approx(expected)
    ar = dataclasses.replace(tp4, pattern="all_reduce")
    assert collective_time(ar, H800, a) == pytest.approx(expected + 3 * H800.nvlink_latency_s)
    assert collective_time(dataclasses.replace(tp4, group=1), H800, a) == 0.0
    # 32 ranks over 4 nodes: 3 of 31 shards cross RDMA, the rest NVLink, concurrently
    ep32 = CommOp("ag", "dispatch", "all_gather", 31e6, group=32)
    t = collective_time(ep32, H800, a)
    rdma = 3e6 / (H800.rdma_bytes_per_s * a.tp_link_fraction)
    nvlink = 28e6 / (H800.nvlink_bytes_per_s * a.tp_link_fraction)
    assert t == pytest.approx(7 * 1e-6 + 3 * 3e-6 + max(rdma, nvlink))


# -- properties (Hypothesis) -----------------------------------------------------------------

amounts = st.floats(min_value=0.0, max_value=1e13, allow_nan=False)
positive = st.floats(min_value=1e-3, max_value=1e4, allow_nan=False)
scale_up = st.floats(min_value=1.0, max_value=100.0, allow_nan=False)
kinds = st.sampled_from(["gemm", "attention", "vector"])


def _with_rates(hw: Hardware, flops_scale: float, bw_scale: float) -> Hardware:
    return hw.replace(
        bf16_tflops=hw.bf16_tflops * flops_scale,
        fp8_tflops=hw.fp8_tflops * flops_scale,
        hbm_tb_s=hw.hbm_tb_s * bw_scale,
        nvlink_gb_s=hw.nvlink_gb_s * bw_scale,
        rdma_gb_s=hw.rdma_gb_s * bw_scale,
    )


OpPricer = Callable[[ComputeOp, Hardware], float]


def _monotone_in_hardware(price: OpPricer):
    @settings(max_examples=40)
    @given(kinds, amounts, amounts, amounts, scale_up, scale_up)
    def check(kind, flops, weight_bytes, kv_bytes, faster, wider) -> None:
        op = ComputeOp("op", "s", kind, flops=flops, weight_bytes=weight_bytes, kv_bytes=kv_bytes)
        base = price(op, H800)
        better = price(op, _with_rates(H800, faster, wider))
        assert better <= base * (1 + 1e-12)

    return check


def test_op_time_non_increasing_in_peak_and_bandwidth() -> None:
    _monotone_in_hardware(lambda op, hw: compute_time(op, hw, DEFAULT))()


def test_negative_control_monotonicity_catches_a_broken_pricer() -> None:
    """A pricer that multiplies by bandwidth instead of dividing must fail the property."""

    def broken(op: ComputeOp, hw: Hardware) -> float:
        return op.flops / hw.peak_flops(op.precision) + op.bytes * hw.hbm_bytes_per_s * 1e-24

    with pytest.raises(AssertionError):
        _monotone_in_hardware(broken)()


@settings(max_examples=40)
@given(kinds, amounts, amounts, amounts, scale_up)
def test_op_time_non_decreasing_in_work(kind, flops, weight_bytes, act_bytes, more) -> None:
    op = ComputeOp("op", "s", kind, flops=flops, weight_bytes=weight_bytes, act_bytes=act_bytes)
    bigger = dataclasses.replace(
        op, flops=flops * more, weight_bytes=weight_bytes * more, act_bytes=act_bytes * more
    )
    for a in (DEFAULT, TABLE7):
        assert compute_time(bigger, H800, a) >= compute_time(op, H800, a)


@settings(max_examples=40)
@given(
    st.floats(min_value=0.0, max_value=1e9),
    scale_up,
    scale_up,
    st.sampled_from([8, 16, 32, 64, 128, 256]),
)
def test_ep_comm_monotone(volume, more, wider, ep) -> None:
    op = CommOp("d", "dispatch", "dispatch", volume)
    base = ep_comm_time(op, H800, DEFAULT, ep=ep)
    assert ep_comm_time(dataclasses.replace(op, bytes=volume * more), H800, DEFAULT, ep=ep) >= base
    assert ep_comm_time(op, _with_rates(H800, 1.0, wider), DEFAULT, ep=ep) <= base


@settings(max_examples=40)
@given(
    st.lists(st.floats(min_value=0.0, max_value=1e6), min_size=16, max_size=16),
    st.sampled_from([1, 2, 4, 8, 16]),
    st.sampled_from([0, 16, 32]),
)
def test_imbalance_factor_at_least_one(loads, ep, redundant) -> None:
    factor = imbalance_factor(np.array(loads), ep, redundant)
    assert factor >= 1.0
    totals = rank_loads(np.array(loads), ep, redundant)
    assert totals.sum() == pytest.approx(sum(loads), rel=1e-9, abs=1e-6)


@settings(max_examples=40)
@given(
    st.lists(
        st.lists(st.integers(0, 50).map(float), min_size=32, max_size=32), min_size=1, max_size=4
    ),
    st.sampled_from([1, 2, 4, 8, 16, 32]),
    st.sampled_from([0, 8, 32]),
)
def test_batched_packing_equals_one_layer_at_a_time(rows, ep, redundant) -> None:
    """The packing of many layers at once (used to price a step) gives every layer exactly the
    rank loads and imbalance of the one-layer greedy packing, ties included."""
    assume((32 + redundant) % ep == 0)
    loads = np.array(rows)
    batch = rank_loads_batch(loads, ep, redundant)
    factors = imbalance_factors(loads, ep, redundant)
    for row, totals, factor in zip(loads, batch, factors, strict=True):
        assert totals.tolist() == rank_loads(row, ep, redundant).tolist()
        assert factor == imbalance_factor(row, ep, redundant)


def test_greedy_packing_hand_computed_and_negative_control() -> None:
    """Loads 9, 7, 5, 4, 3, 1 on 2 ranks of 3 slots, heaviest first onto the lighter rank:
    9 -> r0, 7 -> r1, 5 -> r1, 4 -> r0, 3 -> r1, 1 -> r0: r0 = 14, r1 = 15. A round-robin
    packing of the sorted copies (r0 = 9 + 5 + 3, r1 = 7 + 4 + 1) differs, so the equality
    above holds for the greedy packing only."""
    loads = np.array([9.0, 7.0, 5.0, 4.0, 3.0, 1.0])
    assert rank_loads(loads, 2).tolist() == [14.0, 15.0]
    assert rank_loads_batch(loads[None, :], 2)[0].tolist() == [14.0, 15.0]
    round_robin = [sum(loads[0::2]), sum(loads[1::2])]
    assert round_robin == [17.0, 12.0] != rank_loads(loads, 2).tolist()


@settings(max_examples=25)
@given(st.sampled_from([1, 2, 4, 8, 16, 32, 64]), st.floats(min_value=1e-3, max_value=1e6))
def test_uniform_histogram_is_balanced(ep, load) -> None:
    assert imbalance_factor(np.full(64, load), ep) == 1.0


def test_negative_control_skewed_histogram_is_imbalanced() -> None:
    loads = np.ones(64)
    loads[0] = 10.0
    assert imbalance_factor(loads, 8) > 1.5


def test_replicas_split_the_hot_expert() -> None:
    loads = np.ones(256)
    loads[:4] = 20.0
    assert replica_counts(loads, 4)[:4].tolist() == [2, 2, 2, 2]
    without = imbalance_factor(loads, 128, 0)
    with_replicas = imbalance_factor(loads, 144, 32)  # DeepSeek: EP144, 32 redundant experts
    assert with_replicas < without


def test_sampled_routing_is_reproducible_and_imbalanced() -> None:
    layer = LayerOps(0, "moe", (experts(192, 8, 6144, 2048, 512),))
    a = DEFAULT.replace(expert_popularity_sigma=0.0)
    f1 = layer_imbalance(layer, a, ep=128, rng=np.random.default_rng(7))
    f2 = layer_imbalance(layer, a, ep=128, rng=np.random.default_rng(7))
    assert f1 == f2 and 1.0 < f1 < 1.3  # multinomial noise only: a few percent
    fitted = DEFAULT.replace(expert_popularity_sigma=FITTED_EXPERT_POPULARITY_SIGMA)
    skewed = layer_imbalance(layer, fitted, ep=128, rng=np.random.default_rng(7))
    assert skewed > f1
    assert layer_imbalance(layer, TABLE7, ep=128) == 1.0
    uniform = np.full(512, 3.0)
    assert layer_imbalance(layer, DEFAULT, ep=128, expert_loads=uniform) == 1.0
    # the default set leaves the spread to the model: pricing must resolve it first
    with pytest.raises(ClusterInputError, match="with_router_spread"):
        layer_imbalance(layer, DEFAULT, ep=128, rng=np.random.default_rng(7))


def test_context_imbalance() -> None:
    assert context_imbalance(TABLE7, requests=8, ep=128) == 1.0
    rng = np.random.default_rng(0)
    small = context_imbalance(DEFAULT, requests=8, ep=128, rng=rng)
    large = context_imbalance(DEFAULT, requests=512, ep=128, rng=rng)
    assert small > large > 1.0  # more requests per GPU average the spread out


# -- whole decode step and training layer from hand ops ------------------------------------


def _scmoe_ops(tokens: int) -> tuple[LayerOps, ...]:
    def gemm(name: str, stage: str, params: float) -> ComputeOp:
        return ComputeOp(name, stage, "gemm", 2 * tokens * params, params, 4 * tokens * 6144)

    core = ComputeOp("core", "attn1_core", "attention", tokens * 7e8, 0.0, 0.0, tokens * 3e6)
    ops = (
        gemm("attn0", "attn0", 9e7),
        dataclasses.replace(core, stage="attn0", name="core0"),
        gemm("ffn0", "ffn0", 2.3e8),
        gemm("qkv1", "attn1_qkv", 4e7),
        core,
        gemm("ffn1", "ffn1", 2.3e8),
        gemm("router", "router", 4.7e6),
        experts(tokens, 8, 6144, 2048, 512),
    )
    comms = (dispatch(tokens, 8, 6144), combine(tokens, 8, 6144))
    return (LayerOps(0, "scmoe", ops, comms),) * 3


def test_decode_workload_from_hand_ops() -> None:
    seen: list[int] = []

    def ops_for(tokens: int) -> tuple[LayerOps, ...]:
        seen.append(tokens)
        return _scmoe_ops(tokens)

    draft = dict(mtp_draft_tokens=1, mtp_accept=0.8)
    w = decode_workload(
        ops_for, hardware=H800, assumptions=TABLE7, ep=128, batch_per_device=95, **draft
    )
    assert seen == [190, 96]  # whole batch, then the larger micro-batch (48 requests)
    assert w.tokens_per_step == 190 and len(w.layers) == len(w.layers_half) == 3
    assert w.layers[0].comm_link == {"dispatch": "rdma", "combine": "rdma"}
    assert w.overhead_s == 0.0
    assert w.layers_half[0].get("dispatch") == pytest.approx(w.layers[0].get("dispatch") * 96 / 190)
    step = closedform.step_time(w, "sbo")
    assert closedform.tpot_s(w, "sbo") == pytest.approx(step / 1.8)
    assert closedform.tgs(w, "sbo") == pytest.approx(95 / (step / 1.8))
    # SBO never exceeds running every stage in sequence, and is at least the exposed parts
    full = w.layers[0]
    assert closedform.sbo_layer_time(full) <= closedform.sequential_layer_time(full)
    assert closedform.sbo_layer_time(full) >= full.get("attn0") + full.get("moe")


def test_default_decode_needs_an_rng() -> None:
    with pytest.raises(ClusterInputError, match="numpy Generator"):
        decode_workload(_scmoe_ops, hardware=H800, assumptions=DEFAULT, ep=128, batch_per_device=8)


def test_train_layer_times_from_hand_ops() -> None:
    fwd = _scmoe_ops(4096)[0]
    bwd = LayerOps(
        0,
        "scmoe",
        tuple(dataclasses.replace(op, name=op.name + ".bwd") for op in fwd.ops),
        fwd.comms,
    )
    lt = train_layer_times(fwd, bwd, hardware=H800, assumptions=TABLE7, ep=32)
    assert set(lt.forward.compute) == set(lt.backward.compute)
    assert lt.forward.get("moe") == pytest.approx(lt.backward.get("moe"))
    assert lt.forward.comm_link["dispatch"] == "rdma"


def test_tbo_closed_form_matches_the_paper_form() -> None:
    """With no overheads, a TBO layer takes dispatch + MoE + combine of the full batch when each
    micro-batch's attention fits under the other's combine and its shared expert under its own
    dispatch (Table 7's TBO rows, arXiv 2509.01322)."""
    half = StageTimes(
        "moe",
        {"attn_qkv": 10e-6, "attn_core": 200e-6, "moe": 38e-6, "shared": 1e-6},
        {"dispatch": 137e-6, "combine": 275e-6},
        {"dispatch": "rdma", "combine": "rdma"},
    )
    assert closedform.tbo_steady_layer_time(half) == pytest.approx(2 * (137 + 38 + 275) * 1e-6)


# -- errors ------------------------------------------------------------------------------------


def _one_line(excinfo: pytest.ExceptionInfo[ClusterInputError]) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def test_ep_must_divide_experts_plus_replicas() -> None:
    assert slots_per_rank(256, 144, 32) == 2  # DeepSeek decodes on EP144 with 32 replicas
    with pytest.raises(ClusterInputError) as excinfo:
        slots_per_rank(256, 144, 0)
    assert "R = 32" in _one_line(excinfo)
    with pytest.raises(ClusterInputError) as excinfo:
        expert_time(experts(96, 8, 7168, 2048, 256), H800, DEFAULT, ep=144, redundant_experts=16)
    assert "EP 144 does not divide 256 experts + 16 redundant" in _one_line(excinfo)


def test_batch_zero() -> None:
    with pytest.raises(ClusterInputError) as excinfo:
        decode_workload(_scmoe_ops, hardware=H800, assumptions=TABLE7, ep=128, batch_per_device=0)
    assert "batch per device must be a positive integer" in _one_line(excinfo)


def test_negative_bandwidth() -> None:
    with pytest.raises(ClusterInputError) as excinfo:
        H800.replace(rdma_gb_s=-40.0)
    assert "rdma_gb_s must be positive" in _one_line(excinfo)


def test_unknown_hardware_and_assumptions() -> None:
    with pytest.raises(ClusterInputError) as excinfo:
        get_hardware("TPUv9")
    _one_line(excinfo)
    with pytest.raises(ClusterInputError) as excinfo:
        get_assumptions("optimistic")
    assert "table7" in _one_line(excinfo)


@pytest.mark.parametrize(
    ("build", "needle"),
    [
        (lambda: ComputeOp("x", "s", "gemm", flops=-1.0), "flops must be finite and >= 0"),
        (lambda: ComputeOp("x", "s", "conv", flops=1.0), "kind must be one of"),
        (lambda: CommOp("x", "s", "broadcast", 1.0), "pattern must be one of"),
        (lambda: CommOp("x", "s", "all_gather", 1.0, group=0), "group must be a positive"),
        (lambda: ExpertOp("x", "moe", 1.0, 1.0, 1.0, 1.0, 0), "n_experts must be positive"),
        (lambda: DEFAULT.replace(hbm_fraction=1.5), "must lie in (0, 1]"),
        (lambda: DEFAULT.replace(warp_speed=2), "unknown assumption 'warp_speed'"),
        (lambda: imbalance_factor(np.array([1.0, -1.0]), 2), "finite and >= 0"),
    ],
)
def test_bad_records(build, needle: str) -> None:
    with pytest.raises(ClusterInputError) as excinfo:
        build()
    assert needle in _one_line(excinfo)
