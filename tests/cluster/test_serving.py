"""The serving simulator against queueing laws: Little's law, M/D/1, conservation, no-load
latencies, reproducibility; each with a control that the check can fail."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.cluster.serving import ServingConfig, ServingResult, simulate_serving
from longcat_sim.cluster.traffic import Requests, lengths, poisson_arrivals, synthetic_requests


def _step(
    batch_decoding: int, prefill_tokens: int, context_tokens: int = 0, largest_chunk: int = 0
) -> float:
    return 0.01 + 0.0005 * batch_decoding + 2e-6 * prefill_tokens


def _little(res: ServingResult, wrong_w: bool = False) -> tuple[float, float]:
    """(time-average number in system, arrival rate x mean time in system) over the run."""
    arrived = res.arrival_s <= res.end_s
    leave = np.where(np.isnan(res.finish_s), res.end_s, res.finish_s)[arrived]
    if wrong_w:
        leave = np.where(np.isnan(res.first_token_s), res.end_s, res.first_token_s)[arrived]
    w = float(np.mean(leave - res.arrival_s[arrived])) if arrived.any() else 0.0
    return res.time_avg_in_system, np.count_nonzero(arrived) / res.end_s * w


workloads = st.fixed_dictionaries(
    {
        "rate": st.floats(5.0, 400.0),
        "prompt": st.floats(1.0, 600.0),
        "output": st.floats(2.0, 60.0),
        "seed": st.integers(0, 2**16),
        "instances": st.integers(1, 3),
        "batch_cap": st.integers(1, 32),
        "chunk": st.integers(16, 512),
        "drafts": st.integers(0, 3),
        "horizon": st.one_of(st.none(), st.floats(0.2, 3.0)),
    }
)


def _run(w: dict) -> tuple[Requests, ServingResult]:
    req = synthetic_requests(w["rate"], 2.0, w["prompt"], w["output"], w["seed"], prompt_cv=1.0,
                             output_cv=1.0)  # fmt: skip
    if not len(req):
        req = Requests(np.array([0.1]), np.array([5]), np.array([3]))
    cfg = ServingConfig(instances=w["instances"], batch_cap=w["batch_cap"],
                        chunk_tokens=w["chunk"], draft_tokens=w["drafts"], acceptance=0.6,
                        horizon_s=w["horizon"])  # fmt: skip
    return req, simulate_serving(req, _step, cfg, seed=w["seed"])


@given(workloads)
@settings(max_examples=25)
def test_littles_law_holds_exactly_on_every_run(w):
    _, res = _run(w)
    area_l, lam_w = _little(res)
    assert area_l == pytest.approx(lam_w, rel=1e-9, abs=1e-12)
    # negative control: time to first token is not the time in system; the same check fails
    # whenever some request decoded after its first token (output 1 leaves nothing between)
    wrong_l, wrong = _little(res, wrong_w=True)
    if np.any(res.finish_s > res.first_token_s):
        assert wrong_l != pytest.approx(wrong, rel=1e-9, abs=1e-12)


@given(workloads)
@settings(max_examples=25)
def test_every_arrival_finished_or_still_in_system(w):
    req, res = _run(w)
    arrived = np.flatnonzero(req.arrival_s <= res.end_s)
    finished = np.flatnonzero(np.isfinite(res.finish_s))
    assert np.array_equal(np.union1d(finished, res.in_system_at_end), arrived)
    assert len(np.intersect1d(finished, res.in_system_at_end)) == 0
    assert len(finished) + len(res.in_system_at_end) == res.summary["requests_arrived"]
    # times are ordered for every finished request
    ok = np.isfinite(res.finish_s)
    assert np.all(res.arrival_s[ok] <= res.start_s[ok])
    assert np.all(res.start_s[ok] < res.first_token_s[ok])
    assert np.all(res.first_token_s[ok] <= res.finish_s[ok])
    assert np.all(res.step_batch <= w["batch_cap"])
    if w["horizon"] is None:
        assert len(res.in_system_at_end) == 0


@given(workloads)
@settings(max_examples=25)
def test_step_samples_match_the_request_records(w):
    """At each step start an instance holds exactly its requests arrived and not finished."""
    _, res = _run(w)
    finish = np.where(np.isnan(res.finish_s), np.inf, res.finish_s)
    for k in np.unique(res.step_instance):
        mine = res.instance == k
        arrived, done = np.sort(res.arrival_s[mine]), np.sort(finish[mine])
        t = res.step_start_s[res.step_instance == k]
        held = np.searchsorted(arrived, t, "right") - np.searchsorted(done, t, "right")
        got = res.step_queue[res.step_instance == k] + res.step_batch[res.step_instance == k]
        assert np.array_equal(got, held)
        # negative control: counting the finished as still held breaks the match
        assert not np.array_equal(got, np.searchsorted(arrived, t, "right")) or np.all(
            np.searchsorted(done, t, "right") == 0
        )


def test_overload_leaves_requests_in_the_system():
    req = synthetic_requests(200.0, 2.0, 100.0, 50.0, 3)
    res = simulate_serving(req, _step, ServingConfig(batch_cap=4, horizon_s=2.0))
    # negative control for conservation: finished alone does not account for all arrivals
    assert res.summary["requests_finished"] < res.summary["requests_arrived"]
    assert res.summary["requests_in_system_at_end"] > 100


def _md1_wait(rho: float, n: int, service_tokens: np.ndarray | None, seed: int) -> float:
    """Mean wait in queue: one instance, batch 1, no prompt, each output token one 1 s step."""
    arrivals = poisson_arrivals(rho, n / rho, np.random.default_rng(seed))
    out = np.ones(len(arrivals), dtype=np.int64) if service_tokens is None else service_tokens
    req = Requests(arrivals, np.zeros(len(arrivals), dtype=np.int64), out[: len(arrivals)])
    res = simulate_serving(req, lambda b, p, c, m: 1.0, ServingConfig(batch_cap=1))
    return float(np.mean(res.start_s - res.arrival_s))


def test_md1_mean_wait_matches_pollaczek_khinchine():
    rho = 0.5  # service time 1 s, so mu = 1
    pk = rho / (2 * 1.0 * (1 - rho))
    # standard error of the mean wait with 100k requests at rho 0.5 is about 1.3 %
    assert _md1_wait(rho, 100_000, None, seed=2) == pytest.approx(pk, rel=0.03)


def test_mm1_service_does_not_match_md1():
    lam, n = 0.5, 20_000
    # negative control: exponential-like service (gamma cv 1 tokens of mean 4 at 0.25 s a step)
    tokens = lengths(4.0, 1.0, 2 * n, np.random.default_rng(9))
    arrivals = poisson_arrivals(lam, n / lam, np.random.default_rng(4))
    req = Requests(arrivals, np.zeros(len(arrivals), dtype=np.int64), tokens[: len(arrivals)])
    res = simulate_serving(req, lambda b, p, c, m: 0.25, ServingConfig(batch_cap=1))
    wait = float(np.mean(res.start_s - res.arrival_s))
    service = 0.25 * req.output_tokens
    rho = lam * service.mean()
    md1 = rho / (2 * (1 - rho)) * service.mean()
    mg1 = lam * np.mean(service**2) / (2 * (1 - rho))
    assert wait != pytest.approx(md1, rel=0.3)
    assert wait == pytest.approx(mg1, rel=0.15)


@given(st.integers(1, 5000), st.integers(1, 40), st.integers(16, 2048))
@settings(max_examples=30)
def test_no_load_latencies_are_the_step_times(prompt, output, chunk):
    n = 3
    req = Requests(np.arange(n) * 1000.0, np.full(n, prompt), np.full(n, output))
    res = simulate_serving(req, _step, ServingConfig(chunk_tokens=chunk))
    chunks = [chunk] * (prompt // chunk) + ([prompt % chunk] if prompt % chunk else [])
    ttft = sum(_step(0, c) for c in chunks)
    assert res.ttft_s == pytest.approx(np.full(n, ttft), rel=1e-9)
    if output > 1:
        assert res.tpot_s == pytest.approx(np.full(n, _step(1, 0)), rel=1e-9)
        assert res.summary["itl_p99_s"] == pytest.approx(_step(1, 0), rel=1e-12)
    else:
        assert np.all(np.isnan(res.tpot_s))
    # negative control: the prefill time is not one step when the prompt needs several chunks
    if len(chunks) > 1:
        assert res.ttft_s[0] > _step(0, min(prompt, chunk)) * 1.0001


def test_all_drafts_accepted_cut_the_decode_steps():
    req = Requests(np.array([0.0]), np.array([10]), np.array([21]))
    base = simulate_serving(req, _step, ServingConfig())
    full = simulate_serving(req, _step, ServingConfig(draft_tokens=3, acceptance=1.0))
    none = simulate_serving(req, _step, ServingConfig(draft_tokens=3, acceptance=0.0))
    assert len(base.step_s) == 1 + 20 and len(none.step_s) == 1 + 20
    assert len(full.step_s) == 1 + 5  # 20 tokens after the first, 4 a step
    assert np.array_equal(none.finish_s, base.finish_s)


def test_kv_capacity_limits_the_batch():
    req = Requests(np.zeros(10), np.full(10, 100), np.full(10, 50))
    capped = simulate_serving(req, _step, ServingConfig(kv_capacity_tokens=300))
    free = simulate_serving(req, _step, ServingConfig())
    assert capped.step_batch.max() == 2  # 2 x 150 tokens fit in 300, 3 do not
    assert free.step_batch.max() == 10  # negative control
    with pytest.raises(ClusterInputError, match="KV tokens"):
        simulate_serving(req, _step, ServingConfig(kv_capacity_tokens=100))


def test_router_sends_to_the_least_loaded_instance():
    req = Requests(np.array([0.0, 0.0, 0.0, 0.0, 0.0]), np.full(5, 10), np.full(5, 5))
    res = simulate_serving(req, _step, ServingConfig(instances=3))
    assert res.instance.tolist() == [0, 1, 2, 0, 1]
    assert res.busy_share.shape == (3,) and np.all(res.busy_share <= 1.0)


def _seeded(seed: int) -> ServingResult:
    req = synthetic_requests(100.0, 3.0, 200.0, 30.0, seed, prompt_cv=1.0, output_cv=1.0)
    cfg = ServingConfig(instances=2, batch_cap=16, chunk_tokens=128, draft_tokens=2,
                        acceptance=0.7)  # fmt: skip
    return simulate_serving(req, _step, cfg, seed=seed)


def test_same_seed_is_bitwise_identical_different_seed_is_not():
    a, b, c = _seeded(21), _seeded(21), _seeded(22)
    for name in ("arrival_s", "first_token_s", "finish_s", "step_s", "step_batch"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes()
    assert a.finish_s.tobytes() != c.finish_s.tobytes()


def test_summary_and_slo():
    res = _seeded(5)
    s = res.summary
    assert s["ttft_p50_s"] <= s["ttft_p90_s"] <= s["ttft_p99_s"]
    req = synthetic_requests(100.0, 3.0, 200.0, 30.0, 5, prompt_cv=1.0, output_cv=1.0)
    assert s["throughput_output_tokens_per_s"] * res.end_s == pytest.approx(req.output_tokens.sum())
    assert s["throughput_input_tokens_per_s"] * res.end_s == pytest.approx(req.prompt_tokens.sum())
    assert s["slo_attainment"] == 1.0
    assert s["goodput_requests_per_s"] == pytest.approx(s["requests_finished"] / res.end_s)
    cfg = ServingConfig(instances=2, batch_cap=16, chunk_tokens=128, draft_tokens=2,
                        acceptance=0.7, slo_ttft_s=s["ttft_p50_s"])  # fmt: skip
    strict = simulate_serving(req, _step, cfg, seed=5)
    # negative control: a TTFT limit at the median passes about half
    assert strict.summary["slo_attainment"] == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize(
    "kwargs",
    [{"instances": 0}, {"batch_cap": 0}, {"acceptance": 1.5}, {"horizon_s": -1.0},
     {"slo_ttft_s": 0.0}, {"chunk_tokens": 2.5}],
)  # fmt: skip
def test_bad_config_is_one_line_error(kwargs):
    with pytest.raises(ClusterInputError) as err:
        ServingConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_bad_step_time_is_an_error():
    req = Requests(np.array([0.0]), np.array([1]), np.array([1]))
    with pytest.raises(ClusterInputError, match="step_time_s"):
        simulate_serving(req, lambda b, p, c, m: 0.0, ServingConfig())


def test_prefill_budget_takes_prompts_in_admission_order():
    req = Requests(np.zeros(2), np.array([1000, 1000]), np.array([2, 2]))
    res = simulate_serving(req, _step, ServingConfig(prefill_budget_tokens=1000))
    assert list(res.step_prefill_tokens[:2]) == [1000, 1000]
    assert res.first_token_s[1] > res.first_token_s[0]
    # negative control: without a budget both prompts share the first step
    free = simulate_serving(req, _step, ServingConfig())
    assert free.step_prefill_tokens[0] == 2000
    assert free.first_token_s[0] == free.first_token_s[1]


def test_decode_steps_see_the_cache_their_requests_hold():
    seen: list[tuple[int, int, int]] = []

    def step(b: int, p: int, c: int, m: int) -> float:
        seen.append((b, p, c))
        return 0.01

    req = Requests(np.zeros(1), np.array([50]), np.array([5]), cached_tokens=np.array([100]))
    simulate_serving(req, step, ServingConfig())
    assert seen == [(0, 50, 0), (1, 0, 151), (1, 0, 152), (1, 0, 153), (1, 0, 154)]


def test_cached_tokens_count_against_the_kv_capacity():
    arrivals, prompts, outputs = np.zeros(2), np.array([50, 50]), np.array([5, 5])
    cached = Requests(arrivals, prompts, outputs, cached_tokens=np.array([100, 100]))
    res = simulate_serving(cached, _step, ServingConfig(kv_capacity_tokens=160))
    assert res.start_s[1] >= res.finish_s[0]  # 155 + 155 > 160: the second waits
    plain = simulate_serving(
        Requests(arrivals, prompts, outputs), _step, ServingConfig(kv_capacity_tokens=160)
    )
    assert plain.start_s[1] == plain.start_s[0]  # negative control: 55 + 55 fit together
