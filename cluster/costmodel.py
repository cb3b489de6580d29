"""Pure functions: op x hardware x assumptions -> seconds, and whole decode steps / training
layers priced into ``cluster.workload`` records.

Compute ops follow a roofline: a fixed per-kernel overhead plus the larger of FLOPs over the
achieved FLOP rate and bytes over the achieved HBM bandwidth. Expert-parallel dispatch and
combine follow an alpha-beta model: a fixed per-call latency plus the slower of the NVLink share
and the RDMA share of the bytes over their achieved bandwidths. Tensor/context-parallel
collectives are pipelined hierarchical rings: ring-step latencies plus bytes sent per rank over
the achieved NVLink (same node) and RDMA (other nodes) bandwidths.
The most loaded expert-parallel rank sets the pace of expert work and of dispatch/combine, and
the GPU holding the most cached context sets the pace of attention (every collective after it
waits for the slowest GPU).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from longcat_sim import stages as S
from longcat_sim.cluster.assumptions import Assumptions
from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.cluster.hardware import Hardware
from longcat_sim.cluster.ops import CommOp, ComputeOp, ExpertOp, LayerOps
from longcat_sim.cluster.placement import (
    check_count,
    imbalance_factor,
    imbalance_factors,
    sample_expert_loads,
    slots_per_rank,
)
from longcat_sim.cluster.workload import DecodeWorkload, Link, StageTimes, TrainLayerTimes

OpsForTokens = Callable[[int], Sequence[LayerOps]]
StepOpsForTokens = Callable[[int], Sequence[ComputeOp]]
ExpertLoads = np.ndarray | Sequence[np.ndarray]


# -- compute --------------------------------------------------------------------------------


def _flop_fraction(kind: str, a: Assumptions) -> float:
    if kind == "attention":
        return a.attention_flop_fraction
    return a.gemm_flop_fraction


def roofline_time(
    flops: float, bytes_moved: float, peak_flops: float, bytes_per_s: float, overhead_s: float
) -> float:
    """Fixed overhead plus the slower of compute and memory traffic."""
    return overhead_s + max(flops / peak_flops, bytes_moved / bytes_per_s)


def compute_time(op: ComputeOp, hw: Hardware, a: Assumptions) -> float:
    """Seconds one kernel takes on one GPU."""
    peak = hw.peak_flops(op.precision) * _flop_fraction(op.kind, a)
    hbm = a.attention_hbm_fraction if op.kind == "attention" else a.hbm_fraction
    moved = (
        op.kv_bytes
        + (op.weight_bytes if a.weight_traffic else 0.0)
        + (op.act_bytes if a.activation_traffic else 0.0)
    )
    return roofline_time(op.flops, moved, peak, hw.hbm_bytes_per_s * hbm, a.kernel_overhead_s)


def experts_touched(resident: float, pairs: float) -> float:
    """Expected resident experts that receive at least one of ``pairs`` uniformly routed pairs."""
    if resident <= 0:
        return 0.0
    return resident * -math.expm1(-pairs / resident)


def expert_time(
    op: ExpertOp,
    hw: Hardware,
    a: Assumptions,
    *,
    ep: int,
    redundant_experts: int = 0,
    imbalance: float = 1.0,
) -> float:
    """Seconds of the expert kernel on the most loaded rank of an ``ep``-way group.

    That rank computes ``pairs x imbalance`` pairs and reads the weights of each resident
    expert (or replica) that any pair reaches.
    """
    _check_imbalance(imbalance)
    resident = slots_per_rank(op.n_experts, ep, redundant_experts)
    pairs = op.pairs * imbalance
    touched = experts_touched(resident, pairs)
    weights = touched * op.expert_weight_bytes if a.weight_traffic else 0.0
    acts = pairs * op.act_bytes_per_pair if a.activation_traffic else 0.0
    peak = hw.peak_flops(op.precision) * a.expert_flop_fraction
    return roofline_time(
        pairs * op.flops_per_pair,
        weights + acts,
        peak,
        hw.hbm_bytes_per_s * a.hbm_fraction,
        a.kernel_overhead_s,
    )


# -- communication --------------------------------------------------------------------------


def ep_traffic_shares(ep: int, hw: Hardware, a: Assumptions) -> tuple[float, float]:
    """(NVLink share, RDMA share) of dispatched copies, with ranks packed into whole nodes.

    Without locality every copy is priced on the scale-out network, as the Table 7 estimate
    does. With it, the 1/ep bound for this GPU stays put and same-node copies take NVLink.
    """
    check_count("EP size", ep)
    if not a.ep_locality:
        return 0.0, 1.0
    node = min(ep, hw.gpus_per_node)
    return (node - 1) / ep, (ep - node) / ep


def node_relay_shares(ep: int, hw: Hardware, copies_per_token: float) -> tuple[float, float]:
    """(NVLink share, RDMA share) of a dispatch's copies under throughput kernels, as shares of
    all copies' bytes. A token crosses RDMA once per other node holding one of its
    ``copies_per_token`` experts (experts chosen uniformly: a node of N is missed with
    probability (1 - 1/N)^k); every copy not bound for this GPU then crosses NVLink once."""
    check_count("EP size", ep)
    node = min(ep, hw.gpus_per_node)
    nodes = math.ceil(ep / node)
    k = copies_per_token
    remote_nodes = (nodes - 1) * -math.expm1(k * math.log1p(-1.0 / nodes)) if nodes > 1 else 0.0
    return (ep - 1) / ep, remote_nodes / k


def ep_link(ep: int, hw: Hardware, a: Assumptions) -> Link:
    """The link that carries the bulk of a dispatch/combine."""
    return "nvlink" if a.ep_locality and ep <= hw.gpus_per_node else "rdma"


def ep_comm_time(
    op: CommOp, hw: Hardware, a: Assumptions, *, ep: int, imbalance: float = 1.0
) -> float:
    """Seconds of one dispatch or combine. The most loaded rank receives (dispatch) or sends
    back (combine) ``imbalance`` times the mean, so its bytes scale by it."""
    if op.pattern not in ("dispatch", "combine"):
        raise ClusterInputError(f"comm {op.name!r} is a {op.pattern}, not a dispatch/combine")
    _check_imbalance(imbalance)
    if op.copies_per_token > 0 and a.ep_locality:
        nvlink_share, rdma_share = node_relay_shares(ep, hw, op.copies_per_token)
    else:
        nvlink_share, rdma_share = ep_traffic_shares(ep, hw, a)
    moved = op.bytes * imbalance
    t_nvlink = moved * nvlink_share / (hw.nvlink_bytes_per_s * a.ep_nvlink_fraction)
    t_rdma = moved * rdma_share / (hw.rdma_bytes_per_s * a.ep_rdma_fraction)
    latency = a.ep_call_latency_s
    if a.ep_link_latency:
        if rdma_share > 0:
            latency += hw.rdma_latency_s
        elif nvlink_share > 0:
            latency += hw.nvlink_latency_s
    return latency + max(t_nvlink, t_rdma)


def collective_link(op: CommOp, hw: Hardware) -> Link:
    return "nvlink" if op.group <= hw.gpus_per_node else "rdma"


def collective_time(op: CommOp, hw: Hardware, a: Assumptions) -> float:
    """Seconds of a pipelined hierarchical ring all-gather / reduce-scatter (an all-reduce is
    both). Of the shards a rank exchanges, one per other node crosses RDMA and the rest NVLink;
    the two links work concurrently, and every ring step pays its link's latency."""
    if op.pattern in ("dispatch", "combine"):
        raise ClusterInputError(f"comm {op.name!r} is a {op.pattern}; price it with ep_comm_time")
    if op.group == 1:
        return 0.0
    node = min(op.group, hw.gpus_per_node)
    nodes = math.ceil(op.group / node)
    rdma_bytes = op.bytes * (nodes - 1) / (op.group - 1)
    nvlink_bytes = op.bytes - rdma_bytes
    passes = 2 if op.pattern == "all_reduce" else 1
    latency = passes * ((node - 1) * hw.nvlink_latency_s + (nodes - 1) * hw.rdma_latency_s)
    # training dispatch/combine (stages of the same names) have their own achieved fraction
    fraction = (
        a.ep_collective_fraction if op.stage in (S.DISPATCH, S.COMBINE) else a.tp_link_fraction
    )
    transfer = max(
        nvlink_bytes / (hw.nvlink_bytes_per_s * fraction),
        rdma_bytes / (hw.rdma_bytes_per_s * fraction),
    )
    return a.kernel_overhead_s + latency + transfer


