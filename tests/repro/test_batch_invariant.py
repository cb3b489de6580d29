"""Batch-invariant kernels: equal to the default ops up to rounding, and invariant bit for bit.

Tolerances against float64 references: rtol = atol = 1e-5 (O(1) values, dot products of at most
a few hundred float32 terms). Invariance is checked bitwise (``tensor_hash``), each property
with a negative control on the default op; a default op that cannot fail on this CPU skips its
control with the reason.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from model.kernels import batch_invariant as bi
from tests.repro.cases import bitwise_equal
from tests.repro.conftest import threads
from tests.repro.thread_worker import ThreadWorker
from tests.strategies import seeds

TOL = dict(rtol=1e-5, atol=1e-5)


def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


@pytest.fixture(scope="module")
def worker():
    with ThreadWorker() as w:
        yield w


# -- linear ----------------------------------------------------------------------------------------


@settings(max_examples=40)
@given(
    seed=seeds,
    rows=st.integers(1, 80),
    k=st.sampled_from([8, 24, 64, 96]),
    n=st.sampled_from([4, 32, 100]),
)
def test_linear_matches_the_default_and_its_gradients(seed, rows, k, n) -> None:
    gen = torch.Generator().manual_seed(seed)
    x, w = randn(gen, rows, k), randn(gen, n, k)
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    x2, w2 = x.double().requires_grad_(), w.double().requires_grad_()
    y1, y2 = bi.linear(x1, w1), F.linear(x2, w2)
    upstream = randn(gen, rows, n)
    y1.backward(upstream)
    y2.backward(upstream.double())
    torch.testing.assert_close(y1.double(), y2.detach(), **TOL)
    torch.testing.assert_close(x1.grad.double(), x2.grad, **TOL)
    torch.testing.assert_close(w1.grad.double(), w2.grad, rtol=1e-5, atol=1e-4)


@settings(max_examples=40)
@given(seed=seeds, rows=st.integers(1, 70), data=st.data())
def test_a_row_of_linear_is_bitwise_the_same_in_any_batch_at_any_position(seed, rows, data) -> None:
    pos = data.draw(st.integers(0, rows - 1))
    gen = torch.Generator().manual_seed(seed)
    w, x = randn(gen, 48, 64), randn(gen, 64)
    batch = randn(gen, rows, 64)
    batch[pos] = x
    assert bitwise_equal(bi.linear(batch, w)[pos], bi.linear(x[None], w)[0])


def test_negative_control_default_linear_depends_on_the_batch() -> None:
    """MKL takes another kernel for one row (and for 2-3 rows) than for many."""
    gen = torch.Generator().manual_seed(0)
    w, x = randn(gen, 48, 64), randn(gen, 64)
    found = []
    for rows in range(1, 9):
        batch = randn(gen, rows, 64)
        batch[0] = x
        found.append(not bitwise_equal(F.linear(batch, w)[0], F.linear(x[None], w)[0]))
    if not any(found):
        pytest.skip("the default GEMM happens to be batch-invariant for these shapes on this CPU")
    assert any(found)


def test_linear_and_its_weight_gradient_are_equal_on_one_and_two_threads(worker) -> None:
    gen = torch.Generator().manual_seed(1)
    x, w, up = randn(gen, 301, 96), randn(gen, 80, 96), randn(gen, 301, 80)
    one = linear_with_grads(x, w, up)
    two = worker.call(
        "tests.repro.test_batch_invariant:linear_with_grads", threads=2, x=x, w=w, up=up
    )
    assert all(bitwise_equal(one[k], two[k]) for k in one)


def linear_with_grads(x: torch.Tensor, w: torch.Tensor, up: torch.Tensor) -> dict:
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = bi.linear(x, w)
    y.backward(up)
    return {"y": y.detach(), "dx": x.grad, "dw": w.grad}


def test_linear_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="does not match"):
        bi.linear(torch.zeros(2, 3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="mm_rows"):
        bi.mm_rows(torch.zeros(2, 3), torch.zeros(4, 5))


# -- attention -------------------------------------------------------------------------------------


def qkv(gen: torch.Generator, b: int, h: int, t: int, d: int = 24, dv: int = 16):
    return randn(gen, b, h, t, d), randn(gen, b, h, t, d), randn(gen, b, h, t, dv)


@settings(max_examples=30)
@given(seed=seeds, t=st.integers(1, 80), heads=st.integers(1, 3))
def test_causal_attention_matches_sdpa_and_its_gradients(seed, t, heads) -> None:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (a.requires_grad_() for a in qkv(gen, 2, heads, t))
    q2, k2, v2 = (a.detach().double().requires_grad_() for a in (q, k, v))
    out = bi.causal_attention(q, k, v, 0.2)
    ref = F.scaled_dot_product_attention(q2, k2, v2, is_causal=True, scale=0.2)
    up = randn(gen, *out.shape)
    out.backward(up)
    ref.backward(up.double())
    torch.testing.assert_close(out.double(), ref.detach(), **TOL)
    for mine, theirs in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, **TOL)


@settings(max_examples=30)
@given(
    seed=seeds,
    t=st.integers(1, 40),
    batch=st.integers(1, 4),
    pad=st.integers(0, 70),
    data=st.data(),
)
def test_attention_rows_are_bitwise_the_same_with_any_batch_and_padding(
    seed, t, batch, pad, data
) -> None:
    pos = data.draw(st.integers(0, batch - 1))
    gen = torch.Generator().manual_seed(seed)
    q, k, v = qkv(gen, 1, 2, t)
    bq, bk, bv = qkv(gen, batch, 2, t + pad)
    for big, small in ((bq, q), (bk, k), (bv, v)):
        big[pos, :, :t] = small[0]
    alone = bi.causal_attention(q, k, v, 0.3)[0]
    inside = bi.causal_attention(bq, bk, bv, 0.3)[pos, :, :t]
    assert bitwise_equal(alone, inside)


def test_negative_control_sdpa_rows_change_with_padding() -> None:
    """PyTorch's CPU attention picks its blocking from the sequence length."""
    gen = torch.Generator().manual_seed(0)
    found = []
    for t in range(1, 12):
        q, k, v = qkv(gen, 1, 2, t)
        pq, pk, pv = qkv(gen, 1, 2, t + 40)
        pq[:, :, :t], pk[:, :, :t], pv[:, :, :t] = q, k, v
        alone = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        padded = F.scaled_dot_product_attention(pq, pk, pv, is_causal=True)[:, :, :t]
        found.append(not bitwise_equal(alone, padded))
    if not any(found):
        pytest.skip("SDPA happens to be padding-invariant for these shapes on this CPU")
    assert any(found)


