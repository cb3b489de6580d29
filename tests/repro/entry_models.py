"""Small user-style experiments the library tests load by entry point (``tests.repro.entry_models:NAME``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longcat_sim.repro import Experiment


class TwoLayer(nn.Module):
    def __init__(self, features: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(features, hidden)
        self.act = nn.Tanh()
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.inp(x)))


def _experiment(seed: int, rows: int) -> Experiment:
    model = TwoLayer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        return torch.randn(rows, 8, generator=gen), torch.randn(rows, 1, generator=gen)

    def loss(m: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = data
        return F.mse_loss(m(x), y)

    return Experiment.supervised(model, optimizer, batch, loss)


def two_layer(seed: int) -> Experiment:
    """An MLP regression trained with AdamW on 6 random rows per step."""
    return _experiment(seed, 6)


def two_layer_pair(seed: int) -> Experiment:
    """The same on 2 rows per step (a world of 2 then has one row per rank)."""
    return _experiment(seed, 2)


def not_an_experiment(seed: int) -> int:
    return seed


class Scale(nn.Module):
    """An elementwise model: ``x * weight + bias`` per feature."""

    def __init__(self, features: int = 8) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features))
        self.bias = nn.Parameter(torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


def scale_pair(seed: int) -> Experiment:
    """An elementwise model on 2 rows per step: one row per rank in a world of 2, where every
    sum has two terms in one order (world-size invariance can hold)."""
    model = Scale()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        return torch.randn(2, 8, generator=gen), torch.randn(2, 8, generator=gen)

    def loss(m: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = data
        return ((m(x) - y) ** 2).sum(dim=1).mean()

    return Experiment.supervised(model, optimizer, batch, loss)
