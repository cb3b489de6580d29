"""The report's own reproducibility runs: without ``--determinism-run`` / ``--sdc-run``, a quick
determinism check and a short bit-flip campaign on the tiny model.

They run through the commands' own code: ``commands.report`` parses the command lines below
with the command's parser and calls its ``run``, and hands that here as a ``Runner``. Each
result is cached like a simulated section, keyed by its command line, the library versions it
ran on and the source of the code it runs (``repro_fingerprint``), so a second report runs
neither. The sizes are smoke-test sizes, set here only; the page says so and gives the
full-size commands.
"""

from __future__ import annotations

import hashlib
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from longcat_sim.errors import UserError
from longcat_sim.report.cache import cached_section
from longcat_sim.report.results import determinism_input, sdc_input
from longcat_sim.reports.inputs import check_determinism, check_sdc
from longcat_sim.runs import json_safe

# a command line (its name first) -> the command's results
Runner = Callable[[Sequence[str]], dict[str, Any]]

# Two fresh interpreters (about 3 s each on two cores) of two training steps.
QUICK_DETERMINISM = (
    "determinism", "--model", "tiny", "--runs", "2", "--steps", "2",
    "--byte-budget", "65536", "--workers", "2", "--no-progress",
)  # fmt: skip
# One flip per (site, bit): a low and a high mantissa bit, the lowest exponent bit, the
# highest exponent bit and the sign of a float32; few clean steps and attribution events,
# one round of the guard's overhead.
QUICK_SDC = (
    "sdc", "--model", "tiny", "--sites", "all", "--bits", "0,20,23,30,31", "--trials", "1",
    "--clean-runs", "10", "--attribution-events", "3", "--overhead-rounds", "1", "--seed", "0",
    "--threads", "1",
)  # fmt: skip
QUICK = {"determinism": QUICK_DETERMINISM, "sdc": QUICK_SDC}
# the full-size runs of the README
FULL = {
    "determinism": "longcat-sim determinism --model tiny --steps 10 --runs 20 --threads 1,2 "
    "--run-dir runs/determinism-full",
    "sdc": "longcat-sim sdc --model tiny --sites all --bits all --trials 4 --run-dir runs/sdc-full",
}
_ADAPT: dict[str, tuple[Callable[[Any], Any], Callable[[Any, str], None]]] = {
    "determinism": (determinism_input, check_determinism),
    "sdc": (sdc_input, check_sdc),
}
_PACKAGES = ("torch", "numpy")


def command_line(argv: Sequence[str]) -> str:
    return " ".join(("longcat-sim", *argv))


def repro_fingerprint() -> str:
    """SHA-256 of the sources the quick runs execute: the reproducibility harness, the model,
    the trainer, the two commands and the report's own code."""
    package = Path(__file__).resolve().parents[1]
    files = sorted((package / "repro").glob("*.py"))
    files += sorted((package / "model").rglob("*.py"))
    files += sorted((package / "train").glob("*.py"))
    files += [package / "commands" / f"{name}.py" for name in QUICK]
    files += sorted(Path(__file__).parent.glob("*.py"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(package)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def environment() -> dict[str, Any]:
    """What the runs' bits depend on besides the code: library versions and the machine."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "packages": versions,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def _timed(runner: Runner, argv: Sequence[str]) -> dict[str, Any]:
    start = time.perf_counter()
    results = json_safe(runner(argv))
    return {"argv": list(argv), "results": results, "seconds": time.perf_counter() - start}


@dataclass(frozen=True)
class Quick:
    """One quick run for the page: its result in the report's shape (None when it failed), where
    it came from (``reports.inputs`` PROVENANCE), whether the cache gave it and the warning
    to print when it failed."""

    result: dict[str, Any] | None
    origin: dict[str, Any]
    cached: bool = False
    warning: str | None = None


def quick_run(name: str, runner: Runner, cache_dir: Path, code: str) -> Quick:
    """The quick ``name`` run ("determinism" or "sdc"), from the cache or run now. A failure
    (the command refusing its settings, or raising) leaves the section a note, not the whole
    report; a failed run is not cached."""
    argv = QUICK[name]
    origin: dict[str, Any] = {"command": command_line(argv), "full_command": FULL[name]}
    inputs = {"argv": list(argv), "environment": environment()}
    adapt, check = _ADAPT[name]
    try:
        section, hit = cached_section(cache_dir, name, inputs, lambda: _timed(runner, argv), code)
        result = adapt(section["results"])
        check(result, f"the quick {name} run")
    except Exception as exc:  # shown on the page and on stderr
        error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        warning = f"the report's quick {name} run failed ({error}); its section says so"
        return Quick(None, {**origin, "source": "failed", "failure": error}, warning=warning)
    origin |= {"source": "report", "seconds": section.get("seconds")}
    return Quick(result, origin, cached=hit)


def skipped(name: str) -> dict[str, Any]:
    """The provenance of a quick run left out (``--no-repro``)."""
    return {"source": "skipped", "command": command_line(QUICK[name]), "full_command": FULL[name]}


def given(path: Path) -> dict[str, Any]:
    """The provenance of a result read from a run directory or file."""
    return {"source": "run", "path": str(path)}
