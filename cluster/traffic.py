"""Serving workloads: requests as numpy arrays, synthetic or replayed from a trace.

A workload is a ``Requests``: arrival times (s, sorted) with prompt and output lengths in tokens.
Synthetic arrivals are Poisson or bursty (gamma inter-arrival times); lengths are gamma
distributed. Traces are CSV or JSONL files with a timestamp and two token columns (the Azure
LLM inference traces of 2023 ship with the package, ``AZURE_TRACES``).

Randomness comes from one root seed split into named streams (``seed_streams``), so adding a
draw to one stream never shifts another.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import longcat_sim
from longcat_sim.cluster.errors import ClusterInputError

STREAM_NAMES = ("arrivals", "lengths", "acceptance")
FIXED_CV = 1e-6  # a coefficient of variation below this draws fixed values

_TRACE_DIR = Path(longcat_sim.__file__).parent / "data" / "traces" / "azure-llm-inference-2023"
AZURE_TRACES: dict[str, Path] = {
    "azure-code": _TRACE_DIR / "AzureLLMInferenceTrace_code.csv",
    "azure-conv": _TRACE_DIR / "AzureLLMInferenceTrace_conv.csv",
}

_TIME_COLUMNS = ("timestamp", "time", "arrival_s", "arrival_time")
_INPUT_COLUMNS = ("contexttokens", "input_tokens", "prompt_tokens", "input_len")
_OUTPUT_COLUMNS = ("generatedtokens", "output_tokens", "output_len")


def seed_streams(seed: int) -> dict[str, np.random.Generator]:
    """One independent generator per name in ``STREAM_NAMES``, all derived from ``seed``."""
    children = np.random.SeedSequence(seed).spawn(len(STREAM_NAMES))
    return {name: np.random.default_rng(s) for name, s in zip(STREAM_NAMES, children, strict=True)}


@dataclass(frozen=True)
class Requests:
    """A workload: per request its arrival (s, sorted), prompt and output lengths (tokens)."""

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    cached_tokens: np.ndarray | None = None  # already in the KV cache on arrival (None: 0)

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if self.cached_tokens is not None and (
            len(self.cached_tokens) != n or (n and np.min(self.cached_tokens) < 0)
        ):
            raise ClusterInputError(
                "requests: cached_tokens must hold one count >= 0 per request, or be None"
            )
        if len(self.prompt_tokens) != n or len(self.output_tokens) != n:
            raise ClusterInputError(
                f"requests: arrival_s, prompt_tokens, output_tokens have lengths {n}, "
                f"{len(self.prompt_tokens)}, {len(self.output_tokens)}; they must be equal"
            )
        if n and not np.all(np.isfinite(self.arrival_s)):
            raise ClusterInputError("requests: arrival times must be finite numbers")
        if n > 1 and np.any(np.diff(self.arrival_s) < 0):
            raise ClusterInputError("requests: arrival times must be sorted ascending")
        if n and (np.min(self.prompt_tokens) < 0 or np.min(self.output_tokens) < 1):
            raise ClusterInputError("requests: prompt tokens must be >= 0 and output tokens >= 1")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def cached(self) -> np.ndarray:
        """Tokens each request finds in the KV cache on arrival (zeros when none were given)."""
        if self.cached_tokens is None:
            return np.zeros(len(self), dtype=np.int64)
        return np.asarray(self.cached_tokens, dtype=np.int64)

    @property
    def mean_rate(self) -> float:
        """Requests per second: (n - 1) over the span from the first to the last arrival."""
        span = float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) else 0.0
        if len(self) < 2 or span <= 0.0:
            raise ClusterInputError("requests: a mean rate needs two or more distinct arrivals")
        return (len(self) - 1) / span


def _check_rate(rate: float, duration_s: float) -> None:
    if not (rate > 0 and np.isfinite(rate)) or not (duration_s > 0 and np.isfinite(duration_s)):
        raise ClusterInputError(
            f"arrivals: rate {rate!r} and duration_s {duration_s!r} must be positive and finite"
        )


def _arrivals_from_gaps(
    draw: Callable[[int], np.ndarray], rate: float, duration_s: float
) -> np.ndarray:
    """Cumulative sums of gaps from ``draw(k)`` until past ``duration_s``; those up to it."""
    expected = rate * duration_s
    chunks: list[np.ndarray] = []
    t = 0.0
    while t <= duration_s:
        gaps = draw(int(expected + 6.0 * np.sqrt(expected) + 16))
        times = t + np.cumsum(gaps)
        chunks.append(times)
        t = float(times[-1])
    times = np.concatenate(chunks)
    return times[times <= duration_s]


def poisson_arrivals(rate: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times (s) of a Poisson process of ``rate`` per second over [0, duration_s]."""
    _check_rate(rate, duration_s)
    return _arrivals_from_gaps(lambda k: rng.exponential(1.0 / rate, k), rate, duration_s)


