"""Run directories: atomic file writes and the manifest that ties results to their inputs."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from longcat_sim.config.hashing import config_hash
from longcat_sim.model.files import (
    dumps_json,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

__all__ = [
    "build_manifest",
    "config_hash",
    "dumps_json",
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
