"""Fixtures the benchmarks share."""

from __future__ import annotations

import pytest

from longcat_sim.model.config import get_preset
from longcat_sim.train import training
from longcat_sim.train.data import build_corpus_data


@pytest.fixture(scope="module")
def small_training(tmp_path_factory):
    """The ``small`` preset, its default training config and a 512 KiB corpus for them."""
    small = get_preset("small")
    tc = training.default_train_config(small)
    data = build_corpus_data(
        small.vocab_size,
        tc.seq_len,
        byte_budget=2**19,
        cache_dir=tmp_path_factory.mktemp("data-cache"),
    )
    return small, tc, data
