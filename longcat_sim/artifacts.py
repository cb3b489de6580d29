"""Run directories: atomic file writes and the manifest that ties results to their inputs."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

_TRACKED_PACKAGES = ("longcat-sim", "torch", "simpy", "numpy", "scipy", "plotly", "safetensors")


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename, so a crash loses nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """Canonical JSON: sorted keys, two-space indent, trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, dumps_json(obj))


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


def write_run(
    out_dir: str | Path,
    manifest: dict[str, Any],
    results: dict[str, Any],
) -> Path:
    """Write ``manifest.json`` and ``results.json`` into ``out_dir`` atomically."""
    out = Path(out_dir)
    write_json_atomic(out / "manifest.json", manifest)
    write_json_atomic(out / "results.json", results)
    return out
