"""V3: training overlap. LongCat-Flash (arXiv 2509.01322, sec. 5) reports that the share of step
time spent in dispatch/combine not hidden by compute drops from 25.3 % without ScMoE to 8.4 % with
it (EP group 32, 200 Gb/s RDMA per accelerator, context parallelism 8, MoE split in 2 chunks).

The stage times below are synthetic but derived, not fitted: FLOPs and bytes of one LongCat-Flash
layer per token chunk (released config, numbers carried as literals), one achieved FLOP rate for
all compute and an achieved RDMA bandwidth. The paper names neither, and only their ratio
matters, so one test calibrates the FLOP rate to the paper's 25.3 % baseline and checks the
ScMoE share it then predicts.

The V3 tests at the end price the same comparison from the model's op counts (longcat_sim.bridge)
on the documented setup of ``longcat-sim simulate --mode train``.

"Without ScMoE" is the ``baseline`` training schedule: the MoE in series after the first
attention, every later dense stage waiting for its combine, the chunks overlapping only each
other. The ``conventional`` schedule (model/block.py's conventional topology, the MoE after the
second attention and beside FFN_1) hides part of the traffic behind FFN_1; it is no published
reference, so its share is only checked to lie between the two (fitting the link fraction on it
instead lands at 0.73 and predicts 12.0 % with ScMoE, outside the tolerance).
"""

from __future__ import annotations

import pytest

from longcat_sim.cluster.simulator import simulate_train
from longcat_sim.cluster.workload import StageTimes, TrainLayerTimes, TrainWorkload
from tests.cluster.published import (
    NON_OVERLAPPED_COMM_WITH_SCMOE,
    NON_OVERLAPPED_COMM_WITHOUT_SCMOE,
)
from tests.cluster.published import TRAINING_SHARE_TOLERANCE as TOLERANCE

# LongCat-Flash released config (longcat_flash.md sec. 1.1): hidden, dense FFN, expert FFN,
# heads, q/k head dim (nope 128 + rope 64), v head dim, q and kv latent ranks, experts + zero
# experts (router width); K_e ~ 8 FFN experts per token on average (sec. 1.6).
HIDDEN, FFN, EXPERT_FFN = 6144, 12288, 2048
HEADS, QK_DIM, V_DIM, ROPE_DIM, Q_LORA, KV_LORA = 64, 192, 128, 64, 1536, 512
ROUTER_WIDTH, K_FFN = 768, 8
# V3 setting (paper sec. 5): sequences of 8192 tokens, EP 32 = 4 nodes of 8, 200 Gb/s RDMA.
SEQUENCE, EP, GPUS_PER_NODE, RDMA_BYTES_PER_S = 8192, 32, 8, 200e9 / 8
# Synthetic choices: 2048 tokens per chunk (2 chunks of a 4096-token micro-batch per GPU), BF16
# dispatch and combine, 80 % of the RDMA line rate achieved.
CHUNK_TOKENS, BYTES_PER_ELEMENT, RDMA_EFFICIENCY = 2048, 2, 0.8

QKV_PARAMS = (
    HIDDEN * Q_LORA
    + Q_LORA * HEADS * QK_DIM
    + HIDDEN * (KV_LORA + ROPE_DIM)
    + KV_LORA * HEADS * (QK_DIM - ROPE_DIM + V_DIM)
)
O_PROJ_PARAMS = HEADS * V_DIM * HIDDEN
ATTENTION_FLOPS_PER_TOKEN = 2 * HEADS * (QK_DIM + V_DIM) * (SEQUENCE + 1) / 2  # causal mean
OFF_NODE = (EP - GPUS_PER_NODE) / EP  # share of expert destinations on other nodes


