"""Multi-token prediction (MTP) head: one dense decoder block predicting token t+2 (spec §1.5)."""

from __future__ import annotations

import torch
from torch import nn

from longcat_sim.model.config import ModelConfig
from longcat_sim.model.kernels.batch_invariant import linear_class
from longcat_sim.model.layers import DenseMLP, RMSNorm
from longcat_sim.model.mla import MLA


class DenseDecoderLayer(nn.Module):
    """Pre-norm block ``h + MLA(norm(h))`` then ``+ MLP(norm(.))`` with a dense SwiGLU MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = DenseMLP(hidden, cfg.ffn_hidden_size, deterministic=cfg.deterministic)

    def forward(
        self, x_BTD: torch.Tensor, cos_TP: torch.Tensor, sin_TP: torch.Tensor
    ) -> torch.Tensor:
        h = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos_TP, sin_TP)
        return h + self.mlp(self.post_attention_layernorm(h))


class MultiTokenPredictor(nn.Module):
    """``norm(block(eh_proj([enorm(embed(token t+1)); hnorm(h_t)])))``; the LM head is shared.

    ``h_t`` is the main model's last-layer output at position t, before its final norm.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.embed_tokens = nn.Embedding(cfg.vocab_size, hidden)
        self.enorm = RMSNorm(hidden, eps)
        self.hnorm = RMSNorm(hidden, eps)
        self.eh_proj = linear_class(cfg.deterministic)(2 * hidden, hidden, bias=False)
        self.layers = nn.ModuleList([DenseDecoderLayer(cfg)])
        self.norm = RMSNorm(hidden, eps)

    def forward(
        self,
        next_ids_BT: torch.Tensor,
        hidden_BTD: torch.Tensor,
        cos_TP: torch.Tensor,
        sin_TP: torch.Tensor,
    ) -> torch.Tensor:
        """Normalised MTP hidden states ``[B, T, H]``; ``next_ids[:, t]`` is token t+1."""
        x = torch.cat((self.enorm(self.embed_tokens(next_ids_BT)), self.hnorm(hidden_BTD)), dim=-1)
        x = self.eh_proj(x)
        for layer in self.layers:
            x = layer(x, cos_TP, sin_TP)
        return self.norm(x)
