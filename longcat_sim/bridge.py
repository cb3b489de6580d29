"""The one adapter between the model and the cluster: ``model.costs`` op counts become the
cluster's own op records (``cluster.ops``), priced by ``cluster.costmodel`` into workloads.

Deployment mapping (decode):
- attention and dense FFNs run data-parallel on each GPU's own requests; ``attention_tp`` > 1
  splits attention heads over a TP group (GQA models, Qwen3 in the paper's Table 7), so each
  GPU reads 1/tp of the attention weights for the group's tokens (same FLOPs and KV bytes per
  GPU); ``ffn_tp`` is passed to ``model.costs`` (dense FFN tensor parallelism).
- every request carries 1 + draft query tokens; they attend over the same cache entries, which
  an MLA/GQA decode kernel reads once per request, so the attention op's cache read is divided
  by the queries per request.
- dense projections and FFNs use the assumption set's ``linear_precision``, routed experts its
  ``expert_precision`` (1 byte per weight in FP8, 2 in BF16); activations are BF16, dispatch is
  FP8 (1 B/element) and combine BF16 (2 B/element); the KV cache is BF16 or FP8 per
  ``attention_dtype``. The router classifier keeps its float32 weights.
- the MTP draft (one dense layer and the shared LM head, per draft token) and the LM head of
  the verified tokens are priced as per-step work outside the layers.

Training mapping: ``model.costs`` phase "train" for one MoE token chunk per GPU; attention runs
with context parallelism ``cp`` (each GPU holds 1/cp of every sequence and all-gathers the
compressed KV of the others; the gather sits on the attention stage's critical path), experts
over an ``ep`` group, every matmul's backward split into input and weight gradient, the
attention core's backward priced as a deterministic FlashAttention gradient (score recomputation,
LongCat's 0.95x kernel speed).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Literal

import numpy as np

from longcat_sim import stages as S
from longcat_sim.cluster import costmodel
from longcat_sim.cluster.assumptions import Assumptions, with_router_spread
from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.cluster.hardware import Hardware, Precision
from longcat_sim.cluster.ops import CommOp, ComputeOp, ExpertOp, LayerOps
from longcat_sim.cluster.placement import check_count
from longcat_sim.cluster.workload import DecodeWorkload, StageTimes, TrainLayerTimes, TrainWorkload
from longcat_sim.model import costs
from longcat_sim.model.config import ConfigError, ModelConfig

AttentionDtype = Literal["bf16", "fp8"]
TrainEpComm = Literal["all_to_all", "allgather"]

_MATMUL_KINDS = frozenset({"gemm", "grouped_gemm", "router"})
_BYTES: dict[str, int] = {"bf16": 2, "fp8": 1}


# -- model.costs -> cluster.ops -------------------------------------------------------------


def _compute_op(
    op: costs.OpCost,
    *,
    linear_bytes: float,
    attention_precision: Precision,
    linear_precision: Precision,
    kv_read_share: float,
    attention_tp: int,
) -> ComputeOp:
    kind = {"gemm": "gemm", "router": "gemm", "attention": "attention", "memory": "vector"}[op.kind]
    weights = op.weight_bytes if op.kind == "router" else op.weight_bytes * linear_bytes
    if op.stage in S.ATTENTION_STAGES and op.kind == "gemm":
        weights /= attention_tp
    kv = op.kv_bytes * kv_read_share if op.kind == "attention" else op.kv_bytes
    if op.kind == "attention":
        precision = attention_precision
    elif op.kind == "gemm":
        precision = linear_precision
    else:
        precision = "bf16"
    return ComputeOp(
        name=op.name,
        stage=op.stage,
        kind=kind,
        flops=op.flops,
        weight_bytes=weights,
        act_bytes=op.act_bytes,
        kv_bytes=kv,
        precision=precision,
    )


def _expert_op(
    op: costs.OpCost,
    layer: costs.LayerCost,
    *,
    expert_share: float,
    expert_bytes: float,
    n_experts: int,
    precision: Precision,
) -> ExpertOp:
    pairs = layer.expert_pairs
    per_pair = (lambda x: x / pairs) if pairs > 0 else (lambda x: 0.0)
    weights = layer.expert_weight_bytes * expert_share * expert_bytes if op.weight_bytes else 0.0
    return ExpertOp(
        name=op.name,
        stage=op.stage,
        pairs=pairs,
        flops_per_pair=per_pair(op.flops),
        act_bytes_per_pair=per_pair(op.act_bytes),
        expert_weight_bytes=weights,
        n_experts=n_experts,
        precision=precision if op.kind == "grouped_gemm" else "bf16",
    )


def _comm_op(comm: costs.CommCost, *, ffn_tp: int) -> CommOp:
    if comm.collective == "all_to_all":
        return CommOp(comm.name, comm.stage, comm.stage, comm.bytes)  # dispatch / combine
    return CommOp(comm.name, comm.stage, comm.collective, comm.bytes, group=ffn_tp)


def layer_ops(
    layer: costs.LayerCost,
    cfg: ModelConfig,
    a: Assumptions,
    *,
    direction: costs.Direction = "fwd",
    attention_dtype: AttentionDtype = "bf16",
    queries_per_request: int = 1,
    attention_tp: int = 1,
    ffn_tp: int = 1,
) -> LayerOps:
    """Convert one ``model.costs`` layer, costed with 1 byte per weight element, to cluster ops.

    Only ops and comms of ``direction`` are kept (training layers carry both).
    """
    linear_bytes = _BYTES[a.linear_precision]
    expert_bytes = _BYTES[a.expert_precision]
    attention_precision: Precision = (
        "fp8" if attention_dtype == "fp8" and a.fp8_attention_math else "bf16"
    )
    grouped = [op for op in layer.ops if op.kind == "grouped_gemm" and op.direction == direction]
    grouped_weights = sum(op.weight_bytes for op in grouped)
    ops: list[ComputeOp | ExpertOp] = []
    for op in layer.ops:
        if op.direction != direction:
            continue
        if op.stage == S.ROUTED_EXPERTS:
            share = op.weight_bytes / grouped_weights if grouped_weights else 0.0
            ops.append(
                _expert_op(
                    op,
                    layer,
                    expert_share=share,
                    expert_bytes=expert_bytes,
                    n_experts=cfg.n_routed_experts,
                    precision=a.expert_precision,
                )
            )
        else:
            ops.append(
                _compute_op(
                    op,
                    linear_bytes=linear_bytes,
                    attention_precision=attention_precision,
                    linear_precision=a.linear_precision,
                    kv_read_share=1.0 / queries_per_request,
                    attention_tp=attention_tp,
                )
            )
    comms = tuple(
        _comm_op(comm, ffn_tp=ffn_tp) for comm in layer.comms if comm.direction == direction
    )
    return LayerOps(index=layer.index, kind=layer.kind, ops=tuple(ops), comms=comms)


# -- decode ---------------------------------------------------------------------------------


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ClusterInputError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def decode_layer_ops(
    cfg: ModelConfig,
    a: Assumptions,
    *,
    tokens: int,
    context: float,
    attention_dtype: AttentionDtype = "bf16",
    queries_per_request: int = 1,
    attention_tp: int = 1,
    ffn_tp: int = 1,
    k_ffn: float | None = None,
) -> tuple[LayerOps, ...]:
    """Every layer's ops for ``tokens`` decode query tokens on one GPU."""
    return _layers_ops(
        cfg,
        a,
        (("tokens", tokens), ("context", context), ("phase", "decode")),
        attention_dtype=attention_dtype,
        queries_per_request=queries_per_request,
        attention_tp=attention_tp,
        ffn_tp=ffn_tp,
        k_ffn=k_ffn,
    )


