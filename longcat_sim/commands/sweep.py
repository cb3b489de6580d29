"""``longcat-sim sweep``: decode simulations over a grid of deployments, on every core.

The grid is the product of the list-valued options (or of a TOML file's ``[grid]`` table with
the same names, underscores for dashes; options given on the command line win). Points run in
a process pool of ``--workers`` processes (default: all cores) and come back in grid order, so
a sweep's results do not depend on the pool. Every point draws its sampled routing and
contexts from the same ``--seed``: differences between points come from the grid, not the draw.

The output is a table and, per model, the Pareto front of TPS per user against tokens per GPU
per second (both maximised), with the cost of each front point.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from longcat_sim.commands.base import CommandOutput
from longcat_sim.errors import UserError
from longcat_sim.scenarios.sweep import grid_setups, pareto_front, run_points

HELP = "decode simulations over a grid of deployments, with the TPS/user vs tokens/GPU/s front"

# grid axis -> (parser, default); every axis takes a comma-separated list
AXES: dict[str, tuple[Callable[[str], Any], list[Any]]] = {
    "models": (str, ["longcat-flash"]),
    "hardware": (str, ["H800"]),
    "ep": (int, []),  # default: one EP group over all --gpus
    "schedules": (str, ["sbo", "tbo"]),
    "attention_dtypes": (str, ["bf16"]),
    "contexts": (float, [5000.0]),
    "batch_per_device": (int, [8, 16, 32, 48, 64, 96, 128]),
}
# single-valued settings shared by every point
SETTINGS: dict[str, tuple[Callable[[str], Any], Any]] = {
    "gpus": (int, 128),
    "mtp_draft_tokens": (int, 1),
    "mtp_accept": (float, None),
    "redundant_experts": (int, 0),
    "assumptions": (str, "default"),
    "attention_tp": (int, 1),
    "ffn_tp": (int, 1),
    "rdma_gb_s": (float, None),
    "seed": (int, 0),
    "assume": (list, []),  # TERM=VALUE overrides of the assumption set
}
PER_LAYER_KEYS = ("attention", "dispatch", "moe", "combine", "ffn", "shared", "router", "tp_comm")
TABLE_ROWS = 40


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for name, (_, default) in AXES.items():
        shown = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default) or "--gpus"
        parser.add_argument(
            "--" + name.replace("_", "-"),
            default=None,
            metavar="A,B,...",
            help=f"comma-separated list (default {shown})",
        )
    for name, (kind, default) in SETTINGS.items():
        if name == "assume":
            continue
        shown = {"mtp_accept": "0.9; 0.8 with table7", "rdma_gb_s": "the hardware's own"}
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=None,
            help=f"one value for every point (default {shown.get(name, default)})",
        )
    parser.add_argument(
        "--assume",
        action="append",
        default=None,
        metavar="TERM=VALUE",
        help="override one term of the assumption set, e.g. routing=balanced (repeatable)",
    )
    parser.add_argument("--grid", type=Path, help="TOML file with a [grid] table of the above")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


# -- grid -------------------------------------------------------------------------------------


def _parse_list(name: str, text: str) -> list[Any]:
    kind = AXES[name][0]
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise UserError(f"--{name.replace('_', '-')} needs at least one value")
    try:
        return [kind(item) for item in items]
    except ValueError:
        raise UserError(
            f"--{name.replace('_', '-')} takes {kind.__name__} values, got {text!r}"
        ) from None


def _read_grid(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"grid file {str(path)!r} does not exist")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"grid file {str(path)!r} is not valid TOML: {exc}") from None
    table = doc.get("grid", doc)
    if not isinstance(table, dict):
        raise UserError(f"grid file {str(path)!r}: [grid] must be a table")
    unknown = set(table) - set(AXES) - set(SETTINGS)
    if unknown:
        raise UserError(
            f"grid file {str(path)!r}: unknown key {sorted(unknown)[0]!r}; valid keys: "
            + ", ".join([*AXES, *SETTINGS])
        )
    out = {}
    for key, value in table.items():
        if key in AXES:
            values = value if isinstance(value, list) else [value]
            out[key] = _parse_list(key, ",".join(str(v) for v in values))
        elif key == "assume":
            items = value.items() if isinstance(value, dict) else None
            out[key] = [f"{k}={v}" for k, v in items] if items is not None else list(value)
        else:
            out[key] = value
    return out


def grid_values(args: argparse.Namespace) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """(axes, settings) from defaults, then the grid file, then the command line."""
    from_file = _read_grid(args.grid) if args.grid is not None else {}
    axes = {name: list(default) for name, (_, default) in AXES.items()}
    settings = {name: default for name, (_, default) in SETTINGS.items()}
    for name in AXES:
        if name in from_file:
            axes[name] = from_file[name]
        if getattr(args, name) is not None:
            axes[name] = _parse_list(name, getattr(args, name))
    for name in SETTINGS:
        if name in from_file:
            settings[name] = from_file[name]
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if not axes["ep"]:
        axes["ep"] = [settings["gpus"]]
    return axes, settings


# -- running ----------------------------------------------------------------------------------


# -- output -----------------------------------------------------------------------------------

COLUMNS = (
    ("model", "model", "{}"),
    ("sched", "schedule", "{}"),
    ("attn", "attention_dtype", "{}"),
    ("ctx", "context", "{:g}"),
    ("EP", "ep", "{}"),
    ("batch", "batch_per_device", "{}"),
    ("TPOT ms", "tpot_ms", "{:.2f}"),
    ("TPS/user", "tps_per_user", "{:.1f}"),
    ("tok/GPU/s", "tgs", "{:.0f}"),
    ("$/M", "cost_per_m_tokens", "{:.3f}"),
    ("exposed", "exposed_comm_share", "{:.1%}"),
)


def table(records: Sequence[dict[str, Any]]) -> str:
    rows = [[fmt.format(r[key]) for _, key, fmt in COLUMNS] for r in records]
    heads = [head for head, _, _ in COLUMNS]
    widths = [max(len(x) for x in col) for col in zip(heads, *rows, strict=True)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def _text(points: list[dict[str, Any]], front: list[dict[str, Any]], workers: int) -> str:
    parts = [f"{len(points)} points on {workers} worker process(es)"]
    if len(points) <= TABLE_ROWS:
        parts += ["", table(points)]
    else:
        parts += [f"(table of {len(points)} points: use --json or the run's results.json)"]
    parts += ["", "Pareto front (TPS per user vs tokens/GPU/s, per model):", table(front)]
    return "\n".join(parts)


def run(args: argparse.Namespace) -> CommandOutput:
    axes, settings = grid_values(args)
    setups = grid_setups(axes, settings)
    workers = args.workers if args.workers is not None else os.cpu_count() or 1
    points = run_points(setups, workers=workers, progress=not args.no_progress)
    front = pareto_front(points)
    config = {
        "axes": axes,
        "settings": settings,
        "hardware_spec": {s.hw.name: asdict(s.hw) for s in setups},
        "model_config": {s.cfg.name: s.cfg.to_dict() for s in setups},
    }
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return CommandOutput(
        results={"points": points, "pareto": front, "n_points": len(points)},
        text=_text(points, front, workers),
        config=config,
        config_hash=config_hash,
        seeds={"routing": settings["seed"]},
    )
