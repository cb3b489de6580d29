"""Model growth (spec §3.4): stacking a half-depth model into full depth, order [1..L, 1..L]."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from longcat_sim.model import balance, growth
from longcat_sim.model.config import ConfigError
from longcat_sim.model.optim import build_adamw
from longcat_sim.model.transformer import LongcatFlashForCausalLM
from tests.model import tiny_mtp_model


@pytest.fixture(scope="module")
def small() -> LongcatFlashForCausalLM:
    model = tiny_mtp_model(seed=7)
    with torch.no_grad():  # distinct, non-zero router biases so their copying is visible
        for i, router in enumerate(balance.find_routers(model)):
            router.e_score_correction_bias.copy_(torch.linspace(-0.01, 0.01, 12) * (i + 1))
    return model


def training_loss(model: LongcatFlashForCausalLM, ids: torch.Tensor):
    """Next-token and MTP (token t+2) cross-entropy, plus the model output."""
    out = model.forward_detailed(ids[:, :-1])
    loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
    mtp = F.cross_entropy(out.mtp_logits[:, :-1].flatten(0, 1), ids[:, 2:].flatten())
    return loss + mtp, out


def token_batch(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def test_grown_keys_shapes_and_sources(small) -> None:
    grown_state = growth.grow_state_dict(small.state_dict(), small_layers=2)
    fresh = LongcatFlashForCausalLM(growth.grow_config(small.config)).state_dict()
    assert sorted(grown_state) == sorted(fresh)
    assert all(grown_state[k].shape == fresh[k].shape for k in fresh)
    small_state = small.state_dict()
    for key, tensor in grown_state.items():
        assert torch.equal(tensor, small_state[growth.source_name(key, 2)])
    assert growth.source_name("model.layers.3.mlp.router.e_score_correction_bias", 2) == (
        "model.layers.1.mlp.router.e_score_correction_bias"
    )
    assert growth.source_name("model.mtp.layers.0.mlp.up_proj.weight", 2).startswith(
        "model.mtp.layers.0"
    )


def stacked_forward(small: LongcatFlashForCausalLM, ids: torch.Tensor, order: list[int]):
    """The small model's own layers run in ``order`` by hand."""
    positions = torch.arange(ids.shape[1])
    cos, sin = small.model.rotary_emb(positions)
    hidden = small.model.embed_tokens(ids)
    routing = []
    for idx in order:
        hidden, layer_routing = small.model.layers[idx](hidden, cos, sin)
        routing.append(layer_routing)
    return small.lm_head(small.model.norm(hidden)), routing


@torch.no_grad()
def test_grown_forward_equals_small_layers_run_twice_in_order(small) -> None:
    grown = growth.grow_model(small)
    assert grown.config.num_layers == 4
    ids = token_batch(small.config.vocab_size)
    out = grown.forward_detailed(ids)
    logits, routing = stacked_forward(small, ids, [0, 1, 0, 1])
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=0)
    for got, want in zip(out.router, routing, strict=True):
        assert torch.equal(got.topk_idx_TK, want.topk_idx_TK)
    # control: the interleaved order [1, 1, 2, 2] is a different network
    other, _ = stacked_forward(small, ids, [0, 0, 1, 1])
    assert (other - out.logits).abs().max() > 1e-4


def test_training_steps_run_from_the_grown_model(small) -> None:
    small = copy.deepcopy(small)
    cfg = growth.grow_config(small.config)
    small_opt = build_adamw(small, 1e-3)
    ids = token_batch(cfg.vocab_size, seed=1)
    training_loss(small, ids)[0].backward()
    small_opt.step()
    small_opt.zero_grad()
    grown = growth.grow_model(small)  # from the trained weights
    opt = build_adamw(grown, 1e-3)
    copied = growth.grow_optimizer_state(small, small_opt, grown, opt, small_layers=2)
    assert copied == sum(1 for _ in grown.parameters())
    source = small.model.layers[1].mlp.experts.down_proj
    state = opt.state[grown.model.layers[3].mlp.experts.down_proj]
    assert torch.equal(state["exp_avg"], small_opt.state[source]["exp_avg"])

    controller = balance.BiasController(cfg, 1e-3)
    before = [p.detach().clone() for p in grown.parameters()]
    losses = []
    for step in range(2):
        lm, out = training_loss(grown, ids)
        loss = lm + balance.total_balance_loss(out.router, cfg, 2, 1e-2)
        loss = loss + balance.hidden_z_loss(out.hidden_pre_norm, 1e-6)
        opt.zero_grad()
        loss.backward()
        opt.step()
        controller.update(balance.find_routers(grown), [o.counts_E for o in out.router], step)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(b, p) for b, p in zip(before, grown.parameters(), strict=True))
    # the two copies of layer 0 have now drifted apart
    assert not torch.equal(
        grown.model.layers[0].mlp.router.e_score_correction_bias,
        grown.model.layers[2].mlp.router.e_score_correction_bias,
    )


def test_growth_rejects_a_wrong_layer_count(small) -> None:
    with pytest.raises(ConfigError, match="layers"):
        growth.grow_state_dict(small.state_dict(), small_layers=3)
    with pytest.raises(ConfigError, match="factor"):
        growth.grow_config(small.config, 0)
