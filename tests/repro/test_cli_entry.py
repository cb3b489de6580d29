"""``longcat-sim determinism --entry``: exit code 0 when the runs agree, 1 when they differ
(the ``--inject`` negative control), 2 on a bad entry point, each as the CLI contract says."""

from __future__ import annotations

import json

import pytest

from longcat_sim.cli import main

ENTRY = "tests.repro.entry_models:two_layer"


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_identical_runs_exit_0_and_are_committed(tmp_path, capsys) -> None:
    argv = ["determinism", "--entry", ENTRY, "--steps", "1", "--runs", "2", "--workers", "2"]
    argv += ["--json"]
    code, out, err = run_cli([*argv, "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 0, err
    results = json.loads(out)
    assert results["identical"] is True and results["model"] == ENTRY
    assert (tmp_path / "run" / "results.json").is_file()


def test_a_planted_flip_exits_1_after_the_results_are_committed(tmp_path, capsys) -> None:
    argv = ["determinism", "--entry", ENTRY, "--steps", "2", "--runs", "2", "--workers", "2"]
    argv += ["--inject", "gradient:0:1:out.weight", "--json"]
    code, out, err = run_cli([*argv, "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 1, err
    div = json.loads(out)["first_divergence"]
    assert (div["step"], div["module"], div["tensor"], div["max_ulp"]) == (
        1,
        "out",
        "grad.weight",
        1,
    )
    committed = json.loads((tmp_path / "run" / "results.json").read_text())
    assert committed["identical"] is False


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("train.py", "is not 'package.module:function'"),
        ("mypkg.train:step:x", "is not 'package.module:function'"),
        ("no_such_package_here.train:step", "cannot import 'no_such_package_here.train'"),
        ("tests.repro.entry_models:step", "has no function 'step'"),
        ("tests.repro.entry_models:not_an_experiment", "must return an Experiment"),
    ],
)
def test_bad_entry_is_one_line_and_exit_code_2(entry, message, tmp_path, capsys) -> None:
    argv = ["determinism", "--entry", entry, "--runs", "2", "--run-dir", str(tmp_path / "r")]
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("inject", "message"),
    [
        ("combine:0", "--inject with --entry takes a site among"),
        ("weight:0:0:nope", "parameter 'nope' is not in the model"),
        ("activation:0:0:nope", "module 'nope' is not in the model"),
    ],
)
def test_bad_inject_for_an_entry_is_exit_code_2(inject, message, tmp_path, capsys) -> None:
    argv = ["determinism", "--entry", ENTRY, "--runs", "2", "--inject", inject]
    code, out, err = run_cli([*argv, "--run-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and out == "" and message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["determinism", "--batch-size", "4"], "--batch-size do not apply with --entry"),
        (["determinism", "--model", "small"], "--model do not apply with --entry"),
        (["sdc", "--clean-runs", "5"], "--clean-runs do not apply with --entry"),
        (["determinism", "--model", "tiny"], "--model do not apply with --entry"),  # a default
        (["sdc", "--clean-runs", "1000", "--seq-len", "32"], "--seq-len, --clean-runs do not"),
        (["sdc", "--bits", "0,40"], "--bits must lie in 0..31"),
    ],
)
def test_options_of_the_built_in_model_are_refused_with_an_entry(argv, message, tmp_path, capsys):
    argv = [*argv, "--entry", ENTRY, "--run-dir", str(tmp_path / "r")]
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and out == "" and message in err and err.count("\n") == 1
