"""plan: screening, verification by serve, ranking, executors and bad input."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from longcat_sim.cli import main
from longcat_sim.config.plan import PlanChoices
from longcat_sim.scenarios import plan as plan_mod
from longcat_sim.scenarios.executors import map_items
from longcat_sim.scenarios.plan import (
    PREFILL_RHO_MAX,
    UTILISATION,
    Candidate,
    PlanProblem,
    candidates,
    prefill_fits,
    price_task,
    run_plan,
    screen,
    tasks_for,
    verified_reason,
)

PROBLEM = PlanProblem(
    model="longcat-flash", rate=40.0, prompt_len=2048.0, output_len=256.0,
    slo_ttft_ms=2000.0, slo_tpot_ms=50.0, slo_percentile=90.0,
)  # fmt: skip
SMALL = PlanChoices(
    gpus=(32,), batch_per_device=(16, 64), tokens_per_device=(512, 8192), prefill_gpus=(16,)
)


def _prices(problem: PlanProblem, space: PlanChoices) -> dict:
    tasks = sorted({t for c in candidates(space) for t in tasks_for(problem, c)}, key=repr)
    return dict(zip(tasks, map(price_task, tasks), strict=True))


def test_candidates_are_every_combination():
    space = PlanChoices(hardware=("H800", "H20"), gpus=(16, 32), batch_per_device=(8, 16, 32))
    n = 2 * 2 * 3 * len(space.tokens_per_device) * (1 + len(space.prefill_gpus))
    assert len(candidates(space)) == n
    assert len(set(candidates(space))) == n


def test_screening_serves_the_rate_and_prices_it():
    prices = _prices(PROBLEM, SMALL)
    for c in candidates(SMALL):
        row = screen(PROBLEM, c, prices)
        assert row["instances"] >= 1
        gpus = row["instances"] * c.gpus + row["prefill_instances"] * c.prefill_gpus
        assert row["total_gpus"] == gpus
        usd_h = gpus * 2.0  # H800 at $2 per GPU-hour
        expected = usd_h / (PROBLEM.rate * PROBLEM.output_len * 3600.0) * 1e6
        assert row["cost_per_m_tokens"] == pytest.approx(expected, rel=1e-12)


def test_tight_tpot_screens_everything_out():
    tight = dataclasses.replace(PROBLEM, slo_tpot_ms=1.0)
    res = run_plan(tight, SMALL, verify=2, workers=1)
    assert res.winner is None and not res.verified
    assert all(r["reason"].startswith("TPOT") for r in res.screened)


def test_plan_verifies_and_ranks_by_cost():
    res = run_plan(PROBLEM, SMALL, verify=3, workers=1, verify_duration_s=40.0)
    assert res.winner is not None and res.winner["served_slo_met"]
    met = [r for r in res.verified if r["served_slo_met"]]
    costs = [r["cost_per_m_tokens"] for r in met]
    assert costs == sorted(costs)
    assert all(r["reason"] for r in res.verified if r is not res.winner)
    # verification is a real check: the winner's served TPOT is within its target
    assert res.winner["served_tpot_at_slo_percentile_ms"] <= PROBLEM.slo_tpot_ms


def test_verified_reason_names_the_missed_target():
    res = run_plan(PROBLEM, SMALL, verify=2, workers=1, verify_duration_s=40.0)
    assert all(verified_reason(PROBLEM, r) == "" for r in res.verified if r["served_slo_met"])
    strict = dataclasses.replace(PROBLEM, slo_ttft_ms=1.0)  # below any prefill forward
    for r in res.verified:
        missed = dict(r, served_slo_met=False)
        assert verified_reason(strict, missed).startswith("serve: TTFT P90")


def test_local_processes_give_the_same_prices():
    tasks = sorted({t for c in candidates(SMALL) for t in tasks_for(PROBLEM, c)}, key=repr)[:6]
    assert map_items(price_task, tasks, workers=2) == [price_task(t) for t in tasks]


def test_ray_executor_gives_the_same_answer():
    pytest.importorskip("ray")
    tasks = sorted({t for c in candidates(SMALL) for t in tasks_for(PROBLEM, c)}, key=repr)[:4]
    assert map_items(price_task, tasks, executor="ray") == [price_task(t) for t in tasks]


@pytest.mark.parametrize(
    "argv, needle",
    [
        ([], "--rate"),
        (["--rate", "10", "--address", "x:1"], "--executor ray"),
        (["--trace", "azure-code", "--prompt-len", "5"], "--prompt-len"),
        (["--rate", "-1"], "rate"),
        (["--rate", "10", "--gpus", "0"], "gpus"),
        (["--rate", "10", "--layout", "mixed"], "layout"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, needle):
    assert main(["plan", *argv, "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err


def test_cli_json(tmp_path, capsys):
    argv = [
        "plan", "--rate", "40", "--prompt-len", "2048", "--output-len", "256", "--gpus", "32",
        "--batch-per-device", "16,64", "--tokens-per-device", "512,8192", "--prefill-gpus",
        "16", "--verify", "2", "--verify-duration-s", "40", "--workers", "1", "--json",
        "--run-dir", str(tmp_path / "r"),
    ]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["screened"] == len(candidates(SMALL))
    assert out["winner"]["served_slo_met"] is True
    assert len(out["verified"]) == 2


def test_screening_adds_instances_until_the_rate_fits_the_headroom():
    prices = _prices(PROBLEM, SMALL)
    for c in candidates(SMALL):
        row = screen(PROBLEM, c, prices)
        if c.layout == "disagg":  # a decode instance at its cap: b x gpus x q / (step x O)
            d = plan_mod.pools(PROBLEM, c.hardware, c.gpus, c.schedule, c.gpus).decode
            step = prices[tasks_for(PROBLEM, c)[0]]
            q = 1 + d.mtp_accept * d.mtp_draft_tokens
            expected = c.batch_per_device * c.gpus * q / (step * PROBLEM.output_len)
            assert row["instance_requests_per_s"] == pytest.approx(expected, rel=1e-12)
            assert row["tpot_ms"] == pytest.approx(step / q * 1e3, rel=1e-12)
        capacity = row["instance_requests_per_s"] * UTILISATION
        assert row["instances"] * capacity >= PROBLEM.rate
        assert (row["instances"] - 1) * capacity < PROBLEM.rate  # not one more than needed
        if c.layout == "disagg":
            pre = row["prefill_instance_requests_per_s"] * PREFILL_RHO_MAX
            assert row["prefill_instances"] * pre >= PROBLEM.rate


def test_a_prefill_pool_that_cannot_hold_the_weights_is_screened_out():
    ds = dataclasses.replace(PROBLEM, model="deepseek-v3")
    small = Candidate("disagg", "H800", 64, 16, 4096, None, prefill_gpus=8)
    big = dataclasses.replace(small, prefill_gpus=32)
    prices = {t: price_task(t) for c in (small, big) for t in tasks_for(ds, c)}
    assert screen(ds, small, prices)["reason"].startswith("HBM: a prefill forward")
    assert screen(ds, big, prices)["reason"] == ""  # negative control: 32 GPUs hold it
    assert not prefill_fits(ds, "H800", 8, 4096) and prefill_fits(ds, "H800", 32, 4096)


def test_when_the_cheapest_fails_in_serve_the_next_batch_is_verified(monkeypatch):
    real = plan_mod.verify_task
    calls: list[dict] = []

    def first_fails(task):
        calls.append(task[1])
        out = real(task)
        if len(calls) == 1:  # the cheapest screened candidate misses its TTFT in serve
            out = out | {"served_slo_met": False, "served_ttft_at_slo_percentile_ms": 9e9}
        return out

    monkeypatch.setattr(plan_mod, "verify_task", first_fails)
    res = run_plan(PROBLEM, SMALL, verify=1, workers=1, verify_duration_s=30.0)
    assert len(calls) == 2 and res.winner is not None
    assert res.winner["cost_per_m_tokens"] >= calls[0]["cost_per_m_tokens"]
    lost = [r for r in res.verified if r["reason"].startswith("serve: TTFT")]
    assert len(lost) == 1


def test_ray_cluster_at_an_address(tmp_path, capsys):
    """A Ray head started here, reached through --address (CI has Ray: the test extra)."""
    if importlib.util.find_spec("ray") is None:
        if os.environ.get("CI"):
            pytest.fail("Ray is part of the test extra; CI must have it")
        pytest.skip("ray is not installed")
    port = _free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    start = [str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=2",
             "--include-dashboard=false", "--node-ip-address=127.0.0.1"]  # fmt: skip
    subprocess.run(start, check=True, capture_output=True, timeout=120)
    try:
        argv = [
            "plan", "--rate", "40", "--prompt-len", "2048", "--output-len", "256",
            "--gpus", "32", "--batch-per-device", "16,64", "--tokens-per-device", "512,8192",
            "--prefill-gpus", "16", "--verify", "1", "--verify-duration-s", "30",
            "--executor", "ray", "--address", f"127.0.0.1:{port}", "--json",
            "--run-dir", str(tmp_path / "r"),
        ]  # fmt: skip
        assert main(argv) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["winner"]["served_slo_met"] is True
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, timeout=120)


def test_unreachable_ray_address_is_one_line(tmp_path, capsys):
    pytest.importorskip("ray")
    argv = ["plan", "--rate", "10", "--executor", "ray", "--address", f"127.0.0.1:{_free_port()}",
            "--run-dir", str(tmp_path / "r")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--executor ray" in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
