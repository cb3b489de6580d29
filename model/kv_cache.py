"""Latent KV cache for absorbed-MLA decoding.

Each attention block stores, per token, only the compressed KV latent (``kv_lora_rank`` values,
already normalised and scaled) and the rotated shared rope key (``qk_rope_head_dim`` values).
Keys and values for all heads are never materialised: the up-projections are absorbed into the
query and the output (see ``model.mla``).
"""

from __future__ import annotations

import torch

from longcat_sim.model.config import ModelConfig


class LatentKVCache:
    """Preallocated ``[blocks, batch, capacity, kv_lora_rank + qk_rope_head_dim]`` storage.

    A forward pass over ``T`` new tokens writes positions ``[length, length + T)`` in every
    attention block and then calls :meth:`advance`. When ``capacity`` is exceeded the storage
    doubles, so the total copying stays linear in the number of tokens.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        capacity: int,
        *,
        num_blocks: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if batch_size <= 0 or capacity <= 0:
            raise ValueError(
                f"cache needs batch_size > 0 and capacity > 0, got {batch_size} and {capacity}"
            )
        self.kv_lora_rank = cfg.kv_lora_rank
        self.rope_dim = cfg.qk_rope_head_dim
        self.num_blocks = (
            cfg.num_layers * cfg.attention_blocks_per_layer if num_blocks is None else num_blocks
        )
        self.batch_size = batch_size
        self.length = 0
        self.data_NBSC = torch.zeros(
            self.num_blocks,
            batch_size,
            capacity,
            self.values_per_token,
            dtype=dtype,
            device=device,
        )

    @property
    def values_per_token(self) -> int:
        """Values stored per token per attention block: ``kv_lora_rank + qk_rope_head_dim``."""
        return self.kv_lora_rank + self.rope_dim

    @property
    def capacity(self) -> int:
        return self.data_NBSC.shape[2]

    def reserve(self, new_tokens: int) -> None:
        """Make room for ``new_tokens`` more positions, doubling the storage when short."""
        needed = self.length + new_tokens
        if needed <= self.capacity:
            return
        grown = max(needed, 2 * self.capacity)
        data = self.data_NBSC.new_zeros(*self.data_NBSC.shape[:2], grown, self.values_per_token)
        data[:, :, : self.length] = self.data_NBSC[:, :, : self.length]
        self.data_NBSC = data

    def write(
        self, block: int, latent_BTR: torch.Tensor, k_rope_BTP: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens of one block; return ``(latent, k_rope)`` for all cached positions.

        The returned tensors are views ``[B, length + T, kv_lora]`` and ``[B, length + T, rope]``.
        """
        batch, new = latent_BTR.shape[:2]
        if batch != self.batch_size:
            raise ValueError(f"cache was built for batch {self.batch_size}, got batch {batch}")
        end = self.length + new
        if end > self.capacity:
            raise ValueError(
                f"cache holds {self.capacity} positions but {end} are needed; call reserve() first"
            )
        slot = self.data_NBSC[block]
        slot[:, self.length : end, : self.kv_lora_rank] = latent_BTR
        slot[:, self.length : end, self.kv_lora_rank :] = k_rope_BTP
        used = slot[:, :end]
        return used[..., : self.kv_lora_rank], used[..., self.kv_lora_rank :]

    def advance(self, new_tokens: int) -> None:
        """Mark ``new_tokens`` positions as filled (after every block has written them)."""
        self.length += new_tokens

    def stored_values(self) -> int:
        """Number of cached values actually in use (blocks x batch x length x per-token)."""
        return self.num_blocks * self.batch_size * self.length * self.values_per_token
