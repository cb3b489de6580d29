"""Deterministic mode, model level: batch, permutation and thread-count invariance, bitwise.

Each property has a negative control with ``deterministic=False`` that searches a fixed list
of cases for a counterexample. Where the default path cannot fail on this CPU (the MoE keeps
every GEMM shape under a token permutation, and MKL's single-thread kernels treat all rows of
one call alike) the control runs where it can fail: on 2 threads. A control that finds no
counterexample skips with the reason instead of passing silently.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longcat_sim.model.config import get_preset
from tests.repro.cases import (
    bitwise_equal,
    differing,
    logits,
    moe_output,
    small_model_dicts,
    training_grads,
)
from tests.repro.conftest import threads
from tests.repro.thread_worker import ThreadWorker
from tests.strategies import moe_configs, placements, seeds

MODEL_SEEDS = st.integers(0, 2)  # few distinct models, so built models are reused


@pytest.fixture(scope="module")
def worker():
    with ThreadWorker() as w:
        yield w


def batch_case(cfg: dict, seed: int, t: int, batch: int, pos: int, pad: int):
    gen = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, cfg["vocab_size"], (t,), generator=gen)
    rows = torch.randint(0, cfg["vocab_size"], (batch, t + pad), generator=gen)
    rows[pos, :t] = seq
    return seq[None], rows


# -- batch invariance ------------------------------------------------------------------------------


@settings(max_examples=30)
@given(cfg=small_model_dicts(), model_seed=MODEL_SEEDS, seed=seeds, at=placements(24, 4, 40))
def test_sequence_logits_are_bitwise_equal_alone_or_inside_any_batch(
    cfg, model_seed, seed, at
) -> None:
    """Any batch size, any row position, any amount of trailing padding (other tokens)."""
    t, batch, pos, pad = at
    alone, rows = batch_case(cfg, seed, t, batch, pos, pad)
    with threads(1):
        expected = logits(cfg, model_seed, alone)[0]
        got = logits(cfg, model_seed, rows)[pos, :t]
    assert bitwise_equal(expected, got)


def default_tiny(**changes) -> dict:
    """The tiny preset in default (not deterministic) mode, as a dict."""
    return get_preset("tiny").replace(deterministic=False, **changes).to_dict()


def test_negative_control_default_logits_depend_on_the_batch() -> None:
    cfg = default_tiny(num_layers=1)
    found = 0
    with threads(1):
        for case in range(12):
            alone, rows = batch_case(cfg, case, 1 + case % 5, 3, case % 3, 7)
            got = logits(cfg, 0, rows)[case % 3, : alone.shape[1]]
            found += not bitwise_equal(logits(cfg, 0, alone)[0], got)
    if not found:
        pytest.skip("the default model happened to be batch-invariant for these cases here")
    assert found > 0


# -- MoE permutation invariance --------------------------------------------------------------------


def permutation_case(cfg: dict, seed: int, tokens: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cfg["hidden_size"], generator=gen)
    upstream = torch.randn(tokens, cfg["hidden_size"], generator=gen)
    return x, upstream, torch.randperm(tokens, generator=gen)


def permuted_pair(results: dict, permuted: dict, perm: torch.Tensor) -> list[str]:
    bad = []
    for key in ("out", "idx", "grad_x"):
        if not bitwise_equal(results[key][perm], permuted[key]):
            bad.append(key)
    return bad


@settings(max_examples=40)
@given(cfg=moe_configs(max_experts=8, max_topk=4), seed=seeds, tokens=st.integers(1, 70))
def test_moe_is_bitwise_permutation_equivariant_over_tokens(cfg, seed, tokens) -> None:
    """Output, routing and input gradient of permuted tokens are the permuted ones."""
    cfg = cfg.replace(deterministic=True).to_dict()
    x, upstream, perm = permutation_case(cfg, seed, tokens)
    with threads(1):
        base = moe_output(cfg, seed % 3, x, upstream)
        permuted = moe_output(cfg, seed % 3, x[perm], upstream[perm])
    assert permuted_pair(base, permuted, perm) == []


def test_negative_control_default_moe_is_not_permutation_equivariant_on_two_threads(
    worker,
) -> None:
    """On one thread the default MoE cannot fail this (a permutation keeps every GEMM's shape
    and MKL's single-thread kernels treat all rows of a call alike); on two threads an expert
    GEMM of 5-7 rows is split unevenly and the leftover rows take another micro-kernel."""
    cfg = default_tiny()
    found = 0
    for case in range(8):
        x, upstream, perm = permutation_case(cfg, case, 10 + 4 * case)
        call = "tests.repro.cases:moe_output"
        base = worker.call(call, threads=2, cfg=cfg, seed=0, x_TD=x, upstream_TD=upstream)
        permuted = worker.call(
            call, threads=2, cfg=cfg, seed=0, x_TD=x[perm], upstream_TD=upstream[perm]
        )
        found += bool(permuted_pair(base, permuted, perm))
    if not found:
        pytest.skip("the default MoE happened to be permutation-invariant on 2 threads here")
    assert found > 0


# -- thread-count invariance -----------------------------------------------------------------------


@settings(max_examples=12)
@given(
    cfg=small_model_dicts(),
    model_seed=MODEL_SEEDS,
    seed=seeds,
    batch=st.integers(1, 3),
    t=st.integers(2, 40),
)
def test_training_gradients_are_bitwise_equal_on_one_and_two_threads(
    worker, cfg, model_seed, seed, batch, t
) -> None:
    """Loss, logits and every parameter gradient of a training step."""
    ids = torch.randint(
        0, cfg["vocab_size"], (batch, t), generator=torch.Generator().manual_seed(seed)
    )
    with threads(1):
        one = training_grads(cfg, model_seed, ids)
    two = worker.call(
        "tests.repro.cases:training_grads", threads=2, cfg=cfg, seed=model_seed, input_ids=ids
    )
    assert differing(one, two) == []


def test_negative_control_default_gradients_change_with_the_thread_count(worker) -> None:
    cfg = default_tiny()
    found = 0
    for case in range(3):
        ids = torch.randint(0, 512, (4, 65), generator=torch.Generator().manual_seed(case))
        with threads(1):
            one = training_grads(cfg, 0, ids)
        two = worker.call(
            "tests.repro.cases:training_grads", threads=2, cfg=cfg, seed=0, input_ids=ids
        )
        found += bool(differing(one, two))
    if not found:
        pytest.skip("default training happened to round alike on 1 and 2 threads here")
    assert found > 0
