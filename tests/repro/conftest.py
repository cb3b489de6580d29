"""Fixtures shared by the reproducibility tests: thread-count switching and a data cache."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Run the block on ``n`` intra-op threads, restoring the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One tokenizer cache for every test that trains (built on first use)."""
    return str(tmp_path_factory.mktemp("repro-data-cache"))
