"""Closed-form decode step times for the overlap strategies, straight from stage times.

These are the formulas of the LongCat-Flash paper (arXiv 2509.01322, sec. 6.1-6.2): the
simulator must agree with them when its streams never contend. Per layer:

- ``sbo`` (single-batch overlap, ScMoE layers): attn0 + router + max(dispatch, ffn0 + ffn0_tp +
  attn1_qkv) + moe + max(combine, attn1_core + ffn1 + ffn1_tp).
- ``tbo`` (two-batch overlap): per micro-batch the longer of all its compute and the chain
  dispatch -> moe + shared -> combine that attention of the other micro-batch hides behind;
  twice that per layer.
- ``none``: everything in sequence.

TPOT = step / (1 + accept x draft tokens); tokens/GPU/s = batch / TPOT.
"""

from __future__ import annotations

from typing import Literal

from cluster.errors import ClusterInputError
from cluster.workload import DecodeWorkload, StageTimes

Overlap = Literal["sbo", "tbo", "none"]
OVERLAPS: tuple[str, ...] = ("sbo", "tbo", "none")


def sequential_layer_time(st: StageTimes) -> float:
    return st.compute_total + st.comm_total


def _tp(st: StageTimes, *stages: str) -> float:
    return sum(st.get(stage) for stage in stages)


def sbo_layer_time(st: StageTimes) -> float:
    """One layer of the full batch under single-batch overlap."""
    g = st.get
    if st.kind == "scmoe":
        return (
            g("attn0")
            + g("router")
            + max(g("dispatch"), g("ffn0") + g("ffn0_tp") + g("attn1_qkv"))
            + g("moe")
            + max(g("combine"), g("attn1_core") + g("ffn1") + g("ffn1_tp"))
        )
    if st.kind == "moe":
        return (
            g("attn_qkv")
            + g("attn_core")
            + g("router")
            + max(g("dispatch"), g("shared"))
            + g("moe")
            + g("combine")
        )
    return sequential_layer_time(st)


def tbo_layer_time(half: StageTimes) -> float:
    """One layer under two-batch overlap, from the stage times of one micro-batch."""
    compute = half.compute_total + _tp(half, "ffn_tp", "ffn0_tp", "ffn1_tp")
    chain = half.get("dispatch") + half.get("moe") + half.get("shared") + half.get("combine")
    return 2.0 * max(compute, chain)


def layer_time(full: StageTimes, half: StageTimes, overlap: Overlap) -> float:
    if overlap == "sbo":
        return sbo_layer_time(full)
    if overlap == "tbo":
        return tbo_layer_time(half)
    if overlap == "none":
        return sequential_layer_time(full)
    raise ClusterInputError(f"unknown overlap {overlap!r}; choose one of {', '.join(OVERLAPS)}")


def step_time(workload: DecodeWorkload, overlap: Overlap) -> float:
    """Seconds of one decode step: every layer plus the per-step overhead."""
    layers = sum(
        layer_time(full, half, overlap)
        for full, half in zip(workload.layers, workload.layers_half, strict=True)
    )
    return layers + workload.overhead_s


def tokens_per_request_step(workload: DecodeWorkload) -> float:
    """Output tokens a request gains per step: 1 + accepted draft tokens."""
    return 1.0 + workload.mtp_accept * workload.mtp_draft_tokens


def tpot_s(workload: DecodeWorkload, overlap: Overlap) -> float:
    return step_time(workload, overlap) / tokens_per_request_step(workload)


def tps_per_user(workload: DecodeWorkload, overlap: Overlap) -> float:
    return 1.0 / tpot_s(workload, overlap)


def tgs(workload: DecodeWorkload, overlap: Overlap) -> float:
    """Output tokens per GPU per second."""
    return workload.batch_per_device / tpot_s(workload, overlap)


def cost_per_m_tokens(workload: DecodeWorkload, overlap: Overlap) -> float:
    """US dollars per million output tokens at the workload's GPU price."""
    return workload.gpu_hour_usd / (tgs(workload, overlap) * 3600.0) * 1e6
