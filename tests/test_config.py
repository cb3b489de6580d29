"""ModelConfig validation, presets, TOML loading and hashing."""

from __future__ import annotations

import pytest
from longcat_sim.model.config import (
    ConfigError,
    ModelConfig,
    get_preset,
    load_model_config,
    preset_names,
)


def test_presets_build_and_are_named() -> None:
    for name in preset_names():
        cfg = get_preset(name)
        assert cfg.name == name


def test_longcat_preset_matches_released_config() -> None:
    cfg = get_preset("longcat-flash")
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_attention_heads) == (6144, 28, 64)
    assert (cfg.n_routed_experts, cfg.zero_expert_num, cfg.moe_topk) == (512, 256, 12)
    assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_head_dim, cfg.v_head_dim) == (
        1536,
        512,
        192,
        128,
    )
    assert cfg.routed_scaling_factor == 6.0 and cfg.runnable


def test_only_longcat_style_presets_are_runnable() -> None:
    assert get_preset("tiny").runnable and get_preset("small").runnable
    assert not get_preset("deepseek-v3").runnable
    assert not get_preset("qwen3-235b-a22b").runnable


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"moe_topk": 20}, "moe_topk=20 exceeds"),
        ({"hidden_size": 0}, "'hidden_size' must be positive"),
        ({"topology": "sideways"}, "'topology' must be one of"),
        ({"expected_ffn_experts": 5.0}, "expected_ffn_experts=5.0 must lie in"),
        ({"qk_rope_head_dim": 7}, "must be even"),
        ({"colour": "blue"}, "unknown model field 'colour'"),
        ({"num_layers": True}, "'num_layers' must be an integer"),
        ({"mtp_layers": 2}, "mtp_layers must be 0 or 1"),
    ],
)
def test_bad_fields_give_one_line_naming_the_field(changes: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        get_preset("tiny").replace(**changes)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_preset_lists_choices() -> None:
    with pytest.raises(ConfigError, match="unknown model preset 'huge'; choose one of"):
        get_preset("huge")


def test_toml_overrides_a_preset(tmp_path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('[model]\npreset = "tiny"\nnum_layers = 3\nrouted_scaling_factor = 2\n')
    cfg = load_model_config(str(path))
    assert cfg.num_layers == 3 and cfg.routed_scaling_factor == 2.0 and cfg.name == "mine"
    assert cfg.hidden_size == get_preset("tiny").hidden_size


def test_toml_errors_are_clear(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_model_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_model_config(str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="give a preset"):
        load_model_config("nonsense")


def test_hash_is_stable_and_sensitive() -> None:
    a, b = get_preset("tiny"), get_preset("tiny")
    assert a.config_hash() == b.config_hash()
    assert a.config_hash() != a.replace(num_layers=3).config_hash()
    assert ModelConfig.from_dict(a.to_dict()) == a
