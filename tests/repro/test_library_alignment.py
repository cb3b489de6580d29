"""The model's own output is always compared row by row; skipped tensors are counted."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from longcat_sim.repro import batch_invariance, expect_counterexample, permutation_invariance
from longcat_sim.repro.trace import ROOT
from tests.repro.entry_models import Scale


class Sorted(nn.Module):
    """Elementwise, then sorted along ``dim``: across the batch (dim 0) or within a row."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale, self.dim = Scale(4), dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(x).sort(dim=self.dim).values


class SequenceFirst(nn.Module):
    """(B, T, D) -> (T, B, D) plus the mean over the batch: rows depend on the others."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = Scale(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.scale(x).transpose(0, 1)
        return y + y.mean(dim=1, keepdim=True)


class Transposed(nn.Module):
    """A submodule output that does not line up with the batch, and a per-row root output."""

    def __init__(self) -> None:
        super().__init__()
        self.scale, self.flip = Scale(8), Flip()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.flip(x)
        return self.scale(x)


class Flip(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.t()


def _batch(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def test_an_output_sorted_across_the_batch_is_not_permutation_invariant() -> None:
    torch.manual_seed(0)
    found = expect_counterexample(permutation_invariance(Sorted(0), _batch(5, 4)))
    assert found.module == ROOT
    torch.manual_seed(0)
    permutation_invariance(Sorted(1), _batch(5, 4)).check()  # sorted within each row: holds


def test_an_output_not_aligned_with_the_batch_is_a_value_error() -> None:
    torch.manual_seed(0)
    model, batch = SequenceFirst(), _batch(3, 7, 4)
    for check in (
        lambda: batch_invariance(model, batch, 0),
        lambda: permutation_invariance(model, batch),
    ):
        with pytest.raises(ValueError, match=r"shape \(7, 3, 4\).*pass forward="):
            check()


def test_a_forward_returning_rows_exposes_the_mixing() -> None:
    torch.manual_seed(0)
    model, batch = SequenceFirst(), _batch(3, 7, 4)

    def rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m(x).transpose(0, 1)

    for outcome in (
        batch_invariance(model, batch, 1, forward=rows),
        permutation_invariance(model, batch, [1, 2, 0], forward=rows),
    ):
        assert expect_counterexample(outcome).module == ROOT


def test_skipped_tensors_are_counted_and_reported() -> None:
    torch.manual_seed(0)
    model, batch = Transposed(), _batch(4, 8)
    for outcome in (batch_invariance(model, batch, 2), permutation_invariance(model, batch)):
        assert outcome.holds and outcome.compared == 2 and outcome.skipped == 1
        assert outcome.to_dict()["skipped"] == 1
        assert "1 tensors skipped" in outcome.describe()