@functools.lru_cache(maxsize=1024)
def _layers_ops(
    cfg: ModelConfig,
    a: Assumptions,
    shape: tuple[tuple[str, object], ...],
    *,
    attention_dtype: AttentionDtype,
    attention_tp: int,
    ffn_tp: int,
    k_ffn: float | None,
    queries_per_request: int = 1,
    relay_copies: float = 0.0,
) -> tuple[LayerOps, ...]:
    """Every layer's ops for ``model.costs`` ``shape`` (tokens, context, phase, prefix as
    (name, value) pairs); ``relay_copies`` > 0: dispatch and combine by throughput kernels
    (:func:`_relayed`). Ops do not depend on the hardware or the parallel layout, so
    configurations that differ only there share them (a bounded cache of frozen records).

    ``model.costs`` prices a layer from its kind alone (tests/test_bridge.py checks it), so one
    layer of each kind is costed and converted, and the layers of a kind share its op records.
    """
    kinds = costs.layer_kinds(cfg)
    layers = costs.layer_costs(
        _one_layer_per_kind(cfg, kinds),
        **dict(shape),
        k_ffn=k_ffn,
        weight_bytes=1,
        act_bytes=2,
        kv_bytes=_BYTES[attention_dtype],
        dispatch_bytes=1,
        combine_bytes=2,
        ffn_tp=ffn_tp,
    )
    by_kind: dict[str, LayerOps] = {}
    for layer in layers:
        if layer.kind not in by_kind:
            by_kind[layer.kind] = _relayed(
                layer_ops(
                    layer,
                    cfg,
                    a,
                    attention_dtype=attention_dtype,
                    queries_per_request=queries_per_request,
                    attention_tp=attention_tp,
                    ffn_tp=ffn_tp,
                ),
                relay_copies,
            )
    return tuple(
        LayerOps(index, kind, by_kind[kind].ops, by_kind[kind].comms)
        for index, kind in enumerate(kinds)
    )


