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

from longcat_sim.model.kernels import batch_invariant as bi
from tests.repro.cases import bitwise_equal
from tests.repro.conftest import threads
from tests.repro.thread_worker import ThreadWorker
from tests.strategies import placements, seeds

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


TALL_SKINNY = ((20_000, 8, 16), (20_000, 3, 5), (50_000, 16, 8))  # (M, N, K) of a^T b


def test_linear_and_its_weight_gradient_are_equal_on_one_and_two_threads(worker) -> None:
    """Also tall-skinny weight gradients ``a^T b`` (many rows, a tiny output): the shape a
    GEMM would most want to split along its summed dimension."""
    gen = torch.Generator().manual_seed(1)
    x, w, up = randn(gen, 301, 96), randn(gen, 80, 96), randn(gen, 301, 80)
    tall = [(randn(gen, m, n), randn(gen, m, k)) for m, n, k in TALL_SKINNY]
    with threads(1):
        one = linear_with_grads(x, w, up, tall)
    two = worker.call(
        "tests.repro.test_batch_invariant:linear_with_grads", threads=2, x=x, w=w, up=up, tall=tall
    )
    assert set(one) == set(two) and len(one) == 3 + len(TALL_SKINNY)
    assert [k for k in one if not bitwise_equal(one[k], two[k])] == []


def linear_with_grads(
    x: torch.Tensor,
    w: torch.Tensor,
    up: torch.Tensor,
    tall: list[tuple[torch.Tensor, torch.Tensor]] = (),
) -> dict:
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = bi.linear(x, w)
    y.backward(up)
    out = {"y": y.detach(), "dx": x.grad, "dw": w.grad}
    out.update({f"dw_tall{i}": bi.mm_t_rows(a, b) for i, (a, b) in enumerate(tall)})
    return out


# -- the tile= forms: the fixed-shape references of mm_rows and mm_t_rows --------------------------

TILES = (8, 16, 32)
TILE_ROWS = (0, 1, 7, 8, 9, 33, 100)
TILE_SHAPES = ((64, 48), (16, 8), (24, 5))  # (K, N): a @ b is [M, K] x [K, N]


def _out(kind: str, shape: tuple[int, int], init: torch.Tensor | None) -> torch.Tensor | None:
    """None (a fresh result), or a given ``out``: contiguous, a column slice of a wider
    tensor, or a transposed (column-major) one; holding ``init`` when accumulating."""
    rows, cols = shape
    if kind == "new":
        return None
    if kind == "contiguous":
        out = torch.zeros(rows, cols)
    elif kind == "slice":
        out = torch.zeros(rows, cols + 5)[:, 2 : 2 + cols]
    else:
        out = torch.zeros(cols, rows).t()
    return out.copy_(init) if init is not None else out


