"""The report's simulation cache: a section's JSON keyed by the hash of its inputs and of the
simulator's source, so a second report with the same settings simulates nothing."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from longcat_sim import bridge, cluster, runs, scenarios
from longcat_sim.runs import dumps_json, json_safe, write_json_atomic

CACHE_DIR = "cache"
CACHE_FORMAT = "longcat-sim-report-cache-v1"


def code_fingerprint() -> str:
    """SHA-256 of the sources the simulations depend on; editing them invalidates the cache."""
    from longcat_sim.model import config as model_config
    from longcat_sim.model import costs as model_costs

    files = sorted(Path(cluster.__file__).parent.glob("*.py"))
    files += [Path(model_config.__file__), Path(model_costs.__file__)]
    files += sorted(Path(scenarios.__file__).parent.glob("*.py"))
    files += [Path(bridge.__file__), *sorted(Path(__file__).parent.glob("*.py"))]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def cached_section(
    cache_dir: Path, name: str, inputs: Any, compute: Callable[[], dict[str, Any]], code: str
) -> tuple[dict[str, Any], bool]:
    """(section, whether it came from the cache). The key hashes the section's inputs and the
    code fingerprint; a missing, unreadable or mismatched cache file is recomputed. NaN and
    infinities in a computed section are stored as null (``runs.json_safe``)."""
    key = runs.config_hash(
        {"format": CACHE_FORMAT, "section": name, "inputs": inputs, "code": code}
    )
    path = cache_dir / f"{name}-{key[:16]}.json"
    try:
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and doc.get("key") == key and isinstance(doc.get("result"), dict):
            return doc["result"], True
    except (OSError, ValueError):
        pass
    result = json.loads(dumps_json(json_safe(compute())))
    write_json_atomic(path, {"format": CACHE_FORMAT, "key": key, "section": name, "result": result})
    return result, False
