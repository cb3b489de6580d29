"""Checkpoints: bitwise round trips, Hugging Face key names and config fields, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from longcat_sim import model as model_pkg
from longcat_sim.model.checkpoint import (
    INDEX_NAME,
    config_from_hf,
    config_to_hf,
    save_pretrained,
    to_hf_state_dict,
)
from longcat_sim.model.config import ConfigError, get_preset
from longcat_sim.model.transformer import LongcatFlashForCausalLM

# The released LongCat-Flash config.json fields (HF meituan-longcat/LongCat-Flash-Chat, spec §1.1).
RELEASED_CONFIG = {
    "architectures": ["LongcatFlashForCausalLM"],
    "model_type": "longcat_flash",
    "vocab_size": 131072,
    "hidden_size": 6144,
    "num_layers": 28,
    "num_attention_heads": 64,
    "ffn_hidden_size": 12288,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "moe_topk": 12,
    "n_routed_experts": 512,
    "zero_expert_num": 256,
    "zero_expert_type": "identity",
    "expert_ffn_hidden_size": 2048,
    "routed_scaling_factor": 6.0,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000000.0,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "mla_scale_q_lora": True,
    "mla_scale_kv_lora": True,
    "hidden_act": "silu",
}


def _model(cfg=None, seed: int = 0) -> LongcatFlashForCausalLM:
    cfg = cfg or get_preset("tiny")
    module = LongcatFlashForCausalLM(cfg, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in module.model.layers:
            bias = layer.mlp.router.e_score_correction_bias
            bias.copy_(torch.randn(bias.shape, generator=gen) * 1e-2)
    return module.eval()


def _ids(cfg, batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(
        0, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(7)
    )


def _assert_bitwise_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("changes", [{}, {"mtp_layers": 1}, {"tie_word_embeddings": True}])
def test_round_trip_is_bitwise(tmp_path, changes) -> None:
    original = _model(get_preset("tiny").replace(**changes))
    loaded = model_pkg.load_pretrained(save_pretrained(original, tmp_path / "ckpt"))
    assert not loaded.training
    assert loaded.config == original.config
    _assert_bitwise_equal(original, loaded)
    ids = _ids(original.config)
    assert torch.equal(original(ids), loaded(ids))


def test_sharded_round_trip(tmp_path) -> None:
    original = _model()
    out = save_pretrained(original, tmp_path / "sharded", max_shard_bytes=64 * 1024)
    index = json.loads((out / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    _assert_bitwise_equal(original, model_pkg.load_pretrained(out))


def test_keys_use_hugging_face_names() -> None:
    cfg = get_preset("tiny").replace(mtp_layers=1)
    keys = set(to_hf_state_dict(_model(cfg)))
    n = cfg.n_routed_experts
    for i in (0, 1):
        assert f"model.layers.0.self_attn.{i}.kv_a_proj_with_mqa.weight" in keys
        assert f"model.layers.0.input_layernorm.{i}.weight" in keys
        assert f"model.layers.0.mlps.{i}.down_proj.weight" in keys
    assert "model.layers.1.mlp.router.classifier.weight" in keys
    assert "model.layers.1.mlp.router.e_score_correction_bias" in keys
    assert f"model.layers.1.mlp.experts.{n - 1}.down_proj.weight" in keys
    assert f"model.layers.1.mlp.experts.{n}.down_proj.weight" not in keys
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= keys
    assert any(key.startswith("model.mtp.") for key in keys)


def test_loads_a_transformers_style_checkpoint(tmp_path) -> None:
    """Hugging Face layout: released-style config.json, and identity-expert gate/up placeholders."""
    cfg = get_preset("tiny")
    reference = _model(cfg)
    tensors = to_hf_state_dict(reference)
    for layer in range(cfg.num_layers):
        for expert in range(cfg.n_routed_experts, cfg.num_experts_total):
            shape = (cfg.expert_ffn_hidden_size, cfg.hidden_size)
            tensors[f"model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight"] = torch.ones(
                shape
            )
            tensors[f"model.layers.{layer}.mlp.experts.{expert}.up_proj.weight"] = torch.ones(shape)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    doc = {key: value for key, value in config_to_hf(cfg).items() if key != "longcat_sim"}
    doc.pop("rope_parameters")
    doc["rope_theta"] = cfg.rope_theta
    (tmp_path / "config.json").write_text(json.dumps(doc))
    loaded = model_pkg.load_pretrained(tmp_path)
    ids = _ids(cfg)
    logits = loaded(ids)
    assert logits.shape == (*ids.shape, cfg.vocab_size)
    assert torch.equal(logits, reference(ids))


def test_released_config_maps_onto_the_preset() -> None:
    cfg = config_from_hf(RELEASED_CONFIG, has_mtp=True)
    preset = get_preset("longcat-flash")
    assert cfg.replace(name=preset.name) == preset  # K_e = 12 * 512 / 768 = 8 under uniform routing


def test_our_config_round_trips_and_reads_the_old_target_name() -> None:
    """Every field survives config.json, ``kernels`` included; a config saved before
    ``target_ffn_experts`` was renamed (``expected_ffn_experts``) still loads."""
    cfg = get_preset("tiny").replace(kernels="triton", target_ffn_experts=1.5)
    doc = config_to_hf(cfg)
    assert config_from_hf(doc) == cfg
    extra = dict(doc["longcat_sim"])
    extra["expected_ffn_experts"] = extra.pop("target_ffn_experts")
    assert config_from_hf({**doc, "longcat_sim": extra}) == cfg


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda t: t.pop("model.norm.weight"), "lacks 1 tensors, e.g. 'model.norm.weight'"),
        (lambda t: t.__setitem__("model.bogus.weight", torch.zeros(1)), "unexpected tensors"),
        (lambda t: t.__setitem__("model.norm.weight", torch.zeros(3)), "has shape (3,)"),
        (lambda t: t.pop("model.layers.0.mlp.experts.2.up_proj.weight"), "lacks experts [2]"),
    ],
)
def test_bad_checkpoints_fail_clearly(tmp_path, mutate, needle) -> None:
    reference = _model()
    save_pretrained(reference, tmp_path)
    tensors = to_hf_state_dict(reference)
    mutate(tensors)
    (tmp_path / "model.safetensors").unlink()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError) as info:
        model_pkg.load_pretrained(tmp_path)
    assert needle in str(info.value)


def test_missing_directory_and_bad_config(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        model_pkg.load_pretrained(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps({**RELEASED_CONFIG, "hidden_act": "gelu"}))
    with pytest.raises(ConfigError, match="hidden_act 'gelu' is not supported"):
        model_pkg.load_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="analytic-only"):
        config_to_hf(get_preset("deepseek-v3"))