def tiled_products(cases: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Per case, ``mm_rows`` (plain and accumulating) and ``mm_t_rows`` in the one-call form
    and every ``tile=`` form, into fresh, contiguous, sliced and transposed outputs. Keys:
    ``group/tile/out``; the reference of each group is ``group/one/new`` (``/contiguous``
    when accumulating)."""
    results = []
    for case in cases:
        a, b, init, a_t, b_t = (case[k] for k in ("a", "b", "init", "a_t", "b_t"))
        mm_shape, mm_t_shape = (a.shape[0], b.shape[1]), (a_t.shape[1], b_t.shape[1])
        got: dict[str, torch.Tensor] = {}
        for tile in (None, *TILES):
            name = "one" if tile is None else f"tile{tile}"
            for kind in ("new", "contiguous", "slice", "transposed"):
                got[f"mm/{name}/{kind}"] = bi.mm_rows(
                    a, b, out=_out(kind, mm_shape, None), tile=tile
                )
                got[f"mm_t/{name}/{kind}"] = bi.mm_t_rows(
                    a_t, b_t, out=_out(kind, mm_t_shape, None), tile=tile
                )
                if kind != "new":
                    out = _out(kind, mm_shape, init)
                    got[f"acc/{name}/{kind}"] = bi.mm_rows(
                        a, b, out=out, accumulate=True, tile=tile
                    )
        results.append(got)
    return results


def tile_cases() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    cases = []
    for k, n in TILE_SHAPES:
        for rows in TILE_ROWS:
            cases.append(
                {
                    "a": randn(gen, rows, k),
                    "b": randn(gen, k, n),
                    "init": randn(gen, rows, n),
                    "a_t": randn(gen, rows, n),  # mm_t_rows sums over these rows
                    "b_t": randn(gen, rows, k),
                }
            )
    return cases


def tile_mismatches(results: list[dict[str, torch.Tensor]]) -> list[str]:
    bad = []
    for i, got in enumerate(results):
        for key, value in got.items():
            group = key.split("/")[0]
            reference = got[f"{group}/one/contiguous" if group == "acc" else f"{group}/one/new"]
            if not bitwise_equal(value, reference):
                bad.append(f"case {i}: {key}")
    return bad


def test_tile_forms_and_any_out_layout_equal_the_one_call_form_bitwise(worker) -> None:
    """``tile=8/16/32`` (every GEMM call of one fixed shape) gives bit for bit what the
    one-call form gives, for 0 to 100 rows, with and without ``accumulate``, into outputs of
    any layout, on 1 and on 2 threads; and the one-call form is the same on both."""
    cases = tile_cases()
    with threads(1):
        one = tiled_products(cases)
    two = worker.call("tests.repro.test_batch_invariant:tiled_products", threads=2, cases=cases)
    assert tile_mismatches(one) == []
    assert tile_mismatches(two) == []
    across = [
        f"case {i}: {key}"
        for i, (a, b) in enumerate(zip(one, two, strict=True))
        for key in a
        if not bitwise_equal(a[key], b[key])
    ]
    assert across == []
    assert tiled_products(cases[:1])[0]["mm/tile8/new"].shape == (0, 48)


def test_negative_control_the_output_layout_can_change_a_plain_gemm() -> None:
    """Why ``mm_rows`` routes a non-contiguous ``out`` through a contiguous buffer: MKL can
    round a product written with another row stride differently."""
    gen = torch.Generator().manual_seed(5)
    found = []
    for k, n in TILE_SHAPES:
        for rows in TILE_ROWS[1:]:
            a, b = randn(gen, rows, k), randn(gen, k, n)
            for kind in ("slice", "transposed"):
                out = _out(kind, (rows, n), None)
                torch.mm(a, b, out=out)
                found.append(not bitwise_equal(out.contiguous(), torch.mm(a, b)))
    if not any(found):
        pytest.skip("this CPU's GEMM rounds alike whatever the output layout")
    assert any(found)


def test_tile_and_out_arguments_are_validated() -> None:
    a, b = torch.zeros(9, 4), torch.zeros(4, 3)
    for tile in (0, 12, -8):
        with pytest.raises(ValueError, match="tile must be a positive multiple of 8"):
            bi.mm_rows(a, b, tile=tile)
        with pytest.raises(ValueError, match="tile must be a positive multiple of 8"):
            bi.mm_t_rows(a, torch.zeros(9, 2), tile=tile)
    with pytest.raises(ValueError, match=r"out has shape \(9, 4\), expected \(9, 3\)"):
        bi.mm_rows(a, b, out=torch.zeros(9, 4))
    with pytest.raises(ValueError, match=r"mm_t_rows: out has shape"):
        bi.mm_t_rows(a, torch.zeros(9, 2), out=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="accumulate needs out"):
        bi.mm_rows(a, b, accumulate=True)


# -- SiLU: every element through ATen's vector path ------------------------------------------------

# odd lengths end in a scalar tail on any thread count; 40_016, 65_552 and 200_016 (= 16 mod 32,
# past the grain) end every 2-thread chunk in 8 scalar elements while the whole run has none
# where the vector loop steps by 16 elements (AVX2)
SILU_LENGTHS = (
    *(17, 100, 127, 129, 1000, 32_767, 32_769, 40_003, 40_016),
    *(53_759, 53_761, 65_552, 107_523, 200_003, 200_016),
)
PIECE = 128  # one task (< bi.GRAIN) and a whole number of vector steps on any ISA up to 512 bits


def vector_path_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU computed only by ATen's vector loop: zero-padded 128-element pieces, one call each."""
    padded = torch.zeros(x.numel() + (-x.numel()) % PIECE)
    padded[: x.numel()] = x
    out = torch.empty_like(padded)
    for lo in range(0, padded.numel(), PIECE):
        torch.ops.aten.silu.out(padded[lo : lo + PIECE], out=out[lo : lo + PIECE])
    return out[: x.numel()]


def scalar_vector_disagreements(candidates: int = 4096) -> torch.Tensor:
    """Inputs on which ATen's SiLU scalar loop (a 1-element call never vectorises) and vector
    loop round differently."""
    x = randn(torch.Generator().manual_seed(11), candidates) * 4
    vector = vector_path_silu(x)
    scalar = torch.stack([F.silu(v.reshape(1))[0] for v in x])
    return x[scalar.view(torch.int32) != vector.view(torch.int32)]


def silu_at_lengths(x: torch.Tensor, lengths: tuple[int, ...]) -> dict[str, list[torch.Tensor]]:
    return {
        "silu_forward": [bi.silu_forward(x[:n]) for n in lengths],
        "F.silu": [F.silu(x[:n]) for n in lengths],
    }


def test_silu_forward_takes_the_vector_path_everywhere_on_one_to_three_threads(worker) -> None:
    """Every element is one on which the scalar and vector loops disagree, so a single element
    left to a scalar loop (a run's tail, a thread chunk's tail, any boundary :func:`_aligned`
    creates) shows. Lengths cross the thread-split grain (32768), ALIGN (53760) and its
    multiples; 3 threads check the chunk arithmetic beyond halves. ``F.silu`` is the negative
    control: it leaves the tail of every run, and of every thread's chunk, to the scalar loop."""
    pool = scalar_vector_disagreements()
    if not pool.numel():
        pytest.skip("ATen's SiLU scalar and vector loops agree on this CPU: nothing to tell apart")
    gen = torch.Generator().manual_seed(12)
    x = pool[torch.randint(0, pool.numel(), (max(SILU_LENGTHS),), generator=gen)]
    reference = vector_path_silu(x)

    def mismatches(outputs: list[torch.Tensor]) -> set[int]:
        pairs = zip(SILU_LENGTHS, outputs, strict=True)
        return {n for n, y in pairs if not bitwise_equal(y, reference[:n])}

    with threads(1):
        results = {1: silu_at_lengths(x, SILU_LENGTHS)}
    for n_threads in (2, 3):
        results[n_threads] = worker.call(
            "tests.repro.test_batch_invariant:silu_at_lengths",
            threads=n_threads,
            x=x,
            lengths=SILU_LENGTHS,
        )
    for n_threads, got in results.items():
        assert mismatches(got["silu_forward"]) == set(), n_threads
    caught = {n_threads: mismatches(got["F.silu"]) for n_threads, got in results.items()}
    odd = {n for n in SILU_LENGTHS if n % 2}
    chunk_tails = {n for n in SILU_LENGTHS if n % 32 == 16}
    assert odd <= caught[1] and odd | chunk_tails <= caught[2]
    if torch.backends.cpu.get_cpu_capability() == "AVX2":  # vector loop steps by 16 floats
        assert not chunk_tails & caught[1]  # so on 2 threads it is the chunk boundaries


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
@given(seed=seeds, at=placements(40, 4, 70))
def test_attention_rows_are_bitwise_the_same_with_any_batch_and_padding(seed, at) -> None:
    t, batch, pos, pad = at
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
