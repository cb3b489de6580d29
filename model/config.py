"""ModelConfig: one frozen, validated description of a model, shared by every engine.

Torch-free on purpose: the analytic cost model and the simulator bridge import it too.
Field names follow the Hugging Face LongCat-Flash configuration where one exists.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from longcat_sim.config.fields import Check, choice, integer, name, number, pick, setting, validate
from longcat_sim.config.hashing import config_hash
from longcat_sim.config.toml import read_toml


class ConfigError(ValueError):
    """A configuration is inconsistent or names something unknown; the message is one line."""


AttentionKind = Literal["mla", "gqa"]
LayerType = Literal["scmoe", "standard"]
Topology = Literal["shortcut", "conventional"]
KernelBackend = Literal["torch", "triton"]

# a count of things; a size that may be zero; both below 2**31, so sizes multiply in floats
MAX_SIZE = 2**31 - 1
_COUNT, _SIZE = integer(1, MAX_SIZE), integer(0, MAX_SIZE)
_POS = number(0.0, open_low=True)
_BOOL = Check("must be true or false", lambda v: isinstance(v, bool))
_ATTENTIONS, _LAYER_TYPES = choice("mla", "gqa"), choice("scmoe", "standard")
_TOPOLOGIES, _KERNELS = choice("shortcut", "conventional"), choice("torch", "triton")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters.

    ``layer_type="scmoe"`` is a LongCat-Flash layer (2 MLA blocks, 2 dense FFNs, 1 MoE);
    ``"standard"`` is one attention block followed by a dense FFN or an MoE (DeepSeek-V3,
    Qwen3), used by the analytic cost model only. ``topology`` picks, for scmoe layers, where
    the MoE reads its input: ``"shortcut"`` (the normalised first-attention residual, as
    LongCat-Flash) or ``"conventional"`` (the normalised second-attention residual, so the MoE
    sits after the attention it follows and nothing overlaps it).

    The defaults are the ``tiny`` preset (bar its shorter context).

    ``deterministic`` changes no parameter, only how the same arithmetic runs: the linear
    layers, attention, expert GEMMs and MoE sums take batch-invariant, fixed-order kernels
    (``model/kernels/batch_invariant.py``), so a token's result depends neither on the batch
    it travels in nor on the thread count.

    ``kernels`` changes no parameter either, only which implementation runs the MoE's router
    top-k, token permutation, grouped expert GEMM and combine: ``"torch"`` (plain PyTorch
    operations) or ``"triton"`` (the Triton kernels in ``model/kernels/``; on a CPU they need
    ``TRITON_INTERPRET=1``). ``deterministic`` needs ``kernels="torch"``.
    """

    name: str = setting("custom", "the model's name", check=name())
    vocab_size: int = setting(512, "tokenizer vocabulary", unit="tokens", check=_COUNT)
    hidden_size: int = setting(64, "residual stream width", check=_COUNT)
    num_layers: int = setting(2, "layers (an scmoe layer holds two attention blocks)", check=_COUNT)
    num_attention_heads: int = setting(4, "attention heads", check=_COUNT)
    ffn_hidden_size: int = setting(128, "dense FFN width", check=_COUNT)
    layer_type: LayerType = setting("scmoe", "layer kind", check=_LAYER_TYPES)
    topology: Topology = setting(
        "shortcut", "where an scmoe MoE reads its input", check=_TOPOLOGIES
    )
    first_k_dense_layers: int = setting(0, "leading layers with a dense FFN", check=_SIZE)
    # attention
    attention: AttentionKind = setting("mla", "attention kind", check=_ATTENTIONS)
    q_lora_rank: int = setting(32, "MLA query low-rank width (0: none)", check=_SIZE)
    kv_lora_rank: int = setting(16, "MLA key/value latent width", check=_SIZE)
    qk_nope_head_dim: int = setting(16, "MLA query/key width without RoPE", check=_SIZE)
    qk_rope_head_dim: int = setting(8, "MLA query/key width with RoPE", check=_SIZE)
    v_head_dim: int = setting(16, "MLA value head width", check=_SIZE)
    num_key_value_heads: int = setting(0, "GQA key/value heads", check=_SIZE)
    head_dim: int = setting(0, "GQA head width", check=_SIZE)
    mla_scale_q_lora: bool = setting(True, "rescale the MLA query latent", check=_BOOL)
    mla_scale_kv_lora: bool = setting(True, "rescale the MLA key/value latent", check=_BOOL)
    # mixture of experts
    n_routed_experts: int = setting(8, "routed FFN experts", unit="experts", check=_COUNT)
    zero_expert_num: int = setting(4, "zero-computation experts", unit="experts", check=_SIZE)
    moe_topk: int = setting(3, "experts a token is routed to", unit="experts", check=_COUNT)
    expert_ffn_hidden_size: int = setting(32, "FFN expert width", check=_COUNT)
    n_shared_experts: int = setting(0, "always-on shared experts", unit="experts", check=_SIZE)
    routed_scaling_factor: float = setting(4.0, "scale of the routed experts' sum", check=_POS)
    scale_zero_expert_gates: bool = setting(True, "scale zero experts' gates too", check=_BOOL)
    target_ffn_experts: float = setting(
        2.0, "average FFN experts per token (K_e)", unit="experts", check=number(0.0)
    )
    # misc
    rms_norm_eps: float = setting(1e-5, "RMSNorm epsilon", check=_POS)
    latent_norm_eps: float = setting(1e-6, "MLA latent RMSNorm epsilon", check=_POS)
    rope_theta: float = setting(10000.0, "RoPE base", check=_POS)
    max_position_embeddings: int = setting(2048, "longest context", unit="tokens", check=_COUNT)
    tie_word_embeddings: bool = setting(False, "share input and output embeddings", check=_BOOL)
    mtp_layers: int = setting(0, "multi-token-prediction layers (0 or 1)", check=_SIZE)
    initializer_range: float = setting(0.02, "initial weights' standard deviation", check=_POS)
    deterministic: bool = setting(False, "batch-invariant, fixed-order kernels", check=_BOOL)
    kernels: KernelBackend = setting("torch", "MoE kernel implementation", check=_KERNELS)
    expert_checksums: bool = setting(
        False, "expert weights carry ABFT column checksums", check=_BOOL
    )

    def __post_init__(self) -> None:
        _validate(self)

    # -- derived sizes ---------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_experts_total(self) -> int:
        """Routable experts: FFN experts plus zero-computation (identity) experts."""
        return self.n_routed_experts + self.zero_expert_num

    @property
    def attention_blocks_per_layer(self) -> int:
        return 2 if self.layer_type == "scmoe" else 1

    @property
    def runnable(self) -> bool:
        """True when the PyTorch model in ``model/`` can instantiate this configuration."""
        return (
            self.layer_type == "scmoe"
            and self.attention == "mla"
            and self.n_shared_experts == 0
            and self.first_k_dense_layers == 0
        )

    # -- conversions -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a mapping; a ``preset`` key names the base that the other keys override."""
        data = dict(data)
        base: dict[str, Any] = {}
        if "preset" in data:
            base = get_preset(str(data.pop("preset"))).to_dict()
        known = {f.name: f for f in fields(cls)}
        for key, value in data.items():
            if key not in known:
                raise ConfigError(
                    f"unknown model field {key!r}; valid fields: {', '.join(sorted(known))}"
                )
            base[key] = _coerce(known[key], value)
        try:
            return cls(**base)
        except TypeError as exc:  # pragma: no cover - guarded by the checks above
            raise ConfigError(str(exc)) from None

    def replace(self, **changes: Any) -> ModelConfig:
        return self.from_dict({**self.to_dict(), **changes})

    def config_hash(self) -> str:
        """The project's config hash (``config.hashing``) of the fields; equal configs hash
        equal."""
        return config_hash(self.to_dict())