def clear_op_cache() -> None:
    """Forget the op lists kept for configurations priced before (benchmarks start cold)."""
    _layers_ops.cache_clear()
    decode_step_ops.cache_clear()


@functools.lru_cache(maxsize=64)
def _one_layer_per_kind(cfg: ModelConfig, kinds: tuple[str, ...]) -> ModelConfig:
    """The shallowest version of ``cfg`` that still holds every kind of layer it has."""
    depth = max(kinds.index(kind) for kind in set(kinds)) + 1
    if depth == cfg.num_layers:
        return cfg
    try:
        return cfg.replace(num_layers=depth)
    except ConfigError:
        return cfg


@functools.lru_cache(maxsize=64)
def _mtp_layer_config(cfg: ModelConfig) -> ModelConfig:
    """The MTP draft layer as a one-layer dense model (attention + dense FFN)."""
    return cfg.replace(
        name=f"{cfg.name}-mtp",
        num_layers=1,
        layer_type="standard",
        first_k_dense_layers=1,
        n_shared_experts=0,
    )


@functools.lru_cache(maxsize=1024)
def decode_step_ops(
    cfg: ModelConfig,
    a: Assumptions,
    *,
    tokens: int,
    requests: int,
    context: float,
    attention_dtype: AttentionDtype = "bf16",
    mtp_draft_tokens: int = 0,
) -> tuple[ComputeOp, ...]:
    """Work of one decode step outside the layers: embedding and LM head of the ``tokens``
    verified, then per draft token the MTP layer (eh_proj, attention, dense FFN) and the LM
    head for the ``requests``. The LM head keeps BF16 weights. Kept in a bounded cache of
    frozen records, like the layers' ops (they do not depend on hardware or layout)."""

    def convert(ops: Sequence[costs.OpCost], linear_bytes: float) -> list[ComputeOp]:
        return [
            _compute_op(
                op,
                linear_bytes=linear_bytes,
                attention_precision="bf16",
                linear_precision=a.linear_precision if linear_bytes == 1 else "bf16",
                kv_read_share=1.0,
                attention_tp=1,
            )
            for op in ops
        ]

    head = costs.head_costs(cfg, tokens=tokens, phase="decode", weight_bytes=1)
    ops = convert(head, linear_bytes=2)
    if mtp_draft_tokens:
        mtp_cfg = _mtp_layer_config(cfg)
        (mtp_layer,) = costs.layer_costs(
            mtp_cfg,
            tokens=requests,
            context=context,
            phase="decode",
            weight_bytes=1,
            kv_bytes=_BYTES[attention_dtype],
        )
        h = cfg.hidden_size
        eh_proj = ComputeOp(
            "mtp.eh_proj",
            "mtp",
            "gemm",
            flops=2 * requests * 2 * h * h,
            weight_bytes=2 * h * h * _BYTES[a.linear_precision],
            act_bytes=requests * 3 * h * 2,
            precision=a.linear_precision,
        )
        draft_head = costs.head_costs(cfg, tokens=requests, phase="decode", weight_bytes=1)
        one_draft = [eh_proj, *convert(mtp_layer.ops, _BYTES[a.linear_precision])]
        one_draft += convert(draft_head, linear_bytes=2)
        ops += one_draft * mtp_draft_tokens
    return tuple(ops)


