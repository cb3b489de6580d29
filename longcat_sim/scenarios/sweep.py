"""Decode simulations over a grid of deployments, on every core, and their Pareto front."""

from __future__ import annotations

import itertools
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import as_completed
from dataclasses import fields
from typing import Any

from tqdm import tqdm

from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.config.deployment import DecodeDeployment
from longcat_sim.config.threads import check_workers
from longcat_sim.errors import UserError
from longcat_sim.model.config import ConfigError, load_model_config
from longcat_sim.processes import process_pool
from longcat_sim.scenarios.decode import (
    DecodeSetup,
    decode_results,
    decode_setup,
    resolve_assumptions,
    resolve_hardware,
    run_decode,
    runs_schedule,
)

# where a sweep's default grid differs from the one-point deployment default
SWEEP_GRID: dict[str, tuple[Any, ...]] = {
    "schedule": ("sbo", "tbo"),
    "batch_per_device": (8, 16, 32, 48, 64, 96, 128),
}


def grid_setups(
    grid: Mapping[str, Sequence[Any]],
    assume: Sequence[str] = (),
    *,
    model_schedules: bool = False,
) -> list[DecodeSetup]:
    """Every point of the product of ``grid``'s value lists (keys: ``DecodeDeployment``
    fields, varied in field order except ``batch_per_device``, which varies fastest so that each
    run of consecutive points is one deployment's batch curve; a field not in ``grid`` keeps its
    default), checked before any simulation runs, in grid order. ``model_schedules`` (a default
    schedule list, not one asked for): each model keeps only the schedules it can run, so SBO
    drops out for models without ScMoE layers; otherwise such a point is refused."""
    order = [f.name for f in fields(DecodeDeployment) if f.name != "batch_per_device"]
    order.append("batch_per_device")
    unknown = sorted(set(grid) - set(order))
    if unknown:
        raise UserError(f"unknown grid key {unknown[0]!r}; valid keys: {', '.join(order)}")
    names = [n for n in order if n in grid]
    empty = [n for n in names if not list(grid[n])]
    if empty:
        raise UserError(f"grid key {empty[0]!r} needs at least one value")
    deployments = [
        DecodeDeployment(**dict(zip(names, values, strict=True)))
        for values in itertools.product(*(grid[n] for n in names))
    ]
    models = {d.model: load_model_config(d.model) for d in deployments}
    if model_schedules:
        deployments = [d for d in deployments if runs_schedule(models[d.model], d.schedule)]
    hardware = {
        (d.hardware, d.rdma_gb_s): resolve_hardware(d.hardware, d.rdma_gb_s) for d in deployments
    }
    sets = {d.assumptions: resolve_assumptions(d.assumptions, assume) for d in deployments}
    return [
        decode_setup(d, models[d.model], hardware[d.hardware, d.rdma_gb_s], sets[d.assumptions])
        for d in deployments
    ]


def point_record(setup: DecodeSetup) -> dict[str, Any]:
    """One grid point as a flat record (per-layer times as ``<group>_us``, the HBM breakdown
    as ``hbm_<part>_gb``); a point that does not fit in HBM is kept, ``fits`` false."""
    result, closed = run_decode(setup)
    record = decode_results(setup, result, closed)
    del record["assumptions_description"]
    for key, value in record.pop("per_layer_us").items():
        record[f"{key}_us"] = value
    for key, value in record.pop("hbm_breakdown_gb").items():
        record[f"hbm_{key}_gb"] = value
    return record


def _run_chunk(chunk: Sequence[tuple[int, DecodeSetup]]) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for index, setup in chunk:
        try:
            out.append((index, point_record(setup)))
        except (ClusterInputError, ConfigError, UserError) as exc:
            raise UserError(f"grid point {index} ({_describe(setup)}): {exc}") from None
    return out


def _describe(setup: DecodeSetup) -> str:
    return (
        f"{setup.cfg.name}, {setup.hw.name}, EP{setup.ep}, {setup.schedule}, "
        f"{setup.attention_dtype}, context {setup.context:g}, batch {setup.batch_per_device}"
    )


def run_points(
    setups: Sequence[DecodeSetup], *, workers: int | None = None, progress: bool = True
) -> list[dict[str, Any]]:
    """Simulate every point; records come back in the order of ``setups``."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    check_workers(workers)
    indexed = list(enumerate(setups))
    records: list[dict[str, Any] | None] = [None] * len(indexed)
    bar = tqdm(
        total=len(indexed),
        desc="sweep",
        unit="pt",
        file=sys.stderr,
        disable=None if progress else True,
        dynamic_ncols=True,
    )
    with bar:
        if workers == 1 or len(indexed) < 2:
            for index, setup in indexed:
                records[index] = _run_chunk([(index, setup)])[0][1]
                bar.update(1)
        else:
            size = max(1, math.ceil(len(indexed) / (workers * 8)))
            chunks = [indexed[i : i + size] for i in range(0, len(indexed), size)]
            with process_pool(min(workers, len(chunks))) as pool:  # killed on an exception
                futures = [pool.submit(_run_chunk, chunk) for chunk in chunks]
                for future in as_completed(futures):
                    done = future.result()
                    for index, record in done:
                        records[index] = record
                    bar.update(len(done))
    return [r for r in records if r is not None]


def pareto_front(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model, the points that fit in HBM and that no other such point beats on both TPS
    per user and tokens per GPU per second; sorted by model, then TPS per user."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record.get("fits", True):
            by_model.setdefault(record["model"], []).append(record)
    front = []
    for model in sorted(by_model):
        points = sorted(by_model[model], key=lambda r: (-r["tps_per_user"], -r["tgs"]))
        best_tgs = -math.inf
        for record in points:  # fastest per user first; keep each new best throughput
            if record["tgs"] > best_tgs:
                front.append(record)
                best_tgs = record["tgs"]
    front.sort(key=lambda r: (r["model"], r["tps_per_user"]))
    return front
