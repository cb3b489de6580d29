"""Run directories: one writer at a time, atomic file writes, and the manifest that ties results
to their inputs, committed together with them.

A run directory is owned by the process that claims it (:func:`claim_run_dir`): an exclusive
``flock`` on ``.lock``, which records the owner's pid, host and command, and which the kernel
releases when the owner dies, so a crashed writer never leaves a stale lock. Claiming removes the
temporary files of writes a crash interrupted. :func:`write_run` commits ``manifest.json`` and
``results.json`` with ``commit.json`` written last, holding the SHA-256 of both; :func:`read_run`
refuses a directory whose files do not match it (a crash between the two writes, or two runs'
files side by side).

JSON has no NaN or infinity: :func:`json_safe` (applied to every ``results.json`` and to each
command's results) stores such a float as ``null`` and lists where, and what it was, under the
results' top-level ``non_finite`` key, e.g. ``{"summary.rate.abft": "nan", "losses[3]": "inf"}``
(dotted keys, ``[i]`` for list items; values ``"nan"``, ``"inf"`` or ``"-inf"``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from longcat_sim.config.hashing import config_hash
from longcat_sim.config.paths import check_output_dir
from longcat_sim.errors import UserError
from longcat_sim.model.files import (
    dumps_json,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

__all__ = [
    "build_manifest",
    "claim_run_dir",
    "config_hash",
    "dumps_json",
    "json_safe",
    "read_run",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_run",
    "write_text_atomic",
]

_TRACKED_PACKAGES = ("longcat-sim", "torch", "simpy", "numpy", "scipy", "plotly", "safetensors")


def default_run_dir(command: str, config_digest: str) -> Path:
    """Where a command writes without ``--run-dir``: ``runs/COMMAND/<first 12 of the hash>``."""
    return Path("runs") / command / config_digest[:12]


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def build_manifest(
    command: str,
    config: dict[str, Any],
    config_hash: str,
    seeds: dict[str, int] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """What a run needs to be reproduced: inputs, their hash, code revision and environment."""
    return {
        "command": command,
        "config": config,
        "config_hash": config_hash,
        "seeds": seeds or {},
        "git_revision": git_revision(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device,
    }


LOCK_NAME = ".lock"
COMMIT_NAME = "commit.json"
COMMITTED = ("manifest.json", "results.json")
# the temporary files of write_bytes_atomic (".NAME.XXXXXXXX.tmp", mkstemp's 8 random characters)
_STALE_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
LOCK_ATTEMPTS = 5  # a lock file removed between our open and flock: reopen and retry


@dataclass(frozen=True)
class _Claim:
    fd: int  # the open lock file, flock-ed
    created_dir: bool  # the claim created the run directory
    created_lock: bool  # ... or only its lock file


_claimed: dict[Path, _Claim] = {}


def _owner_text(path: Path) -> str:
    """Who holds the lock at ``path``, as its owner recorded it."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
        return (
            f"pid {owner['pid']} on host {owner['host']} "
            f"(longcat-sim {owner['command']}, since {owner['since']})"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _is_other_rank(command: str) -> bool:
    """A torchrun rank other than 0 of ``train``: rank 0 owns the run directory for all."""
    return command == "train" and os.environ.get("RANK", "0").strip() not in ("", "0")


def _lock(path: Path) -> int:
    """An open descriptor of ``path/.lock`` holding its exclusive flock; one line naming the
    owner when another process holds it."""
    lock = path / LOCK_NAME
    for _ in range(LOCK_ATTEMPTS):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # its owner removed the unused folder: make it again
            path.mkdir(parents=True, exist_ok=True)
            continue
        try:
            if _locked_current(fd, lock):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # its owner removed the file as we locked it: the lock is a new file
    raise UserError(f"run directory {str(path)!r}: its lock keeps changing; try again")


def _locked_current(fd: int, lock: Path) -> bool:
    """Take the flock on ``fd``; whether ``fd`` is still the file at ``lock``."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(
            f"run directory {str(lock.parent)!r} is in use by {_owner_text(lock)}; "
            "wait for it to finish or choose another --run-dir"
        ) from None
    try:
        held, current = os.fstat(fd), os.stat(lock)
    except FileNotFoundError:
        return False
    return (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino)


def _take(path: Path, command: str) -> int:
    """Prove ``path`` writable, lock it and record this process as its owner."""
    check_output_dir(path, "--run-dir")
    try:
        fd = _lock(path)
    except OSError as exc:
        raise UserError(f"--run-dir {str(path)!r}: cannot lock it: {exc.strerror or exc}") from None
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        os.fsync(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            (path / LOCK_NAME).unlink()  # ours, still locked: no other claimer trusts it
        os.close(fd)
        raise UserError(f"--run-dir {str(path)!r} is not writable: {exc.strerror or exc}") from None
    return fd


def claim_run_dir(run_dir: str | Path, command: str) -> Path:
    """Make this process the only writer of ``run_dir`` until it exits (idempotent): the
    directory is created and proven writable, its lock taken (a second writer gets one line
    naming the owner) and the temporary files of interrupted writes removed."""
    path = Path(run_dir)
    key = path.resolve()
    if key in _claimed or _is_other_rank(command):
        return path
    created_dir = not path.exists()
    created_lock = not (path / LOCK_NAME).exists()
    try:
        fd = _take(path, command)
    except UserError:
        if created_dir:  # refused before anything was written: leave no folder behind
            with contextlib.suppress(OSError):
                path.rmdir()  # only when empty: another claimer's lock stays
        raise
    _claimed[key] = _Claim(fd, created_dir, created_lock)
    remove_stale_temporaries(path)
    return path


def release_run_dir(run_dir: str | Path, *, unused: bool = False) -> None:
    """Give up the claim on ``run_dir`` (the lock file stays; it is free once unlocked). With
    ``unused`` (the command wrote nothing), what the claim created goes: the directory, when
    it holds nothing else, or else the lock file. Removal happens under the lock, and a claimer
    that locked the removed file retries on the new one."""
    claim = _claimed.pop(Path(run_dir).resolve(), None)
    if claim is None:
        return
    folder = Path(run_dir)
    try:
        if unused and claim.created_lock:
            (folder / LOCK_NAME).unlink()
            if claim.created_dir and not any(folder.iterdir()):
                folder.rmdir()
    except OSError:
        pass
    finally:
        os.close(claim.fd)


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files that interrupted atomic writes left in ``run_dir`` and its
    ``checkpoints`` folder (not deeper: a nested folder may be another run's)."""
    removed = []
    for folder in (run_dir, run_dir / "checkpoints"):
        for candidate in folder.glob(".*.tmp"):
            if candidate.is_file() and _STALE_TEMPORARY.match(candidate.name):
                candidate.unlink(missing_ok=True)
                removed.append(candidate)
    return removed


NON_FINITE_KEY = "non_finite"


def _finite(value: Any, path: str, found: dict[str, str]) -> Any:
    """``value`` with every NaN or infinite float replaced by None, recorded in ``found``."""
    if isinstance(value, float) and not math.isfinite(value):
        found[path or "."] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{path}.{k}" if path else str(k), found) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v, f"{path}[{i}]", found) for i, v in enumerate(value)]
    return value


def json_safe(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` with NaN and infinite floats as null, listed under ``non_finite`` (merged with
    an existing list); unchanged (the same object) when every float is finite."""
    found: dict[str, str] = {}
    safe = _finite(results, "", found)
    if not found:
        return results
    earlier = results.get(NON_FINITE_KEY)
    safe[NON_FINITE_KEY] = {**(earlier if isinstance(earlier, dict) else {}), **found}
    return safe


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_run(
    out_dir: str | Path,
    manifest: dict[str, Any],
    results: dict[str, Any],
) -> Path:
    """Commit ``manifest.json`` and ``results.json`` into ``out_dir``: the old commit marker is
    removed first and the new one, with both files' SHA-256, written last, so that a crash at
    any point leaves either a complete pair or a directory :func:`read_run` calls incomplete.
    NaN and infinite floats are stored as null and listed (:func:`json_safe`)."""
    out = Path(out_dir)
    texts = {
        "manifest.json": dumps_json(json_safe(manifest)),
        "results.json": dumps_json(json_safe(results)),
    }
    (out / COMMIT_NAME).unlink(missing_ok=True)
    for name, text in texts.items():
        write_text_atomic(out / name, text)
    marker = {name: _digest(text.encode()) for name, text in texts.items()}
    write_json_atomic(out / COMMIT_NAME, {"sha256": marker})
    return out


def read_run(run_dir: str | Path, flag: str = "run directory") -> tuple[dict, dict]:
    """``(manifest, results)`` of a committed run directory; one line for a directory whose
    files are missing, damaged or not the ones committed together."""
    path = Path(run_dir)
    where = f"{flag} {str(path)!r}"
    try:
        marker = json.loads((path / COMMIT_NAME).read_text(encoding="utf-8"))["sha256"]
        blobs = {name: (path / name).read_bytes() for name in COMMITTED}
    except FileNotFoundError as exc:
        raise UserError(
            f"{where}: {Path(exc.filename).name} is missing, so the run was not completed "
            "(interrupted, or still running); rerun the command into it"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{where}: {COMMIT_NAME} is damaged ({exc}); rerun the command") from None
    for name, blob in blobs.items():
        if not isinstance(marker, dict) or marker.get(name) != _digest(blob):
            raise UserError(
                f"{where}: {name} is not the one committed with the run (a crash between "
                "writes, or another run's file); rerun the command into the directory"
            )
    try:
        manifest, results = (json.loads(blobs[name].decode("utf-8")) for name in COMMITTED)
    except ValueError as exc:
        raise UserError(f"{where}: not valid JSON: {exc}") from None
    return manifest, results
