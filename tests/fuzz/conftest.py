"""The fuzz suite's settings profile, sandbox and case count.

``fuzz-ci`` is derandomized with no example database, so every run generates the same cases
(over 1,000 run for real, not stubbed; ``test_zz_case_count`` checks it when the whole suite
runs). It is applied to the fuzz tests through ``FUZZ`` rather than made the process-wide
default, which would change every other test's settings too. ``FUZZ_PROFILE=fuzz-dev``
draws fresh random cases of the same sizes instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings

from tests.fuzz.harness import CASES

_COMMON = dict(
    deadline=timedelta(seconds=30),
    # a failing case is reported as drawn: shrinking would rerun slow cases many times
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=False,
)
settings.register_profile("fuzz-ci", derandomize=True, database=None, **_COMMON)
settings.register_profile("fuzz-dev", database=None, **_COMMON)
FUZZ = settings.get_profile(os.environ.get("FUZZ_PROFILE", "fuzz-ci"))
MIN_CASES = 1000
BYTE_BUDGET = 2**18


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """The tiny model's tokenizer and tokens for the byte budget the fuzz pools use."""
    from longcat_sim.model.config import get_preset
    from longcat_sim.train.data import build_corpus_data

    folder = tmp_path_factory.mktemp("fuzz-data-cache")
    build_corpus_data(get_preset("tiny").vocab_size, 16, byte_budget=BYTE_BUDGET, cache_dir=folder)
    return folder


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, data_cache) -> Iterator[Path]:
    """A working directory (default run directories land there) and a home whose default data
    cache is the session's, for the module's cases."""
    root = tmp_path_factory.mktemp("fuzz-sandbox")
    home = root / "home"
    (home / ".cache").mkdir(parents=True)
    (home / ".cache" / "longcat-sim").symlink_to(data_cache)
    work = root / "work"
    work.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            mp.delenv(name, raising=False)
        mp.chdir(work)
        yield root


@pytest.fixture(scope="module")
def paths(sandbox) -> dict[str, Path]:
    """The path kinds of ``pools.PATH_KINDS``."""
    base = sandbox / "paths"
    base.mkdir()
    (base / "file.txt").write_text("not what any flag expects\n")
    (base / "empty").write_bytes(b"")
    (base / "dir").mkdir()
    (base / "garbage.toml").write_bytes(b"model = [\n\xff")
    (base / "folder.toml").mkdir()
    (base / "trace.csv").write_text("timestamp,input\n1,x\nnan,-3\n")
    (base / "trace.jsonl").write_text('{"timestamp": 0, "input_tokens": 1e308}\n[]\n')
    return {
        "missing": base / "missing",
        "file": base / "file.txt",
        "dir": base / "dir",
        "empty-file": base / "empty",
        "below-file": base / "file.txt" / "below",
        "long-name": base / ("x" * 300),
        "unicode": base / "é ü 💥",
        "toml-file": base / "garbage.toml",
        "toml-dir": base / "folder.toml",
        "csv-file": base / "trace.csv",
        "jsonl-file": base / "trace.jsonl",
    }


# seconds the fuzz tests took (setup, call and teardown, module fixtures included)
SPENT = {"seconds": 0.0}


def pytest_runtest_logreport(report) -> None:
    """Called for the reports of this folder's tests only (a conftest hook of the folder)."""
    SPENT["seconds"] += report.duration


def pytest_terminal_summary(terminalreporter) -> None:
    if CASES["run"]:
        stubbed = CASES["accepted"]
        ends = ", ".join(f"{k} {v}" for k, v in CASES.items() if k not in ("run", "accepted"))
        terminalreporter.write_line(
            f"fuzz: {CASES['run']} generated cases checked in {SPENT['seconds']:.1f} s: "
            f"{CASES['run'] - stubbed} run for real ({ends}), {stubbed} stubbed at the start "
            "of long work"
        )
