"""Closed-form decode step times for the overlap strategies, straight from stage times.

The simulator (``cluster.simulator``) must equal these when the schedule's streams never contend
beyond what the formulas account for; the tests check that it does. Per layer:

- ``sbo`` (single-batch overlap, ScMoE layers; LongCat-Flash paper, arXiv 2509.01322, sec. 6.1):
  attn0 + router + max(dispatch, ffn0 + ffn0_tp + attn1_qkv) + moe
  + max(combine, attn1_core + ffn1 + ffn1_tp).
- ``tbo`` (two-batch overlap in ``cluster.schedules.TBO_ORDER``): see :func:`tbo_step_time`.
  When each micro-batch's attention fits under the other's combine, a layer takes dispatch +
  MoE + combine of the whole batch, the paper's Table 7 estimate.
- ``sequential``: every stage in turn.

One training-layer form too: :func:`conventional_layer_time`, the forward of the
``conventional`` training schedule (``model/block.py`` ``topology="conventional"``) with the MoE in one chunk.

TPOT = step / (1 + accept x draft tokens); tokens/GPU/s = batch / TPOT.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from longcat_sim import stages as S
from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.cluster.workload import DecodeWorkload, StageTimes

Schedule = Literal["sbo", "tbo", "sequential"]
SCHEDULES: tuple[str, ...] = ("sbo", "sequential", "tbo")

# Stages of one micro-batch's layer under TBO: the attention issued before the dispatch, and the
# work beside the routed experts (it needs the attention output but not the dispatch).
TBO_ATTENTION = {kind: (*lead, S.ROUTER) for kind, lead in S.BEFORE_ROUTER.items()}
TBO_ATTENTION["dense"] = S.BEFORE_ROUTER["dense"]
TBO_BESIDE_EXPERTS = S.BESIDE_EXPERTS


def _sum(st: StageTimes, names: Sequence[str]) -> float:
    return sum(st.get(name) for name in names)


def sequential_layer_time(st: StageTimes) -> float:
    return st.compute_total + st.comm_total


def sbo_layer_time(st: StageTimes) -> float:
    """One layer of the full batch under single-batch overlap."""
    g = st.get
    if st.kind == "scmoe":
        return (
            g(S.ATTENTION_0)
            + g(S.ROUTER)
            + max(g(S.DISPATCH), _sum(st, (*S.PARTS[S.DENSE_FFN_0], S.ATTENTION_1_QKV)))
            + g(S.ROUTED_EXPERTS)
            + max(g(S.COMBINE), _sum(st, (S.ATTENTION_1_CORE, *S.PARTS[S.DENSE_FFN_1])))
        )
    if st.kind == "moe":
        return (
            _sum(st, S.BEFORE_ROUTER["moe"])
            + g(S.ROUTER)
            + max(g(S.DISPATCH), g(S.SHARED_EXPERTS))
            + g(S.ROUTED_EXPERTS)
            + g(S.COMBINE)
        )
    return sequential_layer_time(st)


def conventional_layer_time(st: StageTimes) -> float:
    """One ScMoE layer in the conventional topology (the MoE reads the second attention's
    output, like FFN_1), as the ``conventional`` training schedule runs it with one token chunk:

        attn0 + ffn0 + ffn0_tp + attn1_qkv + attn1_core + router
        + max(ffn1 + ffn1_tp, max(ffn1, dispatch) + moe + combine)

    FFN_1 runs beside the dispatch; the MoE GEMM is issued after it. Exact when the
    tensor-parallel collectives use another link than dispatch and combine."""
    if st.kind != "scmoe":
        raise ClusterInputError(f"the conventional topology is of scmoe layers, got {st.kind!r}")
    g = st.get
    before = (S.ATTENTION_0, *S.PARTS[S.DENSE_FFN_0], *S.PARTS[S.ATTENTION_1], S.ROUTER)
    return _sum(st, before) + max(
        _sum(st, S.PARTS[S.DENSE_FFN_1]),
        max(g(S.DENSE_FFN_1), g(S.DISPATCH)) + g(S.ROUTED_EXPERTS) + g(S.COMBINE),
    )


@dataclass(frozen=True)
class TboStages:
    """One micro-batch's layer as TBO sees it: attention ``a`` (issued before the dispatch),
    dispatch ``d``, the work beside the routed experts ``s``, routed experts ``m``, combine
    ``c`` (seconds)."""

    a: float
    d: float
    s: float
    m: float
    c: float


def tbo_stages(half: StageTimes) -> TboStages:
    """Group a micro-batch's stage times for :func:`tbo_step_time`."""
    if half.kind not in TBO_ATTENTION:
        raise ClusterInputError(f"unknown layer kind {half.kind!r}; use scmoe, moe or dense")
    g = half.get
    return TboStages(
        a=_sum(half, TBO_ATTENTION[half.kind]),
        d=g(S.DISPATCH),
        s=_sum(half, TBO_BESIDE_EXPERTS[half.kind]),
        m=g(S.ROUTED_EXPERTS),
        c=g(S.COMBINE),
    )


