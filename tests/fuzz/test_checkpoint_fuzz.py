"""Damaged checkpoints: one file of a tiny run's newest checkpoint (or of a sharded copy of
its weights) truncated, flipped, emptied, replaced or removed, then read by ``train --resume``,
``train --resume latest-valid``, ``train --grow-from`` and ``load_pretrained``. Each refuses in
one line or, where an intact checkpoint remains and the mode allows it, carries on."""

from __future__ import annotations

import contextlib
import itertools
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longcat_sim.cli import PROG
from longcat_sim.errors import UserError
from longcat_sim.model.checkpoint import INDEX_NAME, load_pretrained, save_pretrained
from longcat_sim.model.config import ConfigError
from longcat_sim.train.checkpoint import MARKER_NAME, STATE_NAME, checkpoint_dirs
from tests.fuzz.conftest import BYTE_BUDGET, FUZZ
from tests.fuzz.harness import check, run_case

SHAPE = ["--batch-size", "2", "--seq-len", "16", "--byte-budget", str(BYTE_BUDGET)]
VICTIMS = ["model.safetensors", "config.json", STATE_NAME, MARKER_NAME, "metrics.jsonl"]
SHARD_VICTIMS = [INDEX_NAME, "model-00001-of-00002.safetensors", "config.json"]
DAMAGE = ["truncate-0", "truncate-half", "truncate-1", "flip-start", "flip-middle", "flip-end",
          "garbage", "empty-list", "null", "object", "missing", "folder", "not-utf8"]  # fmt: skip
MODES = ["resume", "latest-valid", "grow-from", "load"]
_serial = itertools.count()


@pytest.fixture(scope="module")
def trained(sandbox, data_cache) -> Path:
    """A one-layer tiny run stopped after step 2 of 3, with checkpoints at steps 1 and 2, and
    ``sharded``: its newest weights saved again as two shards with an index."""
    run = sandbox / "trained"
    argv = [
        "train", "--model", "tiny", "--run-dir", str(run), "--data-cache", str(data_cache),
        *SHAPE, "--steps", "3", "--stop-after", "2", "--set", "checkpoint_every=1",
        "--set", "warmup_steps=1", "--set", "model.num_layers=1", "--json",
    ]  # fmt: skip
    out = run_case(argv, timeout_s=120)
    assert out.code == 0 and not out.problems, out.stderr
    newest = checkpoint_dirs(run)[-1]
    save_pretrained(load_pretrained(newest), sandbox / "sharded", max_shard_bytes=2**19)
    return run


def damage(path: Path, how: str) -> None:
    """Damage ``path`` (a file) in one of the ``DAMAGE`` ways."""
    data = path.read_bytes() if path.is_file() else b""
    replacement = {
        "truncate-0": b"", "truncate-half": data[: len(data) // 2], "truncate-1": data[:-1],
        "garbage": b"\x8f garbage \x00\x01" * 64, "empty-list": b"[]", "null": b"null",
        "object": b"{}", "not-utf8": b'{"step": "\xff\xfe"}',
    }  # fmt: skip
    if how in replacement:
        path.write_bytes(replacement[how])
    elif how.startswith("flip-"):
        at = {"flip-start": 0, "flip-middle": len(data) // 2, "flip-end": max(0, len(data) - 64)}
        start = at[how]
        flipped = bytes(b ^ 0xFF for b in data[start : start + 64])
        path.write_bytes(data[:start] + flipped + data[start + 64 :])
    else:
        path.unlink(missing_ok=True)
        if how == "folder":
            path.mkdir()


def load_as_command(folder: Path):
    """``load_pretrained(folder)`` as a command for ``run_case``: 0 when it loads, 2 with one
    ``longcat-sim: error:`` line when it refuses with the project's error types."""

    def command(argv: list[str]) -> int:
        try:
            load_pretrained(folder)
        except (UserError, ConfigError) as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
        return 0

    return command


def _argv(mode: str, run: Path, data_cache: Path, sandbox: Path) -> list[str]:
    common = ["--data-cache", str(data_cache), "--json"]
    if mode == "grow-from":
        fresh = sandbox / "runs" / f"grown-{next(_serial)}"
        return ["train", "--model", "tiny", "--grow-from", str(run), "--run-dir", str(fresh),
                *SHAPE, "--steps", "1", "--set", "warmup_steps=1", *common]  # fmt: skip
    resume = ["--resume"] if mode == "resume" else ["--resume", "latest-valid"]
    return ["train", "--run-dir", str(run), *resume, *common]


@settings(FUZZ, max_examples=120)
@given(
    sharded=st.booleans(),
    victim=st.sampled_from(VICTIMS),
    shard_victim=st.sampled_from(SHARD_VICTIMS),
    how=st.sampled_from(DAMAGE),
    mode=st.sampled_from(MODES),
)
def test_damaged_checkpoint(
    trained, sandbox, data_cache, sharded, victim, shard_victim, how, mode
) -> None:
    copy = sandbox / "damaged" / f"case-{next(_serial)}"
    if sharded and mode == "load":
        shutil.copytree(sandbox / "sharded", copy)
        damage(copy / shard_victim, how)
        check(run_case(["load_pretrained", str(copy)], command=load_as_command(copy)))
        return
    shutil.copytree(trained, copy)
    newest = checkpoint_dirs(copy)[-1]
    damage(copy / victim if victim == "metrics.jsonl" else newest / victim, how)
    if mode == "load":
        out = run_case(["load_pretrained", str(newest)], command=load_as_command(newest))
    else:
        # a run directory copied whole: its lock records another owner; the copy has none
        with contextlib.suppress(FileNotFoundError):
            (copy / ".lock").unlink()
        out = run_case(_argv(mode, copy, data_cache, sandbox))
    check(out)
