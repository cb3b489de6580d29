"""``longcat-sim train --sdc-guard``: a planted fault is found, attributed and repaired, or
stops the run; bad guard flags are one line and exit code 2."""

from __future__ import annotations

import json

import pytest

from longcat_sim.cli import main
from longcat_sim.train.checkpoint import latest_checkpoint
from tests.cli_checks import refused

BYTE_BUDGET = 2**18


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


def base_argv(cache, *extra: str) -> list[str]:
    return [
        "train", "--model", "tiny", "--steps", "6", "--batch-size", "2", "--seq-len", "32",
        "--data-cache", str(cache), "--set", f"byte_budget={BYTE_BUDGET}", *extra,
    ]  # fmt: skip


def guarded(cache, out, capsys, *extra: str) -> tuple[int, dict, list[dict]]:
    argv = [*base_argv(cache, "--deterministic", "--sdc-guard", *extra), "--json"]
    code = main([*argv, "--run-dir", str(out)])
    stdout, stderr = capsys.readouterr()
    assert "Traceback" not in stderr, stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return code, json.loads(stdout), records


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--sdc-guard"], "add --deterministic"),
        (["--deterministic", "--sdc-inject", "expert_gemm:30:2"], "add --sdc-guard"),
        (["--deterministic", "--sdc-guard", "--sdc-inject", "disk:30:2"], "unknown fault site"),
        (["--deterministic", "--sdc-guard", "--sdc-inject", "combine:32"], "out of range"),
        (["--deterministic", "--sdc-guard", "--sdc-inject", "combine"], "expects SITE:BIT"),
        (["--deterministic", "--sdc-guard", "--sdc-inject", "combine:3:6"], "past the last step"),
        (
            ["--deterministic", "--sdc-guard", "--sdc-inject", "combine:3:1:model.nope"],
            "'model.nope' does not exist",
        ),
        (
            [
                "--deterministic",
                "--sdc-guard",
                "--sdc-inject",
                "expert_gemm:3:1:model.layers.0.mlp:gate_up",
            ],
            "names no GEMM",
        ),
        (
            ["--deterministic", "--sdc-guard", "--nproc", "2", "--sdc-inject", "combine:3:1"],
            "drop --nproc",
        ),
    ],
)
def test_bad_guard_flags_are_one_line_and_exit_2(cache, tmp_path, capsys, extra, fragment):
    line = refused(base_argv(cache, *extra), capsys, tmp_path / "run")
    assert fragment in line


def test_a_planted_transient_fault_is_repaired(cache, tmp_path, capsys) -> None:
    code, clean, _ = guarded(cache, tmp_path / "clean", capsys)
    assert code == 0 and clean["sdc_guard"]["alarmed_steps"] == 0 and clean["stopped"] is None
    code, results, records = guarded(
        cache, tmp_path / "run", capsys, "--sdc-inject", "expert_gemm:30:2"
    )
    assert code == 0 and results["stopped"] is None
    assert [r["step"] for r in records if "sdc_events" in r] == [2]
    (event,) = records[2]["sdc_events"]
    assert event["attribution"] == "transient" and event["action"] == "continue"
    assert "abft" in event["detectors"]
    guard = results["sdc_guard"]
    assert guard["alarmed_steps"] == 1 and guard["attribution"]["transient"] == 1
    assert guard["policy"] == "continue" and guard["steps"] == 6 and guard["abft_checks"] > 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["sdc_guard"] == guard
    assert results["param_hash"] == clean["param_hash"]  # the replay's clean step was kept


def test_policy_stop_exits_1_with_the_checkpoint_before_the_faulty_step(
    cache, tmp_path, capsys
) -> None:
    out = tmp_path / "run"
    code, results, records = guarded(
        cache, out, capsys, "--sdc-policy", "stop", "--sdc-inject", "expert_gemm:30:2"
    )
    assert code == 1
    assert "step 2" in results["stopped"] and results["sdc_guard"]["policy"] == "stop"
    assert [r["step"] for r in records][-1] == 2 and "sdc_stop" in records[-1]
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and checkpoint.name == "step-00000002"


def test_a_fault_that_never_fired_is_a_warning(cache, tmp_path, capsys) -> None:
    """AdamW has no moments before its first update: a flip planted in them at step 0 finds
    nothing, and the run says so instead of passing for a clean negative control."""
    argv = [
        *base_argv(cache, "--deterministic", "--sdc-guard"),
        "--sdc-inject",
        "optimizer_state:30:0",
    ]
    code = main([*argv, "--run-dir", str(tmp_path / "run")])
    _, err = capsys.readouterr()
    assert code == 0 and "warning: --sdc-inject optimizer_state:30:0: the fault never fired" in err
    argv[-1] = "optimizer_state:30:1"  # the control: after step 0 there are moments to flip
    code = main([*argv, "--run-dir", str(tmp_path / "run-1")])
    _, err = capsys.readouterr()
    assert code == 0 and "never fired" not in err


def test_guarded_weights_carry_checksums_and_a_run_resumes_across_the_guard(
    cache, tmp_path, capsys
) -> None:
    """``--sdc-guard`` builds the model with ``expert_checksums`` (recorded in the manifest and
    the checkpoint); the option changes no parameter, so a run resumes with or without it."""
    whole = tmp_path / "whole"
    code, full, _ = guarded(cache, whole, capsys)
    assert code == 0
    manifest = json.loads((whole / "manifest.json").read_text())
    assert manifest["config"]["model"]["expert_checksums"] is True
    saved = json.loads((latest_checkpoint(whole) / "config.json").read_text())
    assert saved["longcat_sim"]["expert_checksums"] is True
    for first, then in ((["--sdc-guard"], []), ([], ["--sdc-guard"])):
        out = tmp_path / f"resumed-{bool(first)}"
        argv = base_argv(cache, "--deterministic", *first, "--stop-after", "3", "--json")
        assert main([*argv, "--run-dir", str(out)]) == 0
        capsys.readouterr()
        argv = base_argv(cache, "--deterministic", *then, "--resume", "--json")
        code = main([*argv, "--run-dir", str(out)])
        stdout, stderr = capsys.readouterr()
        assert code == 0, stderr
        resumed = json.loads(stdout)
        assert resumed["param_hash"] == full["param_hash"]  # the same six steps
        assert (resumed["sdc_guard"] is not None) == bool(then)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["config"]["model"]["expert_checksums"] is bool(then)  # this run's checks


def test_a_resumed_run_takes_the_checksum_option_from_its_own_flags(cache, tmp_path, capsys):
    """The option is this run's, even for a checkpoint of a model that is no preset."""
    out = tmp_path / "run"
    first = base_argv(cache, "--set", "model.rope_theta=5000", "--stop-after", "2")
    assert main([*first, "--run-dir", str(out)]) == 0
    then = ["train", "--resume", "--data-cache", str(cache), "--run-dir", str(out)]
    code = main([*then, "--set", "model.expert_checksums=true"])
    assert code == 0, capsys.readouterr().err
    model = json.loads((out / "manifest.json").read_text())["config"]["model"]
    assert model["expert_checksums"] is True and model["rope_theta"] == 5000
    capsys.readouterr()
    # negative control: a real model change is still refused on resume
    assert main([*then, "--set", "model.rope_theta=8000"]) == 2
    assert "different model config" in capsys.readouterr().err
