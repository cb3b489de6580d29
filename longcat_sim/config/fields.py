"""Config fields that carry their help text, unit and validator once, as dataclass metadata.

A config class declares ``name: int = setting(96, "requests per GPU", check=integer(1))``;
:func:`validate` runs every field's check and raises the owner's one-line error, and
``config.flags`` turns the same fields into command-line options.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = [
    "Check",
    "choice",
    "flag",
    "integer",
    "known",
    "name",
    "names",
    "number",
    "optional",
    "pick",
    "setting",
    "validate",
]


@dataclass(frozen=True)
class Check:
    """A field validator: ``test(value)`` holds for a valid value; ``rule`` says what valid is;
    ``maximum``, when set, is a stated upper limit named on its own in the complaint."""

    rule: str
    test: Callable[[Any], bool]
    maximum: int | None = None

    def problem(self, label: str, value: Any) -> str | None:
        """The one-line complaint about ``value``, or None when it is valid."""
        if self.test(value):
            return None
        if self.maximum is not None and _is_int(value) and value > self.maximum:
            return f"{label} must be at most {self.maximum:,}, got {value}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{label} {self.rule}, got {value!r} (not a finite number)"
        return f"{label} {self.rule}, got {value!r}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def integer(minimum: int = 1, maximum: int | None = None) -> Check:
    """An integer >= ``minimum`` (and <= ``maximum`` when given)."""
    top = math.inf if maximum is None else maximum
    return Check(
        f"must be an integer >= {minimum}",
        lambda v: _is_int(v) and minimum <= v <= top,
        maximum=maximum,
    )


def number(minimum: float = 0.0, maximum: float = math.inf, *, open_low: bool = False) -> Check:
    """A finite number in [minimum, maximum] (``open_low``: above ``minimum``)."""
    if open_low and maximum == math.inf:
        rule = "must be positive" if minimum == 0 else f"must be a number > {minimum:g}"
    elif maximum == math.inf:
        rule = f"must be a number >= {minimum:g}"
    else:
        rule = f"must lie in {'(' if open_low else '['}{minimum:g}, {maximum:g}]"

    def test(v: Any) -> bool:
        if not _is_number(v):
            return False
        return (v > minimum if open_low else v >= minimum) and v <= maximum

    return Check(rule, test)


def choice(*options: str) -> Check:
    return Check(f"must be one of {', '.join(options)}", lambda v: v in options)


def name() -> Check:
    return Check("must be a non-empty string", lambda v: isinstance(v, str) and bool(v))


def names(item: Check) -> Check:
    """A non-empty sequence of distinct values that each pass ``item``."""
    return Check(
        f"must be a non-empty list of distinct values, each {item.rule.removeprefix('must be ')}",
        lambda v: (
            isinstance(v, tuple | list)
            and bool(v)
            and len(set(v)) == len(v)
            and all(item.test(x) for x in v)
        ),
    )


def optional(check: Check) -> Check:
    return Check(
        f"{check.rule} (or unset)", lambda v: v is None or check.test(v), maximum=check.maximum
    )


def setting(
    default: Any,
    help: str,
    *,
    unit: str = "",
    check: Check | None = None,
    kind: type | None = None,
    limit: str = "",
) -> Any:
    """A dataclass field with its help text, unit and validator; ``kind`` parses a flag's text
    (default: the type of ``default``); ``limit`` states an upper limit in the help."""
    meta = {"help": help, "unit": unit, "check": check, "kind": kind or type(default)}
    meta["limit"] = limit
    if isinstance(default, list | dict | set):
        raise TypeError("mutable defaults: use a tuple")
    return dataclasses.field(default=default, metadata=meta)


def validate(
    obj: Any,
    label: Callable[[str], str],
    error: type[Exception],
    checks: Mapping[str, Check] | None = None,
) -> None:
    """Raise ``error`` for the first field whose check fails (the fields' own metadata, or
    ``checks`` by field name for classes that keep plain fields)."""
    for f in dataclasses.fields(obj):
        check = checks.get(f.name) if checks is not None else f.metadata.get("check")
        if check is not None and (message := check.problem(label(f.name), getattr(obj, f.name))):
            raise error(message)


def flag(field_name: str) -> str:
    """The command-line option of a field: ``batch_per_device`` -> ``--batch-per-device``."""
    return "--" + field_name.replace("_", "-")


def known(options: Collection[str], key: str, what: str, error: type[Exception]) -> None:
    """Raise ``error`` naming the ``what`` and the options to choose from unless ``key`` is
    one of ``options``."""
    if key not in options:
        raise error(f"unknown {what} {key!r}; choose one of {', '.join(sorted(options))}")


def pick(table: Mapping[str, T], key: str, what: str, error: type[Exception]) -> T:
    """``table[key]``, or ``error`` naming the ``what`` and the keys to choose from."""
    known(table, key, what, error)
    return table[key]
