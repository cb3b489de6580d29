"""Analytic parameter counts, FLOPs and bytes per op of a ``ModelConfig``; no torch, no I/O.

Parameters
    ``total_params`` (main model, no MTP), ``mtp_params``, ``activated_params(cfg, k_ffn)``:
    non-expert weights plus the LM head, excluding the input-embedding lookup, plus ``k_ffn``
    routed experts in every MoE layer (shared experts always active). Router score-correction
    biases are buffers, not parameters, and are not counted. GQA blocks carry per-head
    ``q_norm``/``k_norm`` of ``head_dim`` (Qwen3). ``kv_cache_bytes_per_token``: absorbed MLA
    keeps ``kv_lora_rank + qk_rope_head_dim`` values per attention block; GQA keeps K and V.

Per-op costs
    ``layer_costs(cfg, tokens=..., context=..., phase=...)`` lists each layer's ops
    (``OpCost``) and communication (``CommCost``) for ``tokens`` tokens on one device. Ops are
    named ``<module>.<op>`` and unique within a layer. Kinds: ``gemm``, ``attention`` (core
    attention, softmax fused), ``grouped_gemm`` (routed experts), ``router`` (the fp32
    classifier GEMM) and ``memory`` (norms, RoPE, SwiGLU activation, top-k, cache writes).

Stage names (a contract with ``cluster.workload``)
    scmoe layers: compute ``attn0`` (all of MLA_0 and the norm feeding FFN_0 and the MoE),
    ``ffn0``, ``attn1_qkv`` (MLA_1 up to q/k/v: norms, projections, RoPE, cache write and,
    absorbed, the W_uk absorption), ``attn1_core`` (core attention, W_uv when absorbed,
    ``o_proj``), ``ffn1`` (incl. its input norm), ``router``, ``moe`` (expert GEMMs and
    activation); communication ``dispatch``, ``combine``, and ``ffn0_tp``/``ffn1_tp`` when
    ``ffn_tp > 1``.
    standard layers (``kind`` "moe" or "dense"): compute ``attn_qkv``, ``attn_core`` (incl. the
    post-attention norm), ``ffn`` (dense layers), ``shared`` (shared experts), ``router``,
    ``moe``; communication ``dispatch``, ``combine``, ``ffn_tp``.
    ``head_costs``: ``embed`` and ``head`` (final norm and LM head).

Conventions
    - A multiply-add is 2 FLOPs: a GEMM [m, k] x [k, n] costs 2mkn. Memory ops carry a small
      elementwise FLOP estimate; only gemm, grouped_gemm, router and attention ops are matmuls.
    - ``weight_bytes``: weights read; ``act_bytes``: activations read plus written;
      ``kv_bytes``: KV cache read plus written (decode and prefill; training keeps no cache).
    - Attention per query token and block: non-absorbed MLA 2*heads*(qk_head + v_head)*ctx,
      absorbed MLA 2*heads*(kv_lora + rope)*ctx + 2*heads*kv_lora*ctx, GQA 4*heads*head_dim*ctx,
      with ctx = ``context`` in decode and the causal mean (context + 1)/2 in prefill/train,
      where ``context`` is the sequence length. Decode reads ``context`` cache entries per query
      token (no sharing between query tokens) and writes one.
    - Non-absorbed decode up-projects every cached latent (``kv_b_proj`` over tokens*context
      rows); prefill/train up-project each new token once.
    - Backward (phase "train"): every forward op gets a ``<name>.bwd`` twin in the same stage
      with ``direction="bwd"``, 2x the forward FLOPs (input gradient + weight gradient; for
      attention dQ and dK/dV), 2x the weight bytes (read weights, write gradients) and 2x the
      activation bytes. Dispatch and combine get backward twins carrying gradients at
      ``combine_bytes`` per element; a TP all-gather's backward is a reduce-scatter and back.
    - Forward weight-GEMM FLOPs per token = 2 x (activated params - norm weights), plus the
      attention core (absorbed decode, prefill, train; non-absorbed decode adds its re-projection).
    - Expert GEMMs: ``tokens * k_ffn`` token-expert pairs. Their ``weight_bytes`` assume all
      routed experts on this device with uniform routing, i.e. the expected number of distinct
      experts hit, N (1 - (1 - k/N)^tokens); a simulator spreading experts over EP ranks uses
      ``LayerCost.expert_weight_bytes`` (one expert), ``expert_pairs``,
      ``expert_flops_per_pair`` and ``expert_act_bytes_per_pair`` instead.
    - Dispatch sends tokens*k_ffn*hidden elements (every pair crosses the network; zero-expert
      slots send nothing, their gate*x is added locally for free); combine returns as many.
    - Dense FFN with tensor parallelism ``ffn_tp``: tokens are all-gathered over the TP group,
      each rank multiplies ``tp*tokens`` rows by a 1/tp slice of the weights, and the result is
      reduce-scattered; each collective moves (tp - 1)*tokens*hidden elements per rank.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

from longcat_sim import stages as S
from longcat_sim.model.config import ConfigError, ModelConfig

Phase = Literal["decode", "prefill", "train"]
OpKind = Literal["gemm", "attention", "grouped_gemm", "router", "memory"]
LayerKind = Literal["scmoe", "moe", "dense"]
Direction = Literal["fwd", "bwd"]
Collective = Literal["all_to_all", "all_gather", "reduce_scatter"]

MATMUL_KINDS: frozenset[str] = frozenset({"gemm", "grouped_gemm", "router", "attention"})
ROUTER_WEIGHT_BYTES = 4  # the router classifier stays float32
_PHASES = ("decode", "prefill", "train")


# -- parameter counts ----------------------------------------------------------------------


def mla_params(cfg: ModelConfig) -> int:
    """One MLA block: projections plus the two latent norms (no input norm)."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    qk, rope, kv = cfg.qk_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank:
        q = h * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * heads * qk
    else:
        q = h * heads * qk
    kv_a = h * (kv + rope) + kv
    kv_b = kv * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    o = heads * cfg.v_head_dim * h
    return q + kv_a + kv_b + o


