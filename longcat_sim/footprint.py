"""Per-GPU HBM footprint of a deployment: weights, KV cache, activations and a named reserve.

GB means 1e9 bytes. Every part is the busiest GPU's share; data-parallel (replicated) parts are
counted whole on every GPU.

Weights (``weight_bytes_per_gpu``)
    routed experts: ceil((n_routed_experts + redundant_experts) / ep) per MoE layer at the
    assumption set's ``expert_precision``; attention blocks / ``attention_tp`` and dense FFNs
    and shared experts / ``ffn_tp`` at its ``linear_precision``; embedding and LM head BF16,
    vocab-parallel over ``attention_tp``; layer and final norms BF16, replicated; routers
    float32, replicated; the MTP module when asked for. FP8 is 1 B per weight plus one float32
    scale per 128 x 128 block (4 / 16384 B per weight, exact when matrix sides are multiples of
    128); BF16 is 2 B.

KV cache
    requests x context x ``kv_cache_bytes_per_token`` x replication, replication = attention_tp
    for MLA (every TP rank keeps the whole latent of its group's requests) and
    attention_tp / min(attention_tp, num_key_value_heads) for GQA; the MTP layer adds one
    attention block's entries.

Activations of one step (``T`` tokens in flight per GPU, BF16 = 2 B, logits float32)
    T x [2 (4 h tp_a + 3 I) + 2 k (h + 3 I_e) + 4 V s], with h the hidden size, tp_a the
    attention TP size (each rank keeps the residual stream of its group's tokens), I the widest
    dense intermediate (dense FFN, shared experts or the attention query heads, sharded and
    gathered so its total is per token), k the mean FFN experts per token (the dispatched
    copies a GPU receives under balanced routing), I_e the expert width, V the vocabulary and s
    the share of tokens sampled (1 in decode, 1 / prompt_len in prefill).

Reserve
    ``hbm_runtime_gb`` + ``hbm_fragmentation`` x HBM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from longcat_sim.cluster.assumptions import Assumptions
from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.cluster.hardware import Hardware, Precision
from longcat_sim.cluster.placement import check_count
from longcat_sim.model import costs
from longcat_sim.model.config import ModelConfig

Phase = Literal["decode", "prefill"]
GB = 1e9
BF16_BYTES = 2
FP32_BYTES = 4
FP8_SCALE_BYTES_PER_WEIGHT = FP32_BYTES / (128 * 128)  # one float32 scale per 128x128 block
_KV_BYTES = {"bf16": 2, "fp8": 1}


@dataclass(frozen=True)
class Footprint:
    """HBM one GPU needs, in GB; ``per_request_gb`` is what one more request (decode) or
    prompt token (prefill) adds in KV cache and activations."""

    weights_gb: float
    kv_cache_gb: float
    activations_gb: float
    reserve_gb: float
    hbm_gb: float
    per_request_gb: float
    phase: Phase = "decode"

    @property
    def used_gb(self) -> float:
        return self.weights_gb + self.kv_cache_gb + self.activations_gb + self.reserve_gb

    @property
    def fits(self) -> bool:
        return self.used_gb <= self.hbm_gb

    @property
    def headroom_gb(self) -> float:
        """HBM left (negative: the overflow)."""
        return self.hbm_gb - self.used_gb

    @property
    def max_batch(self) -> int:
        """Largest requests (decode) or prompt tokens (prefill) per GPU that fit; 0 when the
        fixed part alone does not."""
        fixed = self.weights_gb + self.reserve_gb
        if fixed > self.hbm_gb:
            return 0
        if self.per_request_gb <= 0:
            raise ClusterInputError("per_request_gb must be positive to bound the batch")
        n = math.floor((self.hbm_gb - fixed) / self.per_request_gb)
        while fixed + (n + 1) * self.per_request_gb <= self.hbm_gb:
            n += 1
        while n > 0 and fixed + n * self.per_request_gb > self.hbm_gb:
            n -= 1
        return n

    @property
    def unit(self) -> str:
        return "requests" if self.phase == "decode" else "tokens"

    def to_dict(self) -> dict[str, Any]:
        key = "max_batch_per_device" if self.phase == "decode" else "max_tokens_per_device"
        return {
            "hbm_used_gb": self.used_gb,
            "hbm_gb": self.hbm_gb,
            "fits": self.fits,
            key: self.max_batch,
            "hbm_breakdown_gb": {
                "weights": self.weights_gb,
                "kv_cache": self.kv_cache_gb,
                "activations": self.activations_gb,
                "reserve": self.reserve_gb,
            },
        }


def _bytes_per_weight(precision: Precision) -> float:
    if precision == "fp8":
        return 1 + FP8_SCALE_BYTES_PER_WEIGHT
    if precision == "bf16":
        return BF16_BYTES
    raise ClusterInputError(f"unknown weight precision {precision!r}; use 'bf16' or 'fp8'")


def _dense_ffn_params_total(cfg: ModelConfig) -> int:
    """Dense FFN and shared-expert parameters of the main model's layers."""
    total = 0
    for kind in costs.layer_kinds(cfg):
        if kind == "scmoe":
            total += 2 * costs.dense_ffn_params(cfg)
        elif kind == "dense":
            total += costs.dense_ffn_params(cfg)
        else:
            total += cfg.n_shared_experts * costs.expert_params(cfg)
    return total


