"""Hypothesis strategies for the invariance properties (needs the ``hypothesis`` package).

Each draws a batch the properties take: token ids for language models, float rows for other
modules, with the row to isolate or the permutation to apply.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st


@st.composite
def token_batches(
    draw: st.DrawFn, vocab_size: int, *, max_batch: int = 8, max_len: int = 16
) -> torch.Tensor:
    """An int64 (batch, length) tensor of token ids, batch in 2..max_batch."""
    batch = draw(st.integers(2, max_batch))
    length = draw(st.integers(1, max_len))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=gen)


@st.composite
def float_batches(
    draw: st.DrawFn, features: int, *, max_batch: int = 8, scale: float = 1.0
) -> torch.Tensor:
    """A float32 (batch, features) tensor of normal values, batch in 2..max_batch."""
    batch = draw(st.integers(2, max_batch))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(batch, features, generator=gen)


@st.composite
def with_index(draw: st.DrawFn, batches: st.SearchStrategy[torch.Tensor]):
    """(batch, row index) for :func:`~longcat_sim.repro.batch_invariance`."""
    batch = draw(batches)
    return batch, draw(st.integers(0, batch.shape[0] - 1))


@st.composite
def with_permutation(draw: st.DrawFn, batches: st.SearchStrategy[torch.Tensor]):
    """(batch, permutation of its rows) for :func:`~longcat_sim.repro.permutation_invariance`."""
    batch = draw(batches)
    return batch, draw(st.permutations(range(batch.shape[0])))


thread_pairs = st.tuples(st.just(1), st.integers(2, 4))
"""(1, N) thread counts for :func:`~longcat_sim.repro.thread_invariance`."""
