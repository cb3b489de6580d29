"""Training data that needs no download: the interpreter's own standard library, a byte-level BPE.

Corpus: the running interpreter's standard-library ``*.py`` files, sorted by relative path, with
test directories, ``site-packages`` and two packages of generated data tables (``encodings``
codec maps, ``pydoc_data``) left out, taken in order until a fixed byte budget is filled (the
last file is cut so the corpus is exactly ``byte_budget`` bytes). Its SHA-256 names it, so two
machines on the same Python release agree on every byte.

Tokenizer: byte-level BPE. Ids 0..255 are the raw bytes, 256 is the end-of-document token
``EOT`` and every id above is a learned merge, so any byte string round-trips exactly. Text is
first split into chunks (a word with its leading space, one digit, a run of punctuation, a run
of whitespace); merges never cross a chunk boundary. Merges are learned greedily from a sample
of the corpus, ties broken by the smaller pair, so training is deterministic.

Dataset: documents split into train/validation by a seeded permutation, each split
concatenated with ``EOT`` after every document and cut into non-overlapping windows of
``seq_len + 1`` tokens (inputs and shifted targets). The training batch at step ``s`` is a pure
function of ``(seed, s)``: windows are visited in a fresh seeded permutation each epoch, so a
run resumes at any step without replaying the ones before it.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import itertools
import json
import math
import os
import re
import sysconfig
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from longcat_sim.errors import UserError
from longcat_sim.runs import write_bytes_atomic, write_text_atomic

DEFAULT_BYTE_BUDGET = 4 * 2**20
DEFAULT_SAMPLE_BYTES = 2**20
EOT = 256
N_BASE_TOKENS = 257
TOKENIZER_FORMAT = "longcat-sim-byte-bpe-v1"

_SKIPPED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
_DATA_TABLE_PACKAGES = frozenset({"encodings", "pydoc_data"})
_CHUNK_RE = re.compile(rb" ?[A-Za-z_]+| ?[0-9]| ?[^\sA-Za-z0-9_]+|\s+(?!\S)|\s+")


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "longcat-sim"


# -- corpus --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """Documents (file contents) in a fixed order, their names and the hash of both."""

    names: tuple[str, ...]
    documents: tuple[bytes, ...]
    sha256: str

    @property
    def n_bytes(self) -> int:
        return sum(len(d) for d in self.documents)


def stdlib_source_files(stdlib_dir: str | Path | None = None) -> list[str]:
    """Relative paths (POSIX, sorted) of the standard library's ``*.py`` files the corpus uses."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise UserError(f"standard-library folder {str(root)!r} does not exist; pass stdlib_dir")
    selected = []
    for folder, subdirs, files in os.walk(root):
        rel_folder = Path(folder).relative_to(root)
        subdirs[:] = [
            d
            for d in subdirs
            if d not in _SKIPPED_DIRS and not (rel_folder == Path() and d in _DATA_TABLE_PACKAGES)
        ]
        selected.extend(
            (rel_folder / name).as_posix()
            for name in files
            if name.endswith(".py") and not name.startswith("test_")
        )
    return sorted(selected)


def load_stdlib_corpus(
    byte_budget: int = DEFAULT_BYTE_BUDGET, stdlib_dir: str | Path | None = None
) -> Corpus:
    """The first ``byte_budget`` bytes of the sorted standard-library sources, split by file."""
    if byte_budget <= 0:
        raise UserError(f"byte_budget must be positive, got {byte_budget}")
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    names: list[str] = []
    documents: list[bytes] = []
    digest = hashlib.sha256()
    remaining = byte_budget
    for rel in stdlib_source_files(root):
        if remaining == 0:
            break
        content = (root / rel).read_bytes()[:remaining]
        if not content:
            continue
        remaining -= len(content)
        names.append(rel)
        documents.append(content)
        for part in (rel.encode(), content):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    if remaining:
        raise UserError(
            f"the standard library at {str(root)!r} holds only {byte_budget - remaining} bytes of "
            f"sources, less than byte_budget={byte_budget}; lower the budget"
        )
    return Corpus(tuple(names), tuple(documents), digest.hexdigest())