def gqa_params(cfg: ModelConfig) -> int:
    """One GQA block: q/k/v/o projections plus per-head q_norm and k_norm (no input norm)."""
    h, hd = cfg.hidden_size, cfg.head_dim
    q_dim, kv_dim = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return h * q_dim + 2 * h * kv_dim + q_dim * h + 2 * hd


def attention_params(cfg: ModelConfig) -> int:
    return mla_params(cfg) if cfg.attention == "mla" else gqa_params(cfg)


def dense_ffn_params(cfg: ModelConfig, intermediate: int | None = None) -> int:
    """A SwiGLU FFN (gate, up, down) of ``intermediate`` (default ``ffn_hidden_size``)."""
    return 3 * cfg.hidden_size * (cfg.ffn_hidden_size if intermediate is None else intermediate)


def expert_params(cfg: ModelConfig) -> int:
    """One routed (or shared) expert: a SwiGLU FFN of ``expert_ffn_hidden_size``."""
    return dense_ffn_params(cfg, cfg.expert_ffn_hidden_size)


def router_params(cfg: ModelConfig) -> int:
    """The classifier over all FFN and zero-computation experts."""
    return cfg.hidden_size * cfg.num_experts_total


def layer_kinds(cfg: ModelConfig) -> tuple[LayerKind, ...]:
    """``scmoe`` for every LongCat layer; otherwise leading ``dense`` layers, then ``moe``."""
    if cfg.layer_type == "scmoe":
        return ("scmoe",) * cfg.num_layers
    dense = cfg.first_k_dense_layers
    return ("dense",) * dense + ("moe",) * (cfg.num_layers - dense)


def moe_layer_count(cfg: ModelConfig) -> int:
    return sum(kind != "dense" for kind in layer_kinds(cfg))


def _layer_norm_params(cfg: ModelConfig) -> int:
    """RMSNorm weights of one layer outside its attention blocks (input and post norms)."""
    return 2 * cfg.attention_blocks_per_layer * cfg.hidden_size


def layer_dense_params(cfg: ModelConfig, kind: LayerKind) -> int:
    """Parameters of one layer that every token uses: all but the routed experts."""
    attn = cfg.attention_blocks_per_layer * attention_params(cfg)
    norms = _layer_norm_params(cfg)
    if kind == "scmoe":
        return attn + norms + 2 * dense_ffn_params(cfg) + router_params(cfg)
    if kind == "dense":
        return attn + norms + dense_ffn_params(cfg)
    return attn + norms + router_params(cfg) + cfg.n_shared_experts * expert_params(cfg)


