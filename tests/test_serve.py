"""``longcat-sim serve``: at saturation it reproduces the step model's decode throughput (and so
the paper's Table 6 rows and the DeepSeek-V3 profile), at near-zero load its latencies are the
step model's prefill and batch-1 decode times, requests are conserved, runs are reproducible,
the step-time grid stands in for direct pricing, and the command line refuses bad input with
one line."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from longcat_sim.cli import main
from longcat_sim.cluster import closedform
from longcat_sim.cluster.serving import ServingConfig, simulate_serving
from longcat_sim.cluster.traffic import Requests
from longcat_sim.config.serving import ServeDeployment
from longcat_sim.scenarios.decode import decode_workload
from longcat_sim.scenarios.disagg import colocated_workload, comm_seconds, kv_transfer_s
from longcat_sim.scenarios.prefill import prefill_workload
from longcat_sim.scenarios.serve import (
    exposed_transfer_s,
    kv_capacity_tokens,
    load_requests,
    resolve_serve,
    run_serve,
    serve_results,
)
from longcat_sim.scenarios.serve_steps import (
    batch_nodes,
    colocated_prefill,
    colocated_step_times,
    decode_pool_step_times,
    dense_prefill_s,
    prefill_nodes,
)
from tests.cli_checks import refused
from tests.cluster.published import (
    DEEPSEEK_PROFILE_BATCH,
    DEEPSEEK_PROFILE_CONTEXT,
    DEEPSEEK_PROFILE_TGS,
    LONGCAT_MTP_ACCEPT,
    TABLE6_LONGCAT,
    TABLE6_TOLERANCE,
)

STEP_MODEL_TOLERANCE = 0.05  # serve at saturation against the step model's own tgs
EXACT = 1e-6


def serve_cli(tmp_path: Path, capsys, *argv: str) -> dict:
    code = main(["serve", *argv, "--json", "--run-dir", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


# -- 1. saturation: Table 6 and the DeepSeek-V3 profile ----------------------------------------

SAT_GPUS = 128  # one decode instance on EP128, as the published rows
SAT_OUTPUT = 128  # tokens per request; prompts so that the mean context is the row's
SAT_STEPS = 260  # decode steps simulated
SAT_WARM_STEPS = 90  # steps before the steady window (every first request has finished)


@dataclasses.dataclass(frozen=True)
class Saturation:
    measured_tgs: float  # decode-pool output tokens per GPU per second, steady window
    setup: object
    steps_in_window: int


def saturated_decode(
    batch: int, context: float, assume: tuple[str, ...] = (), **dep: object
) -> Saturation:
    """A decode pool at saturation: every request arrives at t = 0 with its prompt already
    cached (as the prefill pool hands it over), more of them than the pool ever runs; the
    steady window runs from the start of step ``SAT_WARM_STEPS`` to the start of the last
    step. Tokens in the window are two runs of the same seed cut mid-step."""
    n = batch * SAT_GPUS * 8  # 260 steps finish about 4 generations
    cached = round(context - SAT_OUTPUT / 2)
    requests = Requests(
        np.zeros(n),
        np.zeros(n, dtype=np.int64),
        np.full(n, SAT_OUTPUT, dtype=np.int64),
        np.full(n, cached, dtype=np.int64),
    )
    serve_dep = ServeDeployment(
        layout="disagg", gpus=SAT_GPUS, batch_per_device=batch, duration_s=60.0, **dep
    )
    setup = resolve_serve(serve_dep, requests, assume)
    d = setup.pools.decode
    assert (d.batch_per_device, d.context, d.ep) == (batch, context, SAT_GPUS)
    steps = decode_pool_step_times(setup.pools)
    nominal = closedform.step_time(decode_workload(d), d.schedule)

    def run(horizon: float):
        cfg = ServingConfig(
            instances=1,
            batch_cap=batch * SAT_GPUS,
            kv_capacity_tokens=kv_capacity_tokens(setup),
            draft_tokens=d.mtp_draft_tokens,
            acceptance=d.mtp_accept,
            horizon_s=horizon,
        )
        res = simulate_serving(requests, steps, cfg, seed=0)
        return res, res.summary["throughput_output_tokens_per_s"] * horizon

    full, _ = run(SAT_STEPS * nominal)
    starts, durations = full.step_start_s, full.step_s
    assert np.all(full.step_batch == batch * SAT_GPUS), "the batch is not full in every step"
    assert np.all(full.step_queue > 0), "the queue ran dry: not saturated"
    k1, k2 = SAT_WARM_STEPS, len(starts) - 1
    _, tokens_before = run(starts[k1] + durations[k1] / 2)  # steps 0 .. k1-1
    _, tokens_through = run(starts[k2] + durations[k2] / 2)  # steps 0 .. k2-1
    window = starts[k2] - starts[k1]
    measured = (tokens_through - tokens_before) / window / SAT_GPUS
    return Saturation(measured, setup, k2 - k1)


def step_model_tgs(setup, **changes: object) -> float:
    d = dataclasses.replace(setup.pools.decode, **changes)
    return closedform.tgs(decode_workload(d), d.schedule)


def longcat_row(row: int) -> Saturation:
    r = TABLE6_LONGCAT[row]
    return saturated_decode(
        r.batch_per_device,
        float(r.context),
        attention_dtype=r.attention_dtype,
        mtp_draft_tokens=1,
        mtp_accept=LONGCAT_MTP_ACCEPT,
    )


@pytest.mark.parametrize("row", range(len(TABLE6_LONGCAT)))
def test_saturation_reproduces_table6(row: int) -> None:
    sat = longcat_row(row)
    r = TABLE6_LONGCAT[row]
    model = step_model_tgs(sat.setup)
    assert sat.steps_in_window >= 150
    assert sat.measured_tgs == pytest.approx(model, rel=STEP_MODEL_TOLERANCE), (
        f"row {row}: serve {sat.measured_tgs:.1f} vs step model {model:.1f} tokens/GPU/s"
    )
    assert sat.measured_tgs == pytest.approx(r.tgs, rel=TABLE6_TOLERANCE), (
        f"row {row}: serve {sat.measured_tgs:.1f} vs published {r.tgs} tokens/GPU/s"
    )


def test_saturation_reproduces_deepseek_v3_profile() -> None:
    sat = saturated_decode(
        DEEPSEEK_PROFILE_BATCH,
        float(DEEPSEEK_PROFILE_CONTEXT),
        assume=("routing=balanced", "context_cv=0"),
        model="deepseek-v3",
        schedule="tbo",
        mtp_draft_tokens=0,
    )
    model = step_model_tgs(sat.setup)
    assert sat.setup.pools.decode.schedule == "tbo"
    assert sat.measured_tgs == pytest.approx(model, rel=STEP_MODEL_TOLERANCE), (
        f"serve {sat.measured_tgs:.1f} vs step model {model:.1f}"
    )
    assert sat.measured_tgs == pytest.approx(DEEPSEEK_PROFILE_TGS, rel=TABLE6_TOLERANCE), (
        f"serve {sat.measured_tgs:.1f} vs published {DEEPSEEK_PROFILE_TGS}"
    )


def test_saturation_negative_control_half_batch_misses() -> None:
    """The step model at half the batch is a wrong expectation the comparison must reject."""
    sat = longcat_row(0)
    wrong = step_model_tgs(sat.setup, batch_per_device=TABLE6_LONGCAT[0].batch_per_device // 2)
    assert abs(sat.measured_tgs / wrong - 1) > STEP_MODEL_TOLERANCE


# -- 2. near-zero load: TTFT is the prefill, TPOT the batch-1 step ------------------------------

# 512 tokens computed on the rank that holds the request (a prefill node), 16 or 32 per GPU
# when spread over 32 or 16 GPUs (nodes too); 511 cached, so the first decode step's context,
# 1024, is a context node
IDLE_CACHED, IDLE_COMPUTED = 511, 512
IDLE_PROMPT = IDLE_CACHED + IDLE_COMPUTED


def idle_run(layout: str, output: int):
    """Three requests 5 s apart, each served alone."""
    requests = Requests(
        np.array([0.0, 5.0, 10.0]), np.full(3, IDLE_COMPUTED),
        np.full(3, output, dtype=np.int64), cached_tokens=np.full(3, IDLE_CACHED),
    )  # fmt: skip
    dep = ServeDeployment(layout=layout, mtp_draft_tokens=0, duration_s=15.0)
    setup = resolve_serve(dep, requests)
    run = run_serve(setup, requests)
    assert np.all(run.finish_s < requests.arrival_s + 5.0)
    ttft = run.first_token_s - requests.arrival_s
    tpot = (run.finish_s - run.first_token_s) / (output - 1)
    return setup, run, requests, ttft, tpot


def batch1_step_s(setup, context: float) -> float:
    d = dataclasses.replace(setup.pools.decode, batch_per_device=1, context=context)
    return closedform.step_time(decode_workload(d), d.schedule)


def _forward_s(setup, tokens: int) -> float:
    """A forward of ``tokens`` per GPU on the pool that prefills (disagg: as its NIC paces it)."""
    pool = setup.pools.prefill if setup.disagg else colocated_prefill(setup.pools)
    p = dataclasses.replace(pool, tokens_per_device=tokens)
    w = prefill_workload(p)
    forward = closedform.step_time(w, p.schedule)
    if not setup.disagg:
        return forward
    sized = dataclasses.replace(setup.pools, prefill=p)
    return kv_transfer_s(sized, forward, comm_seconds(w))[1]


def direct_prefill_s(setup) -> float:
    """The forward with the prompt spread over the pool's GPUs, plus the work outside the
    routed experts that the rank holding the prompt does beyond that, priced directly."""
    pool = setup.pools.prefill if setup.disagg else colocated_prefill(setup.pools)
    spread = IDLE_COMPUTED // pool.gpus
    extra = dense_prefill_s(pool, IDLE_COMPUTED) - dense_prefill_s(pool, spread)
    return _forward_s(setup, spread) + extra


@pytest.mark.parametrize("layout", ["colocated", "disagg"])
def test_idle_ttft_is_prefill_and_tpot_is_batch1_step(layout: str) -> None:
    setup, _, requests, ttft, tpot = idle_run(layout, output=2)
    expected = direct_prefill_s(setup)
    if setup.disagg:
        expected = expected + exposed_transfer_s(setup, requests)
    np.testing.assert_allclose(ttft, expected, rtol=EXACT)
    np.testing.assert_allclose(tpot, batch1_step_s(setup, IDLE_PROMPT + 1.0), rtol=EXACT)
    # negative controls: the prompt spread over every rank with nothing added, the whole
    # forward at the holding rank's tokens, without the exposed transfer, or at batch 2
    pool = setup.pools.prefill if setup.disagg else setup.pools.decode
    assert np.all(ttft > _forward_s(setup, IDLE_COMPUTED // pool.gpus) * (1 + 1e-3))
    assert np.all(ttft < _forward_s(setup, IDLE_COMPUTED) * (1 - 1e-3))
    if setup.disagg:
        assert np.all(np.abs(ttft / direct_prefill_s(setup) - 1) > EXACT)
    wrong = dataclasses.replace(setup.pools.decode, batch_per_device=2, context=1024.0)
    wrong_s = closedform.step_time(decode_workload(wrong), wrong.schedule)
    assert np.all(np.abs(tpot / wrong_s - 1) > EXACT)


@pytest.mark.parametrize("layout", ["colocated", "disagg"])
def test_idle_tpot_is_mean_of_batch1_steps_over_the_growing_context(layout: str) -> None:
    """A longer output: each decode step prices batch 1 at the context the request holds."""
    output = 40
    setup, run, _, _, tpot = idle_run(layout, output=output)
    steps = run.step_times["decode" if setup.disagg else "colocated"]
    contexts = IDLE_PROMPT + np.arange(1, output)
    expected = np.mean([steps(1, 0, int(c)) for c in contexts])
    np.testing.assert_allclose(tpot, expected, rtol=EXACT)
    assert abs(expected / batch1_step_s(setup, float(contexts.mean())) - 1) < 0.02
    assert np.all(np.abs(tpot / steps(1, 0, IDLE_PROMPT + 1) - 1) > EXACT)  # the first step's


# -- 3. conservation ----------------------------------------------------------------------------


def overloaded(layout: str, seed: int = 0, duration: float = 20.0):
    dep = ServeDeployment(
        layout=layout, rate=40.0, prompt_len=2048.0, output_len=256.0, duration_s=duration,
        prompt_cv=0.5, output_cv=0.5, seed=seed, batch_per_device=2,
    )  # fmt: skip
    requests = load_requests(dep)
    setup = resolve_serve(dep, requests)
    return setup, run_serve(setup, requests)


@pytest.mark.parametrize("layout", ["colocated", "disagg"])
def test_conservation_at_scenario_level(layout: str) -> None:
    setup, run = overloaded(layout)
    end = setup.dep.duration_s
    r = serve_results(setup, run)
    arrival = run.requests.arrival_s
    if setup.disagg:
        pre, dec = run.stages["prefill"], run.stages["decode"]
        in_prefill = pre.summary["requests_in_system_at_end"]
        in_transfer = int(np.count_nonzero((pre.first_token_s <= end) & (run.first_token_s > end)))
        in_decode = dec.summary["requests_in_system_at_end"]
        in_system = in_prefill + in_transfer + in_decode
        assert in_prefill > 0 or in_decode > 0
    else:
        res = run.stages["colocated"]
        routed = res.instance[arrival <= end]
        assert np.all(routed >= 0)
        queued = int(np.count_nonzero((arrival <= end) & np.isnan(res.start_s)))
        running = int(np.count_nonzero(np.isfinite(res.start_s) & np.isnan(res.finish_s)))
        in_system = queued + running
        assert queued > 0  # overloaded: the check covers a queue
    assert r["requests_arrived"] == int(np.count_nonzero(arrival <= end))
    assert r["requests_arrived"] == r["requests_finished"] + in_system
    assert in_system > 0 and r["requests_finished"] > 0
    finished = np.isfinite(run.finish_s)
    assert np.all(run.finish_s[finished] <= end)
    assert np.all(run.finish_s[finished] >= run.first_token_s[finished])
    assert np.all(run.first_token_s[finished] > arrival[finished])


def test_conservation_through_the_command_line(tmp_path, capsys) -> None:
    for layout in ("colocated", "disagg"):
        r = serve_cli(
            tmp_path, capsys, "--layout", layout, "--rate", "40", "--duration-s", "20",
            "--prompt-len", "2048", "--output-len", "256", "--batch-per-device", "2",
        )  # fmt: skip
        assert r["requests_arrived"] == r["requests_finished"] + r["requests_in_system"]
        assert r["requests_in_system"] > 0 and r["requests_finished"] > 0
        assert r["requests_arrived"] <= r["requests"]


# -- 4. reproducibility -------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["colocated", "disagg"])
def test_same_seed_same_results_other_seed_differs(layout: str) -> None:
    def dumped(seed: int) -> str:
        setup, run = overloaded(layout, seed=seed, duration=8.0)
        return json.dumps(serve_results(setup, run), sort_keys=True)

    first = dumped(3)
    assert dumped(3) == first
    assert dumped(4) != first


# -- 5. the step-time grid ----------------------------------------------------------------------

SMOOTH = ("routing=balanced", "context_cv=0")  # a step model without per-batch sampling


def grid_setup(assume: tuple[str, ...] = ()):
    dep = ServeDeployment(duration_s=60.0)
    setup = resolve_serve(dep, load_requests(dep), assume)
    return setup, colocated_step_times(setup.pools, setup.tokens_per_step)


def direct_step_s(setup, b: int, c: float, p: int) -> float:
    d = setup.pools.decode
    if not b:
        alone = dataclasses.replace(colocated_prefill(setup.pools), tokens_per_device=p)
        return closedform.step_time(prefill_workload(alone), alone.schedule)
    if not p:
        w = decode_workload(dataclasses.replace(d, batch_per_device=b, context=c))
        return closedform.step_time(w, d.schedule)
    return closedform.step_time(colocated_workload(setup.pools, b, c, p), d.schedule)


def test_grid_nodes_are_priced_exactly() -> None:
    setup, steps = grid_setup()
    g, cap, budget = steps.gpus, steps.batch_cap, steps.prefill_budget
    assert 18 in batch_nodes(cap) and 16 in prefill_nodes(budget) and 38 in prefill_nodes(budget)
    for b, c, p in [(1, 512.0, 0), (5, 1024.0, 16), (18, 2048.0, 0), (cap, 4096.0, budget)]:
        got = steps(b * g, p * g, int(c * b * g))
        assert got == direct_step_s(setup, b, c, p) == steps.price(b, c, p)
    for p in (16, 38, budget):  # nothing decoding: a prefill forward
        assert steps(0, p * g, 0) == direct_step_s(setup, 0, 0.0, p)


def test_grid_between_nodes_lies_between_neighbours_and_is_monotone_in_batch() -> None:
    _, steps = grid_setup(SMOOTH)
    g = steps.gpus
    nodes = batch_nodes(steps.batch_cap)
    for lo, hi in itertools.pairwise(nodes):
        for b in range(lo + 1, hi):
            low, high = steps(lo * g, 0, 2048 * lo * g), steps(hi * g, 0, 2048 * hi * g)
            assert min(low, high) <= steps(b * g, 0, 2048 * b * g) <= max(low, high)
    by_batch = [steps(b * g, 32 * g, 3000 * b * g) for b in range(1, steps.batch_cap + 1)]
    assert np.all(np.diff(by_batch) > 0)


def test_grid_interpolation_error_against_direct_pricing() -> None:
    setup, steps = grid_setup(SMOOTH)
    g = steps.gpus
    off_node = [(17, 3000.0, 0), (37, 7000.0, 100), (60, 4500.0, 40), (62, 100.0, 480)]
    errors = [
        abs(steps(b * g, p * g, int(c * b * g)) / direct_step_s(setup, b, c, p) - 1)
        for b, c, p in off_node
    ]
    assert max(errors) < 0.02, f"max interpolation error {max(errors):.4%}"
    assert max(errors) > 0  # the points are off the nodes


def test_grid_prices_few_nodes_in_a_minute_colocated(tmp_path, capsys) -> None:
    r = serve_cli(tmp_path, capsys, "--duration-s", "60")
    assert r["colocated_steps"] > 500
    assert 0 < r["colocated_step_nodes_priced"] < 400, r["colocated_step_nodes_priced"]


# -- 6. the command line ------------------------------------------------------------------------


def test_cli_json_parses(tmp_path, capsys) -> None:
    r = serve_cli(
        tmp_path, capsys, "--duration-s", "10", "--layout", "disagg", "--output-len", "128"
    )
    assert r["mode"] == "serve" and r["layout"] == "disagg" and r["requests_finished"] > 0
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in r.values())


@pytest.mark.parametrize(
    "argv",
    [
        ["--context", "5"],
        ["--trace", "nope.csv"],
        ["--trace", "azure-code", "--prompt-len", "5"],
        ["--arrival-cv", "3"],
        ["--prefill-gpus", "8"],
        ["--rate", "-1"],
        ["--batch-per-device", "2048", "--prompt-len", "16000"],
        ["--gpus", "8", "--ep", "8", "--hbm-check", "report"],
    ],
    ids=["context", "trace", "trace-prompt", "arrival-cv", "prefill-gpus", "rate", "kv", "no-kv"],
)
def test_cli_refuses_bad_input(argv: list[str], tmp_path, capsys) -> None:
    line = refused(["serve", *argv, "--duration-s", "5"], capsys, tmp_path / "run")
    assert len(line) > len("longcat-sim: error: ")


# -- 7. the Azure traces ------------------------------------------------------------------------


def test_azure_conversation_trace(tmp_path, capsys) -> None:
    r = serve_cli(tmp_path, capsys, "--trace", "azure-conv", "--duration-s", "120")
    assert r["trace"] == "azure-conv" and r["requests_finished"] > 0
    for name in ("ttft", "tpot", "e2e"):
        p50, p90, p99 = (r[f"{name}_p{q}_ms"] for q in (50, 90, 99))
        assert 0 < p50 <= p90 <= p99
    assert len(r["ttft_cdf_ms"]) == 101


# -- 8. Little's law across the two pools, goodput after the warm-up -----------------------------


def test_littles_law_across_prefill_transfer_and_decode() -> None:
    """The engine's own integrals of requests held (each pool's), plus the KV transfers in
    flight, equal the summed time in system of the drained disaggregated run (L = lambda W over
    the whole deployment)."""
    dep = ServeDeployment(layout="disagg", rate=30.0, duration_s=20.0, drain=True, output_len=64)
    requests = load_requests(dep)
    setup = resolve_serve(dep, requests)
    run = run_serve(setup, requests)
    pre, dec = run.stages["prefill"], run.stages["decode"]
    held = pre.time_avg_in_system * pre.end_s + dec.time_avg_in_system * dec.end_s
    transfers = float(run.kv_transfer_exposed_s.sum())
    in_system = float(np.sum(run.finish_s - requests.arrival_s))
    assert np.all(np.isfinite(run.finish_s))
    assert held + transfers == pytest.approx(in_system, rel=1e-9)
    assert held != pytest.approx(in_system, rel=1e-6)  # negative control: transfers count


def test_goodput_counts_the_window_after_the_warm_up() -> None:
    dep = ServeDeployment(rate=20.0, duration_s=40.0, warmup_s=20.0, drain=True, output_len=64)
    requests = load_requests(dep)
    setup = resolve_serve(dep, requests)
    r = serve_results(setup, run_serve(setup, requests))
    end = r["duration_s"]  # the drained run ends after the 40 s of arrivals
    assert end > 40.0 and r["slo_attainment"] == 1.0
    assert r["goodput_requests_per_s"] == pytest.approx(r["requests_finished"] / (40.0 - 20.0))
    assert r["goodput_requests_per_s"] != pytest.approx(r["requests_finished"] / (end - 20.0))
    assert r["goodput_requests_per_s"] == pytest.approx(20.0, rel=0.25)  # the offered rate


def test_warm_up_as_long_as_the_run_is_refused(tmp_path, capsys) -> None:
    argv = ["serve", "--duration-s", "10", "--warmup-s", "10", "--run-dir", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--warmup-s" in err