# -- layers ---------------------------------------------------------------------------------


def layer_stage_times(
    layer: LayerOps,
    hw: Hardware,
    a: Assumptions,
    *,
    ep: int,
    redundant_experts: int = 0,
    imbalance: float = 1.0,
    attention_imbalance: float = 1.0,
    memo: dict[object, float] | None = None,
) -> StageTimes:
    """Sum the priced ops of each stage of one layer into ``StageTimes``. ``imbalance`` scales
    the expert work and dispatch/combine of the pace-setting rank, ``attention_imbalance`` the
    attention-core work (FLOPs and cache reads) of the GPU with the most cached context.
    ``memo`` (optional, for one hardware and assumption set) keeps compute-op and collective
    seconds already priced, keyed by the op and the attention imbalance."""
    _check_imbalance(attention_imbalance)
    fixed = _fixed_parts(layer, hw, a, attention_imbalance, {} if memo is None else memo)
    return _with_experts(
        layer.kind, fixed, hw, a, ep=ep, redundant_experts=redundant_experts, imbalance=imbalance
    )


_Fixed = tuple[
    dict[str, float], tuple[ExpertOp, ...], dict[str, float], dict[str, Link], tuple[CommOp, ...]
]


def _merge_link(links: dict[str, Link], stage: str, link: Link) -> None:
    """A stage whose collectives use both links is paced by the slower one, RDMA."""
    if links.setdefault(stage, link) != link:
        links[stage] = "rdma"