# -- tokenizer -----------------------------------------------------------------------------------


def split_chunks(data: bytes) -> list[bytes]:
    """Pre-tokenise: consecutive chunks that concatenate back to ``data``."""
    return _CHUNK_RE.findall(data)


class ByteBPETokenizer:
    """Byte-level BPE: ids < 256 are bytes, ``EOT`` = 256, ids >= 257 are learned merges."""

    def __init__(self, merges: Sequence[tuple[int, int]], vocab_size: int) -> None:
        if vocab_size < N_BASE_TOKENS:
            raise UserError(
                f"vocab_size must be at least {N_BASE_TOKENS} (256 bytes + EOT), got {vocab_size}"
            )
        if len(merges) > vocab_size - N_BASE_TOKENS:
            raise UserError(f"{len(merges)} merges do not fit in vocab_size={vocab_size}")
        self.vocab_size = vocab_size
        self.merges: tuple[tuple[int, int], ...] = tuple((int(a), int(b)) for a, b in merges)
        self._rank = {pair: N_BASE_TOKENS + i for i, pair in enumerate(self.merges)}
        pieces = [bytes([i]) for i in range(256)] + [b""]
        for a, b in self.merges:
            if not (0 <= a < len(pieces) and 0 <= b < len(pieces)) or EOT in (a, b):
                raise UserError(f"merge ({a}, {b}) refers to an unknown token; the file is corrupt")
            pieces.append(pieces[a] + pieces[b])
        self._pieces = pieces

    # training ------------------------------------------------------------------------------
    @classmethod
    def train(cls, documents: Iterable[bytes], vocab_size: int) -> ByteBPETokenizer:
        """Learn ``vocab_size - 257`` merges (fewer if the text runs out of pairs)."""
        if vocab_size < N_BASE_TOKENS:
            raise UserError(
                f"vocab_size must be at least {N_BASE_TOKENS} (256 bytes + EOT), got {vocab_size}"
            )
        chunk_counts: Counter[bytes] = Counter()
        for doc in documents:
            chunk_counts.update(split_chunks(doc))
        words = [list(chunk) for chunk in sorted(chunk_counts) if len(chunk) > 1]
        freqs = [chunk_counts[bytes(w)] for w in words]
        pair_counts: Counter[tuple[int, int]] = Counter()
        where: dict[tuple[int, int], set[int]] = {}
        for w_idx, (word, freq) in enumerate(zip(words, freqs, strict=True)):
            for pair in itertools.pairwise(word):
                pair_counts[pair] += freq
                where.setdefault(pair, set()).add(w_idx)
        heap = [(-count, a, b) for (a, b), count in pair_counts.items()]
        heapq.heapify(heap)
        merges: list[tuple[int, int]] = []
        while len(merges) < vocab_size - N_BASE_TOKENS and heap:
            neg, a, b = heapq.heappop(heap)
            if pair_counts.get((a, b), 0) != -neg or neg == 0:
                continue  # stale entry
            new_id = N_BASE_TOKENS + len(merges)
            merges.append((a, b))
            changed: set[tuple[int, int]] = set()
            for w_idx in sorted(where.pop((a, b), ())):
                word, freq = words[w_idx], freqs[w_idx]
                for pair in itertools.pairwise(word):
                    pair_counts[pair] -= freq
                    changed.add(pair)
                word = _merge_pair(word, a, b, new_id)
                words[w_idx] = word
                for pair in itertools.pairwise(word):
                    pair_counts[pair] += freq
                    changed.add(pair)
                    where.setdefault(pair, set()).add(w_idx)
            for pair in changed:
                count = pair_counts[pair]
                if count > 0:
                    heapq.heappush(heap, (-count, *pair))
                else:
                    del pair_counts[pair]
        return cls(merges, vocab_size)

    # encoding ------------------------------------------------------------------------------
    def encode(self, data: bytes | str) -> list[int]:
        """Token ids of ``data`` (a str is UTF-8 encoded first); never emits ``EOT``."""
        return self._encode(data, {})

    def encode_documents(self, documents: Iterable[bytes]) -> list[np.ndarray]:
        """Encode many documents with one shared chunk cache (fast on repetitive text)."""
        cache: dict[bytes, list[int]] = {}
        return [np.asarray(self._encode(doc, cache), dtype=np.int32) for doc in documents]

    def decode(self, ids: Iterable[int]) -> bytes:
        """The bytes the ids stand for; ``EOT`` decodes to nothing."""
        ids = [int(i) for i in ids]
        pieces = self._pieces
        bad = [i for i in ids if not 0 <= i < len(pieces)]
        if bad:
            raise UserError(f"token id {bad[0]} is outside this tokenizer's {len(pieces)} ids")
        return b"".join(pieces[i] for i in ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self._pieces[token_id]

    def _encode(self, data: bytes | str, cache: dict[bytes, list[int]]) -> list[int]:
        if isinstance(data, str):
            data = data.encode("utf-8")
        out: list[int] = []
        for chunk in split_chunks(data):
            ids = cache.get(chunk)
            if ids is None:
                ids = self._encode_chunk(chunk)
                cache[chunk] = ids
            out.extend(ids)
        return out

    def _encode_chunk(self, chunk: bytes) -> list[int]:
        ids = list(chunk)
        rank = self._rank
        while len(ids) > 1:
            best = min(itertools.pairwise(ids), key=lambda p: rank.get(p, math.inf))
            new_id = rank.get(best)
            if new_id is None:
                break
            ids = _merge_pair(ids, best[0], best[1], new_id)
        return ids

    # persistence ---------------------------------------------------------------------------
    def to_json(self) -> str:
        doc = {"format": TOKENIZER_FORMAT, "vocab_size": self.vocab_size, "merges": self.merges}
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ByteBPETokenizer:
        doc = json.loads(text)
        if doc.get("format") != TOKENIZER_FORMAT:
            raise UserError(
                f"not a {TOKENIZER_FORMAT} tokenizer file (format {doc.get('format')!r})"
            )
        return cls([tuple(m) for m in doc["merges"]], int(doc["vocab_size"]))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def _merge_pair(ids: list[int], a: int, b: int, new_id: int) -> list[int]:
    out: list[int] = []
    i, n = 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def tokenizer_sample(corpus: Corpus, sample_bytes: int = DEFAULT_SAMPLE_BYTES) -> list[bytes]:
    """Every k-th document (k chosen so the sample holds about ``sample_bytes``)."""
    if sample_bytes <= 0:
        raise UserError(f"sample_bytes must be positive, got {sample_bytes}")
    stride = max(1, math.ceil(corpus.n_bytes / sample_bytes))
    return list(corpus.documents[::stride])


def load_or_train_tokenizer(
    corpus: Corpus,
    vocab_size: int,
    cache_dir: str | Path | None = None,
    sample_bytes: int = DEFAULT_SAMPLE_BYTES,
) -> ByteBPETokenizer:
    """The tokenizer for ``(corpus, vocab_size)``, trained once and cached as JSON."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"bpe-{corpus.sha256[:16]}-v{vocab_size}-s{sample_bytes}.json"
    if path.is_file():
        tokenizer = ByteBPETokenizer.from_json(path.read_text())
        if tokenizer.vocab_size == vocab_size:
            return tokenizer
    tokenizer = ByteBPETokenizer.train(tokenizer_sample(corpus, sample_bytes), vocab_size)
    write_text_atomic(path, tokenizer.to_json())
    return tokenizer


def load_or_encode_documents(
    corpus: Corpus, tokenizer: ByteBPETokenizer, cache_dir: str | Path | None = None
) -> list[np.ndarray]:
    """Every document's token ids, cached as one ``.npz`` keyed by corpus and tokenizer hash."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"tokens-{corpus.sha256[:16]}-{tokenizer.sha256[:16]}.npz"
    if path.is_file():
        with np.load(path) as saved:
            flat, offsets = saved["tokens"], saved["offsets"]
        if len(offsets) == len(corpus.documents) + 1:
            return [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    docs = tokenizer.encode_documents(corpus.documents)
    offsets = np.cumsum([0] + [len(d) for d in docs]).astype(np.int64)
    flat = np.concatenate(docs) if docs else np.zeros(0, np.int32)
    buffer = io.BytesIO()
    np.savez(buffer, tokens=flat, offsets=offsets)
    write_bytes_atomic(path, buffer.getvalue())
    return docs


# -- statistics ----------------------------------------------------------------------------------


def unigram_entropy(tokens: np.ndarray) -> float:
    """Plug-in entropy of the token frequencies, in nats/token.

    A model that predicts the next token from its frequency alone reaches this loss on the
    same tokens; a trained model must go below it.
    """
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        raise UserError("unigram_entropy needs at least one token")
    counts = np.bincount(tokens.ravel()).astype(np.float64)
    p = counts[counts > 0] / tokens.size
    return float(-(p * np.log(p)).sum())


def unigram_cross_entropy(
    fit_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int, pseudo_count: float = 1.0
) -> float:
    """Loss (nats/token) on ``eval_tokens`` of unigram frequencies fitted on ``fit_tokens``.

    Additive smoothing by ``pseudo_count`` keeps unseen tokens finite.
    """
    counts = np.bincount(np.asarray(fit_tokens).ravel(), minlength=vocab_size).astype(np.float64)
    probs = (counts + pseudo_count) / (counts.sum() + pseudo_count * vocab_size)
    return float(-np.log(probs[np.asarray(eval_tokens).ravel()]).mean())


# -- dataset -------------------------------------------------------------------------------------


def split_documents(
    n_documents: int, val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Document indices (each list sorted) for train and validation, by a seeded permutation."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    n_val = max(1, round(n_documents * val_fraction))
    if n_documents - n_val < 1:
        raise UserError(
            f"{n_documents} documents cannot be split into train and validation; "
            "raise the byte budget or lower val_fraction"
        )
    order = np.random.default_rng(seed).permutation(n_documents)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def pack_documents(documents: Sequence[np.ndarray]) -> np.ndarray:
    """One token stream: each document followed by ``EOT``."""
    parts: list[np.ndarray] = []
    eot = np.array([EOT], dtype=np.int32)
    for doc in documents:
        parts.extend((np.asarray(doc, dtype=np.int32), eot))
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


class TokenDataset:
    """Packed train/validation token streams cut into windows of ``seq_len + 1`` tokens."""

    def __init__(
        self,
        document_tokens: Sequence[np.ndarray],
        seq_len: int,
        *,
        val_fraction: float = 0.05,
        split_seed: int = 0,
    ) -> None:
        if seq_len <= 0:
            raise UserError(f"seq_len must be positive, got {seq_len}")
        self.seq_len = seq_len
        train_idx, val_idx = split_documents(len(document_tokens), val_fraction, split_seed)
        self.train_documents = train_idx
        self.val_documents = val_idx
        self.tokens = {
            "train": pack_documents([document_tokens[i] for i in train_idx]),
            "val": pack_documents([document_tokens[i] for i in val_idx]),
        }
        for split, stream in self.tokens.items():
            if len(stream) < seq_len + 1:
                raise UserError(
                    f"the {split} split has {len(stream)} tokens, fewer than seq_len + 1 = "
                    f"{seq_len + 1}; lower seq_len or raise the byte budget"
                )

    def n_windows(self, split: str = "train") -> int:
        return (len(self._stream(split)) - 1) // self.seq_len

    def window(self, index: int, split: str = "train") -> np.ndarray:
        """Window ``index``: ``seq_len + 1`` consecutive tokens (int64)."""
        start = index * self.seq_len
        return self._stream(split)[start : start + self.seq_len + 1].astype(np.int64)

    def window_indices(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        """Training windows of batch ``step``: slots ``step*B .. step*B+B-1`` of the epoch order.

        Epoch ``e`` visits every window once in the order ``default_rng([seed, e]).permutation``.
        """
        if step < 0 or batch_size <= 0:
            raise UserError(f"need step >= 0 and batch_size > 0, got {step} and {batch_size}")
        n = self.n_windows("train")
        slots = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
        out = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(slots // n):
            mask = slots // n == epoch
            order = np.random.default_rng([seed, int(epoch)]).permutation(n)
            out[mask] = order[slots[mask] % n]
        return out

    def batch_at(self, step: int, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets ``[B, T]`` (int64) of training step ``step``; pure in (seed, step)."""
        rows = np.stack([self.window(int(i)) for i in self.window_indices(step, batch_size, seed)])
        return rows[:, :-1], rows[:, 1:]

    def iter_batches(
        self, batch_size: int, seed: int, start_step: int = 0
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(step, inputs, targets)`` from ``start_step`` on, forever."""
        step = start_step
        while True:
            yield (step, *self.batch_at(step, batch_size, seed))
            step += 1

    def eval_batches(
        self, batch_size: int, max_batches: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Validation windows in order, ``batch_size`` at a time (the last batch may be short)."""
        n = self.n_windows("val")
        if max_batches is not None:
            n = min(n, max_batches * batch_size)
        for start in range(0, n, batch_size):
            rows = np.stack(
                [self.window(i, "val") for i in range(start, min(n, start + batch_size))]
            )
            yield rows[:, :-1], rows[:, 1:]

    def unigram_entropy(self, split: str = "train") -> float:
        return unigram_entropy(self._stream(split))

    def _stream(self, split: str) -> np.ndarray:
        if split not in self.tokens:
            raise UserError(f"unknown split {split!r}; use 'train' or 'val'")
        return self.tokens[split]


@dataclass(frozen=True)
class CorpusData:
    """Everything a training run needs from the data side, with the hashes that name it."""

    corpus: Corpus
    tokenizer: ByteBPETokenizer
    dataset: TokenDataset

    @property
    def fingerprint(self) -> dict[str, object]:
        return {
            "corpus_sha256": self.corpus.sha256,
            "corpus_bytes": self.corpus.n_bytes,
            "corpus_documents": len(self.corpus.documents),
            "tokenizer_sha256": self.tokenizer.sha256,
            "vocab_size": self.tokenizer.vocab_size,
            "train_tokens": len(self.dataset.tokens["train"]),
            "val_tokens": len(self.dataset.tokens["val"]),
        }


def build_corpus_data(
    vocab_size: int,
    seq_len: int,
    *,
    byte_budget: int = DEFAULT_BYTE_BUDGET,
    val_fraction: float = 0.05,
    split_seed: int = 0,
    cache_dir: str | Path | None = None,
    sample_bytes: int = DEFAULT_SAMPLE_BYTES,
    stdlib_dir: str | Path | None = None,
) -> CorpusData:
    """Corpus, cached tokenizer and packed dataset in one call."""
    corpus = load_stdlib_corpus(byte_budget, stdlib_dir)
    tokenizer = load_or_train_tokenizer(corpus, vocab_size, cache_dir, sample_bytes)
    docs = load_or_encode_documents(corpus, tokenizer, cache_dir)
    dataset = TokenDataset(docs, seq_len, val_fraction=val_fraction, split_seed=split_seed)
    return CorpusData(corpus, tokenizer, dataset)
