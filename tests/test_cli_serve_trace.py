"""``longcat-sim serve --trace-out``: writes a Perfetto trace, refuses a missing folder."""

from __future__ import annotations

import json

from longcat_sim.cli import main


def test_serve_writes_a_trace(tmp_path, capsys) -> None:
    out = tmp_path / "t.json"
    argv = ["serve", "--duration-s", "5", "--rate", "5", "--gpus", "32", "--trace-out", str(out),
            "--run-dir", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 0
    trace = json.loads(out.read_text())
    assert trace["metadata"]["layout"] == "colocated"
    assert any(e["ph"] == "X" for e in trace["traceEvents"])
    assert "trace written to" in capsys.readouterr().out


def test_serve_trace_into_a_missing_folder_is_refused(tmp_path, capsys) -> None:
    out = tmp_path / "missing" / "t.json"
    argv = ["serve", "--duration-s", "5", "--rate", "5", "--gpus", "32", "--trace-out", str(out),
            "--run-dir", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 2
    assert "--trace-out" in capsys.readouterr().err
    assert not out.exists()