def paper_setting_layer(flops_per_s: float) -> TrainLayerTimes:
    """One ScMoE layer for one chunk: 2 FLOPs per multiply-add; backward 2x forward compute;
    dispatch/combine move K_FFN x HIDDEN elements per token, the off-node share over RDMA."""
    t = CHUNK_TOKENS
    flops = {
        "attn0": 2 * (QKV_PARAMS + O_PROJ_PARAMS) * t + ATTENTION_FLOPS_PER_TOKEN * t,
        "router": 2 * HIDDEN * ROUTER_WIDTH * t,
        "ffn0": 2 * 3 * HIDDEN * FFN * t,
        "attn1_qkv": 2 * QKV_PARAMS * t,
        "attn1_core": 2 * O_PROJ_PARAMS * t + ATTENTION_FLOPS_PER_TOKEN * t,
        "ffn1": 2 * 3 * HIDDEN * FFN * t,
        "moe": 2 * K_FFN * 3 * HIDDEN * EXPERT_FFN * t,
    }
    traffic = OFF_NODE * K_FFN * HIDDEN * BYTES_PER_ELEMENT * t
    seconds = traffic / (RDMA_BYTES_PER_S * RDMA_EFFICIENCY)
    comm = {"dispatch": seconds, "combine": seconds}
    links = {"dispatch": "rdma", "combine": "rdma"}
    forward = StageTimes("scmoe", {k: v / flops_per_s for k, v in flops.items()}, comm, links)
    backward = StageTimes("scmoe", {k: 2 * v for k, v in forward.compute.items()}, comm, links)
    return TrainLayerTimes(forward, backward)


def shares(flops_per_s: float, chunks: int = 2) -> tuple[float, float]:
    """Non-overlapped communication share (baseline, ScMoE) of a step of 4 layers."""
    w = TrainWorkload(
        layers=(paper_setting_layer(flops_per_s),) * 4,
        moe_chunks=chunks,
        microbatches=2,
        pipeline_stages=1,
        tokens_per_step=2 * chunks * CHUNK_TOKENS,
        gpus=1,
        gpu_hour_usd=2.0,
    )
    return tuple(
        simulate_train(w, schedule).exposed_comm_share for schedule in ("baseline", "scmoe")
    )


def calibrate(target: float) -> float:
    """Achieved FLOP rate at which the baseline share equals ``target`` (bisection; the share
    falls as compute gets slower)."""
    lo, hi = 50e12, 989e12  # up to the H800 BF16 dense peak
    for _ in range(40):
        mid = (lo + hi) / 2
        if shares(mid)[0] < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def test_shortcut_cuts_exposed_communication_at_nominal_rate():
    """At 40 % of H800 BF16 peak the traffic outweighs what one layer's compute can hide, yet the
    shortcut still hides most of what the baseline exposes."""
    baseline, scmoe = shares(0.4 * 989e12)
    assert baseline > 0.2
    assert scmoe < 0.5 * baseline


def test_v3_calibrated_baseline_predicts_scmoe_share():
    """Calibrate the one unknown to the paper's 25.3 % baseline, then predict ScMoE (paper:
    8.4 %). The simulator charges nothing for running GEMMs beside communication (shared HBM
    and SMs), so it can only hide more than the paper measured: its share must be below 8.4 %."""
    rate = calibrate(0.253)
    baseline, scmoe = shares(rate)
    assert baseline == pytest.approx(0.253, abs=1e-6)
    assert 0.1 * 989e12 < rate < 989e12
    assert scmoe < NON_OVERLAPPED_COMM_WITH_SCMOE


def test_chunking_helps_the_baseline_overlap():
    """Splitting the MoE into token chunks lets one chunk's GEMM run beside another's traffic."""
    rate = 0.3 * 989e12
    one, two, four = (shares(rate, chunks)[0] for chunks in (1, 2, 4))
    assert one > two >= four


