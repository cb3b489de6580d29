"""Honest defaults of the decode simulator: every value a run does not state comes from the
model or the hardware it names, or the run is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from longcat_sim.cluster.assumptions import (
    DEFAULT,
    FITTED_EXPERT_POPULARITY_SIGMA,
    router_spread,
)
from longcat_sim.cluster.hardware import get_hardware
from longcat_sim.config.deployment import DecodeDeployment, TrainDeployment
from longcat_sim.errors import UserError
from longcat_sim.model.config import ConfigError, load_model_config
from longcat_sim.scenarios.decode import resolve_decode
from longcat_sim.scenarios.sweep import grid_setups
from longcat_sim.scenarios.train import run_train


def _setup(model: str, **values):
    schedule = "sbo" if model == "longcat-flash" else "tbo"
    return resolve_decode(DecodeDeployment(model=model, schedule=schedule, **values))


def test_mtp_draft_tokens_follow_the_model_unless_asked_for() -> None:
    assert DecodeDeployment().mtp_draft_tokens is None
    drafts = {m: _setup(m).mtp_draft_tokens for m in ("longcat-flash", "deepseek-v3")}
    assert drafts == {"longcat-flash": 1, "deepseek-v3": 1}
    assert _setup("qwen3-235b-a22b").mtp_draft_tokens == 0  # no MTP head
    assert _setup("qwen3-235b-a22b", mtp_draft_tokens=2).mtp_draft_tokens == 2


def test_draft_tokens_at_acceptance_zero_are_flagged() -> None:
    assert _setup("longcat-flash").warnings() == []
    (line,) = _setup("longcat-flash", mtp_accept=0.0).warnings()
    assert "acceptance 0" in line
    assert _setup("longcat-flash", mtp_accept=0.0, mtp_draft_tokens=0).warnings() == []


def test_model_file_without_preset_states_its_moe(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text("[model]\nnum_layers = 2\nn_routed_experts = 16\n")
    with pytest.raises(ConfigError) as err:
        load_model_config(str(path))
    assert "zero_expert_num, moe_topk, target_ffn_experts" in str(err.value)
    assert "n_routed_experts," not in str(err.value)
    path.write_text(
        "[model]\nn_routed_experts = 16\nzero_expert_num = 0\nmoe_topk = 2\n"
        "target_ffn_experts = 2.0\n"
    )
    assert load_model_config(str(path)).n_routed_experts == 16
    path.write_text('[model]\npreset = "tiny"\nnum_layers = 3\n')  # a preset states them
    assert load_model_config(str(path)).num_layers == 3


def test_gpu_hour_price_is_the_hardware_s_unless_overridden() -> None:
    h100 = _setup("longcat-flash", hardware="H100")
    assert h100.hw.gpu_hour_usd == get_hardware("H100").gpu_hour_usd != 2.0
    assert h100.config()["gpu_hour_usd_source"] == get_hardware("H100").price_source
    mine = _setup("longcat-flash", hardware="H100", gpu_hour_usd=1.25)
    assert mine.config()["gpu_hour_usd"] == 1.25
    assert mine.config()["gpu_hour_usd_source"] == "--gpu-hour-usd"


def test_sbo_needs_a_shortcut_branch() -> None:
    with pytest.raises(UserError, match="deepseek-v3 has standard MoE layers: use tbo"):
        resolve_decode(DecodeDeployment(model="deepseek-v3", schedule="sbo"))
    grid = {"model": ["longcat-flash", "deepseek-v3"], "schedule": ["sbo", "tbo"]}
    pairs = [(s.cfg.name, s.schedule) for s in grid_setups(grid, model_schedules=True)]
    assert pairs == [("longcat-flash", "sbo"), ("longcat-flash", "tbo"), ("deepseek-v3", "tbo")]
    with pytest.raises(UserError, match="needs ScMoE layers"):
        grid_setups(grid)  # schedules asked for are run as given, or refused


def test_router_spread_is_the_model_s_own() -> None:
    assert DEFAULT.expert_popularity_sigma is None
    assert router_spread("longcat-flash")[0] == FITTED_EXPERT_POPULARITY_SIGMA
    longcat = _setup("longcat-flash").config()
    assert longcat["expert_popularity_sigma"] == FITTED_EXPERT_POPULARITY_SIGMA
    assert "Table 6" in longcat["router_imbalance_source"]
    deepseek = _setup("deepseek-v3").config()
    assert deepseek["expert_popularity_sigma"] == 0.0
    assert "no measured spread" in deepseek["router_imbalance_source"]
    stated = resolve_decode(
        DecodeDeployment(model="deepseek-v3", schedule="tbo"), ["expert_popularity_sigma=0.4"]
    ).config()
    assert stated["expert_popularity_sigma"] == 0.4
    assert "stated" in stated["router_imbalance_source"]


def test_training_resolves_the_router_spread_too() -> None:
    dep = TrainDeployment(microbatches=1, tokens_per_microbatch=512, seq_len=1024)
    cfg = load_model_config(dep.model)
    _, config = run_train(dep, cfg, get_hardware("H800"), DEFAULT)
    assert config["expert_popularity_sigma"] == FITTED_EXPERT_POPULARITY_SIGMA
