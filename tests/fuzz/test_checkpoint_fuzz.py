"""Damaged checkpoints: one file of a tiny run's newest checkpoint (or of a sharded copy of
its weights) truncated, flipped, emptied, replaced or removed, then read by ``train --resume``,
``train --resume latest-valid``, ``train --grow-from`` and ``load_pretrained``.

Beyond the command line's contract, :func:`damage_problems` holds each mode to what the damage
allows: a changed file that the marker records a digest for (or a marker that no longer reads
as the one written) is refused by ``--resume`` and ``--grow-from`` in one line naming it, and
skipped, with a warning, by ``--resume latest-valid``, which carries on from the older
checkpoint; ``load_pretrained`` refuses weights whose tensor data changed, and a config or
shard index that no longer reads as written, naming the file.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longcat_sim.cli import PROG
from longcat_sim.errors import UserError
from longcat_sim.model.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    load_pretrained,
    save_pretrained,
)
from longcat_sim.model.config import ConfigError
from longcat_sim.train import checkpoint as ckpt
from longcat_sim.train.checkpoint import MARKER_NAME, STATE_NAME, checkpoint_dirs
from tests.fuzz.conftest import BYTE_BUDGET, FUZZ
from tests.fuzz.harness import Outcome, check, run_case

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
                *SHAPE, "--steps", "3", "--set", "warmup_steps=1", *common]  # fmt: skip
    resume = ["--resume"] if mode == "resume" else ["--resume", "latest-valid"]
    return ["train", "--run-dir", str(run), *resume, *common]


def _bytes(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


_UNREADABLE = object()


def _parsed(data: bytes | None) -> object:
    """A JSON file's value, or a marker that it does not read."""
    try:
        return json.loads(data.decode("utf-8")) if data is not None else _UNREADABLE
    except (UnicodeDecodeError, ValueError):
        return _UNREADABLE


def _tensor_data_changed(before: bytes, after: bytes | None) -> bool:
    """Whether a safetensors file's tensor data (after its 8-byte length and JSON header)
    changed, was cut short or is gone."""
    if after is None or len(after) != len(before):
        return True
    start = 8 + int.from_bytes(before[:8], "little")
    return after[start:] != before[start:]


def refusal_due(mode: str, victim: str, before: bytes, after: bytes | None, recorded) -> bool:
    """Whether ``mode`` must refuse, naming ``victim``, once its bytes went from ``before`` to
    ``after``; ``recorded``: the names the newest checkpoint's marker has digests for."""
    if after == before:
        return False
    if mode in ("resume", "grow-from", "latest-valid"):
        if victim in recorded:
            return True
        # a marker that is gone hides its checkpoint (a crash before the marker was written)
        return victim == MARKER_NAME and after is not None and _parsed(after) != _parsed(before)
    if victim.endswith(".safetensors"):
        return _tensor_data_changed(before, after)
    if victim in (CONFIG_NAME, INDEX_NAME):
        return _parsed(after) != _parsed(before)
    return False


def damage_problems(out: Outcome, mode: str, victim: str, newest: str, due: bool) -> list[str]:
    """How ``out`` falls short of what the damage allows (see the module docstring)."""
    if not due or out.problems or out.accepted:
        return []
    if mode == "latest-valid":
        if out.code != 0 or "skipped: checkpoint" not in out.stderr or newest not in out.stderr:
            return [f"exit {out.code}: {victim} damaged, but {newest} was not skipped"]
        return []
    line = out.stderr.strip()
    if out.code != 2:
        return [f"exit {out.code}: {victim} was damaged and the damage went unnoticed"]
    if victim not in line:
        return [f"the refusal does not name the damaged {victim}: {line!r}"]
    return []


def damage_case(trained, sandbox, data_cache, sharded, victim, shard_victim, how, mode,
                counted: bool = True) -> Outcome:  # fmt: skip
    """Damage a copy of ``trained`` (or of its sharded weights), read it in ``mode``; the
    outcome's problems include :func:`damage_problems`."""
    copy = sandbox / "damaged" / f"case-{next(_serial)}"
    if sharded and mode == "load":
        shutil.copytree(sandbox / "sharded", copy)
        folder, victim, recorded = copy, shard_victim, set()
    else:
        shutil.copytree(trained, copy)
        folder = checkpoint_dirs(copy)[-1]
        recorded = set(json.loads((folder / MARKER_NAME).read_text())["files"])
    target = copy / victim if victim == "metrics.jsonl" else folder / victim
    before = _bytes(target)
    damage(target, how)
    due = refusal_due(mode, victim, before, _bytes(target), recorded)
    if mode == "load":
        out = run_case(["load_pretrained", str(folder)], command=load_as_command(folder),
                       counted=counted)  # fmt: skip
    else:
        # a run directory copied whole: its lock records another owner; the copy has none
        with contextlib.suppress(FileNotFoundError):
            (copy / ".lock").unlink()
        out = run_case(_argv(mode, copy, data_cache, sandbox), counted=counted)
    out.problems += damage_problems(out, mode, victim, folder.name, due)
    return out


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
    check(damage_case(trained, sandbox, data_cache, sharded, victim, shard_victim, how, mode))


# a newline cut from config.json: the same JSON, other bytes, so only the digest notices
QUIET_DAMAGE = dict(sharded=False, victim=CONFIG_NAME, shard_victim=INDEX_NAME, how="truncate-1")


def test_the_quiet_damage_is_refused(trained, sandbox, data_cache) -> None:
    out = damage_case(trained, sandbox, data_cache, **QUIET_DAMAGE, mode="resume", counted=False)
    assert out.code == 2 and out.problems == [], (out.problems, out.stderr)


def test_damage_past_a_bypassed_verifier_is_flagged(trained, sandbox, data_cache, monkeypatch):
    """Negative control: with the digest checks turned off, the quiet damage resumes (exit 0)
    and :func:`damage_problems` flags it."""
    monkeypatch.setattr(ckpt, "verify_checkpoint", lambda path: ckpt.read_marker(Path(path)))
    monkeypatch.setattr("longcat_sim.commands.train.verify_checkpoint", ckpt.verify_checkpoint)
    out = damage_case(trained, sandbox, data_cache, **QUIET_DAMAGE, mode="resume", counted=False)
    assert out.code == 0 and any("went unnoticed" in p for p in out.problems), out.problems