def gamma_arrivals(
    rate: float, cv: float, duration_s: float, rng: np.random.Generator
) -> np.ndarray:
    """Arrival times (s) with gamma gaps of mean 1/rate and coefficient of variation ``cv``.

    ``cv`` 1 is Poisson-like, above 1 bursty, 0 evenly spaced.
    """
    _check_rate(rate, duration_s)
    if not (cv >= 0 and np.isfinite(cv)):
        raise ClusterInputError(f"arrivals: cv {cv!r} must be >= 0 and finite")
    if cv < FIXED_CV:
        return _arrivals_from_gaps(lambda k: np.full(k, 1.0 / rate), rate, duration_s)
    shape = 1.0 / cv**2
    return _arrivals_from_gaps(
        lambda k: rng.gamma(shape, 1.0 / (rate * shape), k), rate, duration_s
    )


def lengths(mean: float, cv: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` integer lengths >= 1, gamma with ``mean`` and ``cv`` (cv 0: all ``mean`` rounded)."""
    if not (mean >= 1 and np.isfinite(mean)) or not (cv >= 0 and np.isfinite(cv)) or n < 0:
        raise ClusterInputError(
            f"lengths: mean {mean!r} must be >= 1, cv {cv!r} >= 0 and n {n!r} >= 0"
        )
    if cv < FIXED_CV:
        return np.full(n, max(1, round(mean)), dtype=np.int64)
    shape = 1.0 / cv**2
    values = np.rint(rng.gamma(shape, mean / shape, n)).astype(np.int64)
    return np.maximum(values, 1)


def synthetic_requests(
    rate: float,
    duration_s: float,
    prompt_mean: float,
    output_mean: float,
    seed: int,
    *,
    prompt_cv: float = 0.0,
    output_cv: float = 0.0,
    arrival_cv: float = 1.0,
) -> Requests:
    """A synthetic workload: Poisson (``arrival_cv`` 1) or gamma arrivals, gamma lengths.

    Draws from the ``arrivals`` and ``lengths`` streams of ``seed``.
    """
    streams = seed_streams(seed)
    if arrival_cv == 1.0:
        arrivals = poisson_arrivals(rate, duration_s, streams["arrivals"])
    else:
        arrivals = gamma_arrivals(rate, arrival_cv, duration_s, streams["arrivals"])
    n = len(arrivals)
    prompts = lengths(prompt_mean, prompt_cv, n, streams["lengths"])
    outputs = lengths(output_mean, output_cv, n, streams["lengths"])
    return Requests(arrivals, prompts, outputs)


def scale_to_rate(requests: Requests, rate: float) -> Requests:
    """The same requests with times stretched or compressed so the mean rate is ``rate``."""
    if not (rate > 0 and np.isfinite(rate)):
        raise ClusterInputError(f"scale_to_rate: rate {rate!r} must be positive and finite")
    factor = requests.mean_rate / rate
    start = requests.arrival_s[0]
    arrivals = (requests.arrival_s - start) * factor
    return dataclasses.replace(requests, arrival_s=arrivals)


def _pick(header: list[str], names: tuple[str, ...], what: str, path: Path) -> str:
    lowered = {h.strip().lower(): h for h in header}
    for name in names:
        if name in lowered:
            return lowered[name]
    raise ClusterInputError(
        f"trace {path}: no {what} column (found {sorted(header)}; expected one of {list(names)})"
    )


def _read_rows(path: Path) -> list[dict]:
    """The rows of a CSV (header line) or JSONL (one object a line) file, as dicts."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, ValueError) as err:  # ValueError: not UTF-8, or a NUL in the path
        raise ClusterInputError(f"trace {path}: cannot read ({err})") from None
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ClusterInputError(f"trace {path} line {number}: not a JSON object") from None
            if not isinstance(row, dict):
                raise ClusterInputError(f"trace {path} line {number}: not a JSON object")
            rows.append(row)
        return rows
    return list(csv.DictReader(text.splitlines()))


def _parse_times(values: list, path: Path, column: str) -> np.ndarray:
    """Seconds as numbers, or ISO date-times turned into seconds since the first."""
    try:
        return np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        pass
    try:
        stamps = np.array([str(v).strip() for v in values], dtype="datetime64[ns]")
    except ValueError:
        stamps = None
    if stamps is None or np.isnat(stamps).any():  # an empty value parses as "not a time"
        bad = next((v for v in values if not _is_time(v)), None)
        problem = (
            "mixes seconds and ISO date-times"
            if bad is None
            else f"value {bad!r} is neither seconds nor an ISO date-time"
        )
        raise ClusterInputError(f"trace {path}: {column} {problem}")
    return (stamps - stamps.min()).astype(np.int64) / 1e9


def _is_time(value: object) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        try:
            return not np.isnat(np.datetime64(str(value).strip(), "ns"))
        except ValueError:
            return False


# a request's tokens, far past any model's window (config.deployment.MAX_REQUEST_TOKENS)
MAX_TRACE_TOKENS = 10_000_000


def _parse_tokens(values: list, path: Path, column: str) -> np.ndarray:
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        try:
            number = float(v)
        except (TypeError, ValueError):
            number = float("nan")
        if not (np.isfinite(number) and 0 <= number <= MAX_TRACE_TOKENS):
            number = float("nan")
        if not (np.isfinite(number) and number == int(number)):
            raise ClusterInputError(
                f"trace {path} row {i + 1}: {column} value {v!r} is not a whole number >= 0 "
                f"and at most {MAX_TRACE_TOKENS:,}"
            )
        out[i] = int(number)
    return out


def load_trace(path: str | Path) -> Requests:
    """Requests from a CSV or JSONL trace, arrival times from 0 and sorted.

    Columns (case-insensitive): a timestamp (``TIMESTAMP``/``timestamp``, ISO date-time or
    seconds), input tokens (``ContextTokens``/``input_tokens``) and output tokens
    (``GeneratedTokens``/``output_tokens``). Output lengths of 0 count as 1.
    """
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        raise ClusterInputError(f"trace {path} holds no requests")
    header = list(rows[0].keys())
    time_col = _pick(header, _TIME_COLUMNS, "timestamp", path)
    in_col = _pick(header, _INPUT_COLUMNS, "input-token", path)
    out_col = _pick(header, _OUTPUT_COLUMNS, "output-token", path)
    times = _parse_times([r.get(time_col) for r in rows], path, time_col)
    prompts = _parse_tokens([r.get(in_col) for r in rows], path, in_col)
    outputs = np.maximum(_parse_tokens([r.get(out_col) for r in rows], path, out_col), 1)
    if not np.all(np.isfinite(times)):
        raise ClusterInputError(f"trace {path}: {time_col} holds a non-finite value")
    order = np.argsort(times, kind="stable")
    arrivals = times[order] - times[order][0]
    return Requests(arrivals, prompts[order], outputs[order])