def tbo_step_time(layers_half: Sequence[StageTimes]) -> float:
    """Seconds of all layers under TBO, from one micro-batch's stage times per layer.

    Micro-batch 0's layer l is issued, then micro-batch 1's, on in-order streams (compute, and
    one link carrying dispatch and combine). From the end of one micro-batch's expert GEMM to
    the end of the other's, the compute stream runs the other micro-batch's attention a and its
    work beside the experts s, and the link runs this combine then the other dispatch:

        g(c_before) = max(c_before + d, a + max(d, s)) + m

    where c_before is the combine the dispatch queues behind. Layer l contributes
    g(c_{l-1}) (micro-batch 0 waits for micro-batch 1's previous combine) + g(c_l)
    (micro-batch 1 waits for micro-batch 0's combine of this layer); the step ends with the
    last combine:

        T = sum_l [ max(c_{l-1} + d_l, u_l) + max(c_l + d_l, u_l) + 2 m_l ] + c_{L-1},
        u_l = a_l + max(d_l, s_l),  c_{-1} = 0.

    A steady layer takes 2 (max(c + d, a + max(d, s)) + m): with a <= c and s <= d that is
    2 (d + m + c) of a micro-batch, dispatch + MoE + combine of the whole batch. Exact when the
    layer has no tensor-parallel collectives (``ffn0_tp``, ``ffn1_tp``, ``ffn_tp``, counted here
    as serial work in s) and dispatch and combine share one link.
    """
    if not layers_half:
        raise ClusterInputError("TBO needs stage times of the two micro-batches")
    total = 0.0
    c_before = 0.0
    grouped: dict[int, TboStages] = {}  # layers sharing stage times are grouped once
    for half in layers_half:
        t = grouped.get(id(half))
        if t is None:
            t = grouped[id(half)] = tbo_stages(half)
        u = t.a + max(t.d, t.s)
        total += max(c_before + t.d, u) + max(t.c + t.d, u) + 2.0 * t.m
        c_before = t.c
    return total + c_before


def tbo_steady_layer_time(half: StageTimes) -> float:
    """Per-layer time of TBO over many identical layers: 2 (max(c + d, a + max(d, s)) + m)."""
    t = tbo_stages(half)
    return 2.0 * (max(t.c + t.d, t.a + max(t.d, t.s)) + t.m)


def layers_time(workload: DecodeWorkload, schedule: Schedule) -> float:
    """Seconds of all layers of one decode step under ``schedule``."""
    if schedule == "tbo":
        return tbo_step_time(workload.layers_half)
    if schedule not in ("sbo", "sequential"):
        raise ClusterInputError(
            f"unknown decode schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}"
        )
    if not workload.layers:
        raise ClusterInputError(
            f"the {schedule} schedule needs stage times of the whole batch; price the workload "
            "with micro_batches including 1"
        )
    per_layer = sbo_layer_time if schedule == "sbo" else sequential_layer_time
    seconds: dict[int, float] = {}  # layers sharing stage times are timed once
    for st in workload.layers:
        if id(st) not in seconds:
            seconds[id(st)] = per_layer(st)
    return sum(seconds[id(st)] for st in workload.layers)


def step_time(workload: DecodeWorkload, schedule: Schedule) -> float:
    """Seconds of one decode step: every layer plus the per-step overhead."""
    return layers_time(workload, schedule) + workload.overhead_s


def tokens_per_request_step(workload: DecodeWorkload) -> float:
    """Output tokens a request gains per step: 1 + accepted draft tokens."""
    return 1.0 + workload.mtp_accept * workload.mtp_draft_tokens


def tpot_s(workload: DecodeWorkload, schedule: Schedule) -> float:
    return step_time(workload, schedule) / tokens_per_request_step(workload)


def tps_per_user(workload: DecodeWorkload, schedule: Schedule) -> float:
    return 1.0 / tpot_s(workload, schedule)


def tgs(workload: DecodeWorkload, schedule: Schedule) -> float:
    """Output tokens per GPU per second."""
    return workload.batch_per_device / tpot_s(workload, schedule)


def cost_per_m_tokens(workload: DecodeWorkload, schedule: Schedule) -> float:
    """US dollars per million output tokens at the workload's GPU price."""
    return workload.gpu_hour_usd / (tgs(workload, schedule) * 3600.0) * 1e6
