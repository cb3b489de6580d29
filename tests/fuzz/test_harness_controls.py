"""Negative controls: the contract checker flags what the fuzz tests must catch."""

from __future__ import annotations

import sys
from pathlib import Path

from longcat_sim.runs import read_run, write_run
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


def _uncommitted(argv: list[str]) -> int:
    """Both result files as valid JSON, but no commit marker: not a committed run."""
    run_dir = Path(argv[argv.index("--run-dir") + 1])
    for name in ("manifest.json", "results.json"):
        (run_dir / name).write_text("{}\n")
    return 0


def _committed_nothing(argv: list[str]) -> int:
    """Exit 0 into a directory holding an earlier run, committing nothing of its own."""
    return 0


def _removed_commit(argv: list[str]) -> int:
    """A refusal that deletes the earlier run's commit marker (no file written)."""
    (Path(argv[argv.index("--run-dir") + 1]) / "commit.json").unlink()
    print(f"{PREFIX} refused after removing", file=sys.stderr)
    return 2


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
        _no_results: "exit 0 without a committed run",
        _uncommitted: "exit 0 without a committed run",
        _removed_commit: "left the run committed there before unreadable or changed",
        _committed_nothing: "exit 0 left the run committed there before in place",
    }
    for command, expected in cases.items():
        run_dir = tmp_path / command.__name__
        run_dir.mkdir()
        if command in (_removed_commit, _committed_nothing):
            write_run(run_dir, {"command": "earlier"}, {"earlier": True})
        argv = ["fake", "--run-dir", str(run_dir)]
        problems = run_case(argv, command=command, counted=False).problems
        assert any(expected in p for p in problems), (command.__name__, problems)


def test_checker_passes_a_clean_refusal(tmp_path) -> None:
    out = run_case(["fake", "--run-dir", str(tmp_path / "r")], command=_one_line, counted=False)
    assert out.problems == []
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    write_run(earlier, {"command": "earlier"}, {"earlier": True})
    out = run_case(["fake", "--run-dir", str(earlier)], command=_one_line, counted=False)
    assert out.committed == read_run(earlier) and out.problems == []


def test_a_runaway_case_fails_on_time() -> None:
    def spin(argv: list[str]) -> int:
        while True:
            pass

    problems = run_case(["fake"], command=spin, timeout_s=0.2, counted=False).problems
    assert problems and "timeout" in problems[0]