def _fixed_parts(
    layer: LayerOps, hw: Hardware, a: Assumptions, attention_imbalance: float, memo: dict
) -> _Fixed:
    """Seconds per stage of the ops that do not depend on routing imbalance, and the ops that
    do (expert GEMMs; dispatch and combine)."""
    compute: dict[str, float] = {}
    experts: list[ExpertOp] = []
    for op in layer.ops:
        if isinstance(op, ExpertOp):
            experts.append(op)
            continue
        key = (op, attention_imbalance if op.kind == "attention" else 1.0)
        seconds = memo.get(key)
        if seconds is None:
            seconds = memo[key] = _compute_time_scaled(op, hw, a, key[1])
        compute[op.stage] = compute.get(op.stage, 0.0) + seconds
    comm: dict[str, float] = {}
    links: dict[str, Link] = {}
    routed: list[CommOp] = []
    for op in layer.comms:
        if op.pattern in ("dispatch", "combine"):
            routed.append(op)
            continue
        seconds = memo.get(op)
        if seconds is None:
            seconds = memo[op] = collective_time(op, hw, a)
        comm[op.stage] = comm.get(op.stage, 0.0) + seconds
        _merge_link(links, op.stage, collective_link(op, hw))
    return compute, tuple(experts), comm, links, tuple(routed)


def _with_experts(
    kind: str,
    fixed: _Fixed,
    hw: Hardware,
    a: Assumptions,
    *,
    ep: int,
    redundant_experts: int,
    imbalance: float,
) -> StageTimes:
    """Add the imbalance-dependent ops to a layer's fixed stage seconds."""
    fixed_compute, experts, fixed_comm, fixed_links, routed = fixed
    compute = dict(fixed_compute)
    for op in experts:
        seconds = expert_time(
            op, hw, a, ep=ep, redundant_experts=redundant_experts, imbalance=imbalance
        )
        compute[op.stage] = compute.get(op.stage, 0.0) + seconds
    comm = dict(fixed_comm)
    links = dict(fixed_links)
    for op in routed:
        seconds = ep_comm_time(op, hw, a, ep=ep, imbalance=imbalance)
        comm[op.stage] = comm.get(op.stage, 0.0) + seconds
        _merge_link(links, op.stage, ep_link(ep, hw, a))
    return StageTimes(kind=kind, compute=compute, comm=comm, comm_link=links)


