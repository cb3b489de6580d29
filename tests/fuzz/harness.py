"""Run one command line in-process and check the command line's contract on it.

The contract, for any input: exit code 0 or 2; no traceback; on 2, exactly one non-empty
stderr line starting ``longcat-sim: error:``; with ``--run-dir``, no half-written run directory
(on 2 no ``manifest.json``, ``results.json`` or ``commit.json`` written, nor a temporary file
left, and a run committed there before still read back unchanged by ``read_run``; on 0 its
own committed run, which ``read_run`` accepts with the commit marker verified).

Work that takes tens of seconds whatever the sizes (calibrate's host measurements, the
processes determinism and ``train --nproc`` spawn, the SDC campaign's training steps, a Ray
cluster) is replaced by a stub that
raises :class:`Accepted`: reaching it means the command accepted its input before starting the
long work, which is all a fuzz case can check of it.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from longcat_sim.cli import main
from longcat_sim.errors import UserError
from longcat_sim.runs import read_run

PREFIX = "longcat-sim: error:"
# commands whose documented contract exits 1 (e.g. a check that found a difference)
EXIT_ONE: frozenset[str] = frozenset({"determinism"})
CASE_TIMEOUT_S = 20.0
RESULT_FILES = ("manifest.json", "results.json")
# callables that start long work, by module attribute; each stub raises Accepted
LONG_WORK = (
    "longcat_sim.commands.determinism.check_determinism",
    "longcat_sim.commands.sdc.guard_overhead",
    "longcat_sim.commands.sdc.run_campaign",
    "longcat_sim.commands.calibrate._host",
    "longcat_sim.calibrate.wire.enter_shaped_network",
    "longcat_sim.train.distributed.launch",
    "longcat_sim.scenarios.executors.map_ray",
)

# cases checked this session, and how they ended (conftest prints them; the total is checked);
# "accepted" cases reached a stub of long work, every other one ran for real
CASES = {"run": 0, "exit 0": 0, "exit 2": 0, "accepted": 0, "failed": 0}


class Accepted(Exception):
    """A command accepted its input and reached the start of long work."""


class CaseTimeout(BaseException):
    """One case ran past ``CASE_TIMEOUT_S``."""


@dataclass
class Outcome:
    argv: list[str]
    code: int | None = None
    stdout: str = ""
    stderr: str = ""
    escaped: str | None = None  # an exception that left main, as 'Type: message'
    accepted: bool = False
    run_dir: Path | None = None
    before: dict[str, bytes | None] = field(default_factory=dict)  # result files beforehand
    committed: tuple[dict, dict] | None = None  # what read_run read there beforehand
    problems: list[str] = field(default_factory=list)


def _accept(*_args, **_kwargs):
    raise Accepted


@contextlib.contextmanager
def _stubbed_long_work() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for target in LONG_WORK:
            mp.setattr(target, _accept)
        yield


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    def expire(signum, frame) -> None:
        raise CaseTimeout(f"case ran past {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def named_run_dir(argv: list[str]) -> Path | None:
    """The run directory the last ``--run-dir`` names (argparse keeps the last)."""
    found = None
    for i, token in enumerate(argv):
        if token == "--run-dir" and i + 1 < len(argv):
            found = argv[i + 1]
        elif token.startswith("--run-dir="):
            found = token.split("=", 1)[1]
    return Path(found) if found else None


def run_case(
    argv: list[str],
    command: Callable[[list[str]], int] = main,
    timeout_s: float = CASE_TIMEOUT_S,
    counted: bool = True,
) -> Outcome:
    """Run ``command(argv)`` with stdout and stderr captured, long work stubbed and a hard
    time limit; the outcome carries every broken rule in ``problems``. ``counted``: a
    generated case, counted in ``CASES``."""
    out = Outcome(argv=list(argv), run_dir=named_run_dir(argv))
    out.before = _result_files(out.run_dir)
    out.committed = committed_run(out.run_dir)
    stdout, stderr = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    try:
        with (
            _time_limit(timeout_s),
            _stubbed_long_work(),
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stderr),
        ):
            out.code = command(list(argv))
    except Accepted:
        out.accepted = True
    except CaseTimeout as exc:
        out.escaped = f"timeout: {exc}"
    except BaseException as exc:  # anything leaving main is a traceback
        out.escaped = f"{type(exc).__name__}: {exc}"
    finally:
        torch.set_num_threads(threads)
    out.stdout, out.stderr = stdout.getvalue(), stderr.getvalue()
    out.problems = contract_problems(out)
    if counted:
        ending = "failed" if out.problems else "accepted" if out.accepted else f"exit {out.code}"
        CASES["run"] += 1
        CASES[ending] = CASES.get(ending, 0) + 1
    return out


def contract_problems(out: Outcome) -> list[str]:
    """Every rule of the contract ``out`` breaks (empty when it keeps them all)."""
    if out.accepted:
        return []
    if out.escaped is not None:
        return [f"exception escaped main: {out.escaped}"]  # what the CLI shows as a traceback
    problems = []
    allowed = (0, 1, 2) if out.argv and out.argv[0] in EXIT_ONE else (0, 2)
    if out.code not in allowed:
        problems.append(f"exit code {out.code!r}, not 0 or 2")
    if "Traceback" in out.stderr:
        problems.append("traceback on stderr")
    if out.code == 2:
        lines = out.stderr.splitlines()
        if (
            len(lines) != 1
            or not lines[0].startswith(PREFIX)
            or not lines[0][len(PREFIX) :].strip()
        ):
            problems.append(f"exit 2 wants one '{PREFIX} ...' line, stderr has {len(lines)}")
    if out.code == 0 and "--json" in out.argv and not _asked_for_help(out.argv):
        try:
            json.loads(out.stdout)
        except ValueError:
            problems.append("exit 0 under --json without JSON on stdout")
    problems += _run_dir_problems(out)
    return problems


def _asked_for_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def _result_files(run_dir: Path | None) -> dict[str, bytes | None]:
    """The bytes of a run directory's result files (None for a missing one)."""
    found: dict[str, bytes | None] = {}
    for name in (*RESULT_FILES, "commit.json"):
        try:
            found[name] = None if run_dir is None else (run_dir / name).read_bytes()
        except (OSError, ValueError):
            found[name] = None
    return found


