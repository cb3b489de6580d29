"""What every experiment returns to the command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from longcat_sim.runs import json_safe


@dataclass(frozen=True)
class CommandOutput:
    """``results`` is printed by ``--json`` and saved as results.json; ``text`` is for people;
    each of ``warnings`` is printed on stderr as one ``warning: ...`` line, also under
    ``--json``. NaN and infinite floats in ``results`` become null, listed under
    ``non_finite`` (``runs.json_safe``). ``exit_code`` is the process's exit status once the
    results are committed and printed: 0, or 1 for a check that found what it looks for (e.g.
    ``determinism``: runs differ)."""

    results: dict[str, Any]
    text: str
    config: dict[str, Any]
    config_hash: str
    seeds: dict[str, int] = field(default_factory=dict)
    device: str = "cpu"
    warnings: tuple[str, ...] = ()
    exit_code: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "results", json_safe(self.results))