def _compute_time_scaled(op: ComputeOp, hw: Hardware, a: Assumptions, factor: float) -> float:
    """An attention core's seconds with its FLOPs and cache reads scaled by ``factor``."""
    if factor != 1.0:
        op = dataclasses.replace(op, flops=op.flops * factor, kv_bytes=op.kv_bytes * factor)
    return compute_time(op, hw, a)


def layer_expert_loads(
    layer: LayerOps,
    a: Assumptions,
    *,
    ep: int,
    redundant_experts: int = 0,
    rng: np.random.Generator | None = None,
    expert_loads: np.ndarray | None = None,
) -> np.ndarray | None:
    """The per-expert load histogram behind one layer's imbalance: the given one, a sampled one
    (``routing="multinomial"``), or None (no experts, or ``"balanced"`` routing: factor 1)."""
    experts = [op for op in layer.ops if isinstance(op, ExpertOp)]
    if not experts:
        return None
    n_experts = experts[0].n_experts
    slots_per_rank(n_experts, ep, redundant_experts)
    if expert_loads is not None:
        loads = np.asarray(expert_loads, dtype=float)
        if loads.shape != (n_experts,):
            raise ClusterInputError(
                f"expert load histogram has shape {loads.shape}; layer {layer.index} needs "
                f"({n_experts},), one entry per FFN expert"
            )
        return loads
    if a.routing == "balanced":
        return None
    if rng is None:
        raise ClusterInputError(
            f"assumption set {a.name!r} samples routing; pass a numpy Generator as rng"
        )
    if a.expert_popularity_sigma is None:
        raise ClusterInputError(
            f"assumption set {a.name!r} leaves expert_popularity_sigma to the model; resolve it "
            "with cluster.assumptions.with_router_spread before pricing"
        )
    popularity = None
    if a.expert_popularity_sigma > 0:
        popularity = rng.lognormal(0.0, a.expert_popularity_sigma, n_experts)
    group_pairs = round(experts[0].pairs * ep)
    return sample_expert_loads(rng, n_experts, group_pairs, popularity)


def layer_imbalance(
    layer: LayerOps,
    a: Assumptions,
    *,
    ep: int,
    redundant_experts: int = 0,
    rng: np.random.Generator | None = None,
    expert_loads: np.ndarray | None = None,
) -> float:
    """Imbalance of one layer's expert work: from a given histogram of per-expert loads, from
    a sampled one (``routing="multinomial"``), or 1 (``"balanced"``)."""
    loads = layer_expert_loads(
        layer, a, ep=ep, redundant_experts=redundant_experts, rng=rng, expert_loads=expert_loads
    )
    return 1.0 if loads is None else imbalance_factor(loads, ep, redundant_experts)


def context_imbalance(
    a: Assumptions, *, requests: int, ep: int, rng: np.random.Generator | None = None
) -> float:
    """Attention work of the GPU with the most cached context over the mean, when each of the
    ``ep`` GPUs holds ``requests`` requests whose contexts are gamma distributed with the
    assumption set's coefficient of variation (1 when it is 0)."""
    check_count("requests per GPU", requests)
    if a.context_cv == 0:
        return 1.0
    if not isinstance(rng, np.random.Generator):
        raise ClusterInputError(
            f"assumption set {a.name!r} samples request contexts; pass a numpy Generator as rng"
        )
    shape = 1.0 / a.context_cv**2
    per_gpu = rng.gamma(shape, 1.0 / shape, size=(ep, requests)).sum(axis=1)
    return max(1.0, float(per_gpu.max() / per_gpu.mean()))


