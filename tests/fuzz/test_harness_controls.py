"""Negative controls: the contract checker flags what the fuzz tests must catch."""

from __future__ import annotations

import sys

from tests.fuzz.harness import PREFIX, run_case


def _raises(argv: list[str]) -> int:
    raise ValueError("a bug")


def _two_lines(argv: list[str]) -> int:
    print(f"{PREFIX} first", file=sys.stderr)
    print(f"{PREFIX} second", file=sys.stderr)
    return 2


def _printed_traceback(argv: list[str]) -> int:
    print("Traceback (most recent call last):", file=sys.stderr)
    return 0


def _exit_1(argv: list[str]) -> int:
    print(f"{PREFIX} differs", file=sys.stderr)
    return 1


def _bare_prefix(argv: list[str]) -> int:
    print(PREFIX, file=sys.stderr)
    return 2


def _half_written(argv: list[str]) -> int:
    run_dir = argv[argv.index("--run-dir") + 1]
    with open(f"{run_dir}/manifest.json", "w") as handle:
        handle.write("{}")
    print(f"{PREFIX} refused after writing", file=sys.stderr)
    return 2


def _no_results(argv: list[str]) -> int:
    return 0


def _one_line(argv: list[str]) -> int:
    print(f"{PREFIX} bad input", file=sys.stderr)
    return 2


def test_checker_flags_each_broken_rule(tmp_path) -> None:
    cases = {
        _raises: "exception escaped main: ValueError",
        _two_lines: "one 'longcat-sim: error: ...' line",
        _printed_traceback: "traceback on stderr",
        _exit_1: "exit code 1",
        _bare_prefix: "one 'longcat-sim: error: ...' line",
        _half_written: "exit 2 wrote manifest.json",
        _no_results: "exit 0 without a readable manifest.json",
    }
    for command, expected in cases.items():
        run_dir = tmp_path / command.__name__
        run_dir.mkdir()
        argv = ["fake", "--run-dir", str(run_dir)]
        problems = run_case(argv, command=command, counted=False).problems
        assert any(expected in p for p in problems), (command.__name__, problems)


def test_checker_passes_a_clean_refusal(tmp_path) -> None:
    out = run_case(["fake", "--run-dir", str(tmp_path / "r")], command=_one_line, counted=False)
    assert out.problems == []


def test_a_runaway_case_fails_on_time() -> None:
    def spin(argv: list[str]) -> int:
        while True:
            pass

    problems = run_case(["fake"], command=spin, timeout_s=0.2, counted=False).problems
    assert problems and "timeout" in problems[0]
