"""Every command, fuzzed: its real flags with valid, boundary and junk values keep the command
line's contract (``harness.contract_problems``)."""

from __future__ import annotations

import itertools
from pathlib import Path

from hypothesis import given, settings

from longcat_sim.cli import COMMANDS
from longcat_sim.runs import write_run
from tests.fuzz.conftest import FUZZ
from tests.fuzz.harness import check, run_case
from tests.fuzz.pools import SPECS, command_lines, resolve

# examples per command: the cheap ones get more
EXAMPLES = {
    "params": 100, "train": 150, "report": 50, "simulate": 250, "sweep": 150, "serve": 150,
    "plan": 150, "determinism": 120, "sdc": 120, "calibrate": 100,
}  # fmt: skip
_serial = itertools.count()
# the run an existing run directory holds before a case (a refusal must leave it as it is)
EARLIER_MANIFEST = {"command": "earlier", "config": {"case": "committed before"}}
EARLIER_RESULTS = {"earlier": True}


def run_dir_args(kind: str, root: Path, paths: dict[str, Path]) -> list[str]:
    """``--run-dir`` for a run directory kind: a fresh path, an existing folder holding an
    earlier committed run, a file, a path below a file, or no flag at all."""
    if kind == "none":
        return []
    fresh = root / "runs" / f"case-{next(_serial)}"
    if kind == "dir":
        fresh.mkdir(parents=True)
        write_run(fresh, EARLIER_MANIFEST, EARLIER_RESULTS)
    target = {"fresh": fresh, "dir": fresh, "file": paths["file"]}.get(kind)
    return ["--run-dir", str(target or paths["below-file"])]


def _fuzz_test(command: str):
    @settings(FUZZ, max_examples=EXAMPLES[command])
    @given(case=command_lines(command))
    def test(case, sandbox, paths, data_cache) -> None:
        tokens, run_dir_kind = case
        argv = [command, *SPECS[command].base, *tokens]
        argv = [resolve(t, paths, data_cache) for t in argv]
        check(run_case([*argv, *run_dir_args(run_dir_kind, sandbox, paths)]))

    test.__name__ = f"test_{command}_command_line"
    test.__doc__ = f"``{command}`` keeps the contract on generated command lines."
    return test


for _command in COMMANDS:
    globals()[f"test_{_command}_command_line"] = _fuzz_test(_command)