def decode_workload(
    cfg: ModelConfig,
    *,
    hardware: Hardware,
    assumptions: Assumptions,
    ep: int,
    batch_per_device: int,
    context: float,
    attention_dtype: AttentionDtype = "bf16",
    mtp_draft_tokens: int = 0,
    mtp_accept: float = 0.0,
    redundant_experts: int = 0,
    rng: np.random.Generator | None = None,
    expert_loads: costmodel.ExpertLoads | None = None,
    attention_tp: int = 1,
    ffn_tp: int = 1,
    k_ffn: float | None = None,
    step_work: bool | None = None,
    micro_batches: Sequence[int] = (1, 2),
) -> DecodeWorkload:
    """Price one decode step of ``cfg`` on one GPU of an ``ep``-way deployment.

    ``context``: cached tokens each request attends to. ``step_work`` adds the LM head and MTP
    draft outside the layers (``overhead_s``; default: the assumption set's ``step_work``); the
    assumption set's fixed per-step overhead is always added. ``micro_batches``: price the whole
    batch (1: ``sequential``, ``sbo``), the two micro-batches (2: ``tbo``) or both.
    """
    if step_work is None:
        step_work = assumptions.step_work
    _check_choice("attention dtype", attention_dtype, ("bf16", "fp8"))
    check_count("attention TP size", attention_tp)
    check_count("FFN TP size", ffn_tp)
    if isinstance(context, bool) or not isinstance(context, int | float) or not context >= 1:
        raise ClusterInputError(f"context must be a number >= 1 (cached tokens), got {context!r}")
    queries = 1 + mtp_draft_tokens if isinstance(mtp_draft_tokens, int) else 1

    def ops_for_tokens(tokens: int) -> tuple[LayerOps, ...]:
        return decode_layer_ops(
            cfg,
            assumptions,
            tokens=tokens,
            context=context,
            attention_dtype=attention_dtype,
            queries_per_request=queries,
            attention_tp=attention_tp,
            ffn_tp=ffn_tp,
            k_ffn=k_ffn,
        )

    def step_ops(tokens: int) -> tuple[ComputeOp, ...]:
        return decode_step_ops(
            cfg,
            assumptions,
            tokens=tokens,
            requests=batch_per_device,
            context=context,
            attention_dtype=attention_dtype,
            mtp_draft_tokens=mtp_draft_tokens,
        )

    return costmodel.decode_workload(
        ops_for_tokens,
        hardware=hardware,
        assumptions=with_router_spread(assumptions, cfg.name)[0],
        ep=ep,
        batch_per_device=batch_per_device,
        mtp_draft_tokens=mtp_draft_tokens,
        mtp_accept=mtp_accept,
        redundant_experts=redundant_experts,
        rng=rng,
        expert_loads=expert_loads,
        step_ops_for_tokens=step_ops if step_work else None,
        micro_batches=micro_batches,
    )


# -- prefill --------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def prefill_assumptions(a: Assumptions) -> Assumptions:
    """The assumption set as prefill sees it: its prefill compute fractions and the throughput
    ("normal") kernels' link fractions for dispatch and combine; request contexts do not vary
    within a prefill batch (prompt lengths enter as a distribution, :func:`prefill_layer_ops`)."""
    return a.replace(
        gemm_flop_fraction=a.prefill_gemm_flop_fraction,
        expert_flop_fraction=a.prefill_expert_flop_fraction,
        attention_flop_fraction=a.prefill_attention_flop_fraction,
        ep_nvlink_fraction=a.ep_normal_nvlink_fraction,
        ep_rdma_fraction=a.ep_normal_rdma_fraction,
        context_cv=0.0,
    )


