"""ModelConfig: one frozen, validated description of a model, shared by every engine.

Torch-free on purpose: the analytic cost model and the simulator bridge import it too.
Field names follow the Hugging Face LongCat-Flash configuration where one exists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration is inconsistent or names something unknown; the message is one line."""


AttentionKind = Literal["mla", "gqa"]
LayerType = Literal["scmoe", "standard"]
Topology = Literal["shortcut", "conventional"]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters.

    ``layer_type="scmoe"`` is a LongCat-Flash layer (2 MLA blocks, 2 dense FFNs, 1 MoE);
    ``"standard"`` is one attention block followed by a dense FFN or an MoE (DeepSeek-V3,
    Qwen3), used by the analytic cost model only. ``topology`` picks, for scmoe layers, where
    the MoE reads its input: ``"shortcut"`` (the normalised first-attention residual, as
    LongCat-Flash) or ``"conventional"`` (the normalised second-attention residual, so the MoE
    sits after the attention it follows and nothing overlaps it).

    ``deterministic`` changes no parameter, only how the same arithmetic runs: the linear
    layers, attention, expert GEMMs and MoE sums take batch-invariant, fixed-order kernels
    (``model/kernels/batch_invariant.py``), so a token's result depends neither on the batch
    it travels in nor on the thread count.
    """

    name: str = "custom"
    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    ffn_hidden_size: int = 128
    layer_type: LayerType = "scmoe"
    topology: Topology = "shortcut"
    first_k_dense_layers: int = 0
    # attention
    attention: AttentionKind = "mla"
    q_lora_rank: int = 32
    kv_lora_rank: int = 16
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    num_key_value_heads: int = 0
    head_dim: int = 0
    mla_scale_q_lora: bool = True
    mla_scale_kv_lora: bool = True
    # mixture of experts
    n_routed_experts: int = 8
    zero_expert_num: int = 4
    moe_topk: int = 3
    expert_ffn_hidden_size: int = 32
    n_shared_experts: int = 0
    routed_scaling_factor: float = 4.0
    scale_zero_expert_gates: bool = True
    expected_ffn_experts: float = 2.0
    # misc
    rms_norm_eps: float = 1e-5
    latent_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    mtp_layers: int = 0
    initializer_range: float = 0.02
    deterministic: bool = False

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
        """SHA-256 of the canonical JSON form; equal configs hash equal."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def _coerce(field: dataclasses.Field, value: Any) -> Any:
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    if kind == "int" and isinstance(value, bool):
        raise ConfigError(f"model field {field.name!r} must be an integer, got {value!r}")
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


_POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_attention_heads",
    "ffn_hidden_size",
    "n_routed_experts",
    "moe_topk",
    "expert_ffn_hidden_size",
    "max_position_embeddings",
)
_NON_NEGATIVE_INTS = ("zero_expert_num", "n_shared_experts", "first_k_dense_layers", "mtp_layers")
_CHOICES = {
    "attention": ("mla", "gqa"),
    "layer_type": ("scmoe", "standard"),
    "topology": ("shortcut", "conventional"),
}


def _validate(cfg: ModelConfig) -> None:
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        expected = {"int": int, "float": (int, float), "bool": bool, "str": str}.get(str(f.type))
        if expected is not None and (
            not isinstance(value, expected) or (expected is not bool and isinstance(value, bool))
        ):
            raise ConfigError(f"model field {f.name!r} must be {f.type}, got {value!r}")
    for name in _POSITIVE_INTS:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"model field {name!r} must be positive, got {getattr(cfg, name)}")
    for name in _NON_NEGATIVE_INTS:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"model field {name!r} must be >= 0, got {getattr(cfg, name)}")
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ConfigError(
                f"model field {name!r} must be one of {', '.join(choices)}; got {getattr(cfg, name)!r}"
            )
    if cfg.moe_topk > cfg.num_experts_total:
        raise ConfigError(
            f"moe_topk={cfg.moe_topk} exceeds the {cfg.num_experts_total} routable experts "
            f"(n_routed_experts + zero_expert_num); lower moe_topk or add experts"
        )
    lo = max(0, cfg.moe_topk - cfg.zero_expert_num)
    hi = min(cfg.moe_topk, cfg.n_routed_experts)
    if not lo <= cfg.expected_ffn_experts <= hi:
        raise ConfigError(
            f"expected_ffn_experts={cfg.expected_ffn_experts} must lie in [{lo}, {hi}] "
            f"(top-k {cfg.moe_topk} over {cfg.n_routed_experts} FFN + {cfg.zero_expert_num} zero experts)"
        )
    if cfg.first_k_dense_layers > cfg.num_layers:
        raise ConfigError(
            f"first_k_dense_layers={cfg.first_k_dense_layers} exceeds num_layers={cfg.num_layers}"
        )
    if cfg.mtp_layers > 1:
        raise ConfigError(f"mtp_layers must be 0 or 1 (one dense MTP layer), got {cfg.mtp_layers}")
    if cfg.routed_scaling_factor <= 0:
        raise ConfigError(
            f"routed_scaling_factor must be positive, got {cfg.routed_scaling_factor}"
        )
    for name in ("rms_norm_eps", "latent_norm_eps", "rope_theta", "initializer_range"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"model field {name!r} must be positive, got {getattr(cfg, name)}")
    if cfg.attention == "mla":
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(cfg, name) <= 0:
                raise ConfigError(f"MLA needs {name} > 0, got {getattr(cfg, name)}")
        if cfg.q_lora_rank < 0:
            raise ConfigError(
                f"q_lora_rank must be >= 0 (0 = no query compression), got {cfg.q_lora_rank}"
            )
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
    if cfg.layer_type == "scmoe" and (cfg.n_shared_experts or cfg.first_k_dense_layers):
        raise ConfigError("scmoe layers have no shared experts and no leading dense layers")