def embedding_params(cfg: ModelConfig) -> int:
    return cfg.vocab_size * cfg.hidden_size


def total_params(cfg: ModelConfig) -> int:
    """Every parameter of the main model (embedding, layers, final norm, LM head), no MTP."""
    layers = sum(layer_dense_params(cfg, kind) for kind in layer_kinds(cfg))
    experts = moe_layer_count(cfg) * cfg.n_routed_experts * expert_params(cfg)
    head = 0 if cfg.tie_word_embeddings else embedding_params(cfg)
    return embedding_params(cfg) + layers + experts + cfg.hidden_size + head


def mtp_params(cfg: ModelConfig) -> int:
    """The MTP module: its own embedding, enorm/hnorm, eh_proj (2H -> H), one dense layer
    (attention + dense FFN and their two norms) and a final norm; it shares the LM head."""
    if not cfg.mtp_layers:
        return 0
    h = cfg.hidden_size
    block = attention_params(cfg) + dense_ffn_params(cfg) + 2 * h
    return embedding_params(cfg) + 2 * h + 2 * h * h + block + h


def _check_k_ffn(cfg: ModelConfig, k_ffn: float) -> float:
    hi = min(cfg.moe_topk, cfg.n_routed_experts)
    if isinstance(k_ffn, bool) or not isinstance(k_ffn, int | float) or not 0 <= k_ffn <= hi:
        raise ConfigError(
            f"k_ffn={k_ffn!r} must be a number in [0, {hi}] (FFN experts per token, "
            f"at most min(moe_topk, n_routed_experts))"
        )
    return float(k_ffn)


def activated_params(cfg: ModelConfig, k_ffn: float) -> int | float:
    """Parameters one token touches with ``k_ffn`` routed FFN experts per MoE layer.

    Non-expert weights plus the LM head, excluding the input-embedding lookup, plus
    ``k_ffn`` experts in every MoE layer. An int when ``k_ffn`` is a whole number.
    """
    k = _check_k_ffn(cfg, k_ffn)
    fixed = sum(layer_dense_params(cfg, kind) for kind in layer_kinds(cfg))
    fixed += cfg.hidden_size + embedding_params(cfg)  # final norm + LM head
    routed = k * moe_layer_count(cfg) * expert_params(cfg)
    value = fixed + routed
    return int(value) if float(value).is_integer() else value


def expected_activated_params(cfg: ModelConfig) -> int | float:
    """Activated parameters at the configured average ``target_ffn_experts``."""
    return activated_params(cfg, cfg.target_ffn_experts)


def norm_params(cfg: ModelConfig) -> int:
    """RMSNorm weights among the activated parameters (layers and the final norm)."""
    if cfg.attention == "mla":
        per_block = cfg.kv_lora_rank + (cfg.q_lora_rank or 0)
    else:
        per_block = 2 * cfg.head_dim
    per_layer = cfg.attention_blocks_per_layer * per_block + _layer_norm_params(cfg)
    return cfg.num_layers * per_layer + cfg.hidden_size


def kv_cache_entry_elements(cfg: ModelConfig) -> int:
    """Cached values per token for one attention block (absorbed MLA latent + rope key; GQA K+V)."""
    if cfg.attention == "mla":
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return 2 * cfg.num_key_value_heads * cfg.head_dim


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: float = 2) -> int | float:
    """KV-cache bytes one token occupies across all attention blocks of the main model."""
    _check_positive("dtype_bytes", dtype_bytes)
    blocks = cfg.num_layers * cfg.attention_blocks_per_layer
    value = blocks * kv_cache_entry_elements(cfg) * dtype_bytes
    return int(value) if float(value).is_integer() else value


# -- per-op costs --------------------------------------------------------------------------


@dataclass(frozen=True)
class OpCost:
    """One compute op for the tokens of one device; FLOPs and bytes are totals, not per token."""

    name: str
    stage: str
    kind: OpKind
    flops: float
    weight_bytes: float
    act_bytes: float
    kv_bytes: float = 0.0
    direction: Direction = "fwd"

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.act_bytes + self.kv_bytes


@dataclass(frozen=True)
class CommCost:
    """Bytes one device sends in one collective of one layer."""

    name: str
    stage: str
    bytes: float
    collective: Collective = "all_to_all"
    direction: Direction = "fwd"


