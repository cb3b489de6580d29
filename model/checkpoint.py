"""Hugging Face compatible checkpoints: ``config.json`` fields and safetensors key names.

Our module names already produce the ``LongcatFlashForCausalLM`` key names, except that routed
experts are stored stacked (``mlp.experts.gate_proj`` of shape [N, I, H]) for grouped GEMMs;
on disk they are one triple per expert, ``mlp.experts.E.{gate,up,down}_proj.weight``. Checkpoints
written by the transformers library also hold meaningless gate/up weights for identity experts
(E >= N); the loader skips them. Files are written atomically; sharded checkpoints use the
standard ``model.safetensors.index.json``.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from longcat_sim.model.config import ConfigError, ModelConfig
from longcat_sim.model.files import write_bytes_atomic, write_json_atomic

__all__ = [
    "config_from_hf",
    "config_to_hf",
    "from_hf_state_dict",
    "load_pretrained",
    "save_pretrained",
    "to_hf_state_dict",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_EXPERT_KEY = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$"
)
_STACKED_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")

# Fields we keep that the Hugging Face configuration has no name for.
_EXTRA_FIELDS = (
    "name",
    "topology",
    "scale_zero_expert_gates",
    "target_ffn_experts",
    "latent_norm_eps",
    "mtp_layers",
    "deterministic",
    "kernels",
    "expert_checksums",
)


# -- configuration ----------------------------------------------------------------------------


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` a transformers ``LongcatFlashConfig`` reads, plus our extra fields."""
    if not cfg.runnable:
        raise ConfigError(f"model {cfg.name!r} is analytic-only and has no checkpoint format")
    return {
        "architectures": ["LongcatFlashForCausalLM"],
        "model_type": "longcat_flash",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers,
        "num_hidden_layers": 2 * cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
        "ffn_hidden_size": cfg.ffn_hidden_size,
        "q_lora_rank": cfg.q_lora_rank or None,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "qk_head_dim": cfg.qk_head_dim,
        "head_dim": cfg.qk_rope_head_dim,
        "mla_scale_q_lora": cfg.mla_scale_q_lora,
        "mla_scale_kv_lora": cfg.mla_scale_kv_lora,
        "moe_topk": cfg.moe_topk,
        "n_routed_experts": cfg.n_routed_experts,
        "zero_expert_num": cfg.zero_expert_num,
        "zero_expert_type": "identity",
        "expert_ffn_hidden_size": cfg.expert_ffn_hidden_size,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "initializer_range": cfg.initializer_range,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "longcat_sim": {name: getattr(cfg, name) for name in _EXTRA_FIELDS},
    }


def config_from_hf(doc: Mapping[str, Any], *, has_mtp: bool | None = None) -> ModelConfig:
    """Read a transformers ``config.json`` (released checkpoint or ours) into a ModelConfig."""
    if doc.get("model_type", "longcat_flash") != "longcat_flash":
        raise ConfigError(
            f"config.json has model_type {doc.get('model_type')!r}, expected 'longcat_flash'"
        )
    if doc.get("hidden_act", "silu") != "silu":
        raise ConfigError(
            f"config.json hidden_act {doc['hidden_act']!r} is not supported (only silu)"
        )
    if doc.get("zero_expert_type", "identity") != "identity":
        raise ConfigError(
            f"zero_expert_type {doc['zero_expert_type']!r} is not supported (only identity)"
        )
    if doc.get("num_key_value_heads", doc.get("num_attention_heads")) != doc.get(
        "num_attention_heads"
    ):
        raise ConfigError("num_key_value_heads must equal num_attention_heads for MLA checkpoints")
    try:
        num_layers = (
            int(doc["num_layers"]) if "num_layers" in doc else int(doc["num_hidden_layers"]) // 2
        )
        rope = doc.get("rope_parameters") or doc.get("rope_scaling") or {}
        if doc.get("rope_scaling"):
            raise ConfigError("rope_scaling is not supported; the released model uses none")
        rope_theta = float(rope.get("rope_theta", doc.get("rope_theta", 1e7)))
        fields: dict[str, Any] = {
            "vocab_size": int(doc["vocab_size"]),
            "hidden_size": int(doc["hidden_size"]),
            "num_layers": num_layers,
            "num_attention_heads": int(doc["num_attention_heads"]),
            "ffn_hidden_size": int(doc["ffn_hidden_size"]),
            "q_lora_rank": int(doc.get("q_lora_rank") or 0),
            "kv_lora_rank": int(doc["kv_lora_rank"]),
            "qk_nope_head_dim": int(doc["qk_nope_head_dim"]),
            "qk_rope_head_dim": int(doc["qk_rope_head_dim"]),
            "v_head_dim": int(doc["v_head_dim"]),
            "mla_scale_q_lora": bool(doc.get("mla_scale_q_lora", True)),
            "mla_scale_kv_lora": bool(doc.get("mla_scale_kv_lora", True)),
            "moe_topk": int(doc["moe_topk"]),
            "n_routed_experts": int(doc["n_routed_experts"]),
            "zero_expert_num": int(doc.get("zero_expert_num", 0)),
            "expert_ffn_hidden_size": int(doc["expert_ffn_hidden_size"]),
            "routed_scaling_factor": float(doc.get("routed_scaling_factor", 1.0)),
            "rms_norm_eps": float(doc.get("rms_norm_eps", 1e-5)),
            "rope_theta": rope_theta,
            "max_position_embeddings": int(doc.get("max_position_embeddings", 131072)),
            "tie_word_embeddings": bool(doc.get("tie_word_embeddings", False)),
            "initializer_range": float(doc.get("initializer_range", 0.02)),
        }
    except KeyError as exc:
        raise ConfigError(f"config.json lacks the field {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config.json has a malformed value: {exc}") from None
    extra = dict(doc.get("longcat_sim") or {})
    if "expected_ffn_experts" in extra:  # its name before the rename
        extra.setdefault("target_ffn_experts", extra.pop("expected_ffn_experts"))
    fields["name"] = extra.pop("name", "longcat-flash-checkpoint")
    fields.update(extra)
    if "target_ffn_experts" not in fields:
        # config.json does not state K_e; take the uniform-routing expectation K * N / (N + Z)
        # (exactly 8 for LongCat-Flash), clipped to what top-k routing allows.
        topk, n_ffn, n_zero = (
            fields["moe_topk"],
            fields["n_routed_experts"],
            fields["zero_expert_num"],
        )
        uniform = topk * n_ffn / (n_ffn + n_zero)
        fields["target_ffn_experts"] = min(max(uniform, topk - n_zero, 0), min(topk, n_ffn))
    if has_mtp is not None:
        fields["mtp_layers"] = int(has_mtp)
    return ModelConfig.from_dict(fields)