def _relayed(layer: LayerOps, copies_per_token: float) -> LayerOps:
    """Dispatch and combine as throughput kernels that relay each token once per node."""
    comms = tuple(
        dataclasses.replace(c, copies_per_token=copies_per_token)
        if c.pattern in (S.DISPATCH, S.COMBINE) and copies_per_token > 0
        else c
        for c in layer.comms
    )
    return LayerOps(layer.index, layer.kind, layer.ops, comms)


def prefill_layer_ops(
    cfg: ModelConfig,
    a: Assumptions,
    *,
    tokens: int,
    prompt_len: float,
    prompt_cv: float = 0.0,
    prefix_hit: float = 0.0,
    chunk_size: int | None = None,
    attention_dtype: AttentionDtype = "bf16",
    attention_tp: int = 1,
    ffn_tp: int = 1,
    k_ffn: float | None = None,
) -> tuple[LayerOps, ...]:
    """Every layer's ops for ``tokens`` prompt tokens computed on one GPU.

    Prompts are ``prompt_len`` tokens on average with coefficient of variation ``prompt_cv``;
    a share ``prefix_hit`` of each is already cached (its compute skipped, its cache read).
    Causal attention work per computed token grows with E[L^2] / E[L] = L (1 + cv^2): the
    batch is priced as prompts of that effective length L', each new part n = L' (1 - h)
    following a cached prefix h L'. Chunks of ``chunk_size`` c < n leave the attention total
    unchanged (each chunk attends to the chunks before it) but each chunk reads, and under
    MLA re-projects, its prompt's cache so far: on average h L' + (n - c) / 2 entries.
    MLA runs non-absorbed (prefill's FLOP-optimal form)."""
    effective = prompt_len * (1.0 + prompt_cv**2)
    new = max(1.0, effective * (1.0 - prefix_hit))
    segment, prefix = new, effective * prefix_hit
    if chunk_size is not None and chunk_size < new:
        segment, prefix = float(chunk_size), prefix + (new - chunk_size) / 2
    return _layers_ops(
        cfg,
        a,
        (
            ("tokens", tokens),
            ("context", segment),
            ("phase", "prefill"),
            ("prefix", prefix),
        ),
        attention_dtype=attention_dtype,
        attention_tp=attention_tp,
        ffn_tp=ffn_tp,
        k_ffn=k_ffn,
        relay_copies=cfg.target_ffn_experts if k_ffn is None else k_ffn,
    )


def prefill_step_ops(cfg: ModelConfig, *, prompts: float) -> tuple[ComputeOp, ...]:
    """Work of one prefill forward outside the layers: the final norm and LM head of each
    prompt's last token (BF16 weights); the embedding lookup is negligible."""
    head = costs.head_costs(cfg, tokens=max(prompts, 1.0), phase="prefill", weight_bytes=1)
    return tuple(
        _compute_op(
            op,
            linear_bytes=2,
            attention_precision="bf16",
            linear_precision="bf16",
            kv_read_share=1.0,
            attention_tp=1,
        )
        for op in head
        if op.stage == "head"
    )


def stretch_compute(workload: DecodeWorkload, factor: float) -> DecodeWorkload:
    """Every compute stage ``factor`` times slower (compute that shares the GPU's SMs with
    overlapping communication kernels)."""

    stretched: dict[int, StageTimes] = {}  # layers that share stage times stretch once

    def stretch(st: StageTimes) -> StageTimes:
        if id(st) not in stretched:
            compute = {k: v * factor for k, v in st.compute.items()}
            stretched[id(st)] = StageTimes(st.kind, compute, st.comm, st.comm_link)
        return stretched[id(st)]

    return dataclasses.replace(
        workload,
        layers=tuple(stretch(st) for st in workload.layers),
        layers_half=tuple(stretch(st) for st in workload.layers_half),
    )


