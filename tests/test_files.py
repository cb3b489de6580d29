"""Atomic writes: whole files or nothing, with the mode an ordinary ``open()`` gives."""

from __future__ import annotations

import os
import stat

import pytest

from longcat_sim.model.files import write_bytes_atomic, write_json_atomic


def test_written_files_get_the_umask_mode(tmp_path) -> None:
    previous = os.umask(0o022)
    try:
        path = write_json_atomic(tmp_path / "sub" / "results.json", {"b": 1, "a": [1, 2]})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path) -> None:
    path = write_bytes_atomic(tmp_path / "f.bin", b"old")
    with pytest.raises(ValueError):
        write_json_atomic(path, {"x": float("nan")})  # canonical JSON refuses NaN
    with pytest.raises(TypeError):
        write_bytes_atomic(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
