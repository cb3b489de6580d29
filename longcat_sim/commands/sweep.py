"""``longcat-sim sweep``: decode simulations over a grid of deployments, on every core.

Every option of ``simulate --mode decode`` takes a comma-separated list here; the grid is the
product of those lists (or of a TOML file's ``[grid]`` table, keyed by the same field names;
options given on the command line win). The default schedules (SBO and TBO) apply per model:
a model without ScMoE layers has no shortcut branch for SBO and runs TBO only; schedules named
on the command line or in the grid file are run as given, and SBO on such a model is refused.
Points run in a process pool of ``--workers`` processes (default: all cores) and come back in grid order, so
a sweep's results do not depend on the pool. Every point draws its sampled routing and
contexts from the same ``--seed``: differences between points come from the grid, not the draw.

The output is a table and, per model, the Pareto front of TPS per user against tokens per GPU
per second (both maximised), with the cost of each front point. Every point carries its per-GPU
HBM footprint; a point that does not fit is kept with ``fits`` false and never on the front
(a sweep refuses no point for memory: ``--hbm-check`` is refused).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from longcat_sim.commands.base import CommandOutput
from longcat_sim.config.deployment import DecodeDeployment
from longcat_sim.config.flags import add_assume_option, add_config_flags, set_values
from longcat_sim.config.paths import path_arg
from longcat_sim.config.threads import WORKERS_LIMIT, check_workers
from longcat_sim.config.toml import read_toml
from longcat_sim.errors import UserError
from longcat_sim.runs import config_hash
from longcat_sim.scenarios.sweep import (
    SWEEP_GRID,
    grid_setups,
    pareto_front,
    point_record,
    run_points,
)

HELP = "decode simulations over a grid of deployments, with the TPS/user vs tokens/GPU/s front"

TABLE_ROWS = 40
DEFAULT_MAX_POINTS = 10_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser, DecodeDeployment, as_lists=True, defaults=SWEEP_GRID)
    add_assume_option(parser, unset_is_none=True)
    parser.add_argument("--grid", type=path_arg, help="TOML file with a [grid] table of the above")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"processes (default: all cores; {WORKERS_LIMIT})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument(
        "--max-points",
        type=int,
        default=DEFAULT_MAX_POINTS,
        help=f"refuse a grid of more points, with its estimated run time (default "
        f"{DEFAULT_MAX_POINTS:,})",
    )


# -- grid -------------------------------------------------------------------------------------


def _read_grid(path: Path) -> tuple[dict[str, list[Any]], list[str]]:
    """A grid file's ``[grid]`` table: field -> value or list of values, and ``assume``."""
    table = read_toml(path, what=f"grid file {str(path)!r}", table="grid")
    assume = _grid_assume(path, table.pop("assume", []))
    valid = [f.name for f in fields(DecodeDeployment)]
    unknown = sorted(set(table) - set(valid))
    if unknown:
        raise UserError(
            f"grid file {str(path)!r}: unknown key {unknown[0]!r}; valid keys: "
            + ", ".join([*valid, "assume"])
        )
    return {k: v if isinstance(v, list) else [v] for k, v in table.items()}, list(assume)


def _grid_assume(path: Path, assume: Any) -> list[str]:
    """A grid file's ``assume``: a table of TERM = value, or a list of "TERM=VALUE" strings."""
    scalar = (str, int, float, bool)
    if isinstance(assume, dict) and all(isinstance(v, scalar) for v in assume.values()):
        return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in assume.items()]
    if isinstance(assume, list) and all(isinstance(item, str) for item in assume):
        return list(assume)
    raise UserError(
        f"grid file {str(path)!r}: assume must be a table of TERM = value or a list of "
        f'"TERM=VALUE" strings, got {assume!r}'
    )


def grid_values(args: argparse.Namespace) -> tuple[dict[str, list[Any]], list[str], bool]:
    """(grid, assumption overrides, whether the schedules are the sweep's defaults) from the
    sweep defaults, then the grid file, then the command line."""
    grid: dict[str, list[Any]] = {k: list(v) for k, v in SWEEP_GRID.items()}
    assume: list[str] = []
    given: dict[str, list[Any]] = {}
    if args.grid is not None:
        given, assume = _read_grid(args.grid)
    given |= set_values(args, DecodeDeployment)
    grid |= given
    default_schedules = "schedule" not in given
    return grid, args.assume if args.assume is not None else assume, default_schedules


# -- running ----------------------------------------------------------------------------------


def check_grid_size(
    grid: dict[str, list[Any]],
    assume: list[str],
    max_points: int,
    workers: int,
    default_schedules: bool,
) -> int:
    """The number of grid points (before models drop schedules they cannot run); a grid of
    more than ``max_points`` is refused with its run time estimated from one point timed here."""
    if max_points < 1:
        raise UserError(f"--max-points must be >= 1, got {max_points}")
    points = math.prod(len(values) for values in grid.values())
    if points <= max_points:
        return points
    corner = {name: list(values)[:1] for name, values in grid.items() if name != "schedule"}
    corner["schedule"] = list(grid.get("schedule", ["sbo"]))
    first = grid_setups(corner, assume, model_schedules=default_schedules)[0]
    timings = []
    for _ in range(2):  # the second run is warm
        start = time.perf_counter()
        point_record(first)
        timings.append(time.perf_counter() - start)
    seconds = min(timings) * points / max(workers, 1)
    raise UserError(
        f"the grid has {points:,} points, more than --max-points {max_points:,} (about "
        f"{_duration(seconds)} on {workers} worker(s), timed from one point); narrow the grid "
        f"or pass --max-points {points}"
    )


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


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
    ("HBM GB", "hbm_used_gb", "{:.1f}"),
    ("fits", "fits", "{}"),
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
    infeasible = sum(1 for p in points if not p["fits"])
    if infeasible:
        parts += ["", f"{infeasible} point(s) do not fit in HBM (fits False): kept, off the front"]
    parts += ["", "Pareto front (TPS per user vs tokens/GPU/s, per model):", table(front)]
    return "\n".join(parts)


def run(args: argparse.Namespace) -> CommandOutput:
    grid, assume, default_schedules = grid_values(args)
    if "hbm_check" in grid:
        raise UserError(
            "--hbm-check applies to simulate: a sweep keeps every point, flagging those that do "
            "not fit (fits false) and leaving them off the Pareto front"
        )
    workers = check_workers(args.workers if args.workers is not None else os.cpu_count() or 1)
    check_grid_size(grid, assume, args.max_points, workers, default_schedules)
    setups = grid_setups(grid, assume, model_schedules=default_schedules)
    points = run_points(setups, workers=workers, progress=not args.no_progress)
    front = pareto_front(points)
    config = {
        "grid": grid,
        "assume": assume,
        "hardware_spec": {s.hw.name: asdict(s.hw) for s in setups},
        "model_config": {s.cfg.name: s.cfg.to_dict() for s in setups},
    }
    return CommandOutput(
        results={"points": points, "pareto": front, "n_points": len(points)},
        text=_text(points, front, workers),
        config=config,
        config_hash=config_hash(config),
        seeds={"routing": setups[0].seed},
        warnings=tuple(dict.fromkeys(w for s in setups for w in s.warnings())),
    )
