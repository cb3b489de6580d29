"""Rerun a fingerprinted training in separate processes and compare the runs bit for bit.

Every run is a fresh interpreter (``python -m longcat_sim.repro.fingerprint``), so nothing
is shared between runs but the code, the cached tokenizer and the spec: no warm allocator, no
cached kernel choice, no RNG state. Runs cycle through the requested thread counts. All runs
are compared with run 0; if any differs, the earliest divergent (step, module, tensor) is
localised and both tensors are captured by two more runs to measure the difference in ULPs.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longcat_sim.processes import Children
from longcat_sim.repro.compare import Divergence, first_divergence, measured
from longcat_sim.repro.fingerprint import RunRecord, RunSpec

# Idle OpenMP threads sleep instead of spinning: on a shared machine a spinning pool can slow a
# 2-thread run a hundredfold. It changes no result.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def run_in_subprocess(
    spec: RunSpec, *, timeout: float | None = None, children: Children | None = None
) -> RunRecord:
    """Run ``spec`` in a fresh Python process (one of ``children``, so a caller that stops can
    kill it) and return its fingerprints."""
    with tempfile.TemporaryDirectory(prefix="determinism-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.pt"
        spec_path.write_text(json.dumps(spec.to_dict()))
        env = {**os.environ, **WORKER_ENV}
        proc = (children or Children()).run(
            [sys.executable, "-m", "longcat_sim.repro.fingerprint", str(spec_path), str(out_path)],
            env=env,
            timeout=timeout,
        )
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise RuntimeError(
                f"fingerprint worker failed (exit {proc.returncode}): " + " | ".join(tail)
            )
        payload = torch.load(io.BytesIO(out_path.read_bytes()), weights_only=True)
    return RunRecord.from_payload(payload)


def run_many(
    specs: Sequence[RunSpec],
    *,
    workers: int = 1,
    on_done: Callable[[], None] | None = None,
    runner: Callable[[RunSpec], RunRecord] | None = None,
) -> list[RunRecord]:
    """Run every spec (``workers`` processes at a time; by default each in a fresh process by
    :func:`run_in_subprocess`); results in spec order. On an exception (a failed run, a stop
    signal) the running processes are killed and no other starts."""
    children = Children()
    run = runner or functools.partial(run_in_subprocess, children=children)

    def one(spec: RunSpec) -> RunRecord:
        record = run(spec)
        if on_done is not None:
            on_done()
        return record

    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        return list(pool.map(one, specs))
    except BaseException:
        children.close()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class DeterminismReport:
    runs: int
    identical: int
    steps: int
    threads: list[int]
    run_threads: list[int]
    step_digests: list[list[str]]
    losses: list[list[float]]
    first_divergence: Divergence | None
    divergent_run: int | None
    manifest: dict[str, Any]
    seconds: float

    @property
    def all_identical(self) -> bool:
        return self.identical == self.runs

    def to_json(self) -> dict[str, Any]:
        div = self.first_divergence
        return {
            "identical": self.all_identical,
            "runs": self.runs,
            "identical_runs": self.identical,
            "steps": self.steps,
            "threads": self.threads,
            "run_threads": self.run_threads,
            "first_divergence": None
            if div is None
            else {
                "step": div.step,
                "module": div.module,
                "tensor": div.tensor,
                "max_ulp": div.max_ulp,
                "max_abs": div.max_abs,
                "run": self.divergent_run,
            },
            "final_step_digest": self.step_digests[0][-1] if self.step_digests[0] else None,
            "losses_run0": self.losses[0],
            "manifest": self.manifest,
            "seconds": self.seconds,
        }


def check_determinism(
    base: RunSpec,
    runs: int,
    threads: Sequence[int],
    *,
    workers: int = 1,
    fault_in_run: tuple[int, dict[str, Any]] | None = None,
    on_done: Callable[[], None] | None = None,
    runner: Callable[[RunSpec], RunRecord] | None = None,
) -> DeterminismReport:
    """``runs`` reruns of ``base`` (run r on ``threads[r % len(threads)]`` threads), compared
    bitwise with run 0. ``fault_in_run=(r, fault)`` plants a fault in run r (negative control).
    """
    if runs < 2:
        raise ValueError(f"need at least 2 runs to compare, got {runs}")
    if not threads or min(threads) < 1:
        raise ValueError(f"thread counts must be positive, got {list(threads)}")
    start = time.perf_counter()
    specs = [dataclasses.replace(base, threads=threads[r % len(threads)]) for r in range(runs)]
    if fault_in_run is not None:
        r, fault = fault_in_run
        specs[r] = dataclasses.replace(specs[r], fault=fault)
    records = run_many(specs, workers=workers, on_done=on_done, runner=runner)
    reference = records[0].fingerprints
    divergences = [first_divergence(reference, rec.fingerprints) for rec in records]
    identical = sum(d is None for d in divergences)
    found = [(d.step, d.position, r) for r, d in enumerate(divergences) if d is not None]
    first, divergent_run = None, None
    if found:
        _, _, divergent_run = min(found)
        first = divergences[divergent_run]
        assert first is not None
        capture = (first.step, first.module, first.tensor)
        if first.module != "<stream>" and "(" not in first.tensor:
            pair = run_many(
                [
                    dataclasses.replace(specs[0], capture=capture),
                    dataclasses.replace(specs[divergent_run], capture=capture),
                ],
                workers=workers,
                runner=runner,
            )
            first = measured(first, pair[0].captured, pair[1].captured)
    return DeterminismReport(
        runs=runs,
        identical=identical,
        steps=base.steps,
        threads=list(threads),
        run_threads=[s.threads for s in specs],
        step_digests=[[f.digest for f in rec.fingerprints] for rec in records],
        losses=[rec.losses for rec in records],
        first_divergence=first,
        divergent_run=divergent_run,
        manifest=records[0].manifest,
        seconds=time.perf_counter() - start,
    )