def _v3_shares(
    assumptions=None, schedules: tuple[str, ...] = ("baseline", "scmoe"), **changes
) -> tuple[float, ...]:
    """Non-overlapped communication share (baseline, ScMoE) on the documented V3 setup: the
    defaults of ``longcat-sim simulate --mode train`` (LongCat-Flash on H800 with 200 Gb/s RDMA
    per GPU, EP 32, CP 8, sequences of 8192, 4096 tokens per GPU per micro-batch in 2 MoE
    chunks, pipelined AG/RS dispatch and combine, no pipeline bubbles as with V-ZB), priced by
    the bridge with the ``train`` assumption set."""
    import numpy as np

    from longcat_sim import bridge
    from longcat_sim.cluster.assumptions import get_assumptions
    from longcat_sim.cluster.hardware import get_hardware
    from longcat_sim.model.config import get_preset
    from longcat_sim.scenarios.train import TRAIN_DEFAULTS as d

    setup = {**d, **changes}
    w = bridge.train_workload(
        get_preset(setup["model"]),
        hardware=get_hardware(setup["hardware"]).replace(rdma_gb_s=setup["rdma_gb_s"]),
        assumptions=assumptions or get_assumptions(setup["assumptions"]),
        microbatch_tokens=setup["tokens_per_microbatch"],
        microbatches=setup["microbatches"],
        pipeline_stages=setup["pp"],
        data_parallel=1,
        seq_len=setup["seq_len"],
        ep=setup["ep"],
        cp=setup["cp"],
        moe_chunks=setup["moe_chunks"],
        rng=np.random.default_rng(setup["seed"]),
    )
    return tuple(
        simulate_train(w, schedule, setup["pipeline"]).exposed_comm_share for schedule in schedules
    )


def test_v3_documented_setup():
    """Paper sec. 5.3: 25.3 % without ScMoE -> 8.4 % with it, each within 3 points. One term was
    fitted (the collectives' achieved link fraction, on the 25.3 %); 8.4 % is a prediction."""
    baseline, scmoe = _v3_shares()
    assert baseline == pytest.approx(NON_OVERLAPPED_COMM_WITHOUT_SCMOE, abs=TOLERANCE)
    assert scmoe == pytest.approx(NON_OVERLAPPED_COMM_WITH_SCMOE, abs=TOLERANCE)


@pytest.mark.parametrize("tokens", [None, 2048, 8192])
def test_v3_conventional_topology_lies_between(tokens: int | None):
    """The conventional topology hides the traffic behind FFN_1 only: it exposes less than the
    serial baseline and more than the shortcut, on the documented setup and across micro-batch
    sizes (no published number to compare with)."""
    changes = {} if tokens is None else {"tokens_per_microbatch": tokens}
    baseline, conventional, scmoe = _v3_shares(
        schedules=("baseline", "conventional", "scmoe"), **changes
    )
    assert scmoe < conventional < baseline


def test_v3_fitted_term_reproduces_the_baseline_only():
    """Re-fit the one fitted term on the (serial) baseline share alone: it lands on the stated
    value, a physical fraction of line rate."""
    from longcat_sim.cluster.assumptions import FITTED_TRAIN_LINK_FRACTION, TRAIN

    def baseline(fraction: float) -> float:
        return _v3_shares(TRAIN.replace(ep_collective_fraction=fraction))[0]

    lo, hi = 0.5, 1.0  # the share falls as the links get faster
    for _ in range(8):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if baseline(mid) > NON_OVERLAPPED_COMM_WITHOUT_SCMOE else (lo, mid)
    assert (lo + hi) / 2 == pytest.approx(FITTED_TRAIN_LINK_FRACTION, abs=0.01)
    assert 0.0 < FITTED_TRAIN_LINK_FRACTION <= 1.0


@pytest.mark.parametrize("tokens", [2048, 8192])
def test_v3_holds_across_micro_batch_sizes(tokens: int):
    """The micro-batch size is a setup choice, not a fit: from 2 to 8 sequences of 8192 per CP
    group both shares stay within the tolerance."""
    baseline, scmoe = _v3_shares(tokens_per_microbatch=tokens)
    assert baseline == pytest.approx(NON_OVERLAPPED_COMM_WITHOUT_SCMOE, abs=TOLERANCE)
    assert scmoe == pytest.approx(NON_OVERLAPPED_COMM_WITH_SCMOE, abs=TOLERANCE)


def test_v3_negative_control_unfitted_links_miss():
    """With the links at line rate (fraction 1, nothing fitted) the baseline misses 25.3 % by
    more than the tolerance: the check can fail, and the fit is what moves it."""
    from longcat_sim.cluster.assumptions import TRAIN

    baseline, _ = _v3_shares(TRAIN.replace(ep_collective_fraction=1.0))
    assert abs(baseline - NON_OVERLAPPED_COMM_WITHOUT_SCMOE) > TOLERANCE
