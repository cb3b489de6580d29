"""The one config hash: SHA-256 of a config's canonical JSON (sorted keys, no spaces)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def config_hash(*parts: Any) -> str:
    """Hex SHA-256 over the canonical JSON of ``parts``; equal configs hash equal."""
    blob = canonical_json(parts[0] if len(parts) == 1 else list(parts))
    return hashlib.sha256(blob.encode()).hexdigest()
