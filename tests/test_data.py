"""Standard-library corpus, byte-level BPE tokenizer, packed dataset and unigram baseline."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from longcat_sim.errors import UserError
from longcat_sim.train import data
from longcat_sim.train.data import (
    EOT,
    N_BASE_TOKENS,
    ByteBPETokenizer,
    TokenDataset,
    build_corpus_data,
    load_or_encode_documents,
    load_or_train_tokenizer,
    load_stdlib_corpus,
    split_chunks,
    split_documents,
    stdlib_source_files,
    unigram_cross_entropy,
    unigram_entropy,
)

BUDGET = 192 * 1024


@pytest.fixture(scope="module")
def corpus() -> data.Corpus:
    return load_stdlib_corpus(BUDGET)


@pytest.fixture(scope="module")
def tokenizer(corpus) -> ByteBPETokenizer:
    return ByteBPETokenizer.train(corpus.documents, 512)


# -- corpus --------------------------------------------------------------------------------------


def test_corpus_is_sorted_exact_size_and_hashed(corpus) -> None:
    assert corpus.n_bytes == BUDGET
    assert list(corpus.names) == sorted(corpus.names)
    assert list(corpus.names) == stdlib_source_files()[: len(corpus.names)]
    digest = hashlib.sha256()
    for name, doc in zip(corpus.names, corpus.documents, strict=True):
        for part in (name.encode(), doc):
            digest.update(len(part).to_bytes(8, "little") + part)
    assert corpus.sha256 == digest.hexdigest()
    again = load_stdlib_corpus(BUDGET)
    assert again == corpus
    assert load_stdlib_corpus(BUDGET - 1).sha256 != corpus.sha256  # control


def test_source_selection_rules(tmp_path: Path) -> None:
    files = [
        "a.py",
        "pkg/b.py",
        "pkg/test_b.py",
        "pkg/tests/c.py",
        "test/d.py",
        "site-packages/e.py",
        "encodings/cp437.py",
        "pydoc_data/topics.py",
        "sub/encodings/kept.py",
        "notes.txt",
    ]
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(rel.encode() * 10)
    assert stdlib_source_files(tmp_path) == ["a.py", "pkg/b.py", "sub/encodings/kept.py"]
    small = load_stdlib_corpus(45, tmp_path)
    assert small.names == ("a.py", "pkg/b.py")  # the last file is cut to fill the budget
    assert small.documents == (b"a.py" * 10, b"pkg/b") and small.n_bytes == 45
    with pytest.raises(UserError, match="lower the budget"):
        load_stdlib_corpus(10**6, tmp_path)


# -- tokenizer -----------------------------------------------------------------------------------


@given(st.binary(max_size=300))
def test_chunks_concatenate_back(blob: bytes) -> None:
    assert b"".join(split_chunks(blob)) == blob


@given(st.binary(max_size=300))
def test_round_trip_of_arbitrary_bytes(tokenizer, blob: bytes) -> None:
    ids = tokenizer.encode(blob)
    assert tokenizer.decode(ids) == blob
    assert all(0 <= i < 512 and i != EOT for i in ids)


@given(st.text(max_size=200))
def test_round_trip_of_text(tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)).decode("utf-8") == text


def naive_bpe(documents: list[bytes], vocab_size: int) -> list[tuple[int, int]]:
    """Recount every pair before every merge; most frequent first, ties to the smaller pair."""
    words = Counter(c for doc in documents for c in split_chunks(doc))
    seqs = {w: list(w) for w in words}
    merges: list[tuple[int, int]] = []
    while len(merges) < vocab_size - N_BASE_TOKENS:
        counts: Counter[tuple[int, int]] = Counter()
        for w, freq in words.items():
            for pair in zip(seqs[w], seqs[w][1:], strict=False):
                counts[pair] += freq
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        new_id = N_BASE_TOKENS + len(merges)
        merges.append(best)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if seq[i : i + 2] == list(best):
                    out.append(new_id)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return merges


def test_incremental_training_matches_naive_bpe(corpus) -> None:
    docs = [doc[:3000] for doc in corpus.documents[:6]] + [b"aaaaaaa aaaa 1234 !!!!"]
    assert ByteBPETokenizer.train(docs, 400).merges == tuple(naive_bpe(docs, 400))


def sequential_encode(tok: ByteBPETokenizer, blob: bytes) -> list[int]:
    """Apply the merges one after another in training order, chunk by chunk."""
    out = []
    for chunk in split_chunks(blob):
        seq = list(chunk)
        for rank, (a, b) in enumerate(tok.merges):
            merged, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    merged.append(N_BASE_TOKENS + rank)
                    i += 2
                else:
                    merged.append(seq[i])
                    i += 1
            seq = merged
        out.extend(seq)
    return out


def test_encoding_equals_sequential_merging(tokenizer, corpus) -> None:
    blob = corpus.documents[-1][:2000]
    assert tokenizer.encode(blob) == sequential_encode(tokenizer, blob)


def test_training_is_deterministic_and_compresses(corpus, tokenizer) -> None:
    assert len(tokenizer.merges) == 512 - N_BASE_TOKENS
    assert ByteBPETokenizer.train(corpus.documents, 512).sha256 == tokenizer.sha256
    n_tokens = sum(len(ids) for ids in tokenizer.encode_documents(corpus.documents))
    assert n_tokens < 0.6 * corpus.n_bytes


def test_bad_vocab_and_ids_are_reported(tokenizer) -> None:
    with pytest.raises(UserError, match="at least 257"):
        ByteBPETokenizer.train([b"abc"], 100)
    with pytest.raises(UserError, match="outside"):
        tokenizer.decode([5, 9999])


def test_tokenizer_and_tokens_are_cached(tmp_path, corpus, monkeypatch) -> None:
    first = load_or_train_tokenizer(corpus, 300, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"bpe-{corpus.sha256[:16]}-v300-s{data.DEFAULT_SAMPLE_BYTES}.json"]

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(ByteBPETokenizer, "train", no_training)
    assert load_or_train_tokenizer(corpus, 300, tmp_path).merges == first.merges
    docs = load_or_encode_documents(corpus, first, tmp_path)
    cached = load_or_encode_documents(corpus, first, tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(docs, cached, strict=True))
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


# -- dataset -------------------------------------------------------------------------------------


def fake_documents(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, rng.integers(5, 60)).astype(np.int32) for _ in range(n)]


def test_split_is_seeded_disjoint_and_complete() -> None:
    train, val = split_documents(40, 0.1, seed=3)
    assert sorted(train + val) == list(range(40)) and len(val) == 4
    assert split_documents(40, 0.1, seed=3) == (train, val)
    assert split_documents(40, 0.1, seed=4) != (train, val)  # control
    with pytest.raises(UserError, match="val_fraction"):
        split_documents(40, 1.0, seed=0)


def test_packing_windows_and_targets() -> None:
    docs = fake_documents(30)
    ds = TokenDataset(docs, seq_len=16, val_fraction=0.2, split_seed=1)
    expected = np.concatenate([np.append(docs[i], EOT) for i in ds.train_documents])
    assert np.array_equal(ds.tokens["train"], expected)
    x, y = ds.batch_at(0, batch_size=4, seed=0)
    assert x.shape == y.shape == (4, 16) and x.dtype == np.int64
    assert np.array_equal(x[:, 1:], y[:, :-1])
    for row, index in zip(x, ds.window_indices(0, 4, 0), strict=True):
        assert np.array_equal(row, expected[index * 16 : index * 16 + 16])


def test_batches_are_a_pure_function_of_seed_and_step() -> None:
    docs = fake_documents(30)
    a = TokenDataset(docs, seq_len=8, split_seed=1)
    b = TokenDataset(docs, seq_len=8, split_seed=1)
    stream = a.iter_batches(batch_size=3, seed=5, start_step=7)
    for _ in range(3):
        step, x, y = next(stream)
        bx, by = b.batch_at(step, 3, seed=5)
        assert np.array_equal(x, bx) and np.array_equal(y, by)
    assert step == 9
    assert not np.array_equal(a.batch_at(9, 3, seed=6)[0], x)  # control: another seed


@given(batch_size=st.integers(1, 9), seed=st.integers(0, 2**32 - 1))
def test_each_epoch_visits_every_window_once(batch_size: int, seed: int) -> None:
    ds = TokenDataset(fake_documents(20, seed=2), seq_len=7, split_seed=0)
    n = ds.n_windows()
    steps = math.ceil(3 * n / batch_size)
    slots = np.concatenate([ds.window_indices(s, batch_size, seed) for s in range(steps)])
    for epoch in range(3):
        assert sorted(slots[epoch * n : (epoch + 1) * n].tolist()) == list(range(n))


def test_eval_batches_cover_validation_in_order() -> None:
    ds = TokenDataset(fake_documents(40), seq_len=8, val_fraction=0.25, split_seed=0)
    rows = np.concatenate([x for x, _ in ds.eval_batches(batch_size=3)])
    assert len(rows) == ds.n_windows("val")
    assert np.array_equal(rows.reshape(-1), ds.tokens["val"][: len(rows) * 8])
    assert sum(len(x) for x, _ in ds.eval_batches(2, max_batches=2)) == 4


def test_short_split_is_reported() -> None:
    with pytest.raises(UserError, match="seq_len"):
        TokenDataset(fake_documents(4), seq_len=10_000)


# -- unigram baseline ----------------------------------------------------------------------------


def test_unigram_entropy_closed_forms() -> None:
    assert math.isclose(unigram_entropy(np.arange(8).repeat(3)), math.log(8))
    assert unigram_entropy(np.zeros(5, dtype=np.int64)) == 0.0
    h = -(1 / 3) * math.log(1 / 3) - (2 / 3) * math.log(2 / 3)
    assert math.isclose(unigram_entropy(np.array([0, 0, 7, 7, 7, 7])), h)


@given(st.lists(st.integers(0, 9), min_size=1, max_size=60))
def test_cross_entropy_is_at_least_entropy(tokens: list[int]) -> None:
    t = np.array(tokens)
    h = unigram_entropy(t)
    assert unigram_cross_entropy(t, t, 10, pseudo_count=1e-9) == pytest.approx(h, abs=1e-6)
    assert unigram_cross_entropy(t, t, 10, pseudo_count=1.0) >= h - 1e-12


def test_build_corpus_data_end_to_end(tmp_path) -> None:
    built = build_corpus_data(300, 64, byte_budget=BUDGET, cache_dir=tmp_path, sample_bytes=65536)
    again = build_corpus_data(300, 64, byte_budget=BUDGET, cache_dir=tmp_path, sample_bytes=65536)
    assert built.fingerprint == again.fingerprint
    assert built.fingerprint["corpus_sha256"] == load_stdlib_corpus(BUDGET).sha256
    x, _ = built.dataset.batch_at(0, 2, seed=0)
    assert x.max() < 300
    h = built.dataset.unigram_entropy()
    assert 0 < h < math.log(300)


@pytest.mark.slow
def test_default_build_for_the_small_preset_is_fast(tmp_path) -> None:
    import time

    start = time.perf_counter()
    built = build_corpus_data(8192, 256, cache_dir=tmp_path)
    cold = time.perf_counter() - start
    assert cold < 60, f"building the default corpus data took {cold:.1f} s"
    assert built.corpus.n_bytes == data.DEFAULT_BYTE_BUDGET
    assert len(built.tokenizer.merges) == 8192 - N_BASE_TOKENS
    assert built.fingerprint["train_tokens"] < 0.4 * data.DEFAULT_BYTE_BUDGET
