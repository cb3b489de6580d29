"""Fixtures the benchmarks share."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from longcat_sim.model.config import ModelConfig, get_preset
from longcat_sim.train.config import TrainConfig, default_train_config
from longcat_sim.train.data import build_corpus_data
from longcat_sim.train.training import Trainer


@pytest.fixture(scope="module")
def small_training(tmp_path_factory):
    """The ``small`` preset, its default training config and a 512 KiB corpus for them."""
    small = get_preset("small")
    tc = default_train_config(small)
    data = build_corpus_data(
        small.vocab_size,
        tc.seq_len,
        byte_budget=2**19,
        cache_dir=tmp_path_factory.mktemp("data-cache"),
    )
    return small, tc, data


@pytest.fixture
def one_thread():
    """Torch on one thread for the test, the previous count restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def small_trainers(small_training, tmp_path_factory) -> Callable[..., dict[str, Trainer]]:
    """``make(name=(model_cfg changes, train_cfg changes), ...)``: one trainer of the small
    preset per name."""
    small, tc, data = small_training

    def make(**variants: tuple[dict, dict]) -> dict[str, Trainer]:
        trainers = {}
        for name, (model_changes, train_changes) in variants.items():
            cfg: ModelConfig = small.replace(**model_changes)
            train_cfg: TrainConfig = tc.replace(**train_changes)
            trainers[name] = Trainer(cfg, train_cfg, tmp_path_factory.mktemp(name), data=data)
        return trainers

    return make
