"""A rank of ``train --nproc N`` (or of any :func:`distributed.launch`) that refuses its input
is one line and exit code 2, like the same error in one process; a bug in a rank keeps its
traceback. ``--grow-from`` is checked before any rank starts."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest

from longcat_sim.errors import UserError
from longcat_sim.train import distributed
from longcat_sim.train.checkpoint import MARKER_NAME, STATE_NAME
from tests.cli_checks import refused

TRAIN = ["train", "--model", "tiny", "--nproc", "2", "--steps", "4"]


def _refuse_on_rank_1(rank: int, world: int) -> int:
    if rank == 1:
        raise UserError("no such setting 'x'; see --help")
    return rank


def _crash(rank: int, world: int) -> int:
    raise ZeroDivisionError("a bug")


def test_a_rank_refusing_its_input_is_one_line() -> None:
    with pytest.raises(UserError) as caught:
        distributed.launch(_refuse_on_rank_1, 2)
    assert str(caught.value) == "rank 1: no such setting 'x'; see --help"


def _disk_full(rank: int, world: int) -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/metrics.jsonl")


def test_a_full_disk_in_a_rank_is_one_line() -> None:
    with pytest.raises(UserError) as caught:
        distributed.launch(_disk_full, 1)
    assert str(caught.value) == (
        "rank 0: cannot read or write '/runs/x/metrics.jsonl': No space left on device; "
        "check the path and free space"
    )


def test_a_bug_in_a_rank_keeps_its_traceback() -> None:
    """Negative control: an unexpected exception is not made into bad input."""
    with pytest.raises(RuntimeError, match="rank 0 of 1 failed:\n") as caught:
        distributed.launch(_crash, 1)
    assert "Traceback" in str(caught.value) and "ZeroDivisionError: a bug" in str(caught.value)


def test_grow_from_a_missing_folder_is_refused_before_any_rank(tmp_path, capsys) -> None:
    start = time.perf_counter()
    line = refused([*TRAIN, "--grow-from", str(tmp_path / "missing")], capsys, tmp_path / "run")
    assert "holds no complete checkpoint" in line
    assert time.perf_counter() - start < 5.0  # no rank was started (each imports torch)


def _damaged_checkpoint(folder: Path) -> Path:
    """A complete checkpoint whose trainer state does not match the digest its marker records."""
    folder.mkdir(parents=True)
    (folder / STATE_NAME).write_bytes(b"not a trainer state")
    marker = {"step": 2, "param_hash": "0" * 64, "files": {STATE_NAME: "0" * 64}}
    (folder / MARKER_NAME).write_text(json.dumps(marker))
    return folder


def test_grow_from_a_damaged_checkpoint_is_refused_before_any_rank(tmp_path, capsys) -> None:
    checkpoint = _damaged_checkpoint(tmp_path / "small" / "checkpoints" / "step-00000002")
    start = time.perf_counter()
    line = refused([*TRAIN, "--grow-from", str(checkpoint)], capsys, tmp_path / "run")
    assert "is damaged: trainer_state.pt does not match the SHA-256" in line
    assert time.perf_counter() - start < 5.0