def prefill_workload(
    cfg: ModelConfig,
    *,
    hardware: Hardware,
    assumptions: Assumptions,
    ep: int,
    tokens_per_device: int,
    prompt_len: float,
    prompt_cv: float = 0.0,
    prefix_hit: float = 0.0,
    chunk_size: int | None = None,
    attention_dtype: AttentionDtype = "bf16",
    redundant_experts: int = 0,
    rng: np.random.Generator | None = None,
    attention_tp: int = 1,
    ffn_tp: int = 1,
    micro_batches: int = 1,
    overlapped: bool = False,
) -> DecodeWorkload:
    """Price one prefill forward of ``tokens_per_device`` computed prompt tokens on one GPU of
    an ``ep``-way deployment, as a one-step workload (its ``batch_per_device`` and
    ``tokens_per_step`` are the tokens). ``micro_batches`` 2 prices the two halves (TBO);
    ``overlapped`` (TBO, SBO) stretches compute by the SMs the communication kernels hold."""
    check_count("tokens per device", tokens_per_device)
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, int | float) or prompt_len < 1:
        raise ClusterInputError(f"prompt length must be a number >= 1, got {prompt_len!r}")
    a = prefill_assumptions(assumptions)

    def ops_for_tokens(tokens: int) -> tuple[LayerOps, ...]:
        return prefill_layer_ops(
            cfg,
            a,
            tokens=tokens,
            prompt_len=prompt_len,
            prompt_cv=prompt_cv,
            prefix_hit=prefix_hit,
            chunk_size=chunk_size,
            attention_dtype=attention_dtype,
            attention_tp=attention_tp,
            ffn_tp=ffn_tp,
        )

    prompts = tokens_per_device / max(1.0, prompt_len * (1.0 - prefix_hit))
    workload = costmodel.decode_workload(
        ops_for_tokens,
        hardware=hardware,
        assumptions=with_router_spread(a, cfg.name)[0],
        ep=ep,
        batch_per_device=tokens_per_device,
        redundant_experts=redundant_experts,
        rng=rng,
        step_ops_for_tokens=lambda _tokens: prefill_step_ops(cfg, prompts=prompts),
        micro_batches=(micro_batches,),
    )
    if overlapped and a.comm_sm_share:
        workload = stretch_compute(workload, 1.0 / (1.0 - a.comm_sm_share))
    return workload


# -- training -------------------------------------------------------------------------------


def _split_backward(layer: LayerOps) -> tuple[LayerOps, LayerOps]:
    """(input-gradient ops, weight-gradient ops): each matmul backward (2x forward FLOPs) is
    half input gradient, half weight gradient; attention and memory ops are input gradient."""
    dgrad: list[ComputeOp | ExpertOp] = []
    wgrad: list[ComputeOp | ExpertOp] = []
    for op in layer.ops:
        has_weights = (
            op.expert_weight_bytes > 0 if isinstance(op, ExpertOp) else op.weight_bytes > 0
        )
        is_matmul = isinstance(op, ExpertOp) or op.kind == "gemm"
        if not (is_matmul and has_weights):
            dgrad.append(op)
            continue
        if isinstance(op, ExpertOp):
            half = {
                "flops_per_pair": op.flops_per_pair / 2,
                "act_bytes_per_pair": op.act_bytes_per_pair / 2,
                "expert_weight_bytes": op.expert_weight_bytes / 2,
            }
        else:
            half = {
                "flops": op.flops / 2,
                "weight_bytes": op.weight_bytes / 2,
                "act_bytes": op.act_bytes / 2,
            }
        dgrad.append(_replace(op, name=f"{op.name}.dgrad", **half))
        wgrad.append(_replace(op, name=f"{op.name}.wgrad", **half))
    return (
        LayerOps(layer.index, layer.kind, tuple(dgrad), layer.comms),
        LayerOps(layer.index, layer.kind, tuple(wgrad)),
    )


def _replace(op: ComputeOp | ExpertOp, **changes: float | str) -> ComputeOp | ExpertOp:
    return dataclasses.replace(op, **changes)


# FlashAttention's backward recomputes the attention scores: five matmuls against the forward's
# two (FlashAttention-2, Dao 2023, sec. 3), 2.5x the forward FLOPs where model.costs counts 2x.
FLASH_BACKWARD_FLOPS = 2.5 / 2.0
# LongCat-Flash's deterministic FlashAttention gradient runs at 0.95x the speed of the
# non-deterministic kernel (arXiv 2509.01322 sec. 5.2).
DETERMINISTIC_FAG_SPEED = 0.95


