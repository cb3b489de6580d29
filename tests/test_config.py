"""ModelConfig validation, presets, TOML loading and hashing; the config package's fields,
options, validators, TOML reader and hash."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from longcat_sim.cluster.assumptions import get_assumptions
from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.config.deployment import (
    DecodeDeployment,
    HostStep,
    ModelChoice,
    TrainDeployment,
)
from longcat_sim.config.fields import choice, flag, integer, names, number, optional
from longcat_sim.config.flags import add_config_flags, list_of, set_values
from longcat_sim.config.report import ReportConfig
from longcat_sim.config.toml import read_toml
from longcat_sim.errors import UserError
from longcat_sim.model.config import (
    ConfigError,
    ModelConfig,
    get_preset,
    load_model_config,
    preset_names,
)
from longcat_sim.runs import config_hash


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
        ({"hidden_size": 0}, "'hidden_size' must be an integer >= 1"),
        ({"topology": "sideways"}, "'topology' must be one of"),
        ({"target_ffn_experts": 5.0}, "target_ffn_experts=5.0 must lie in"),
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


# -- the config package: fields, flags, TOML, hash ---------------------------------------------


def _parser(*classes: type, **kw) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, *classes, **kw)
    return parser


@pytest.mark.parametrize(
    "cls", [DecodeDeployment, TrainDeployment, ReportConfig, ModelChoice, HostStep]
)
def test_every_field_is_an_option_with_help_unit_and_a_validator(cls: type) -> None:
    """The config class is the command line: ``--field-name`` per field, its help from the
    field, and every field checked by its own validator."""
    text = _parser(cls).format_help()
    for f in dataclasses.fields(cls):
        assert flag(f.name) in text
        assert f.metadata["help"] and f.metadata["check"] is not None
    assert "requests per GPU [requests] (default 96)" in _parser(DecodeDeployment).format_help()


def test_flags_build_the_config_and_a_bad_value_names_its_option() -> None:
    args = _parser(DecodeDeployment).parse_args(["--batch-per-device", "8", "--context", "2e3"])
    assert set_values(args, DecodeDeployment) == {"batch_per_device": 8, "context": 2000.0}
    dep = DecodeDeployment(**set_values(args, DecodeDeployment))
    assert (dep.batch_per_device, dep.context, dep.gpus) == (8, 2000.0, 128)
    with pytest.raises(UserError, match=r"^--batch-per-device must be an integer >= 1, got 0$"):
        DecodeDeployment(batch_per_device=0)


def test_list_options_parse_comma_separated_values() -> None:
    args = _parser(DecodeDeployment, as_lists=True).parse_args(["--schedule", "sbo,tbo"])
    assert args.schedule == ["sbo", "tbo"]
    assert list_of(int)("8, 16") == [8, 16]
    with pytest.raises(argparse.ArgumentTypeError, match="takes int values"):
        list_of(int)("8,lots")


def test_a_shared_field_is_one_option_showing_each_default() -> None:
    text = " ".join(_parser(DecodeDeployment, TrainDeployment).format_help().split())
    assert text.count("baseline in training) (default unset)") == 1
    assert "--cp CP context parallelism of attention (default 8)" in text


@pytest.mark.parametrize(
    ("check", "good", "bad"),
    [
        (integer(1), [1, 96], [0, -1, True, 1.0, "8"]),
        (integer(0), [0, 3], [-1, None]),
        (number(0.0, 1.0), [0, 0.5, 1.0], [-0.1, 1.5, float("nan"), True, "x"]),
        (number(0.0, open_low=True), [1e-9, 7], [0, -2, float("inf")]),
        (choice("bf16", "fp8"), ["bf16"], ["fp16", None]),
        (names(integer(1)), [(1, 2), [4]], [(), (1, 1), (0,), "12"]),
        (optional(integer(1)), [None, 3], [0]),
    ],
)
def test_validators_accept_the_valid_and_refuse_the_rest(check, good, bad) -> None:
    assert all(check.test(v) for v in good)
    assert not any(check.test(v) for v in bad)  # negative control: each must be refused
    assert check.problem("x", bad[0]) == f"x {check.rule}, got {bad[0]!r}"


def test_mtp_acceptance_is_a_term_of_the_assumption_set() -> None:
    assert get_assumptions("table7").mtp_accept == 0.8
    assert get_assumptions("default").mtp_accept == get_assumptions("train").mtp_accept == 0.9
    renamed = get_assumptions("table7").replace(name="paper")  # the name no longer decides
    assert renamed.mtp_accept == 0.8
    with pytest.raises(ClusterInputError, match="'mtp_accept' must lie in"):
        get_assumptions("default").replace(mtp_accept=1.2)


def test_one_toml_reader_reports_one_line(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[report]\ngpus = 8\n")
    assert read_toml(path, what="c", table="report") == {"gpus": 8}
    path.write_text("gpus = 8\n")
    assert read_toml(path, what="c", table="report") == {"gpus": 8}  # top level
    with pytest.raises(UserError, match=r"^c: unknown table or key 'gpus'; put settings under"):
        read_toml(path, what="c", table="report", only_table=True)
    path.write_text("[report\n")
    with pytest.raises(ConfigError, match=r"^c is not valid TOML"):
        read_toml(path, what="c", table="report", error=ConfigError)
    with pytest.raises(UserError, match=r"^m does not exist$"):
        read_toml(tmp_path / "missing.toml", what="m")


def test_one_config_hash() -> None:
    cfg = get_preset("tiny")
    assert cfg.config_hash() == config_hash(cfg.to_dict())
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