def _mtp_bytes(cfg: ModelConfig, a: Assumptions, attention_tp: int, ffn_tp: int) -> float:
    """The MTP module (``costs.mtp_params``) split like the main model; eh_proj replicated."""
    if not cfg.mtp_layers:
        return 0.0
    h, lin = cfg.hidden_size, _bytes_per_weight(a.linear_precision)
    embed = costs.embedding_params(cfg) * BF16_BYTES / attention_tp
    attn = costs.attention_params(cfg) * lin / attention_tp
    ffn = costs.dense_ffn_params(cfg) * lin / ffn_tp
    eh_proj = 2 * h * h * lin
    norms = (2 * h + 2 * h + h) * BF16_BYTES  # enorm/hnorm, the layer's two norms, final norm
    return embed + attn + ffn + eh_proj + norms


def _check_parallel(ep: int, redundant_experts: int, attention_tp: int, ffn_tp: int) -> None:
    check_count("EP size", ep)
    check_count("redundant experts", redundant_experts, allow_zero=True)
    check_count("attention TP size", attention_tp)
    check_count("FFN TP size", ffn_tp)


def weight_bytes_per_gpu(
    cfg: ModelConfig,
    a: Assumptions,
    *,
    ep: int,
    redundant_experts: int = 0,
    attention_tp: int = 1,
    ffn_tp: int = 1,
    mtp: bool = False,
) -> float:
    """Weight bytes on the busiest GPU (see the module docstring for the split)."""
    _check_parallel(ep, redundant_experts, attention_tp, ffn_tp)
    lin = _bytes_per_weight(a.linear_precision)
    moe_layers = costs.moe_layer_count(cfg)
    experts_here = math.ceil((cfg.n_routed_experts + redundant_experts) / ep) if moe_layers else 0
    experts = moe_layers * experts_here * costs.expert_params(cfg)
    experts_b = experts * _bytes_per_weight(a.expert_precision)
    blocks = cfg.num_layers * cfg.attention_blocks_per_layer
    attention_b = blocks * costs.attention_params(cfg) * lin / attention_tp
    ffn_b = _dense_ffn_params_total(cfg) * lin / ffn_tp
    tables = 1 if cfg.tie_word_embeddings else 2
    embed_b = tables * costs.embedding_params(cfg) * BF16_BYTES / attention_tp
    norms_b = (2 * blocks * cfg.hidden_size + cfg.hidden_size) * BF16_BYTES
    router_b = moe_layers * costs.router_params(cfg) * FP32_BYTES
    mtp_b = _mtp_bytes(cfg, a, attention_tp, ffn_tp) if mtp else 0.0
    return experts_b + attention_b + ffn_b + embed_b + norms_b + router_b + mtp_b


def _kv_bytes_per_token(
    cfg: ModelConfig, attention_dtype: str, attention_tp: int, mtp: bool
) -> float:
    """KV-cache bytes one context token of one request occupies on one GPU."""
    if attention_dtype not in _KV_BYTES:
        raise ClusterInputError(f"unknown attention dtype {attention_dtype!r}; use 'bf16' or 'fp8'")
    dtype = _KV_BYTES[attention_dtype]
    if cfg.attention == "mla":
        replication = attention_tp
    else:
        replication = attention_tp / min(attention_tp, cfg.num_key_value_heads)
    per_token = costs.kv_cache_bytes_per_token(cfg, dtype)
    if mtp and cfg.mtp_layers:
        per_token += costs.kv_cache_entry_elements(cfg) * dtype
    return per_token * replication


def _widest_intermediate(cfg: ModelConfig) -> int:
    """The widest per-token intermediate outside the routed experts."""
    kinds = set(costs.layer_kinds(cfg))
    widths = [cfg.num_attention_heads * max(cfg.qk_head_dim, cfg.head_dim)]
    if kinds & {"scmoe", "dense"}:
        widths.append(cfg.ffn_hidden_size)
    if "moe" in kinds:
        widths.append(cfg.n_shared_experts * cfg.expert_ffn_hidden_size)
    return max(widths)


def _activation_bytes_per_token(cfg: ModelConfig, attention_tp: int, sampled: float) -> float:
    """One in-flight token's share of a step's live tensors (module docstring formula)."""
    h, k = cfg.hidden_size, cfg.target_ffn_experts
    dense = BF16_BYTES * (4 * h * attention_tp + 3 * _widest_intermediate(cfg))
    routed = (
        BF16_BYTES * k * (h + 3 * cfg.expert_ffn_hidden_size) if costs.moe_layer_count(cfg) else 0.0
    )
    logits = FP32_BYTES * cfg.vocab_size * sampled
    return dense + routed + logits


