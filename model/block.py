"""One LongCat-Flash layer: two MLA blocks, two dense FFNs and one MoE (spec §1.2)."""

from __future__ import annotations

import torch
from torch import nn

from longcat_sim import stages
from longcat_sim.model.config import ModelConfig
from longcat_sim.model.kv_cache import LatentKVCache
from longcat_sim.model.layers import DenseMLP, RMSNorm
from longcat_sim.model.mla import MLA
from longcat_sim.model.moe import MoE
from longcat_sim.model.router import RouterOutput


class LongcatDecoderLayer(nn.Module):
    """Shortcut-connected MoE layer.

    ``topology == "shortcut"`` (LongCat-Flash)::

        a = x + MLA_0(norm_in0(x));  u = norm_post0(a);  m = MoE(u)
        b = a + FFN_0(u)
        c = b + MLA_1(norm_in1(b));  n = norm_post1(c)
        y = c + FFN_1(n) + m

    ``topology == "conventional"``: the same, except ``m = MoE(n)``, so the MoE follows the
    second attention and reads the tensor FFN_1 reads.

    ``forward`` runs the blocks and the MoE's phases (``start``, ``compute``, ``finish``) in
    the order of ``longcat_sim.stages.layer_order``; an MoE with ``overlap = False`` has its
    phases run back to back. Expert parallelism swaps ``mlp`` for a module with the same phases.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        hidden, eps = cfg.hidden_size, cfg.rms_norm_eps
        blocks = cfg.attention_blocks_per_layer
        self.layer_idx = layer_idx
        self.topology = cfg.topology
        self.input_layernorm = nn.ModuleList(RMSNorm(hidden, eps) for _ in range(2))
        self.post_attention_layernorm = nn.ModuleList(RMSNorm(hidden, eps) for _ in range(2))
        self.self_attn = nn.ModuleList(MLA(cfg, block_idx=blocks * layer_idx + i) for i in range(2))
        self.mlps = nn.ModuleList(
            DenseMLP(hidden, cfg.ffn_hidden_size, deterministic=cfg.deterministic) for _ in range(2)
        )
        self.mlp = MoE(cfg)

    def dense_step(
        self,
        step: str,
        hidden: torch.Tensor,
        normed: dict[str, torch.Tensor],
        cos_TP: torch.Tensor,
        sin_TP: torch.Tensor,
        cache: LatentKVCache | None = None,
    ) -> torch.Tensor:
        """The residual stream after attention i or dense FFN i (``stages.ATTENTIONS``,
        ``stages.DENSE_FFNS``); an attention also leaves its post-norm in ``normed[step]``,
        which FFN i and the MoE read."""
        if step in stages.ATTENTIONS:
            i = stages.ATTENTIONS.index(step)
            attn = self.self_attn[i](self.input_layernorm[i](hidden), cos_TP, sin_TP, cache)
            hidden = hidden + attn
            normed[step] = self.post_attention_layernorm[i](hidden)
            return hidden
        i = stages.DENSE_FFNS.index(step)
        return hidden + self.mlps[i](normed[stages.ATTENTIONS[i]])

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_TP: torch.Tensor,
        sin_TP: torch.Tensor,
        cache: LatentKVCache | None = None,
    ) -> tuple[torch.Tensor, RouterOutput]:
        """Runs the steps of ``stages.layer_order`` in order; the MoE's phases where it says."""
        order = stages.layer_order(self.topology, self.mlp.overlap)
        reads = stages.moe_input(order)
        hidden, normed, flight = x_BTD, {}, None
        for step in order:
            if step == stages.DISPATCH:
                flight = self.mlp.start(normed[reads])
            elif step == stages.ROUTED_EXPERTS:
                flight = self.mlp.compute(flight)
            elif step == stages.COMBINE:
                moe_out, routing = self.mlp.finish(flight)
            else:
                hidden = self.dense_step(step, hidden, normed, cos_TP, sin_TP, cache)
        return hidden + moe_out, routing