def committed_run(run_dir: Path | None) -> tuple[dict, dict] | None:
    """``read_run(run_dir)``, or None where it holds no committed run."""
    if run_dir is None:
        return None
    try:
        return read_run(run_dir)
    except UserError:
        return None


def _run_dir_problems(out: Outcome) -> list[str]:
    run_dir = out.run_dir
    if run_dir is None or out.code not in (0, 2) or _asked_for_help(out.argv):
        return []
    if out.code == 2:
        if not run_dir.is_dir():
            return []
        after = _result_files(run_dir)
        left = [n for n, data in after.items() if data is not None and data != out.before.get(n)]
        left += [str(p.relative_to(run_dir)) for p in run_dir.rglob(".*.tmp")]
        problems = [f"exit 2 wrote {', '.join(left)} in the run directory"] if left else []
        if out.committed is not None and committed_run(run_dir) != out.committed:
            problems.append("exit 2 left the run committed there before unreadable or changed")
        return problems
    try:
        committed = read_run(run_dir)
    except UserError as exc:
        return [f"exit 0 without a committed run: {exc}"]
    if committed == out.committed:
        return ["exit 0 left the run committed there before in place of its own"]
    return []


def check(out: Outcome) -> None:
    """Fail the test with the command line and what went wrong."""
    if out.problems:
        tail = out.stderr.strip().splitlines()[-3:]
        pytest.fail(
            f"{' '.join(map(repr, out.argv))}\n  " + "\n  ".join(out.problems)
            + f"\n  stderr tail: {tail}",
            pytrace=False,
        )  # fmt: skip
