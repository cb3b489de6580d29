"""Building blocks shared by the attention and feed-forward modules: RMSNorm, RoPE, SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longcat_sim.model.kernels import batch_invariant
from longcat_sim.model.kernels.batch_invariant import linear_class


class RMSNorm(nn.Module):
    """Root-mean-square norm ``weight * x / sqrt(mean(x^2) + eps)``, reduced in float32 or wider."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * wide.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs ``(x[2j], x[2j+1])`` of the last dimension by the angles in cos/sin.

    ``cos`` and ``sin`` hold one value per pair and must broadcast to ``x.shape[:-1] + (d/2,)``.
    Pair j becomes ``(x0 cos - x1 sin, x1 cos + x0 sin)``, i.e. the complex product
    ``(x[2j] + i x[2j+1]) * exp(i angle_j)``.
    """
    pairs = x.unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)


class RotaryEmbedding(nn.Module):
    """Angles ``position * theta^(-2j/dim)`` for the dim/2 interleaved pairs of a rotary head.

    Holds no state: the angles are computed in float64 from the positions on each call, so
    parameter initialisation never has to restore a buffer.
    """

    def __init__(self, dim: int, theta: float) -> None:
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"rotary dimension must be a positive even number, got {dim}")
        self.dim = dim
        self.theta = theta

    def inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        exponent = torch.arange(0, self.dim, 2, dtype=torch.float64, device=device) / self.dim
        return self.theta**-exponent

    def forward(self, positions_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return float64 ``(cos, sin)`` of shape ``positions.shape + (dim/2,)``.

        :func:`apply_rope_interleaved` casts them to the dtype of the rotated tensor.
        """
        angles = positions_T.to(torch.float64)[..., None] * self.inv_freq(positions_T.device)
        return angles.cos(), angles.sin()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, theta={self.theta}"


class DenseMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``, no biases (batch-invariant
    linear layers when ``deterministic``)."""

    def __init__(self, hidden: int, intermediate: int, *, deterministic: bool = False) -> None:
        super().__init__()
        linear = linear_class(deterministic)
        self.act = batch_invariant.silu if deterministic else F.silu
        self.gate_proj = linear(hidden, intermediate, bias=False)
        self.up_proj = linear(hidden, intermediate, bias=False)
        self.down_proj = linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