# -- fixed-order sums ------------------------------------------------------------------------------


def test_fixed_order_sum_matches_float64_and_handles_edge_sizes() -> None:
    gen = torch.Generator().manual_seed(2)
    for n in (0, 1, 1023, 1024, 1025, 70_001):
        x = randn(gen, n)
        torch.testing.assert_close(
            bi.fixed_order_sum(x).double(), x.double().sum(), rtol=1e-5, atol=1e-3
        )
    assert bi.fixed_order_sum(torch.zeros(0)).shape == ()


def big_sums(x: torch.Tensor) -> dict:
    return {"fixed": bi.fixed_order_sum(x), "plain": x.sum()}


def test_fixed_order_sum_is_thread_invariant_where_the_default_is_not(worker) -> None:
    x = randn(torch.Generator().manual_seed(3), 3_000_001)
    with threads(1):
        one = big_sums(x)
    two = worker.call("tests.repro.test_batch_invariant:big_sums", threads=2, x=x)
    assert bitwise_equal(one["fixed"], two["fixed"])
    # negative control: torch.sum splits more than 32k elements between threads
    if bitwise_equal(one["plain"], two["plain"]):
        pytest.skip("the plain sum happened to round alike on 1 and 2 threads here")
    assert not bitwise_equal(one["plain"], two["plain"])


@settings(max_examples=30)
@given(seed=seeds, k=st.integers(1, 12))
def test_slot_sum_adds_in_slot_order(seed, k) -> None:
    x = randn(torch.Generator().manual_seed(seed), 5, k) * 1e3
    expected = x[:, 0].clone()
    for j in range(1, k):
        expected = expected + x[:, j]
    assert bitwise_equal(bi.slot_sum(x), expected)