class _OpTotals:
    """FLOP and byte totals over the ops ``_each_op`` yields."""

    def _each_op(self) -> Iterable[OpCost]:
        raise NotImplementedError

    def _total(self, quantity: str) -> float:
        return sum(getattr(op, quantity) for op in self._each_op())

    flops = property(lambda self: self._total("flops"), doc="FLOPs of every op")
    weight_bytes = property(lambda self: self._total("weight_bytes"), doc="weight bytes read")
    act_bytes = property(lambda self: self._total("act_bytes"), doc="activation bytes moved")
    kv_bytes = property(lambda self: self._total("kv_bytes"), doc="KV-cache bytes read")


@dataclass(frozen=True)
class LayerCost(_OpTotals):
    """The ops and communication of one layer, in execution order (forward, then backward)."""

    index: int
    kind: LayerKind
    ops: tuple[OpCost, ...]
    comms: tuple[CommCost, ...]
    expert_weight_bytes: float  # weights of one routed expert (0 for dense layers)
    expert_pairs: float  # token-expert pairs sent to FFN experts (tokens x k_ffn)
    expert_flops_per_pair: float  # the ``moe`` stage's FLOPs per pair (GEMMs + activation)
    expert_act_bytes_per_pair: float  # the ``moe`` stage's activation bytes per pair

    def _each_op(self) -> Iterable[OpCost]:
        return self.ops

    @property
    def comm_bytes(self) -> float:
        return sum(comm.bytes for comm in self.comms)

    @property
    def stages(self) -> tuple[str, ...]:
        """Compute stages, then communication stages, in order of first appearance."""
        names = [op.stage for op in self.ops] + [comm.stage for comm in self.comms]
        return tuple(dict.fromkeys(names))

    def select(
        self,
        *,
        stage: str | None = None,
        kind: str | None = None,
        direction: Direction | None = None,
    ) -> tuple[OpCost, ...]:
        """The ops matching every filter given."""
        return tuple(
            op
            for op in self.ops
            if (stage is None or op.stage == stage)
            and (kind is None or op.kind == kind)
            and (direction is None or op.direction == direction)
        )

    def stage_flops(self, stage: str, direction: Direction = "fwd") -> float:
        return sum(op.flops for op in self.select(stage=stage, direction=direction))


@dataclass(frozen=True)
class ModelCost(_OpTotals):
    """All layers plus the embedding lookup and LM head."""

    layers: tuple[LayerCost, ...]
    head: tuple[OpCost, ...]

    def ops(self) -> Iterator[OpCost]:
        for layer in self.layers:
            yield from layer.ops
        yield from self.head

    def _each_op(self) -> Iterable[OpCost]:
        return self.ops()

    @property
    def comm_bytes(self) -> float:
        return sum(layer.comm_bytes for layer in self.layers)


@dataclass(frozen=True)
class _Bytes:
    weight: float
    act: float
    kv: float
    dispatch: float
    combine: float


@dataclass(frozen=True)
class _Shape:
    tokens: float
    context: float  # decode: entries attended; prefill/train: sequence length
    phase: Phase
    absorbed: bool
    prefix: float = 0.0  # prefill: cached tokens before each sequence that it also attends to

    @property
    def mean_context(self) -> float:
        """Keys one query attends to on average (causal mean for prefill and training, after
        any cached prefix)."""
        return self.context if self.phase == "decode" else self.prefix + (self.context + 1) / 2

    @property
    def prefix_rows(self) -> float:
        """Cached prefix entries read per step: one prefix per sequence of ``context`` tokens."""
        return self.tokens / self.context * self.prefix if self.phase == "prefill" else 0.0


def _op(
    name: str,
    stage: str,
    kind: OpKind,
    flops: float,
    *,
    weight: float = 0.0,
    act: float = 0.0,
    kv: float = 0.0,
) -> OpCost:
    return OpCost(name, stage, kind, flops, weight_bytes=weight, act_bytes=act, kv_bytes=kv)


def _gemm(
    name: str, stage: str, rows: float, d_in: float, d_out: float, b: _Bytes, groups: int = 1
) -> OpCost:
    """``rows`` x [d_in -> d_out], repeated over ``groups`` independent weight matrices."""
    return _op(
        name,
        stage,
        "gemm",
        2 * rows * groups * d_in * d_out,
        weight=groups * d_in * d_out * b.weight,
        act=rows * groups * (d_in + d_out) * b.act,
    )


