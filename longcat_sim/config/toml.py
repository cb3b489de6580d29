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
    try:
        exists = path.is_file()
    except (OSError, ValueError) as exc:  # a name too long, a NUL character
        raise error(f"{what} cannot be opened: {getattr(exc, 'strerror', None) or exc}") from None
    if not exists:
        raise error(f"{what} does not exist")
    try:
        doc = tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise error(
            f"{what} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise error(f"{what} cannot be read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
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
