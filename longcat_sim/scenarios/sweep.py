"""Decode simulations over a grid of deployments, on every core, and their Pareto front."""

from __future__ import annotations

import itertools
import math
import os
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from tqdm import tqdm

from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.errors import UserError
from longcat_sim.model.config import ConfigError, load_model_config
from longcat_sim.scenarios.decode import (
    DecodeSetup,
    decode_results,
    decode_setup,
    resolve_assumptions,
    resolve_hardware,
    run_decode,
)


def grid_setups(axes: dict[str, list[Any]], settings: dict[str, Any]) -> list[DecodeSetup]:
    """Every grid point, checked before any simulation runs, in grid order."""
    assumptions = resolve_assumptions(settings["assumptions"], settings["assume"])
    models = {name: load_model_config(name) for name in axes["models"]}
    hardware = {name: resolve_hardware(name, settings["rdma_gb_s"]) for name in axes["hardware"]}
    setups = []
    for model, hw, ep, schedule, dtype, context, batch in itertools.product(
        axes["models"],
        axes["hardware"],
        axes["ep"],
        axes["schedules"],
        axes["attention_dtypes"],
        axes["contexts"],
        axes["batch_per_device"],
    ):
        setups.append(
            decode_setup(
                cfg=models[model],
                hw=hardware[hw],
                assumptions=assumptions,
                gpus=settings["gpus"],
                ep=ep,
                batch_per_device=batch,
                context=context,
                attention_dtype=dtype,
                mtp_draft_tokens=settings["mtp_draft_tokens"],
                mtp_accept=settings["mtp_accept"],
                schedule=schedule,
                redundant_experts=settings["redundant_experts"],
                attention_tp=settings["attention_tp"],
                ffn_tp=settings["ffn_tp"],
                seed=settings["seed"],
            )
        )
    return setups


def point_record(setup: DecodeSetup) -> dict[str, Any]:
    """One grid point as a flat record (per-layer times as ``<group>_us``)."""
    result, closed = run_decode(setup)
    record = decode_results(setup, result, closed)
    del record["assumptions_description"]
    for key, value in record.pop("per_layer_us").items():
        record[f"{key}_us"] = value
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
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
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
            with ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
                futures = [pool.submit(_run_chunk, chunk) for chunk in chunks]
                try:
                    for future in as_completed(futures):
                        done = future.result()
                        for index, record in done:
                            records[index] = record
                        bar.update(len(done))
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
    return [r for r in records if r is not None]


def pareto_front(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model, the points no other point beats on both TPS per user and tokens per GPU per
    second; sorted by model, then TPS per user."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    for record in records:
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
