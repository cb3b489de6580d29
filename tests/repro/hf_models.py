"""Tiny Hugging Face MoE language models (no downloads) as entry points for the library tests:
``tests.repro.hf_models:longcat_flash`` and ``tests.repro.hf_models:mixtral``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longcat_sim.repro import Experiment

VOCAB = 100


def longcat_flash_model() -> nn.Module:
    from transformers import LongcatFlashConfig, LongcatFlashForCausalLM

    cfg = LongcatFlashConfig(
        vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=2,
        num_key_value_heads=2, ffn_hidden_size=64, expert_ffn_hidden_size=32,
        n_routed_experts=4, zero_expert_num=2, moe_topk=2, q_lora_rank=16, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, head_dim=8,
        max_position_embeddings=64,
    )  # fmt: skip
    return LongcatFlashForCausalLM(cfg)


def mixtral_model() -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    return MixtralForCausalLM(cfg)


def _language_model(model: nn.Module, seed: int) -> Experiment:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def batch(i: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        return torch.randint(0, VOCAB, (2, 9), generator=gen)

    def loss(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        logits = m(ids[:, :-1], use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    return Experiment.supervised(model, optimizer, batch, loss)


def longcat_flash(seed: int) -> Experiment:
    torch.manual_seed(seed)
    return _language_model(longcat_flash_model(), seed)


def mixtral(seed: int) -> Experiment:
    torch.manual_seed(seed)
    return _language_model(mixtral_model(), seed)
