"""What every experiment returns to the command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CommandOutput:
    """``results`` is printed by ``--json`` and saved as results.json; ``text`` is for people;
    each of ``warnings`` is printed on stderr as one ``warning: ...`` line, also under
    ``--json``."""

    results: dict[str, Any]
    text: str
    config: dict[str, Any]
    config_hash: str
    seeds: dict[str, int] = field(default_factory=dict)
    device: str = "cpu"
    warnings: tuple[str, ...] = ()
