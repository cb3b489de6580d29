"""The one TOML reader: every config file of the project goes through :func:`read_toml`."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from longcat_sim.errors import UserError


def read_toml(
    path: str | Path,
    *,
    what: str,
    table: str | None = None,
    only_table: bool = False,
    error: type[Exception] = UserError,
) -> dict[str, Any]:
    """The ``[table]`` of a TOML file (its top level when the file has no such table, or
    ``table`` is None); ``only_table`` refuses other top-level keys. Errors name ``what``
    (e.g. ``"model file 'x.toml'"``) in one line of ``error``."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} does not exist")
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise error(f"{what} is not valid TOML: {exc}") from None
    if table is None:
        return doc
    extra = sorted(set(doc) - {table})
    if only_table and extra:
        raise error(f"{what}: unknown table or key {extra[0]!r}; put settings under [{table}]")
    body = doc.get(table, {} if only_table else doc)
    if not isinstance(body, dict):
        raise error(f"{what}: [{table}] must be a table")
    return dict(body)