def price_layers(
    layers: Sequence[LayerOps],
    hw: Hardware,
    a: Assumptions,
    *,
    ep: int,
    redundant_experts: int = 0,
    rng: np.random.Generator | None = None,
    expert_loads: ExpertLoads | None = None,
    attention_imbalance: float = 1.0,
    memo: dict[object, float] | None = None,
) -> tuple[StageTimes, ...]:
    """Price every layer; ``expert_loads`` is one histogram for all layers or one per layer.
    ``memo`` (optional) keeps the seconds of ops met before, for layers that repeat."""
    memo = {} if memo is None else memo
    if expert_loads is None and a.routing == "balanced":
        return _price_balanced(
            layers, hw, a, ep=ep, redundant_experts=redundant_experts,
            attention_imbalance=attention_imbalance, memo=memo,
        )  # fmt: skip
    per_layer = loads_per_layer(expert_loads, len(layers))
    histograms = [
        layer_expert_loads(
            layer, a, ep=ep, redundant_experts=redundant_experts, rng=rng, expert_loads=loads
        )
        for layer, loads in zip(layers, per_layer, strict=True)
    ]
    factors = [1.0] * len(layers)
    by_size: dict[int, list[int]] = {}
    for i, loads in enumerate(histograms):
        if loads is not None:
            by_size.setdefault(loads.size, []).append(i)
    for indices in by_size.values():  # pack all layers of one expert count at once
        batch = imbalance_factors(np.stack([histograms[i] for i in indices]), ep, redundant_experts)
        for i, factor in zip(indices, batch, strict=True):
            factors[i] = float(factor)
    _check_imbalance(attention_imbalance)
    fixed_by_layer: dict[tuple[int, int], tuple[LayerOps, _Fixed]] = {}  # layers sharing ops
    priced = []
    for layer, imbalance in zip(layers, factors, strict=True):
        key = (id(layer.ops), id(layer.comms))
        entry = fixed_by_layer.get(key)
        if entry is None or entry[0].ops is not layer.ops or entry[0].comms is not layer.comms:
            entry = fixed_by_layer[key] = (
                layer,
                _fixed_parts(layer, hw, a, attention_imbalance, memo),
            )
        priced.append(
            _with_experts(
                layer.kind,
                entry[1],
                hw,
                a,
                ep=ep,
                redundant_experts=redundant_experts,
                imbalance=imbalance,
            )
        )
    return tuple(priced)


def _price_balanced(
    layers: Sequence[LayerOps],
    hw: Hardware,
    a: Assumptions,
    *,
    ep: int,
    redundant_experts: int,
    attention_imbalance: float,
    memo: dict[object, float],
) -> tuple[StageTimes, ...]:
    """Balanced routing: every layer's imbalance is 1, so layers sharing op records share
    their stage times, priced once."""
    _check_imbalance(attention_imbalance)
    priced: dict[tuple[int, int], StageTimes] = {}
    out = []
    for layer in layers:
        key = (id(layer.ops), id(layer.comms))
        if key not in priced:
            layer_expert_loads(layer, a, ep=ep, redundant_experts=redundant_experts)  # checks
            fixed = _fixed_parts(layer, hw, a, attention_imbalance, memo)
            priced[key] = _with_experts(
                layer.kind, fixed, hw, a, ep=ep, redundant_experts=redundant_experts,
                imbalance=1.0,
            )  # fmt: skip
        out.append(priced[key])
    return tuple(out)


# -- whole decode step / training layer -----------------------------------------------------