def _deterministic_flash_backward(layer: LayerOps) -> LayerOps:
    """The backward attention core priced as LongCat trains it: score recomputation and the
    deterministic kernel's speed, as extra FLOPs at the attention rate."""
    factor = FLASH_BACKWARD_FLOPS / DETERMINISTIC_FAG_SPEED
    ops = tuple(
        _replace(op, flops=op.flops * factor)
        if isinstance(op, ComputeOp) and op.kind == "attention"
        else op
        for op in layer.ops
    )
    return LayerOps(layer.index, layer.kind, ops, layer.comms)


def _cp_gather_seconds(
    cfg: ModelConfig, hw: Hardware, a: Assumptions, *, tokens: int, cp: int, act_bytes: int
) -> float:
    """One attention block's context-parallel all-gather of the compressed KV (MLA latent +
    rope key; GQA keys and values) of the other ``cp - 1`` ranks."""
    if cp == 1:
        return 0.0
    entry = costs.kv_cache_entry_elements(cfg)
    op = CommOp("cp.all_gather", "cp", "all_gather", (cp - 1) * tokens * entry * act_bytes, cp)
    return costmodel.collective_time(op, hw, a)


def _add_to_stages(st: StageTimes, extra: dict[str, float]) -> StageTimes:
    compute = dict(st.compute)
    for stage, seconds in extra.items():
        if stage in compute:
            compute[stage] += seconds
    return StageTimes(kind=st.kind, compute=compute, comm=st.comm, comm_link=st.comm_link)


def _train_ep_comms(layer: LayerOps, *, ep: int, hidden: int, tokens: int) -> LayerOps:
    """Dispatch/combine as LongCat's pipelined all-gather / reduce-scatter over the EP group:
    every rank sends its chunk to the other ep - 1 ranks (BF16)."""
    comms = []
    for comm in layer.comms:
        if comm.pattern in (S.DISPATCH, S.COMBINE):
            pattern = "all_gather" if comm.stage == S.DISPATCH else "reduce_scatter"
            if comm.name.endswith(".bwd"):  # gradients flow the other way
                pattern = "reduce_scatter" if comm.stage == S.DISPATCH else "all_gather"
            volume = (ep - 1) * tokens * hidden * 2
            comm = CommOp(comm.name, comm.stage, pattern, volume, group=ep)
        comms.append(comm)
    return LayerOps(layer.index, layer.kind, layer.ops, tuple(comms))


def train_layer_times(
    cfg: ModelConfig,
    *,
    hardware: Hardware,
    assumptions: Assumptions,
    chunk_tokens: int,
    seq_len: int = 8192,
    ep: int = 32,
    cp: int = 8,
    ep_comm: TrainEpComm = "allgather",
    redundant_experts: int = 0,
    rng: np.random.Generator | None = None,
    expert_loads: costmodel.ExpertLoads | None = None,
    k_ffn: float | None = None,
) -> tuple[TrainLayerTimes, ...]:
    """Forward/backward stage times of every layer for one MoE token chunk of ``chunk_tokens``
    tokens per GPU (BF16 weights and activations; sequences of ``seq_len`` split over ``cp``).

    LongCat-Flash training (arXiv 2509.01322 sec. 5): EP group 32, CP 8, 200 Gb/s RDMA per
    accelerator (``hardware.replace(rdma_gb_s=25)``), dispatch/combine as all-gather /
    reduce-scatter (``ep_comm="allgather"``) or DeepEP-style ``"all_to_all"``.
    """
    check_count("chunk tokens", chunk_tokens)
    check_count("CP size", cp)
    check_count("EP size", ep)
    _check_choice("training EP communication", ep_comm, ("all_to_all", "allgather"))
    if seq_len % cp:
        raise ClusterInputError(f"sequence length {seq_len} must be a multiple of CP size {cp}")
    a = assumptions.replace(linear_precision="bf16", expert_precision="bf16")
    layers = costs.layer_costs(
        cfg,
        tokens=chunk_tokens,
        context=seq_len,
        phase="train",
        k_ffn=k_ffn,
        weight_bytes=1,
        act_bytes=2,
        dispatch_bytes=2,
        combine_bytes=2,
    )
    gather = _cp_gather_seconds(cfg, hardware, a, tokens=chunk_tokens, cp=cp, act_bytes=2)
    if cfg.layer_type == "scmoe":
        cp_stages = {S.ATTENTION_0: gather, S.ATTENTION_1_CORE: gather}
    else:
        cp_stages = {S.ATTENTION_CORE: gather}
    per_layer = costmodel.loads_per_layer(expert_loads, len(layers))
    out = []
    for layer, loads in zip(layers, per_layer, strict=True):
        fwd = layer_ops(layer, cfg, a, direction="fwd")
        bwd = _deterministic_flash_backward(layer_ops(layer, cfg, a, direction="bwd"))
        if ep_comm == "allgather":
            fwd = _train_ep_comms(fwd, ep=ep, hidden=cfg.hidden_size, tokens=chunk_tokens)
            bwd = _train_ep_comms(bwd, ep=ep, hidden=cfg.hidden_size, tokens=chunk_tokens)
        dgrad, wgrad = _split_backward(bwd)
        times = costmodel.train_layer_times(
            fwd,
            dgrad,
            hardware=hardware,
            assumptions=a,
            ep=ep,
            redundant_experts=redundant_experts,
            rng=rng,
            expert_loads=loads,
            weight_grad=wgrad,
        )
        out.append(
            TrainLayerTimes(
                forward=_add_to_stages(times.forward, cp_stages),
                backward=_add_to_stages(times.backward, cp_stages),
                weight_grad=times.weight_grad,
            )
        )
    return tuple(out)


