"""Command-line options derived from config fields: the config class is the command line.

A thin layer of our own over argparse and dataclasses rather than a library (simple-parsing,
tyro, jsonargparse): the project's command line keeps argparse's one-line usage errors with
exit code 2 (``cli._Parser``), several commands share one parser per mode, and a field's
validator must run once, at config construction, with the same message whatever the source
(flag, TOML key or JSON key). Each option is ``--field-name``; its help is the field's help,
unit and default; it defaults to None so a config built from arguments knows what was given.
A boolean field is a switch, ``--field-name`` / ``--no-field-name``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from longcat_sim.config.fields import flag

__all__ = ["add_config_flags", "given", "list_of", "set_values"]


def _label(cls: type) -> str:
    return cls.__name__.removesuffix("Deployment").removesuffix("Config").lower()


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, tuple | list):
        return ",".join(_shown(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _help(field: dataclasses.Field, owners: list[type], defaults: Mapping[str, Any]) -> str:
    meta = field.metadata
    unit = f" [{meta['unit']}]" if meta.get("unit") else ""
    shown = {_label(c): _shown(_field(c, field.name).default) for c in owners}
    if field.name in defaults:
        default = _shown(defaults[field.name])
    elif len(set(shown.values())) == 1:
        default = next(iter(shown.values()))
    else:
        default = "; ".join(f"{label} {value}" for label, value in shown.items())
    limit = f"; {meta['limit']}" if meta.get("limit") else ""
    return f"{meta['help']}{unit} (default {default}){limit}"


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def list_of(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """An argparse type: a comma-separated list of ``kind`` values."""

    def parse(text: str) -> list[Any]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError("needs at least one value")
        try:
            return [kind(item) for item in items]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"takes {kind.__name__} values, got {text!r}"
            ) from None

    parse.__name__ = f"list of {kind.__name__}"
    return parse


def add_config_flags(
    parser: argparse.ArgumentParser,
    *classes: type,
    as_lists: bool = False,
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """One option per field of ``classes`` (a field they share appears once, in ``parser``;
    a field of one class only goes into that class's argument group). ``as_lists``: every
    option takes a comma-separated list; ``defaults`` replaces a field's default in the help
    (for commands that apply their own)."""
    owners: dict[str, list[type]] = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            owners.setdefault(f.name, []).append(cls)
    groups = {
        cls: parser.add_argument_group(_label(cls)) if len(classes) > 1 else parser
        for cls in classes
    }
    for name, owned_by in owners.items():
        field = _field(owned_by[0], name)
        kind = field.metadata["kind"]
        target = parser if len(owned_by) == len(classes) else groups[owned_by[0]]
        listed = as_lists or isinstance(field.default, tuple)
        text = _help(field, owned_by, defaults or {})
        if kind is bool and not listed:  # a switch: --name / --no-name
            target.add_argument(
                flag(name), dest=name, action=argparse.BooleanOptionalAction, help=text
            )
            continue
        target.add_argument(
            flag(name),
            dest=name,
            type=list_of(kind) if listed else kind,
            default=None,
            metavar="A,B,..." if listed else None,
            help=text,
        )


def given_options(
    build: Callable[[], argparse.ArgumentParser], argv: Sequence[str]
) -> frozenset[str]:
    """The destinations of the options ``argv`` sets itself, defaults aside (``argv`` has
    parsed already): a fresh parser from ``build``, every default suppressed, sub-commands'
    too, parses it again."""
    parser = build()
    parsers = [parser]
    while parsers:
        for action in parsers.pop()._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            else:
                action.default = argparse.SUPPRESS
    return frozenset(vars(parser.parse_args(list(argv))))


def given(args: argparse.Namespace, names: list[str] | tuple[str, ...]) -> list[str]:
    """The fields among ``names`` set on the command line."""
    return [n for n in names if getattr(args, n, None) is not None]


def set_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The values of ``cls``'s fields that were given on the command line."""
    return {n: getattr(args, n) for n in given(args, [f.name for f in dataclasses.fields(cls)])}


def add_assume_option(parser: argparse.ArgumentParser, *, unset_is_none: bool = False) -> None:
    """``--assume TERM=VALUE`` (repeatable): overrides of the assumption set's terms, collected
    in a list (``unset_is_none``: None when never given)."""
    parser.add_argument(
        "--assume",
        action="append",
        default=None if unset_is_none else [],
        metavar="TERM=VALUE",
        help="override one term of the assumption set, e.g. routing=balanced (repeatable); "
        "fractions of peak lie in (0, 1], context_cv and expert_popularity_sigma in [0, 10], "
        "the *_s overheads in [0, 1] seconds",
    )
