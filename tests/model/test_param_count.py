"""The analytic parameter count equals the parameters of the instantiated PyTorch model."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from longcat_sim.model import costs
from longcat_sim.model.config import ModelConfig, get_preset
from longcat_sim.model.transformer import LongcatFlashForCausalLM

TINY = get_preset("tiny")
VARIANTS = {
    "tiny": TINY,
    "small": get_preset("small"),
    "tiny-mtp": TINY.replace(mtp_layers=1),
    "tiny-no-zero-experts": TINY.replace(zero_expert_num=0, target_ffn_experts=3.0),
    "tiny-tied": TINY.replace(tie_word_embeddings=True),
    "tiny-no-q-lora": TINY.replace(q_lora_rank=0),
    "tiny-conventional": TINY.replace(topology="conventional"),
}


@pytest.fixture(scope="module")
def build() -> Callable[[ModelConfig], LongcatFlashForCausalLM]:
    """Instantiate each configuration once per module (``small`` takes a moment)."""
    built: dict[str, LongcatFlashForCausalLM] = {}

    def get(cfg: ModelConfig) -> LongcatFlashForCausalLM:
        key = cfg.config_hash()
        if key not in built:
            built[key] = LongcatFlashForCausalLM(cfg, generator=torch.Generator().manual_seed(0))
        return built[key]

    return get


def _numel(module: torch.nn.Module) -> int:
    """Distinct parameters (a tied LM head counts once)."""
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_analytic_total_equals_instantiated_model(build, variant: str) -> None:
    cfg = VARIANTS[variant]
    model = build(cfg)
    assert _numel(model) == costs.total_params(cfg) + costs.mtp_params(cfg)
    if cfg.mtp_layers:
        assert _numel(model.model.mtp) == costs.mtp_params(cfg)


def test_component_counts_equal_the_modules(build) -> None:
    cfg = get_preset("small")
    layer = build(cfg).model.layers[0]
    assert _numel(layer.self_attn[0]) == costs.mla_params(cfg)
    assert _numel(layer.mlps[0]) == costs.dense_ffn_params(cfg)
    assert _numel(layer.mlp.router) == costs.router_params(cfg)
    assert _numel(layer.mlp.experts) == cfg.n_routed_experts * costs.expert_params(cfg)
    assert _numel(layer) - _numel(layer.mlp.experts) == costs.layer_dense_params(cfg, "scmoe")
    # the score-correction bias is a buffer: saved with the weights, not a parameter
    assert "mlp.router.e_score_correction_bias" in dict(layer.named_buffers())


@pytest.mark.parametrize("variant", ["tiny", "small", "tiny-tied"])
def test_activated_params_are_the_model_minus_experts_and_input_embedding(
    build, variant: str
) -> None:
    cfg = VARIANTS[variant]
    model = build(cfg)
    experts = sum(_numel(layer.mlp.experts) for layer in model.model.layers)
    one_expert = costs.expert_params(cfg)
    lm_head = model.lm_head.weight.numel()
    # with tied embeddings the one matrix is the LM head; otherwise drop the lookup table
    lookup = 0 if cfg.tie_word_embeddings else model.model.embed_tokens.weight.numel()
    non_expert = _numel(model) - experts - lookup
    assert lm_head == costs.embedding_params(cfg)
    for k in (0, 1, cfg.target_ffn_experts):
        expected = non_expert + k * cfg.num_layers * one_expert
        assert costs.activated_params(cfg, k) == expected


def test_norm_params_equal_the_rmsnorm_weights(build) -> None:
    cfg = get_preset("small")
    model = build(cfg)
    norms = sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if type(m).__name__ == "RMSNorm" and not name.startswith("model.mtp")
    )
    assert norms == costs.norm_params(cfg)