# -- presets ---------------------------------------------------------------------------------

_PRESETS: dict[str, dict[str, Any]] = {
    # Released LongCat-Flash configuration (arXiv 2509.01322; HF config.json).
    "longcat-flash": dict(
        vocab_size=131072,
        hidden_size=6144,
        num_layers=28,
        num_attention_heads=64,
        ffn_hidden_size=12288,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=512,
        zero_expert_num=256,
        moe_topk=12,
        expert_ffn_hidden_size=2048,
        routed_scaling_factor=6.0,
        expected_ffn_experts=8.0,
        rope_theta=1e7,
        max_position_embeddings=131072,
        mtp_layers=1,
    ),
    # A training step well under a second on two CPU cores.
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        ffn_hidden_size=128,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        zero_expert_num=4,
        moe_topk=3,
        expert_ffn_hidden_size=32,
        routed_scaling_factor=4.0,
        expected_ffn_experts=2.0,
        max_position_embeddings=1024,
    ),
    # Tens of millions of parameters: benchmarks and training experiments.
    "small": dict(
        vocab_size=8192,
        hidden_size=256,
        num_layers=4,
        num_attention_heads=8,
        ffn_hidden_size=1024,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=32,
        zero_expert_num=16,
        moe_topk=6,
        expert_ffn_hidden_size=256,
        routed_scaling_factor=4.0,
        expected_ffn_experts=4.0,
        max_position_embeddings=4096,
    ),
    # Analytic only: DeepSeek-V3 (671 B total / 37 B activated; MTP module not counted).
    "deepseek-v3": dict(
        vocab_size=129280,
        hidden_size=7168,
        num_layers=61,
        num_attention_heads=128,
        ffn_hidden_size=18432,
        layer_type="standard",
        first_k_dense_layers=3,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        mla_scale_q_lora=False,
        mla_scale_kv_lora=False,
        n_routed_experts=256,
        zero_expert_num=0,
        moe_topk=8,
        expert_ffn_hidden_size=2048,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        expected_ffn_experts=8.0,
        rope_theta=10000.0,
        max_position_embeddings=163840,
        rms_norm_eps=1e-6,
    ),
    # Analytic only: Qwen3-235B-A22B (GQA, 128 experts, top-8, no shared experts).
    "qwen3-235b-a22b": dict(
        vocab_size=151936,
        hidden_size=4096,
        num_layers=94,
        num_attention_heads=64,
        ffn_hidden_size=12288,
        layer_type="standard",
        attention="gqa",
        num_key_value_heads=4,
        head_dim=128,
        q_lora_rank=0,
        kv_lora_rank=0,
        qk_nope_head_dim=0,
        qk_rope_head_dim=0,
        v_head_dim=0,
        mla_scale_q_lora=False,
        mla_scale_kv_lora=False,
        n_routed_experts=128,
        zero_expert_num=0,
        moe_topk=8,
        expert_ffn_hidden_size=1536,
        routed_scaling_factor=1.0,
        expected_ffn_experts=8.0,
        rope_theta=1e6,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
    ),
}


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    if name not in _PRESETS:
        raise ConfigError(
            f"unknown model preset {name!r}; choose one of {', '.join(preset_names())}"
        )
    return ModelConfig(name=name, **_PRESETS[name])


def load_model_config(spec: str) -> ModelConfig:
    """A preset name, or a TOML file whose ``[model]`` table (or top level) lists fields.

    The TOML may name ``preset = "tiny"`` as the base and override any field.
    """
    if spec in _PRESETS:
        return get_preset(spec)
    path = Path(spec)
    if path.suffix != ".toml":
        raise ConfigError(
            f"unknown model {spec!r}: give a preset ({', '.join(preset_names())}) or a .toml file"
        )
    if not path.is_file():
        raise ConfigError(f"model file {spec!r} does not exist")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"model file {spec!r} is not valid TOML: {exc}") from None
    table = doc.get("model", doc)
    if not isinstance(table, dict):
        raise ConfigError(f"model file {spec!r}: [model] must be a table")
    table.setdefault("name", path.stem)
    return ModelConfig.from_dict(table)
