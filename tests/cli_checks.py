"""The command line's contract on bad input, checked the same way for every command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from longcat_sim.cli import main


def refused(argv: list[str], capsys, run_dir: Path | str) -> str:
    """Run a command that must refuse its input: exit code 2, nothing on stdout, one stderr
    line starting ``longcat-sim: error:``, no traceback and no run directory. Returns the
    line."""
    code = main([*argv, "--json", "--run-dir", str(run_dir)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "", err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("longcat-sim: error:"), err
    assert "Traceback" not in err
    assert not Path(run_dir).exists()
    return lines[0]


def refused_in_a_process(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """The same contract through ``python -m longcat_sim`` in a fresh process; returns the
    stderr line."""
    proc = subprocess.run(
        [sys.executable, "-m", "longcat_sim", *argv, "--json"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("longcat-sim: error:") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr
    return proc.stderr