def _reserve_gb(hw: Hardware, a: Assumptions) -> float:
    return a.hbm_runtime_gb + a.hbm_fragmentation * hw.hbm_gb


def decode_footprint(
    cfg: ModelConfig,
    hw: Hardware,
    a: Assumptions,
    *,
    ep: int,
    batch_per_device: int,
    context: int,
    attention_dtype: str = "bf16",
    redundant_experts: int = 0,
    attention_tp: int = 1,
    ffn_tp: int = 1,
    mtp_draft_tokens: int = 0,
) -> Footprint:
    """One decode GPU holding ``batch_per_device`` requests of ``context`` cached tokens, each
    step carrying 1 + ``mtp_draft_tokens`` tokens per request (MTP weights and cache when > 0)."""
    check_count("batch per device", batch_per_device, allow_zero=True)
    check_count("context", context)
    check_count("MTP draft tokens", mtp_draft_tokens, allow_zero=True)
    mtp = mtp_draft_tokens > 0
    weights = weight_bytes_per_gpu(
        cfg,
        a,
        ep=ep,
        redundant_experts=redundant_experts,
        attention_tp=attention_tp,
        ffn_tp=ffn_tp,
        mtp=mtp,
    )
    kv_per_request = context * _kv_bytes_per_token(cfg, attention_dtype, attention_tp, mtp)
    act_per_request = (1 + mtp_draft_tokens) * _activation_bytes_per_token(cfg, attention_tp, 1.0)
    return Footprint(
        weights_gb=weights / GB,
        kv_cache_gb=batch_per_device * kv_per_request / GB,
        activations_gb=batch_per_device * act_per_request / GB,
        reserve_gb=_reserve_gb(hw, a),
        hbm_gb=hw.hbm_gb,
        per_request_gb=(kv_per_request + act_per_request) / GB,
        phase="decode",
    )


def prefill_footprint(
    cfg: ModelConfig,
    hw: Hardware,
    a: Assumptions,
    *,
    ep: int,
    tokens_per_device: int,
    prompt_len: int,
    attention_dtype: str = "bf16",
    redundant_experts: int = 0,
    attention_tp: int = 1,
    ffn_tp: int = 1,
    micro_batches: int = 1,
    kv_tokens_per_token: float = 1.0,
) -> Footprint:
    """One prefill GPU with ``tokens_per_device`` prompt tokens (prompts of ``prompt_len``):
    their KV is kept until sent, ``kv_tokens_per_token`` cache entries per computed token (more
    than one when the forward's prompts also hold cached prefixes or earlier chunks);
    activations for tokens_per_device / micro_batches tokens per micro-batch, two micro-batches
    live at once when there are two or more."""
    check_count("tokens per device", tokens_per_device, allow_zero=True)
    check_count("prompt length", prompt_len)
    check_count("micro-batches", micro_batches)
    weights = weight_bytes_per_gpu(
        cfg,
        a,
        ep=ep,
        redundant_experts=redundant_experts,
        attention_tp=attention_tp,
        ffn_tp=ffn_tp,
    )
    if not kv_tokens_per_token >= 1.0:
        raise ClusterInputError(f"kv_tokens_per_token must be >= 1, got {kv_tokens_per_token!r}")
    kv_per_token = kv_tokens_per_token * _kv_bytes_per_token(
        cfg, attention_dtype, attention_tp, False
    )
    live = min(micro_batches, 2) / micro_batches
    act_per_token = live * _activation_bytes_per_token(cfg, attention_tp, 1 / prompt_len)
    return Footprint(
        weights_gb=weights / GB,
        kv_cache_gb=tokens_per_device * kv_per_token / GB,
        activations_gb=tokens_per_device * act_per_token / GB,
        reserve_gb=_reserve_gb(hw, a),
        hbm_gb=hw.hbm_gb,
        per_request_gb=(kv_per_token + act_per_token) / GB,
        phase="prefill",
    )


def infeasible_message(fp: Footprint, what: str) -> str:
    """One line naming the overflow, its breakdown and the largest batch that fits."""
    verdict = "fits" if fp.fits else "does not fit"
    over = f"{-fp.headroom_gb:.1f} GB over" if not fp.fits else f"{fp.headroom_gb:.1f} GB free"
    hint = ""
    if fp.weights_gb + fp.reserve_gb > fp.hbm_gb:
        hint = " (weights and reserve alone exceed HBM: use more GPUs for EP/TP or FP8 weights)"
    return (
        f"{what} {verdict}: needs {fp.used_gb:.1f} GB per GPU (weights {fp.weights_gb:.1f}, "
        f"KV cache {fp.kv_cache_gb:.1f}, activations {fp.activations_gb:.1f}, reserve "
        f"{fp.reserve_gb:.1f}) of {fp.hbm_gb:g} GB, {over}; the largest batch that fits is "
        f"{fp.max_batch} {fp.unit} per GPU{hint}"
    )
