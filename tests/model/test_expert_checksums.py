"""Checksum-encoded expert weights as a model option (``expert_checksums``): derived state that
follows the weights, is never saved and changes no output."""

from __future__ import annotations

import pytest
import torch

from longcat_sim.model.abft import keep_checksums, moe_layers
from longcat_sim.model.checkpoint import (
    config_from_hf,
    config_to_hf,
    load_pretrained,
    save_pretrained,
)
from longcat_sim.model.config import get_preset, same_model
from longcat_sim.model.experts import GroupedExperts, column_checksum
from longcat_sim.model.hashing import parameter_hash
from longcat_sim.model.probes import GEMMS
from longcat_sim.model.transformer import LongcatFlashForCausalLM

TINY = get_preset("tiny")
CHECKED = TINY.replace(expert_checksums=True)


def build(cfg, seed: int = 0) -> LongcatFlashForCausalLM:
    return LongcatFlashForCausalLM(cfg, generator=torch.Generator().manual_seed(seed))


def all_experts(model: torch.nn.Module) -> list[GroupedExperts]:
    return [moe.experts for _, moe in moe_layers(model)]


def stale_gemms(experts: GroupedExperts) -> list[str]:
    """The GEMMs whose carried encoding is not that of the weight as it is now."""
    weights = (experts.gate_proj, experts.up_proj, experts.down_proj)
    stale = []
    for gemm, weight in zip(GEMMS, weights, strict=True):
        carried, fresh = experts.checksum(gemm), column_checksum(weight)
        if not (
            torch.equal(carried.sums_NX, fresh.sums_NX)
            and torch.equal(carried.scales_N, fresh.scales_N)
        ):
            stale.append(gemm)
    return stale


def test_checksums_change_no_parameter_no_output_and_no_checkpoint_key() -> None:
    checked, plain = build(CHECKED), build(TINY)
    assert all(e.expert_checksums for e in all_experts(checked))
    assert not any(e.expert_checksums for e in all_experts(plain))
    assert checked.state_dict().keys() == plain.state_dict().keys()  # never saved
    assert parameter_hash(checked, include_buffers=True) == parameter_hash(
        plain, include_buffers=True
    )
    ids = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(checked(ids), plain(ids))
    assert all(stale_gemms(e) == [] for e in all_experts(checked))  # encoded at build time


def test_checksums_are_encoded_again_on_load_and_only_then(tmp_path) -> None:
    model, other = build(CHECKED), build(CHECKED, seed=7)
    (experts, *_), (loaded, *_) = all_experts(model), all_experts(other)
    with torch.no_grad():
        experts.down_proj.mul_(2.0)  # a write that bypasses the encoding
    assert stale_gemms(experts) == ["down"]  # negative control: the check sees a stale code
    model.load_state_dict(other.state_dict())
    assert stale_gemms(experts) == [] and torch.equal(experts.gate_proj, loaded.gate_proj)
    save_pretrained(other, tmp_path / "ckpt")
    reread = load_pretrained(tmp_path / "ckpt")
    assert reread.config.expert_checksums
    assert all(stale_gemms(e) == [] for e in all_experts(reread))


def test_a_cast_encodes_the_checksums_of_the_cast_weights() -> None:
    model = build(CHECKED).to(torch.bfloat16)
    for experts in all_experts(model):
        assert experts.checksum("gate").sums_NX.dtype == torch.bfloat16
        assert stale_gemms(experts) == []


def test_keep_checksums_follows_every_optimizer_step() -> None:
    model = build(CHECKED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    handle = keep_checksums(model, optimizer)
    ids = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))

    def step() -> None:
        optimizer.zero_grad()
        model(ids).float().logsumexp(-1).mean().backward()
        optimizer.step()

    step()
    assert all(stale_gemms(e) == [] for e in all_experts(model))
    handle.remove()
    step()  # negative control: without the hook the weights move away from their encoding
    assert all(stale_gemms(e) == list(GEMMS) for e in all_experts(model))


def test_a_model_without_the_option_refuses_checksum_work() -> None:
    plain = build(TINY)
    with pytest.raises(ValueError, match="expert_checksums"):
        all_experts(plain)[0].checksum("gate")
    with pytest.raises(ValueError, match="expert_checksums"):
        keep_checksums(plain, torch.optim.AdamW(plain.parameters()))


def test_the_option_is_a_config_field_that_round_trips_and_resumes() -> None:
    assert config_from_hf(config_to_hf(CHECKED)).expert_checksums is True
    assert config_from_hf(config_to_hf(TINY)).expert_checksums is False
    assert same_model(TINY, CHECKED)  # a run may resume across the option
    assert not same_model(TINY, TINY.replace(deterministic=True))  # but not across arithmetic
    assert TINY.config_hash() != CHECKED.config_hash()  # and a run records which it used


def test_the_trainer_s_proxy_width_initialisation_is_encoded() -> None:
    """``build_model`` draws the weights again for a width transfer (Table 1); the checksums
    follow."""
    from longcat_sim.train.config import default_train_config
    from longcat_sim.train.training import build_model

    model, _ = build_model(CHECKED, default_train_config(CHECKED).replace(proxy_width=32))
    assert all(stale_gemms(e) == [] for e in all_experts(model))