def _norm(name: str, stage: str, rows: float, dim: int, b: _Bytes) -> OpCost:
    return _op(
        name, stage, "memory", 4 * rows * dim, weight=dim * b.weight, act=2 * rows * dim * b.act
    )


def _rope(name: str, stage: str, rows: float, heads: int, dim: int, b: _Bytes) -> OpCost:
    elements = rows * heads * dim
    return _op(name, stage, "memory", 3 * elements, act=2 * elements * b.act)


def _swiglu(name: str, stage: str, rows: float, inter: float, b: _Bytes) -> OpCost:
    return _op(name, stage, "memory", 5 * rows * inter, act=3 * rows * inter * b.act)


def _cache_write(name: str, stage: str, s: _Shape, entry: int, b: _Bytes) -> list[OpCost]:
    """Storing each new token's cache entry (nothing in training)."""
    if s.phase == "train":
        return []
    return [
        _op(name, stage, "memory", 0.0, act=s.tokens * entry * b.act, kv=s.tokens * entry * b.kv)
    ]


def _mla_ops(
    cfg: ModelConfig, s: _Shape, b: _Bytes, prefix: str, qkv: str, core: str
) -> list[OpCost]:
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    nope, rope, vd = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    kvl, ql, qk = cfg.kv_lora_rank, cfg.q_lora_rank, cfg.qk_head_dim
    t, entry, ctx = s.tokens, kvl + rope, s.mean_context
    decode = s.phase == "decode"
    ops = [_norm(f"{prefix}.input_norm", qkv, t, h, b)]
    if ql:
        ops += [
            _gemm(f"{prefix}.q_a_proj", qkv, t, h, ql, b),
            _norm(f"{prefix}.q_a_layernorm", qkv, t, ql, b),
            _gemm(f"{prefix}.q_b_proj", qkv, t, ql, heads * qk, b),
        ]
    else:
        ops.append(_gemm(f"{prefix}.q_proj", qkv, t, h, heads * qk, b))
    ops += [
        _gemm(f"{prefix}.kv_a_proj_with_mqa", qkv, t, h, entry, b),
        _norm(f"{prefix}.kv_a_layernorm", qkv, t, kvl, b),
        _rope(f"{prefix}.rope", qkv, t, heads + 1, rope, b),
        *_cache_write(f"{prefix}.kv_cache_write", qkv, s, entry, b),
    ]
    cache_read = t * s.context * entry * b.kv if decode else 0.0
    if s.absorbed:
        # W_uk folds into the query, W_uv into the output: attention runs on the latents
        kv_act = 0.0 if decode else t * entry * b.act
        ops += [
            _gemm(f"{prefix}.q_absorb", qkv, t, nope, kvl, b, groups=heads),
            _op(
                f"{prefix}.attention",
                core,
                "attention",
                2 * t * heads * entry * ctx + 2 * t * heads * kvl * ctx,
                act=t * heads * (entry + kvl) * b.act + kv_act,
                kv=cache_read,
            ),
            _gemm(f"{prefix}.v_absorb", core, t, kvl, vd, b, groups=heads),
        ]
    else:
        # decode re-projects every cached latent; prefill/train project each new token once,
        # and prefill the cached prefix of each sequence too
        kv_rows = t * s.context if decode else t + s.prefix_rows
        up = _gemm(f"{prefix}.kv_b_proj", qkv, kv_rows, kvl, heads * (nope + vd), b)
        if decode:  # the latents come from the cache, not from activations
            up = replace(up, act_bytes=kv_rows * heads * (nope + vd) * b.act, kv_bytes=cache_read)
        elif s.prefix_rows:
            up = replace(up, kv_bytes=s.prefix_rows * entry * b.kv)
        ops += [
            up,
            _op(
                f"{prefix}.attention",
                core,
                "attention",
                2 * t * heads * (qk + vd) * ctx,
                act=(t + kv_rows) * heads * (qk + vd) * b.act,
            ),
        ]
    ops.append(_gemm(f"{prefix}.o_proj", core, t, heads * vd, h, b))
    return ops