def train_workload(
    cfg: ModelConfig,
    *,
    hardware: Hardware,
    assumptions: Assumptions,
    microbatch_tokens: int,
    microbatches: int,
    pipeline_stages: int,
    data_parallel: int,
    seq_len: int = 8192,
    ep: int = 32,
    cp: int = 8,
    moe_chunks: int = 2,
    ep_comm: TrainEpComm = "allgather",
    redundant_experts: int = 0,
    rng: np.random.Generator | None = None,
) -> TrainWorkload:
    """One training step of one pipeline stage. ``microbatch_tokens`` per GPU per micro-batch
    (split into ``moe_chunks`` chunks); the stage holds num_layers / pipeline_stages layers;
    ``data_parallel`` replicas of the ep x pipeline_stages grid make the GPU count."""
    for name, value in (
        ("microbatch tokens", microbatch_tokens),
        ("micro-batches", microbatches),
        ("pipeline stages", pipeline_stages),
        ("data parallel size", data_parallel),
        ("MoE chunks", moe_chunks),
    ):
        check_count(name, value)
    if cfg.num_layers % pipeline_stages:
        raise ClusterInputError(
            f"{cfg.num_layers} layers do not split over {pipeline_stages} pipeline stages"
        )
    if microbatch_tokens % moe_chunks:
        raise ClusterInputError(
            f"micro-batch of {microbatch_tokens} tokens does not split into {moe_chunks} chunks"
        )
    layers = train_layer_times(
        cfg,
        hardware=hardware,
        assumptions=with_router_spread(assumptions, cfg.name)[0],
        chunk_tokens=microbatch_tokens // moe_chunks,
        seq_len=seq_len,
        ep=ep,
        cp=cp,
        ep_comm=ep_comm,
        redundant_experts=redundant_experts,
        rng=rng,
    )
    per_stage = cfg.num_layers // pipeline_stages
    gpus = ep * pipeline_stages * data_parallel
    return TrainWorkload(
        layers=layers[:per_stage],
        moe_chunks=moe_chunks,
        microbatches=microbatches,
        pipeline_stages=pipeline_stages,
        tokens_per_step=microbatch_tokens * microbatches * gpus // pipeline_stages,
        gpus=gpus,
        gpu_hour_usd=hardware.gpu_hour_usd,
    )


__all__ = [
    "decode_layer_ops",
    "decode_step_ops",
    "decode_workload",
    "layer_ops",
    "prefill_assumptions",
    "prefill_layer_ops",
    "prefill_step_ops",
    "prefill_workload",
    "stretch_compute",
    "train_layer_times",
    "train_workload",
]
