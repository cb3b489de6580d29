"""Parameter groups, AdamW construction, Table 1 hyper-parameter transfer and the LR schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from longcat_sim.model.config import ConfigError, get_preset
from longcat_sim.model.optim import (
    GROUP_NAMES,
    PAPER_ADAM_EPS,
    GroupHyperParams,
    build_adamw,
    group_parameters,
    initialize_parameters,
    lr_multiplier,
    set_lr_multiplier,
    transfer_hyperparameters,
    uniform_hyperparameters,
)
from longcat_sim.model.transformer import LongcatFlashForCausalLM
from tests.model import tiny_mtp_model


@pytest.fixture(scope="module")
def tiny_model() -> LongcatFlashForCausalLM:
    return tiny_mtp_model(seed=0)


def names(groups, group: str) -> set[str]:
    return {n for n, _ in groups[group]}


def test_every_parameter_lands_in_exactly_one_group(tiny_model) -> None:
    groups = group_parameters(tiny_model)
    listed = [n for g in GROUP_NAMES for n, _ in groups[g]]
    assert sorted(listed) == sorted(n for n, _ in tiny_model.named_parameters())
    assert names(groups, "embedding") == {
        "model.embed_tokens.weight",
        "model.mtp.embed_tokens.weight",
    }
    assert names(groups, "unembedding") == {"lm_head.weight"}
    assert all(p.dim() == 1 for _, p in groups["vector"])
    assert "model.layers.0.input_layernorm.0.weight" in names(groups, "vector")
    hidden = names(groups, "hidden")
    assert {
        "model.layers.1.mlp.experts.gate_proj",
        "model.layers.0.mlp.router.classifier.weight",
    } <= hidden
    assert all(p.dim() >= 2 for _, p in groups["hidden"])


def test_tied_head_counts_once_as_embedding() -> None:
    cfg = get_preset("tiny").replace(tie_word_embeddings=True)
    groups = group_parameters(LongcatFlashForCausalLM(cfg))
    assert names(groups, "embedding") == {"model.embed_tokens.weight"}
    assert groups["unembedding"] == []


def test_adamw_groups_eps_and_no_decay_on_vectors(tiny_model) -> None:
    rates = {"embedding": 1e-2, "hidden": 2e-3, "unembedding": 3e-3, "vector": 4e-3}
    opt = build_adamw(tiny_model, rates, weight_decay=0.5)
    assert opt.defaults["eps"] == PAPER_ADAM_EPS == 1e-16
    by_name = {g["name"]: g for g in opt.param_groups}
    assert {n: g["lr"] for n, g in by_name.items()} == rates
    assert by_name["vector"]["weight_decay"] == 0.0 and by_name["hidden"]["weight_decay"] == 0.5


def test_zero_gradient_step_is_pure_decoupled_decay_off_the_vectors() -> None:
    model = LongcatFlashForCausalLM(get_preset("tiny"), generator=torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_adamw(model, 0.1, weight_decay=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    vectors = names(group_parameters(model), "vector")
    for name, param in model.named_parameters():
        expected = before[name] if name in vectors else before[name] * (1 - 0.1 * 0.5)
        torch.testing.assert_close(param.detach(), expected, rtol=0, atol=0)


def test_missing_group_rate_is_reported() -> None:
    model = LongcatFlashForCausalLM(get_preset("tiny"))
    with pytest.raises(ConfigError, match="'vector'"):
        build_adamw(model, {"embedding": 1e-3, "hidden": 1e-3, "unembedding": 1e-3})


# -- Table 1 ---------------------------------------------------------------------------------------


def test_table1_transfer_from_768_to_6144() -> None:
    # Spec §3.3 (paper Table 1): s = 6144 / 768 = 8; embedding σ², η unchanged; hidden and
    # unembedding σ²/s and η/s.
    proxy = {
        "embedding": GroupHyperParams(lr=1e-2, init_variance=4e-4),
        "hidden": GroupHyperParams(lr=8e-3, init_variance=1.6e-3),
        "unembedding": GroupHyperParams(lr=4e-3, init_variance=8e-4),
        "vector": GroupHyperParams(lr=2e-3, init_variance=1.0),
    }
    target = transfer_hyperparameters(proxy, proxy_width=768, target_width=6144)
    assert target["embedding"] == proxy["embedding"] and target["vector"] == proxy["vector"]
    assert math.isclose(target["hidden"].lr, 1e-3) and math.isclose(
        target["hidden"].init_variance, 2e-4
    )
    assert math.isclose(target["unembedding"].lr, 5e-4)
    assert math.isclose(target["unembedding"].init_variance, 1e-4)


@given(
    proxy_width=st.integers(1, 4096),
    target_width=st.integers(1, 4096),
    lr=st.floats(1e-6, 1.0),
    std=st.floats(1e-4, 1.0),
)
def test_transfer_is_identity_at_equal_width_and_invertible(
    proxy_width: int, target_width: int, lr: float, std: float
) -> None:
    proxy = uniform_hyperparameters(lr, std)
    assert transfer_hyperparameters(proxy, proxy_width, proxy_width) == proxy
    there = transfer_hyperparameters(proxy, proxy_width, target_width)
    back = transfer_hyperparameters(there, target_width, proxy_width)
    for g in GROUP_NAMES:
        assert math.isclose(back[g].lr, lr, rel_tol=1e-12)
        assert math.isclose(back[g].init_variance, std**2, rel_tol=1e-12)
    scale = target_width / proxy_width
    assert math.isclose(there["hidden"].lr * scale, lr, rel_tol=1e-12)


def test_transfer_rejects_bad_widths() -> None:
    with pytest.raises(ConfigError, match="positive"):
        transfer_hyperparameters(uniform_hyperparameters(1e-3, 0.02), 0, 8)


def test_initialize_parameters_draws_each_group_at_its_variance() -> None:
    model = LongcatFlashForCausalLM(get_preset("small"), generator=torch.Generator().manual_seed(2))
    hyper = transfer_hyperparameters(uniform_hyperparameters(1e-3, 0.04), 256, 4096)  # s = 16
    initialize_parameters(model, hyper, torch.Generator().manual_seed(3))
    groups = group_parameters(model)
    for group, expected_std in (("embedding", 0.04), ("hidden", 0.01), ("unembedding", 0.01)):
        values = torch.cat([p.detach().reshape(-1) for _, p in groups[group]])
        assert abs(values.std().item() / expected_std - 1) < 0.02
    assert all(torch.equal(p, torch.ones_like(p)) for _, p in groups["vector"])


# -- schedule --------------------------------------------------------------------------------------


def test_lr_schedule_shape() -> None:
    kw = dict(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert lr_multiplier(0, **kw) == 0.1 and lr_multiplier(4, **kw) == 0.5
    assert lr_multiplier(9, **kw) == 1.0 and lr_multiplier(10, **kw) == 1.0
    assert math.isclose(lr_multiplier(60, **kw), 0.55)
    assert lr_multiplier(110, **kw) == lr_multiplier(10_000, **kw) == 0.1
    assert lr_multiplier(0, warmup_steps=0, total_steps=5) == 1.0
    with pytest.raises(ConfigError):
        lr_multiplier(0, warmup_steps=20, total_steps=10)


@given(warmup=st.integers(0, 50), extra=st.integers(1, 200), min_ratio=st.floats(0, 1))
def test_lr_schedule_rises_then_falls(warmup: int, extra: int, min_ratio: float) -> None:
    total = warmup + extra
    values = [
        lr_multiplier(s, warmup_steps=warmup, total_steps=total, min_ratio=min_ratio)
        for s in range(total + 5)
    ]
    peak = max(warmup - 1, 0)  # the last warmup step reaches the peak rate
    rising, falling = values[: peak + 1], values[peak:]
    assert all(a <= b for a, b in itertools.pairwise(rising))
    assert all(a >= b - 1e-15 for a, b in itertools.pairwise(falling))
    assert values[peak] == 1.0 and min(falling) >= min_ratio - 1e-15


def test_set_lr_multiplier_scales_each_base_rate(tiny_model) -> None:
    opt = build_adamw(
        tiny_model, {"embedding": 1.0, "hidden": 0.5, "unembedding": 0.25, "vector": 2.0}
    )
    set_lr_multiplier(opt, 0.1)
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {
        "embedding": 0.1,
        "hidden": 0.05,
        "unembedding": 0.025,
        "vector": 0.2,
    }
