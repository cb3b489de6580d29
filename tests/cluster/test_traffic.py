"""Serving workloads: synthetic arrivals and lengths, the shipped Azure traces, trace files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.cluster.traffic import (
    AZURE_TRACES,
    Requests,
    gamma_arrivals,
    lengths,
    load_trace,
    poisson_arrivals,
    scale_to_rate,
    seed_streams,
    synthetic_requests,
)


def _gap_cv(times: np.ndarray) -> float:
    gaps = np.diff(times)
    return float(gaps.std() / gaps.mean())


def test_poisson_arrivals_have_the_rate_and_exponential_gaps():
    times = poisson_arrivals(50.0, 400.0, np.random.default_rng(1))
    assert times[0] >= 0 and times[-1] <= 400.0 and np.all(np.diff(times) >= 0)
    assert len(times) / 400.0 == pytest.approx(50.0, rel=0.02)
    assert _gap_cv(times) == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("cv", [0.0, 0.5, 3.0])
def test_gamma_arrivals_have_the_rate_and_cv(cv):
    times = gamma_arrivals(20.0, cv, 2000.0, np.random.default_rng(2))
    assert len(times) / 2000.0 == pytest.approx(20.0, rel=0.1)
    assert _gap_cv(times) == pytest.approx(cv, abs=0.1 * max(cv, 0.1))
    # negative control: a Poisson stream has cv 1, which these do not
    assert abs(_gap_cv(times) - 1.0) > 0.3


@given(st.floats(1.0, 5000.0), st.floats(0.0, 2.0), st.integers(0, 500), st.integers(0, 99))
@settings(max_examples=40)
def test_lengths_are_integers_at_least_one(mean, cv, n, seed):
    values = lengths(mean, cv, n, np.random.default_rng(seed))
    assert values.dtype == np.int64 and len(values) == n
    assert n == 0 or values.min() >= 1
    if cv == 0:
        assert np.all(values == max(1, round(mean)))


def test_lengths_have_the_mean_and_cv():
    values = lengths(300.0, 0.8, 200_000, np.random.default_rng(3))
    assert values.mean() == pytest.approx(300.0, rel=0.01)
    assert values.std() / values.mean() == pytest.approx(0.8, rel=0.02)


def test_named_streams_are_reproducible_and_independent():
    a, b, c = seed_streams(5), seed_streams(5), seed_streams(6)
    assert np.array_equal(a["arrivals"].random(4), b["arrivals"].random(4))
    assert not np.array_equal(a["lengths"].random(4), c["lengths"].random(4))
    # drawing from one stream leaves the others where they were
    d, e = seed_streams(5), seed_streams(5)
    d["lengths"].random(1000)
    assert np.array_equal(d["arrivals"].random(4), e["arrivals"].random(4))


def test_synthetic_requests_same_seed_identical_different_seed_not():
    args = (30.0, 20.0, 500.0, 80.0)
    one = synthetic_requests(*args, 11, prompt_cv=1.0, output_cv=0.5, arrival_cv=2.0)
    two = synthetic_requests(*args, 11, prompt_cv=1.0, output_cv=0.5, arrival_cv=2.0)
    other = synthetic_requests(*args, 12, prompt_cv=1.0, output_cv=0.5, arrival_cv=2.0)
    for name in ("arrival_s", "prompt_tokens", "output_tokens"):
        assert np.array_equal(getattr(one, name), getattr(two, name))
    assert not np.array_equal(one.arrival_s[:10], other.arrival_s[:10])


@pytest.mark.parametrize(
    ("name", "count", "rate", "prompt_mean", "output_mean"),
    [
        ("azure-code", 8819, 2.5664, 2047.85, 27.88),
        ("azure-conv", 19366, 5.5301, 1154.70, 211.13),
    ],
)
def test_azure_traces_load(name, count, rate, prompt_mean, output_mean):
    trace = load_trace(AZURE_TRACES[name])
    assert len(trace) == count
    assert trace.arrival_s[0] == 0.0 and np.all(np.diff(trace.arrival_s) >= 0)
    assert 3300.0 < trace.arrival_s[-1] <= 3600.0  # about one hour
    assert trace.mean_rate == pytest.approx(rate, rel=1e-4)
    assert trace.prompt_tokens.mean() == pytest.approx(prompt_mean, rel=1e-4)
    assert trace.output_tokens.mean() == pytest.approx(output_mean, rel=1e-4)


@given(st.floats(0.01, 1e4))
@settings(max_examples=30)
def test_scale_to_rate_gives_that_rate(rate):
    trace = load_trace(AZURE_TRACES["azure-code"])
    scaled = scale_to_rate(trace, rate)
    assert scaled.mean_rate == pytest.approx(rate, rel=1e-9)
    assert np.array_equal(scaled.prompt_tokens, trace.prompt_tokens)
    # negative control: the trace as recorded runs at its own rate
    assert trace.mean_rate != pytest.approx(rate, rel=1e-3) or abs(rate - 2.5664) < 0.01


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_with_seconds_and_jsonl_with_iso_times(tmp_path):
    csv_path = _write(
        tmp_path, "t.csv", "timestamp,input_tokens,output_tokens\n5.5,10,3\n2.0,20,0\n"
    )
    trace = load_trace(csv_path)
    assert trace.arrival_s.tolist() == [0.0, 3.5]
    assert trace.prompt_tokens.tolist() == [20, 10] and trace.output_tokens.tolist() == [1, 3]
    rows = [
        {"TIMESTAMP": "2023-11-16 18:17:03.5", "ContextTokens": 7, "GeneratedTokens": 2},
        {"TIMESTAMP": "2023-11-16T18:17:05.0", "ContextTokens": 9, "GeneratedTokens": 4},
    ]
    jsonl = _write(tmp_path, "t.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_trace(jsonl).arrival_s.tolist() == [0.0, 1.5]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("timestamp,input_tokens,output_tokens\n1.0,10,3\n2.0,abc,4\n", "row 2"),
        ("timestamp,input_tokens,output_tokens\n1.0,10,3\n2.0,12\n", "row 2"),
        ("timestamp,input_tokens\n1.0,10\n", "output-token column"),
        ("timestamp,input_tokens,output_tokens\n", "no requests"),
        ("", "no requests"),
        ("timestamp,input_tokens,output_tokens\nyesterday,10,3\n", "ISO date-time"),
        ("timestamp,input_tokens,output_tokens\n1.0,-4,3\n", "whole number >= 0"),
    ],
)
def test_bad_trace_is_one_line_error(tmp_path, text, words):
    path = _write(tmp_path, "bad.csv", text)
    with pytest.raises(ClusterInputError) as err:
        load_trace(path)
    message = str(err.value)
    assert words in message and "\n" not in message


def test_bad_jsonl_line_is_one_line_error(tmp_path):
    path = _write(
        tmp_path, "bad.jsonl", '{"timestamp": 1, "input_tokens": 2, "output_tokens": 3}\n[1]\n'
    )
    with pytest.raises(ClusterInputError, match="line 2"):
        load_trace(path)


def test_requests_validate():
    with pytest.raises(ClusterInputError, match="sorted"):
        Requests(np.array([2.0, 1.0]), np.array([1, 1]), np.array([1, 1]))
    with pytest.raises(ClusterInputError, match="lengths"):
        Requests(np.array([1.0]), np.array([1, 1]), np.array([1]))
    with pytest.raises(ClusterInputError, match="two or more"):
        scale_to_rate(Requests(np.array([1.0]), np.array([1]), np.array([1])), 2.0)
