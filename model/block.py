"""One LongCat-Flash layer: two MLA blocks, two dense FFNs and one MoE (spec §1.2)."""

from __future__ import annotations

import torch
from longcat_sim.model.config import ModelConfig
from longcat_sim.model.kv_cache import LatentKVCache
from longcat_sim.model.layers import DenseMLP, RMSNorm
from longcat_sim.model.mla import MLA
from longcat_sim.model.moe import MoE
from longcat_sim.model.router import RouterOutput
from torch import nn


class LongcatDecoderLayer(nn.Module):
    """Shortcut-connected MoE layer.

    ``topology == "shortcut"`` (LongCat-Flash)::

        a = x + MLA_0(norm_in0(x));  u = norm_post0(a);  m = MoE(u)
        b = a + FFN_0(u)
        c = b + MLA_1(norm_in1(b));  n = norm_post1(c)
        y = c + FFN_1(n) + m

    ``topology == "conventional"``: the same, except ``m = MoE(n)``, so the MoE follows the
    second attention and reads the tensor FFN_1 reads.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        hidden, eps = cfg.hidden_size, cfg.rms_norm_eps
        blocks = cfg.attention_blocks_per_layer
        self.layer_idx = layer_idx
        self.shortcut = cfg.topology == "shortcut"
        self.input_layernorm = nn.ModuleList(RMSNorm(hidden, eps) for _ in range(2))
        self.post_attention_layernorm = nn.ModuleList(RMSNorm(hidden, eps) for _ in range(2))
        self.self_attn = nn.ModuleList(MLA(cfg, block_idx=blocks * layer_idx + i) for i in range(2))
        self.mlps = nn.ModuleList(
            DenseMLP(hidden, cfg.ffn_hidden_size, deterministic=cfg.deterministic) for _ in range(2)
        )
        self.mlp = MoE(cfg)

    def _moe(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        out_TD, routing = self.mlp(x_BTD.flatten(0, 1))
        return out_TD.view_as(x_BTD), routing

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_TP: torch.Tensor,
        sin_TP: torch.Tensor,
        cache: LatentKVCache | None = None,
    ) -> tuple[torch.Tensor, RouterOutput]:
        a = x_BTD + self.self_attn[0](self.input_layernorm[0](x_BTD), cos_TP, sin_TP, cache)
        u = self.post_attention_layernorm[0](a)
        if self.shortcut:
            moe_out, routing = self._moe(u)
        b = a + self.mlps[0](u)
        c = b + self.self_attn[1](self.input_layernorm[1](b), cos_TP, sin_TP, cache)
        n = self.post_attention_layernorm[1](c)
        if not self.shortcut:
            moe_out, routing = self._moe(n)
        return c + self.mlps[1](n) + moe_out, routing