def _gqa_ops(
    cfg: ModelConfig, s: _Shape, b: _Bytes, prefix: str, qkv: str, core: str
) -> list[OpCost]:
    h, heads, kvh, hd = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    )
    t, entry = s.tokens, 2 * kvh * hd
    decode = s.phase == "decode"
    return [
        _norm(f"{prefix}.input_norm", qkv, t, h, b),
        _gemm(f"{prefix}.q_proj", qkv, t, h, heads * hd, b),
        _gemm(f"{prefix}.k_proj", qkv, t, h, kvh * hd, b),
        _gemm(f"{prefix}.v_proj", qkv, t, h, kvh * hd, b),
        _norm(f"{prefix}.q_norm", qkv, t * heads, hd, b),
        _norm(f"{prefix}.k_norm", qkv, t * kvh, hd, b),
        _rope(f"{prefix}.rope", qkv, t, heads + kvh, hd, b),
        *_cache_write(f"{prefix}.kv_cache_write", qkv, s, entry, b),
        _op(
            f"{prefix}.attention",
            core,
            "attention",
            4 * t * heads * hd * s.mean_context,
            act=2 * t * heads * hd * b.act + (0.0 if decode else t * entry * b.act),
            kv=(t * s.context if decode else s.prefix_rows) * entry * b.kv,
        ),
        _gemm(f"{prefix}.o_proj", core, t, heads * hd, h, b),
    ]


def _attention_ops(
    cfg: ModelConfig, s: _Shape, b: _Bytes, prefix: str, qkv: str, core: str
) -> list[OpCost]:
    build = _mla_ops if cfg.attention == "mla" else _gqa_ops
    return build(cfg, s, b, prefix, qkv, core)


def _ffn_ops(
    prefix: str, stage: str, tokens: float, hidden: int, inter: int, tp: int, b: _Bytes
) -> list[OpCost]:
    rows, part = tokens * tp, inter / tp
    return [
        _gemm(f"{prefix}.gate_up_proj", stage, rows, hidden, 2 * part, b),
        _swiglu(f"{prefix}.act", stage, rows, part, b),
        _gemm(f"{prefix}.down_proj", stage, rows, part, hidden, b),
    ]


def _tp_comms(
    prefix: str, stage: str, tokens: float, hidden: int, tp: int, b: _Bytes
) -> list[CommCost]:
    if tp == 1:
        return []
    volume = (tp - 1) * tokens * hidden * b.act
    return [
        CommCost(f"{prefix}.all_gather", stage, volume, "all_gather"),
        CommCost(f"{prefix}.reduce_scatter", stage, volume, "reduce_scatter"),
    ]


def _moe_ops(
    cfg: ModelConfig, tokens: float, k: float, b: _Bytes
) -> tuple[list[OpCost], list[CommCost]]:
    """Router, routed-expert GEMMs and their dispatch/combine; zero experts cost nothing."""
    h, inter, n, e = (
        cfg.hidden_size,
        cfg.expert_ffn_hidden_size,
        cfg.n_routed_experts,
        cfg.num_experts_total,
    )
    pairs = tokens * k
    distinct = n * (1 - (1 - k / n) ** tokens)  # experts hit, uniform routing
    ops = [
        _op(
            "router.classifier",
            S.ROUTER,
            "router",
            2 * tokens * h * e,
            weight=h * e * ROUTER_WEIGHT_BYTES,
            act=tokens * h * b.act + tokens * e * 4,
        ),
        _op(
            "router.topk",
            S.ROUTER,
            "memory",
            6 * tokens * e,
            act=tokens * e * 4 + tokens * cfg.moe_topk * 12,  # fp32 scores; index + gate out
        ),
        _op(
            "experts.gate_up_proj",
            S.ROUTED_EXPERTS,
            "grouped_gemm",
            2 * pairs * h * 2 * inter,
            weight=distinct * 2 * h * inter * b.weight,
            act=pairs * (h + 2 * inter) * b.act,
        ),
        _swiglu("experts.act", S.ROUTED_EXPERTS, pairs, inter, b),
        _op(
            "experts.down_proj",
            S.ROUTED_EXPERTS,
            "grouped_gemm",
            2 * pairs * inter * h,
            weight=distinct * inter * h * b.weight,
            act=pairs * (inter + h) * b.act,
        ),
    ]
    comms = [
        CommCost("dispatch", S.DISPATCH, pairs * h * b.dispatch),
        CommCost("combine", S.COMBINE, pairs * h * b.combine),
    ]
    return ops, comms