# fields that add checks and change neither a parameter nor the arithmetic: a run may resume
# from, or grow out of, a checkpoint that differs in them
CHECK_ONLY_FIELDS = ("expert_checksums",)


def same_model(a: ModelConfig, b: ModelConfig) -> bool:
    """``a`` and ``b`` build the same parameters and compute alike (bar :data:`CHECK_ONLY_FIELDS`)."""
    unchecked = dict.fromkeys(CHECK_ONLY_FIELDS, False)
    return dataclasses.replace(a, **unchecked) == dataclasses.replace(b, **unchecked)


def _coerce(field: dataclasses.Field, value: Any) -> Any:
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    if kind == "int" and isinstance(value, bool):
        raise ConfigError(f"model field {field.name!r} must be an integer, got {value!r}")
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _validate(cfg: ModelConfig) -> None:
    validate(cfg, lambda n: f"model field {n!r}", ConfigError)
    if cfg.moe_topk > cfg.num_experts_total:
        raise ConfigError(
            f"moe_topk={cfg.moe_topk} exceeds the {cfg.num_experts_total} routable experts "
            f"(n_routed_experts + zero_expert_num); lower moe_topk or add experts"
        )
    lo = max(0, cfg.moe_topk - cfg.zero_expert_num)
    hi = min(cfg.moe_topk, cfg.n_routed_experts)
    if not lo <= cfg.target_ffn_experts <= hi:
        raise ConfigError(
            f"target_ffn_experts={cfg.target_ffn_experts} must lie in [{lo}, {hi}] "
            f"(top-k {cfg.moe_topk} over {cfg.n_routed_experts} FFN + {cfg.zero_expert_num} zero experts)"
        )
    if cfg.first_k_dense_layers > cfg.num_layers:
        raise ConfigError(
            f"first_k_dense_layers={cfg.first_k_dense_layers} exceeds num_layers={cfg.num_layers}"
        )
    if cfg.mtp_layers > 1:
        raise ConfigError(f"mtp_layers must be 0 or 1 (one dense MTP layer), got {cfg.mtp_layers}")
    if cfg.attention == "mla":
        for dim in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(cfg, dim) <= 0:
                raise ConfigError(f"MLA needs {dim} > 0, got {getattr(cfg, dim)}")
        if cfg.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even for RoPE, got {cfg.qk_rope_head_dim}")
    else:
        if cfg.num_key_value_heads <= 0 or cfg.head_dim <= 0:
            raise ConfigError("GQA needs num_key_value_heads > 0 and head_dim > 0")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={cfg.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={cfg.num_key_value_heads}"
            )
    if cfg.deterministic and cfg.kernels != "torch":
        raise ConfigError(
            f"deterministic=True runs the batch-invariant torch kernels; it cannot be combined "
            f"with kernels={cfg.kernels!r}"
        )
    if cfg.layer_type == "scmoe" and (cfg.n_shared_experts or cfg.first_k_dense_layers):
        raise ConfigError("scmoe layers have no shared experts and no leading dense layers")


