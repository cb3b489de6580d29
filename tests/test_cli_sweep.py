"""``longcat-sim sweep``: grid order, worker-independent results, the Pareto front, grid files
and one-line errors."""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import pytest

from longcat_sim.cli import main
from longcat_sim.scenarios.sweep import pareto_front
from tests.cli_checks import refused

GRID = ["--batch-per-device", "8,64", "--schedule", "sbo,tbo", "--no-progress"]


def sweep(tmp_path: Path, capsys, *argv: str) -> dict:
    code = main(["sweep", *argv, "--json", "--run-dir", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_points_in_grid_order_and_same_as_simulate(tmp_path, capsys) -> None:
    r = sweep(tmp_path, capsys, *GRID, "--workers", "2")
    points = r["points"]
    assert r["n_points"] == len(points) == 4
    assert [(p["schedule"], p["batch_per_device"]) for p in points] == [
        ("sbo", 8),
        ("sbo", 64),
        ("tbo", 8),
        ("tbo", 64),
    ]
    assert all(isinstance(v, int | float | str) for p in points for v in p.values())  # flat
    assert {"attention_us", "dispatch_us", "routed_experts_us", "combine_us"} <= set(points[0])
    code = main(
        ["simulate", "--schedule", "tbo", "--batch-per-device", "64", "--json", "--run-dir",
         str(tmp_path / "one")]
    )  # fmt: skip
    single = json.loads(capsys.readouterr().out)
    assert code == 0
    assert points[3]["tpot_ms"] == single["tpot_ms"]
    assert points[3]["dispatch_us"] == single["per_layer_us"]["dispatch"]


def test_results_do_not_depend_on_the_worker_count(tmp_path, capsys) -> None:
    one = sweep(tmp_path, capsys, *GRID, "--workers", "1")
    two = sweep(tmp_path, capsys, *GRID, "--workers", "2")
    assert one == two


def test_pareto_front_against_brute_force(tmp_path, capsys) -> None:
    r = sweep(
        tmp_path, capsys, "--model", "longcat-flash,qwen3-235b-a22b",
        "--batch-per-device", "4,16,48,96,160", "--no-progress",
    )  # fmt: skip
    points, front = r["points"], r["pareto"]
    # the default schedules apply per model: Qwen3 has no shortcut branch for SBO
    schedules = {(p["model"], p["schedule"]) for p in points}
    assert schedules == {
        ("longcat-flash", "sbo"),
        ("longcat-flash", "tbo"),
        ("qwen3-235b-a22b", "tbo"),
    }

    def front_of(candidates: list[dict]) -> list[dict]:
        def dominated(p: dict) -> bool:
            return any(
                q["model"] == p["model"]
                and q["tps_per_user"] >= p["tps_per_user"]
                and q["tgs"] >= p["tgs"]
                and (q["tps_per_user"], q["tgs"]) != (p["tps_per_user"], p["tgs"])
                for q in candidates
            )

        key = lambda p: (p["model"], p["tps_per_user"])  # noqa: E731
        return sorted((p for p in candidates if not dominated(p)), key=key)

    # batch 160 of 5,000-token requests overflows 80 GB: kept, flagged, never on the front
    assert not all(p["fits"] for p in points)
    assert front == front_of([p for p in points if p["fits"]])
    assert front != front_of(points)  # negative control: unfiltered, an infeasible point wins
    assert {p["model"] for p in front} == {"longcat-flash", "qwen3-235b-a22b"}
    assert all("cost_per_m_tokens" in p for p in front)


def test_pareto_front_hand_example() -> None:
    """(TPS/user, TGS): (10, 100) and (30, 50) trade off; (20, 40) loses to (30, 50)."""
    points = [
        {"model": "m", "tps_per_user": 10.0, "tgs": 100.0},
        {"model": "m", "tps_per_user": 20.0, "tgs": 40.0},
        {"model": "m", "tps_per_user": 30.0, "tgs": 50.0},
    ]
    assert pareto_front(points) == [points[0], points[2]]


def test_grid_file_and_command_line_override(tmp_path, capsys) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_text(
        "[grid]\n"
        'model = ["deepseek-v3"]\n'
        "batch_per_device = [16, 32, 64]\n"
        'schedule = ["tbo"]\n'
        "mtp_draft_tokens = 0\n"
        'assume = { routing = "balanced", context_cv = 0 }\n'
    )
    r = sweep(tmp_path, capsys, "--grid", str(grid), "--batch-per-device", "128", "--no-progress")
    (point,) = r["points"]
    assert (point["model"], point["batch_per_device"], point["schedule"]) == (
        "deepseek-v3",
        128,
        "tbo",
    )
    assert point["assumptions"] == "default+routing=balanced,context_cv=0.0"
    assert point["mtp_draft_tokens"] == 0


def test_text_has_table_and_front(tmp_path, capsys) -> None:
    code = main(["sweep", *GRID, "--run-dir", str(tmp_path / "run")])
    out, _ = capsys.readouterr()
    assert code == 0
    assert "4 points" in out and "Pareto front" in out and "TPS/user" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--schedule", "sbo,dbo"], "unknown schedule 'dbo'"),
        (["--batch-per-device", "8,0"], "--batch-per-device must be an integer >= 1"),
        (["--ep", "96", "--gpus", "96"], "--ep 96 does not divide"),
        (["--hardware", "H800,TPU9"], "unknown hardware 'TPU9'"),
        (["--context", "5000,lots"], "--context: takes float values"),
        (["--grid", "GRID"], "unknown key 'colour'"),
        (["--grid", "EMPTY"], "grid key 'batch_per_device' needs at least one value"),
        (["--workers", "0"], "--workers must be >= 1"),
        (["--model", "longcat-flash,deepseek-v3", "--schedule", "sbo"], "needs ScMoE layers"),
        (["--hbm-check", "report"], "--hbm-check applies to simulate"),
    ],
)
def test_bad_input_is_one_stderr_line_and_exit_2(argv, needle, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[grid]\ncolour = "blue"\n')
    empty = tmp_path / "empty.toml"
    empty.write_text("[grid]\nbatch_per_device = []\n")
    argv = [{"GRID": str(bad), "EMPTY": str(empty)}.get(a, a) for a in argv]
    assert needle in refused(["sweep", *argv, "--no-progress"], capsys, tmp_path / "r")


def test_every_decode_option_is_a_grid_axis(tmp_path, capsys) -> None:
    """The sweep's options are ``simulate``'s decode fields, each taking a list; a value from
    a grid file meets the same validator as the option."""
    from dataclasses import fields

    from longcat_sim.commands import sweep as sweep_command
    from longcat_sim.config.deployment import DecodeDeployment

    parser = argparse.ArgumentParser()
    sweep_command.add_arguments(parser)
    text = parser.format_help()
    assert all(f"--{f.name.replace('_', '-')} A,B,..." in text for f in fields(DecodeDeployment))
    r = sweep(tmp_path, capsys, "--seed", "0,1", "--batch-per-device", "8", "--no-progress")
    pairs = [(p["schedule"], p["seed"]) for p in r["points"]]
    assert pairs == [("sbo", 0), ("sbo", 1), ("tbo", 0), ("tbo", 1)]  # in field order
    grid = tmp_path / "grid.toml"
    grid.write_text("[grid]\nbatch_per_device = [8, 0]\n")
    line = refused(["sweep", "--grid", str(grid), "--no-progress"], capsys, tmp_path / "bad")
    assert "--batch-per-device must be an integer >= 1, got 0" in line


def test_a_grid_over_max_points_is_refused_with_its_estimate_before_any_work(
    tmp_path, capsys
) -> None:
    batches = ",".join(str(b) for b in range(1, 201))
    contexts = ",".join(str(1024 * c) for c in range(1, 101))
    argv = ["--batch-per-device", batches, "--context", contexts, "--ep", "32,64,128,256"]
    start = time.perf_counter()
    message = refused(
        ["sweep", *argv, "--schedule", "sbo,tbo", "--no-progress"], capsys, tmp_path / "r"
    )
    assert time.perf_counter() - start < 30  # the 160,000 points are never built
    assert "160,000 points, more than --max-points 10,000" in message
    assert re.search(r"about \d+(\.\d)? (s|min|h) on \d+ worker", message)
    assert "--max-points 160000" in message


def test_max_points_admits_a_grid_of_exactly_that_size(tmp_path, capsys) -> None:
    assert "4 points, more than --max-points 3" in refused(
        ["sweep", *GRID, "--max-points", "3"], capsys, tmp_path / "a"
    )
    assert len(sweep(tmp_path, capsys, *GRID, "--max-points", "4")["points"]) == 4


def test_max_points_times_a_point_the_model_can_run(tmp_path, capsys) -> None:
    """DeepSeek-V3 has no ScMoE layers: the timed point is its TBO one, not a refused SBO."""
    message = refused(
        ["sweep", "--model", "deepseek-v3", "--max-points", "2", "--no-progress"],
        capsys,
        tmp_path / "r",
    )
    assert "more than --max-points 2" in message
