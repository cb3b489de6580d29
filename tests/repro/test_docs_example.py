"""docs/examples/own_model.py runs as documented (so the example cannot rot)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "own_model.py"


def test_the_own_model_example_runs_and_reports_each_check() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("thread invariance 1 vs 2 holds")
    assert "negative control: up" in lines
    assert any(line.startswith("rerun determinism holds") for line in lines)
    assert sum('"detector": "replay"' in line for line in lines) == 4
