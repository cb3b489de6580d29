"""Multi-head latent attention (MLA) with LongCat-Flash's latent scale correction.

Two equivalent forms share one set of weights:

- full form (training, no cache): keys and values for every head are expanded from the KV
  latent by ``kv_b_proj`` and attention runs per head;
- absorbed form (decoding, with a :class:`~model.kv_cache.LatentKVCache`): only the latent and
  the shared rope key are cached; the key up-projection ``W_uk`` is folded into the query and
  the value up-projection ``W_uv`` into the output, so attention runs in latent space.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from longcat_sim.model.config import ModelConfig
from longcat_sim.model.kernels import batch_invariant
from longcat_sim.model.kv_cache import LatentKVCache
from longcat_sim.model.layers import RMSNorm, apply_rope_interleaved


def fused_attention(
    q_BhTd: torch.Tensor, k_BhSd: torch.Tensor, v_BhSv: torch.Tensor, scale: float, start: int = 0
) -> torch.Tensor:
    """Causal ``softmax(q k^T * scale) v`` by PyTorch's fused kernel; query t sits at position
    ``start + t`` of the S keys. Values narrower than the keys are zero-padded to their width
    (the fused CPU kernel wants one head size) and the padding is cut from the result."""
    seq, total, width = q_BhTd.shape[2], k_BhSd.shape[2], v_BhSv.shape[-1]
    if width < q_BhTd.shape[-1]:
        v_BhSv = F.pad(v_BhSv, (0, q_BhTd.shape[-1] - width))
    if start == 0 and seq == total:
        mask = None
        causal = True
    else:  # queries continue a prefix: key s is visible to query t when s <= start + t
        positions = torch.arange(total, device=q_BhTd.device)
        mask = positions[None, :] <= (start + torch.arange(seq, device=q_BhTd.device))[:, None]
        causal = False
        if bool(mask.all()):  # one new query sees every key: no mask
            mask = None
    out = F.scaled_dot_product_attention(
        q_BhTd, k_BhSd, v_BhSv, attn_mask=mask, is_causal=causal, scale=scale
    )
    return out[..., :width]


class MLA(nn.Module):
    """MLA block; ``block_idx`` is its slot in a latent KV cache.

    Scale correction (spec §1.4): after the latent RMSNorms the query (nope and rope parts) is
    multiplied by ``alpha_q = sqrt(H / q_lora_rank)`` and the KV latent by
    ``alpha_kv = sqrt(H / kv_lora_rank)``; the rope key, taken straight from the input, is not
    scaled. With ``q_lora_rank == 0`` the query is a single projection ``q_proj`` with no latent
    and no ``alpha_q``.
    """

    def __init__(self, cfg: ModelConfig, block_idx: int = 0) -> None:
        super().__init__()
        hidden = cfg.hidden_size
        self.block_idx = block_idx
        self.num_heads = cfg.num_attention_heads
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        qk_head_dim = cfg.qk_head_dim
        self.deterministic = cfg.deterministic
        linear = batch_invariant.linear_class(cfg.deterministic)
        if cfg.q_lora_rank > 0:
            self.q_a_proj = linear(hidden, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.latent_norm_eps)
            self.q_b_proj = linear(cfg.q_lora_rank, self.num_heads * qk_head_dim, bias=False)
            self.q_scale = math.sqrt(hidden / cfg.q_lora_rank) if cfg.mla_scale_q_lora else 1.0
        else:
            self.q_proj = linear(hidden, self.num_heads * qk_head_dim, bias=False)
            self.q_scale = 1.0
        self.kv_a_proj_with_mqa = linear(hidden, cfg.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.latent_norm_eps)
        self.kv_b_proj = linear(
            cfg.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False
        )
        self.o_proj = linear(self.num_heads * self.v_dim, hidden, bias=False)
        self.kv_scale = math.sqrt(hidden / cfg.kv_lora_rank) if cfg.mla_scale_kv_lora else 1.0
        self.softmax_scale = qk_head_dim**-0.5

    # -- projections shared by both forms ----------------------------------------------------
    def project(
        self, x_BTD: torch.Tensor, cos_TP: torch.Tensor, sin_TP: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``q_nope [B,T,h,n]``, rotated ``q_rope [B,T,h,r]``, scaled KV latent
        ``[B,T,kv_lora]`` and rotated shared ``k_rope [B,T,r]``.

        ``cos_TP``/``sin_TP`` are ``[T, rope_dim/2]`` angles for the T positions.
        """
        batch, seq = x_BTD.shape[:2]
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q = q.view(batch, seq, self.num_heads, self.nope_dim + self.rope_dim) * self.q_scale
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = apply_rope_interleaved(q_rope, cos_TP[:, None, :], sin_TP[:, None, :])

        latent, k_rope = self.kv_a_proj_with_mqa(x_BTD).split(
            [self.kv_lora_rank, self.rope_dim], dim=-1
        )
        latent = self.kv_a_layernorm(latent) * self.kv_scale
        k_rope = apply_rope_interleaved(k_rope, cos_TP, sin_TP)
        return q_nope, q_rope, latent, k_rope

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_TP: torch.Tensor,
        sin_TP: torch.Tensor,
        cache: LatentKVCache | None = None,
    ) -> torch.Tensor:
        """Causal attention over ``x``; with a cache, over the cached prefix plus ``x``."""
        q_nope, q_rope, latent, k_rope = self.project(x_BTD, cos_TP, sin_TP)
        if cache is None:
            out_BThV = self._attend_full(q_nope, q_rope, latent, k_rope)
        else:
            start = cache.length
            latent_all, k_rope_all = cache.write(self.block_idx, latent, k_rope)
            out_BThV = self._attend_absorbed(q_nope, q_rope, latent_all, k_rope_all, start)
        return self.o_proj(out_BThV.flatten(-2))

    # -- full form ---------------------------------------------------------------------------
    def _attend_full(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        latent_BTR: torch.Tensor,
        k_rope_BTP: torch.Tensor,
    ) -> torch.Tensor:
        batch, seq = latent_BTR.shape[:2]
        kv = self.kv_b_proj(latent_BTR).view(batch, seq, self.num_heads, -1)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_rope = k_rope_BTP[:, :, None, :].expand(-1, -1, self.num_heads, -1)
        q_BhTd = torch.cat((q_nope, q_rope), dim=-1).transpose(1, 2)
        k_BhTd = torch.cat((k_nope, k_rope), dim=-1).transpose(1, 2)
        if self.deterministic:
            out = batch_invariant.causal_attention(
                q_BhTd, k_BhTd, v.transpose(1, 2), self.softmax_scale
            )
        else:
            out = fused_attention(q_BhTd, k_BhTd, v.transpose(1, 2), self.softmax_scale)
        return out.transpose(1, 2)

    # -- absorbed form -----------------------------------------------------------------------
    def _attend_absorbed(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        latent_BSR: torch.Tensor,
        k_rope_BSP: torch.Tensor,
        start: int,
    ) -> torch.Tensor:
        """Attention in latent space; query t sits at position ``start + t``."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, -1)
        w_uk_hNR, w_uv_hVR = w[:, : self.nope_dim], w[:, self.nope_dim :]
        q_latent = torch.einsum("bthn,hnr->bthr", q_nope, w_uk_hNR)
        if not self.deterministic:
            q_BhTd = torch.cat((q_latent, q_rope), dim=-1).transpose(1, 2)
            k_B1Sd = torch.cat((latent_BSR, k_rope_BSP), dim=-1).unsqueeze(1)
            heads = q_BhTd.shape[1]
            out_latent = fused_attention(
                q_BhTd,
                k_B1Sd.expand(-1, heads, -1, -1),
                latent_BSR.unsqueeze(1).expand(-1, heads, -1, -1),
                self.softmax_scale,
                start,
            ).transpose(1, 2)
            return torch.einsum("bthr,hvr->bthv", out_latent, w_uv_hVR)
        scores_BhTS = torch.einsum("bthr,bsr->bhts", q_latent, latent_BSR) + torch.einsum(
            "bthp,bsp->bhts", q_rope, k_rope_BSP
        )
        seq, total = q_nope.shape[1], latent_BSR.shape[1]
        q_pos = torch.arange(start, start + seq, device=q_nope.device)
        k_pos = torch.arange(total, device=q_nope.device)
        future = k_pos[None, :] > q_pos[:, None]
        scores_BhTS = (scores_BhTS * self.softmax_scale).masked_fill(future, float("-inf"))
        probs = torch.softmax(scores_BhTS.float(), dim=-1).to(latent_BSR.dtype)
        out_latent = torch.einsum("bhts,bsr->bthr", probs, latent_BSR)
        return torch.einsum("bthr,hvr->bthv", out_latent, w_uv_hVR)