_REVERSED_COLLECTIVE: dict[str, Collective] = {
    "all_gather": "reduce_scatter",
    "reduce_scatter": "all_gather",
    "all_to_all": "all_to_all",
}


def _backward(
    ops: list[OpCost], comms: list[CommCost], b: _Bytes
) -> tuple[list[OpCost], list[CommCost]]:
    """Backward twins in reverse order (see the module docstring for the convention)."""
    bwd_ops = [
        replace(
            op,
            name=f"{op.name}.bwd",
            flops=2 * op.flops,
            weight_bytes=2 * op.weight_bytes,
            act_bytes=2 * op.act_bytes,
            kv_bytes=0.0,
            direction="bwd",
        )
        for op in reversed(ops)
    ]
    bwd_comms = []
    for comm in reversed(comms):
        volume = comm.bytes
        if comm.collective == "all_to_all":  # gradients travel at the combine precision
            per_element = b.dispatch if comm.stage == S.DISPATCH else b.combine
            volume = comm.bytes / per_element * b.combine
        bwd_comms.append(
            replace(
                comm,
                name=f"{comm.name}.bwd",
                bytes=volume,
                collective=_REVERSED_COLLECTIVE[comm.collective],
                direction="bwd",
            )
        )
    return bwd_ops, bwd_comms


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")


def layer_costs(
    cfg: ModelConfig,
    *,
    tokens: float,
    context: float,
    phase: Phase,
    k_ffn: float | None = None,
    weight_bytes: float = 2,
    act_bytes: float = 2,
    kv_bytes: float = 2,
    dispatch_bytes: float = 1,
    combine_bytes: float = 2,
    ffn_tp: int = 1,
    absorbed: bool | None = None,
    prefix: float = 0.0,
) -> tuple[LayerCost, ...]:
    """Per-layer ops and communication for ``tokens`` tokens on one device.

    decode: ``tokens`` per step, each attending over ``context`` cached entries. prefill and
    train: ``tokens`` in sequences of length ``context`` (causal); prefill sequences may follow
    a cached ``prefix`` of that many tokens each, which they attend to and read. ``k_ffn`` (default
    ``cfg.target_ffn_experts``) FFN experts per token; ``absorbed`` (MLA only) defaults to
    True for decode and False otherwise. Byte arguments are bytes per element.
    """
    if phase not in _PHASES:
        raise ConfigError(f"phase must be one of {', '.join(_PHASES)}; got {phase!r}")
    _check_positive("tokens", tokens)
    if (
        isinstance(context, bool)
        or not isinstance(context, int | float)
        or not 1 <= context < math.inf
    ):
        raise ConfigError(f"context must be a finite number >= 1 (keys attended), got {context!r}")
    for name, value in (
        ("weight_bytes", weight_bytes),
        ("act_bytes", act_bytes),
        ("kv_bytes", kv_bytes),
        ("dispatch_bytes", dispatch_bytes),
        ("combine_bytes", combine_bytes),
    ):
        _check_positive(name, value)
    if isinstance(ffn_tp, bool) or not isinstance(ffn_tp, int) or ffn_tp < 1:
        raise ConfigError(f"ffn_tp must be an integer >= 1, got {ffn_tp!r}")
    k = _check_k_ffn(cfg, cfg.target_ffn_experts if k_ffn is None else k_ffn)
    if prefix and (phase != "prefill" or not 0 <= prefix < math.inf):
        raise ConfigError(
            f"a cached prefix applies to prefill only, as tokens >= 0; got {prefix!r}"
        )
    shape = _Shape(
        float(tokens),
        float(context),
        phase,
        phase == "decode" if absorbed is None else absorbed,
        float(prefix),
    )
    b = _Bytes(weight_bytes, act_bytes, kv_bytes, dispatch_bytes, combine_bytes)
    return tuple(
        _layer(cfg, index, kind, shape, b, k, ffn_tp) for index, kind in enumerate(layer_kinds(cfg))
    )


