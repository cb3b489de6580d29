"""Reproducibility checks on a model of your own, through the public API only.

Run: ``python docs/examples/own_model.py``. It prints each property's outcome, a rerun of two
training steps in two fresh processes, and a small bit-flip campaign; it exits 1 if a check
that should hold does not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from longcat_sim.repro import (
    Experiment,
    batch_invariance,
    coupled_rows,
    expect_counterexample,
    rerun_determinism,
    run_entry_campaign,
    thread_invariance,
)

ENTRY = f"{Path(__file__).stem}:build"  # this file, imported by name in the worker processes


class TinyClassifier(nn.Module):
    """Embedding, a gated feed-forward block and a classifier head."""

    def __init__(self, vocab: int = 50, width: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.gate = nn.Linear(width, width)
        self.up = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = F.silu(self.gate(h)) * self.up(h)
        return self.head(h.mean(dim=1))


def build(seed: int) -> Experiment:
    """The entry point: everything comes from ``seed``."""
    model = TinyClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        return torch.randint(0, 50, (4, 6), generator=gen), torch.randint(0, 3, (4,), generator=gen)

    def loss(m: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, labels = data
        return F.cross_entropy(m(ids), labels)

    return Experiment.supervised(model, optimizer, batch, loss)


def main() -> int:
    model = build(0).model
    ids = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(1))

    threads = thread_invariance(model, ids, (1, 2))
    print(threads.describe())
    batch = batch_invariance(model, ids, index=2)
    print(batch.describe())
    with coupled_rows(model, "up"):  # negative control: rows that see each other must differ
        print("negative control:", expect_counterexample(batch_invariance(model, ids, 2)).module)

    rerun = rerun_determinism(ENTRY, steps=2, runs=2)
    print(rerun.describe())

    campaign = run_entry_campaign(ENTRY, sites=["weight", "gradient"], bits=[0, 31], trials=1)
    for row in campaign["results"]:
        print(json.dumps({k: row[k] for k in ("site", "bit", "detector", "detected", "masked")}))
    return 0 if rerun.holds else 1


if __name__ == "__main__":
    sys.exit(main())