# -- state dicts ---------------------------------------------------------------------------------


def to_hf_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our state dict with stacked experts split into one triple per expert (on-disk names)."""
    out: dict[str, torch.Tensor] = {}
    cfg: ModelConfig = module.config
    for key, tensor in module.state_dict().items():
        match = _STACKED_KEY.match(key)
        if match is None:
            if key == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            out[key] = tensor.detach().contiguous()
            continue
        prefix, proj = match.groups()
        for expert, weight in enumerate(tensor.detach().unbind(0)):
            out[f"{prefix}.{expert}.{proj}.weight"] = weight.contiguous()
    return out


def from_hf_state_dict(
    module: torch.nn.Module, tensors: Mapping[str, torch.Tensor]
) -> torch.nn.Module:
    """Copy on-disk tensors into ``module``; per-expert keys are stacked, identity-expert
    gate/up weights are ignored, and any other missing or unexpected key is an error."""
    cfg: ModelConfig = module.config
    own = module.state_dict()
    stacked: dict[str, dict[int, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in tensors.items():
        match = _EXPERT_KEY.match(key)
        if match is not None:
            prefix, expert, proj = match.group(1), int(match.group(2)), match.group(3)
            if expert >= cfg.n_routed_experts:
                continue  # identity experts carry no weights; transformers writes placeholders
            stacked.setdefault(f"{prefix}.{proj}", {})[expert] = tensor
        elif key in own:
            plain[key] = tensor
        else:
            unexpected.append(key)
    for key, experts in stacked.items():
        if key not in own:
            unexpected.append(key)
            continue
        missing = sorted(set(range(cfg.n_routed_experts)) - set(experts))
        if missing:
            raise ConfigError(f"checkpoint lacks experts {missing[:5]} of {key}")
        plain[key] = torch.stack([experts[i] for i in range(cfg.n_routed_experts)])
    if cfg.tie_word_embeddings and "lm_head.weight" in own and "lm_head.weight" not in plain:
        plain["lm_head.weight"] = plain.get("model.embed_tokens.weight", own["lm_head.weight"])
    if unexpected:
        raise ConfigError(
            f"checkpoint has {len(unexpected)} unexpected tensors, e.g. {unexpected[0]!r}"
        )
    missing_keys = sorted(set(own) - set(plain))
    if missing_keys:
        raise ConfigError(f"checkpoint lacks {len(missing_keys)} tensors, e.g. {missing_keys[0]!r}")
    for key, tensor in plain.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise ConfigError(
                f"tensor {key!r} has shape {tuple(tensor.shape)}, the config expects {tuple(own[key].shape)}"
            )
    module.load_state_dict(plain, strict=True)
    return module


# -- files -----------------------------------------------------------------------------------------


def _shards(
    tensors: dict[str, torch.Tensor], max_bytes: int | None
) -> Iterator[dict[str, torch.Tensor]]:
    if max_bytes is None:
        yield tensors
        return
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[key] = tensors[key]
        size += nbytes
    if shard:
        yield shard


DIGEST_KEY = "tensors_sha256"  # safetensors metadata: the digest of the file's tensors


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _weights_bytes(shard: dict[str, torch.Tensor]) -> bytes:
    """A safetensors file whose metadata carries the digest of its tensors."""
    return safetensors_bytes(shard, metadata={"format": "pt", DIGEST_KEY: tensors_digest(shard)})


def save_pretrained(
    module: torch.nn.Module, path: str | Path, *, max_shard_bytes: int | None = None
) -> Path:
    """Write ``config.json`` and safetensors weights (sharded with an index above
    ``max_shard_bytes``). Each file is written atomically; the index is written last."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(module)
    write_json_atomic(out / CONFIG_NAME, config_to_hf(module.config))
    shards = list(_shards(tensors, max_shard_bytes))
    if len(shards) == 1:
        write_bytes_atomic(out / WEIGHTS_NAME, _weights_bytes(shards[0]))
        return out
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_bytes_atomic(out / name, _weights_bytes(shard))
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json_atomic(
        out / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map}
    )
    return out