def _layer(
    cfg: ModelConfig,
    index: int,
    kind: LayerKind,
    s: _Shape,
    b: _Bytes,
    k: float,
    tp: int,
) -> LayerCost:
    h, t = cfg.hidden_size, s.tokens
    ops: list[OpCost] = []
    comms: list[CommCost] = []
    if kind == "scmoe":
        ops += _attention_ops(cfg, s, b, "attn0", S.ATTENTION_0, S.ATTENTION_0)
        ops.append(_norm("attn0.post_attention_norm", S.ATTENTION_0, t, h, b))
        ops += _ffn_ops("ffn0", S.DENSE_FFN_0, t, h, cfg.ffn_hidden_size, tp, b)
        ops += _attention_ops(cfg, s, b, "attn1", S.ATTENTION_1_QKV, S.ATTENTION_1_CORE)
        ops.append(_norm("attn1.post_attention_norm", S.DENSE_FFN_1, t, h, b))
        ops += _ffn_ops("ffn1", S.DENSE_FFN_1, t, h, cfg.ffn_hidden_size, tp, b)
        comms += _tp_comms("ffn0", S.DENSE_FFN_0_TP, t, h, tp, b)
        comms += _tp_comms("ffn1", S.DENSE_FFN_1_TP, t, h, tp, b)
    else:
        ops += _attention_ops(cfg, s, b, "attn", S.ATTENTION_QKV, S.ATTENTION_CORE)
        ops.append(_norm("attn.post_attention_norm", S.ATTENTION_CORE, t, h, b))
        if kind == "dense":
            ops += _ffn_ops("ffn", S.DENSE_FFN, t, h, cfg.ffn_hidden_size, tp, b)
            comms += _tp_comms("ffn", S.DENSE_FFN_TP, t, h, tp, b)
        elif cfg.n_shared_experts:
            inter = cfg.n_shared_experts * cfg.expert_ffn_hidden_size
            ops += _ffn_ops("shared_experts", S.SHARED_EXPERTS, t, h, inter, 1, b)
    pairs = 0.0
    if kind != "dense":
        moe_ops, moe_comms = _moe_ops(cfg, t, k, b)
        ops += moe_ops
        comms += moe_comms
        pairs = t * k
    if s.phase == "train":
        bwd_ops, bwd_comms = _backward(ops, comms, b)
        ops += bwd_ops
        comms += bwd_comms
    routed = kind != "dense"
    inter = cfg.expert_ffn_hidden_size
    return LayerCost(
        index=index,
        kind=kind,
        ops=tuple(ops),
        comms=tuple(comms),
        expert_weight_bytes=expert_params(cfg) * b.weight if routed else 0.0,
        expert_pairs=pairs,
        expert_flops_per_pair=(2 * 3 * h * inter + 5 * inter) if routed else 0.0,
        expert_act_bytes_per_pair=(2 * h + 6 * inter) * b.act if routed else 0.0,
    )


def head_costs(
    cfg: ModelConfig,
    *,
    tokens: float,
    phase: Phase,
    weight_bytes: float = 2,
    act_bytes: float = 2,
) -> tuple[OpCost, ...]:
    """Embedding lookup (stage ``embed``), final norm and LM head (stage ``head``)."""
    if phase not in _PHASES:
        raise ConfigError(f"phase must be one of {', '.join(_PHASES)}; got {phase!r}")
    _check_positive("tokens", tokens)
    _check_positive("weight_bytes", weight_bytes)
    _check_positive("act_bytes", act_bytes)
    b = _Bytes(weight_bytes, act_bytes, 1, 1, 1)
    t, h = float(tokens), cfg.hidden_size
    ops = [
        OpCost("embed_tokens", "embed", "memory", 0.0, t * h * weight_bytes, t * h * act_bytes),
        _norm("norm", "head", t, h, b),
        _gemm("lm_head", "head", t, h, cfg.vocab_size, b),
    ]
    if phase == "train":
        ops += _backward(ops, [], b)[0]
    return tuple(ops)


def model_costs(cfg: ModelConfig, **options: Any) -> ModelCost:
    """``layer_costs(cfg, **options)`` for every layer plus ``head_costs``, which reads the
    same ``tokens``, ``phase``, ``weight_bytes`` and ``act_bytes``."""
    layers = layer_costs(cfg, **options)
    head = head_costs(cfg, **{k: v for k, v in options.items() if k in _HEAD_OPTIONS})
    return ModelCost(layers=layers, head=head)


_HEAD_OPTIONS = frozenset(inspect.signature(head_costs).parameters) - {"cfg"}