def decode_workload(
    ops_for_tokens: OpsForTokens,
    *,
    hardware: Hardware,
    assumptions: Assumptions,
    ep: int,
    batch_per_device: int,
    mtp_draft_tokens: int = 0,
    mtp_accept: float = 0.0,
    redundant_experts: int = 0,
    rng: np.random.Generator | None = None,
    expert_loads: ExpertLoads | None = None,
    step_ops_for_tokens: StepOpsForTokens | None = None,
    micro_batches: Sequence[int] = (1, 2),
) -> DecodeWorkload:
    """Price one decode step on one GPU of an ``ep``-way expert-parallel deployment.

    ``ops_for_tokens(n)`` lists the layers' ops for ``n`` query tokens on this GPU. It is called
    for the whole batch when ``micro_batches`` holds 1 (``sequential``, ``sbo``) and for the
    larger of two micro-batches (ceil(batch / 2) requests) when it holds 2 (``tbo``); sampled
    terms are drawn in that order, the whole batch first. Each request carries
    1 + ``mtp_draft_tokens`` query tokens. ``step_ops_for_tokens(n)`` (optional) lists work
    outside the layers (embedding, LM head, MTP draft), priced sequentially into
    ``overhead_s`` with the assumption set's fixed per-step overhead.
    """
    check_count("batch per device", batch_per_device)
    check_count("EP size", ep)
    check_count("MTP draft tokens", mtp_draft_tokens, allow_zero=True)
    splits = tuple(micro_batches)
    if not splits or any(n not in (1, 2) for n in splits):
        raise ClusterInputError(
            f"micro_batches must hold 1 (whole batch) and/or 2 (two micro-batches), got {splits}"
        )
    queries = 1 + mtp_draft_tokens
    tokens = batch_per_device * queries
    common = dict(ep=ep, redundant_experts=redundant_experts, rng=rng, expert_loads=expert_loads)
    memo: dict[object, float] = {}
    priced: dict[int, tuple[StageTimes, ...]] = {1: (), 2: ()}
    for split in (1, 2):
        if split not in splits:
            continue
        requests = math.ceil(batch_per_device / split)
        ctx = context_imbalance(assumptions, requests=requests, ep=ep, rng=rng)
        priced[split] = price_layers(
            ops_for_tokens(requests * queries),
            hardware,
            assumptions,
            attention_imbalance=ctx,
            memo=memo,
            **common,
        )
    overhead = assumptions.step_overhead_s
    if step_ops_for_tokens is not None:
        overhead += sum(
            compute_time(op, hardware, assumptions) for op in step_ops_for_tokens(tokens)
        )
    return DecodeWorkload(
        layers=priced[1],
        layers_half=priced[2],
        batch_per_device=batch_per_device,
        tokens_per_step=tokens,
        mtp_draft_tokens=mtp_draft_tokens,
        mtp_accept=mtp_accept,
        gpu_hour_usd=hardware.gpu_hour_usd,
        overhead_s=overhead,
    )


def train_layer_times(
    forward: LayerOps,
    backward: LayerOps,
    *,
    hardware: Hardware,
    assumptions: Assumptions,
    ep: int,
    redundant_experts: int = 0,
    rng: np.random.Generator | None = None,
    expert_loads: np.ndarray | None = None,
    weight_grad: LayerOps | None = None,
) -> TrainLayerTimes:
    """Forward and backward stage times of one layer for one token chunk. The backward pass
    meets the same routing as the forward, so both use one imbalance factor. ``weight_grad``
    (optional) holds the weight-gradient ops, ``backward`` then the input gradient only."""
    imbalance = layer_imbalance(
        forward,
        assumptions,
        ep=ep,
        redundant_experts=redundant_experts,
        rng=rng,
        expert_loads=expert_loads,
    )

    def times(layer: LayerOps) -> StageTimes:
        return layer_stage_times(
            layer,
            hardware,
            assumptions,
            ep=ep,
            redundant_experts=redundant_experts,
            imbalance=imbalance,
        )

    return TrainLayerTimes(
        forward=times(forward),
        backward=times(backward),
        weight_grad={} if weight_grad is None else dict(times(weight_grad).compute),
    )


# -- checks ---------------------------------------------------------------------------------


def _check_imbalance(imbalance: float) -> None:
    if not (math.isfinite(imbalance) and imbalance >= 1.0):
        raise ClusterInputError(f"imbalance factor must be a finite number >= 1, got {imbalance}")


def loads_per_layer(loads: ExpertLoads | None, n_layers: int) -> list[np.ndarray | None]:
    if loads is None:
        return [None] * n_layers
    if isinstance(loads, np.ndarray) and loads.ndim == 1:
        return [loads] * n_layers
    per_layer = list(loads)
    if len(per_layer) != n_layers:
        raise ClusterInputError(
            f"got {len(per_layer)} expert load histograms for {n_layers} layers; give one per "
            f"layer or a single 1-D histogram for all"
        )
    return per_layer


__all__ = [
    "collective_time",
    "compute_time",
    "context_imbalance",
    "decode_workload",
    "ep_comm_time",
    "ep_traffic_shares",
    "expert_time",
    "layer_expert_loads",
    "layer_imbalance",
    "layer_stage_times",
    "loads_per_layer",
    "price_layers",
    "roofline_time",
    "train_layer_times",
]
