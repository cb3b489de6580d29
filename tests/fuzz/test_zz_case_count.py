"""Runs last in the fuzz folder: the suite ran at least ``MIN_CASES`` cases for real (not
counting those stopped at a stub of long work), when all of its generating tests ran in this
session."""

from __future__ import annotations

import pytest

from tests.fuzz import test_checkpoint_fuzz, test_cli_fuzz, test_toml_fuzz, test_trace_fuzz
from tests.fuzz.conftest import MIN_CASES
from tests.fuzz.harness import CASES


def _generators() -> set[str]:
    names = set()
    for module in (test_cli_fuzz, test_toml_fuzz, test_trace_fuzz, test_checkpoint_fuzz):
        for name, fn in vars(module).items():
            if name.startswith("test_") and getattr(fn, "is_hypothesis_test", False):
                names.add(name)
    return names


def test_at_least_min_cases(request) -> None:
    ran = {item.name for item in request.session.items}
    missing = _generators() - ran
    if missing:
        pytest.skip(f"only part of the fuzz suite ran ({len(missing)} generating tests left out)")
    assert CASES["run"] - CASES["accepted"] >= MIN_CASES, CASES  # run for real, not stubbed