def _shard_names(path: Path) -> list[str]:
    """The weight files a shard index names, each a plain file name inside ``path``."""
    where = str(path / INDEX_NAME)
    try:
        index = json.loads((path / INDEX_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"shard index {where!r} is damaged: {exc}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConfigError(f"shard index {where!r} is damaged: no weight_map of file names")
    names = sorted(set(weight_map.values()))
    for name in names:
        if Path(name).name != name or name in ("", ".", "..") or "\\" in name:
            raise ConfigError(
                f"shard index {where!r} names {name!r}, outside the checkpoint directory"
            )
    return names


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if (path / INDEX_NAME).is_file():
        files = _shard_names(path)
    elif (path / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise ConfigError(f"{str(path)!r} holds neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors |= _read_weights_file(path, name)
    return tensors


def _read_weights_file(path: Path, name: str) -> dict[str, torch.Tensor]:
    """One safetensors file's tensors, checked against the digest in its metadata when it
    has one (files written by other tools have none)."""
    try:
        with safe_open(str(path / name), framework="pt") as handle:
            recorded = (handle.metadata() or {}).get(DIGEST_KEY)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors reports a damaged file with several types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot read weights file {name!r}: {first}") from None
    if recorded is not None and recorded != tensors_digest(tensors):
        raise ConfigError(
            f"weights file {str(path / name)!r} is damaged: its tensors do not match the "
            "SHA-256 recorded when it was written"
        )
    return tensors


def _stored_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype holding most of a checkpoint's weights (float32 when it has none)."""
    counts: dict[torch.dtype, int] = {}
    for tensor in tensors.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def load_pretrained(
    path: str | Path, *, dtype: torch.dtype | Literal["auto"] | None = None
) -> torch.nn.Module:
    """Load a checkpoint directory (ours or one written by transformers) in eval mode.

    Calling the result on ``input_ids`` (LongTensor [B, T]) returns logits [B, T, vocab].
    An MTP module is built when the weights contain ``model.mtp.*`` tensors.

    ``dtype`` picks the parameters' dtype, as ``from_pretrained``'s does in transformers: None
    (the default) builds float32 parameters, the dtype the trainer and the reference kernels
    compute in; weights stored in a narrower dtype (float16, bfloat16) are upcast exactly, and
    one ``warning:`` line on stderr says so. ``"auto"`` keeps the dtype that holds most of the
    stored weights; a torch dtype converts to it. Outside float32 the routers stay float32.
    """
    from longcat_sim.model.transformer import LongcatFlashForCausalLM

    root = Path(path)
    if not (root / CONFIG_NAME).is_file():
        raise ConfigError(f"{str(root)!r} has no {CONFIG_NAME}; pass a checkpoint directory")
    try:
        doc = json.loads((root / CONFIG_NAME).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{CONFIG_NAME} in {str(root)!r} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{CONFIG_NAME} in {str(root)!r} is not a JSON object")
    try:
        config_from_hf(doc)  # reject a bad config before reading any weights
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{CONFIG_NAME} in {str(root)!r} is damaged: {exc!r}") from None
    tensors = _read_tensors(root)
    cfg = config_from_hf(doc, has_mtp=any(key.startswith("model.mtp.") for key in tensors))
    module = LongcatFlashForCausalLM(cfg)
    from_hf_state_dict(module, tensors)
    stored = _stored_dtype(tensors)
    if dtype is None and stored != torch.float32:
        print(
            f"warning: checkpoint {str(root)!r} stores {str(stored).removeprefix('torch.')} "
            "weights; loaded as float32 (pass dtype='auto' to keep them as stored)",
            file=sys.stderr,
        )
    target = stored if dtype == "auto" else dtype
    if target is not None and target != torch.float32:
        module = module.to(target)
        for moe in (layer.mlp for layer in module.model.layers):
            moe.router.float()
    return module.eval()