# -- presets ---------------------------------------------------------------------------------

# DeepSeek-V3's MLA shapes, which LongCat-Flash keeps; GQA models set the MLA fields to zero.
_V3_MLA: dict[str, Any] = dict(
    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128
)
_UNSCALED_LORA: dict[str, Any] = dict(mla_scale_q_lora=False, mla_scale_kv_lora=False)
_NO_MLA: dict[str, Any] = dict.fromkeys(_V3_MLA, 0) | _UNSCALED_LORA

# Standard (analytic-only) layers routing each token to 8 FFN experts, no zero experts.
_ANALYTIC_TOP8: dict[str, Any] = dict(
    layer_type="standard", zero_expert_num=0, moe_topk=8, target_ffn_experts=8.0
)

# Each preset by concern: sizes, attention, experts, context; a field it omits keeps its default.
# The defaults are the tiny preset's, so ``tiny`` names only its shorter context.
_PRESETS: dict[str, dict[str, Any]] = {
    # Released LongCat-Flash configuration (arXiv 2509.01322; HF config.json).
    "longcat-flash": (
        dict(vocab_size=131072, hidden_size=6144, num_layers=28, num_attention_heads=64)
        | dict(ffn_hidden_size=12288)
        | _V3_MLA
        | dict(n_routed_experts=512, zero_expert_num=256, moe_topk=12, target_ffn_experts=8.0)
        | dict(expert_ffn_hidden_size=2048, routed_scaling_factor=6.0)
        | dict(rope_theta=1e7, max_position_embeddings=131072, mtp_layers=1)
    ),
    # A training step well under a second on two CPU cores.
    "tiny": dict(max_position_embeddings=1024),
    # Tens of millions of parameters: benchmarks and training experiments.
    "small": (
        dict(vocab_size=8192, hidden_size=256, num_layers=4, num_attention_heads=8)
        | dict(ffn_hidden_size=1024)
        | dict(q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16)
        | dict(v_head_dim=32)
        | dict(n_routed_experts=32, zero_expert_num=16, moe_topk=6, target_ffn_experts=4.0)
        | dict(expert_ffn_hidden_size=256, max_position_embeddings=4096)
    ),
    # Analytic only: DeepSeek-V3 (671 B total / 37 B activated, the MTP module not counted;
    # its released config has one MTP module, num_nextn_predict_layers=1).
    "deepseek-v3": (
        dict(vocab_size=129280, hidden_size=7168, num_layers=61, num_attention_heads=128)
        | dict(ffn_hidden_size=18432, first_k_dense_layers=3)
        | _V3_MLA
        | _UNSCALED_LORA
        | _ANALYTIC_TOP8
        | dict(n_routed_experts=256, expert_ffn_hidden_size=2048, n_shared_experts=1)
        | dict(routed_scaling_factor=2.5)
        | dict(max_position_embeddings=163840, rms_norm_eps=1e-6, mtp_layers=1)
    ),
    # Analytic only: Qwen3-235B-A22B (GQA, 128 experts, top-8, no shared experts).
    "qwen3-235b-a22b": (
        dict(vocab_size=151936, hidden_size=4096, num_layers=94, num_attention_heads=64)
        | dict(ffn_hidden_size=12288)
        | dict(attention="gqa", num_key_value_heads=4, head_dim=128)
        | _NO_MLA
        | _ANALYTIC_TOP8
        | dict(n_routed_experts=128, expert_ffn_hidden_size=1536, routed_scaling_factor=1.0)
        | dict(rope_theta=1e6, max_position_embeddings=40960, rms_norm_eps=1e-6)
    ),
}


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    return ModelConfig(name=name, **pick(_PRESETS, name, "model preset", ConfigError))


# What a model file without a ``preset`` base must state: the tiny defaults of these would
# silently describe a different mixture of experts.
MOE_FIELDS = ("n_routed_experts", "zero_expert_num", "moe_topk", "target_ffn_experts")


def load_model_config(spec: str) -> ModelConfig:
    """A preset name, or a TOML file whose ``[model]`` table (or top level) lists fields.

    The TOML may name ``preset = "tiny"`` as the base and override any field; without a
    ``preset`` it must state the MoE fields (``MOE_FIELDS``).
    """
    if spec in _PRESETS:
        return get_preset(spec)
    path = Path(spec)
    if path.suffix != ".toml":
        raise ConfigError(
            f"unknown model {spec!r}: give a preset ({', '.join(preset_names())}) or a .toml file"
        )
    table = read_toml(path, what=f"model file {spec!r}", table="model", error=ConfigError)
    table.setdefault("name", path.stem)
    missing = [key for key in MOE_FIELDS if key not in table]
    if "preset" not in table and missing:
        raise ConfigError(
            f"model file {spec!r} names no preset, so it must state {', '.join(missing)} "
            f'(or name a base with preset = "...")'
        )
    return ModelConfig.from_dict(table)
