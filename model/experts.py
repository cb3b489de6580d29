"""Routed SwiGLU experts stored stacked, applied to rows already grouped by expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.router import default_generator


class GroupedExperts(nn.Module):
    """N SwiGLU experts: ``down(silu(gate(x)) * up(x))`` per expert, one GEMM per non-empty expert.

    Weights are stacked per expert (``gate_proj``/``up_proj`` [N, I, H], ``down_proj`` [N, H, I])
    so the checkpoint code can split them into Hugging Face per-expert keys. The computation runs
    in the activations' dtype.
    """

    def __init__(self, cfg: ModelConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        n, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.expert_ffn_hidden_size
        self.n_experts = n
        self.initializer_range = cfg.initializer_range
        self.gate_proj = nn.Parameter(torch.empty(n, i, h))
        self.up_proj = nn.Parameter(torch.empty(n, i, h))
        self.down_proj = nn.Parameter(torch.empty(n, h, i))
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        gen = generator if generator is not None else default_generator()
        for weight in (self.gate_proj, self.up_proj, self.down_proj):
            weight.normal_(0.0, self.initializer_range, generator=gen)

    def forward(self, x_SD: torch.Tensor, counts_N: torch.Tensor | list[int]) -> torch.Tensor:
        """``x_SD``: rows sorted by expert, ``counts_N[e]`` of them for expert e; returns ``y_SD``."""
        counts = counts_N.tolist() if isinstance(counts_N, torch.Tensor) else list(counts_N)
        if len(counts) != self.n_experts or sum(counts) != x_SD.shape[0]:
            raise ValueError(
                f"counts_N must give {self.n_experts} per-expert row counts summing to the "
                f"{x_SD.shape[0]} rows of x_SD; got {len(counts)} counts summing to {sum(counts)}"
            )
        dtype = x_SD.dtype
        # unbind (not indexing) so backward stacks the per-expert weight grads in one copy
        gate_N = self.gate_proj.to(dtype).unbind(0)
        up_N = self.up_proj.to(dtype).unbind(0)
        down_N = self.down_proj.to(dtype).unbind(0)
        y_parts = []
        for e, x_rD in enumerate(x_SD.split(counts)):
            if counts[e] == 0:
                continue
            h_rI = F.silu(F.linear(x_rD, gate_N[e])) * F.linear(x_rD, up_N[e])
            y_parts.append(F.linear(h_rI, down_N[e]))
        if not y_parts:
            return x_SD.new_zeros(0, self.down_proj.shape[1])
        return torch.cat(y_parts) if len(y_parts) > 1 else y_parts[0]
