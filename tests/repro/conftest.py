"""Fixtures shared by the reproducibility tests: thread-count switching and a data cache."""

from __future__ import annotations

import pytest

from longcat_sim.repro.properties import num_threads

threads = num_threads  # the block on ``n`` intra-op threads, the previous count restored


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One tokenizer cache for every test that trains (built on first use)."""
    return str(tmp_path_factory.mktemp("repro-data-cache"))
