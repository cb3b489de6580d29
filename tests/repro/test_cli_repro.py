"""``longcat-sim determinism`` and ``longcat-sim sdc`` through the command line, and their errors."""

from __future__ import annotations

import json

import pytest

from longcat_sim.cli import main
from longcat_sim.repro.inject import SITES


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_determinism_three_runs_on_one_and_two_threads_and_a_planted_flip(
    tmp_path, capsys, data_cache
) -> None:
    """Runs 0 (1 thread) and 1 (2 threads) agree bit for bit; run 2 carries a flipped lowest
    mantissa bit in a dense FFN's output at step 1, found there, 1 ULP wide; the runs differ, so the exit code is 1."""
    argv = ["determinism", "--model", "tiny", "--steps", "3", "--runs", "3"]
    argv += ["--threads", "1,2", "--batch-size", "4", "--seq-len", "32"]
    argv += ["--byte-budget", str(2**18), "--data-cache", data_cache, "--workers", "2"]
    argv += ["--inject", "activation:0:1:model.layers.0.mlps.1", "--json"]
    code, out, err = run_cli([*argv, "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 1, err
    results = json.loads(out)
    assert results["runs"] == 3 and results["run_threads"] == [1, 2, 1]
    assert results["identical"] is False and results["identical_runs"] == 2
    div = results["first_divergence"]
    assert (div["step"], div["module"], div["tensor"]) == (1, "model.layers.0.mlps.1", "output")
    assert div["max_ulp"] == 1 and div["run"] == 2
    assert (tmp_path / "run" / "manifest.json").is_file()


@pytest.mark.parametrize("site", SITES)
def test_every_site_help_lists_is_a_negative_control_found(site, tmp_path, capsys, data_cache):
    """A flip of bit 30 at step 1 of the last run, at each site ``--help`` names: the runs
    differ from that step on, so the exit code is 1."""
    argv = ["determinism", "--steps", "2", "--runs", "2", "--batch-size", "1", "--seq-len", "8"]
    argv += ["--byte-budget", str(2**18), "--data-cache", data_cache, "--workers", "2"]
    argv += ["--inject", f"{site}:30:1", "--json", "--run-dir", str(tmp_path / "run")]
    code, out, err = run_cli(argv, capsys)
    assert code == 1, err
    results = json.loads(out)
    assert results["identical_runs"] == 1 and results["first_divergence"]["step"] == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["determinism", "--runs", "1"], "--runs must be at least 2"),
        (["determinism", "--threads", "0,1"], "--threads needs positive"),
        (["determinism", "--threads", "a"], "--threads expects"),
        (["determinism", "--inject", "disk:1"], "unknown fault site"),
        (["determinism", "--inject", "combine"], "--inject expects"),
        (["determinism", "--steps", "2", "--inject", "combine:1:5"], "past the last step"),
        (["determinism", "--model", "deepseek-v3"], "analytic-only"),
        (
            ["determinism", "--inject", "expert_gemm:30:0:model.layers.0.mlp:gate_up"],
            "names no GEMM",
        ),
        (["determinism", "--inject", "weight:30:0:nope"], "'nope' does not exist"),
        (["sdc", "--bits", "x"], "--bits expects"),
        (["sdc", "--bits", "70"], "0..63"),
        (["sdc", "--sites", "disk"], "unknown --sites"),
        (["sdc", "--trials", "0"], "--trials must be positive"),
        (["sdc", "--model", "longcat-flash"], "train tiny or small"),
        (["sdc", "--sites", "combine", "--bits", "40"], "selects no bit"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(argv, message, capsys, tmp_path) -> None:
    code, out, err = run_cli([*argv, "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1
