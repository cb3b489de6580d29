"""Per-step fingerprints of any :class:`~longcat_sim.repro.entry.Experiment`, and reruns of
an entry point in fresh processes compared bit for bit.

A step's fingerprint lists, in computation order, every submodule's output (forward hooks),
the loss, gradients, parameters, buffers and optimizer state (see
:mod:`longcat_sim.repro.fingerprint`). ``python -m longcat_sim.repro.entry_worker run SPEC.json OUT.pt``
runs one :class:`EntrySpec` in a fresh interpreter; :func:`check_entry_determinism` launches
several and localises the first divergent (step, module, tensor).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from longcat_sim.processes import Children
from longcat_sim.repro.entry import Experiment, build_experiment
from longcat_sim.repro.fingerprint import (
    ActivationRecorder,
    RunRecord,
    StepFingerprint,
    add_losses_and_state,
    with_capture_tuple,
)
from longcat_sim.repro.harness import WORKER_ENV, DeterminismReport, check_determinism
from longcat_sim.repro.inject import Fault, ModelFaultInjector
from longcat_sim.repro.targets import default_target

WORKER = "longcat_sim.repro.entry_worker"


def fingerprint_experiment_step(
    experiment: Experiment,
    step: int,
    *,
    capture: Iterable[tuple[str, str]] = (),
    after_step: Callable[[], None] | None = None,
) -> tuple[StepFingerprint, dict[tuple[str, str], torch.Tensor], float]:
    """Run ``experiment.step(step)`` under forward hooks, then ``after_step()`` (e.g. a fault
    landing in the updated state) before the state is fingerprinted; (fingerprint, captured,
    loss)."""
    wanted = set(capture)
    with ActivationRecorder(experiment.model, capture=wanted) as recorder:
        loss = experiment.step(step)
    if after_step is not None:
        after_step()
    entries, captured = list(recorder.entries), dict(recorder.captured)
    value = float(loss.detach().double().item())
    model, optimizer = experiment.model, experiment.optimizer
    add_losses_and_state(entries, captured, wanted, {"loss": value}, model, optimizer)
    return StepFingerprint(step, tuple(entries)), captured, value


@dataclass(frozen=True)
class EntrySpec:
    """One run of an entry point: ``steps`` steps on ``threads`` threads from ``seed``.
    ``fault`` (a :class:`Fault` dict) plants a bit flip; ``capture`` is ``(step, module,
    tensor)`` of one entry to keep."""

    entry: str
    steps: int = 2
    threads: int = 1
    seed: int = 0
    fault: dict[str, Any] | None = None
    capture: tuple[int, str, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EntrySpec:
        return cls(**with_capture_tuple(data))


def _injector(experiment: Experiment, spec: EntrySpec) -> ModelFaultInjector | None:
    if not spec.fault:
        return None
    fault = Fault.from_dict(spec.fault)
    if not fault.target:
        fault = dataclasses.replace(fault, target=default_target(experiment.model, fault.site))
    return ModelFaultInjector(experiment.model, fault)


def run_entry(spec: EntrySpec) -> RunRecord:
    """Build the experiment and fingerprint ``spec.steps`` steps in this process."""
    from longcat_sim.repro.manifest import environment_manifest

    previous = torch.get_num_threads()
    try:
        experiment = build_experiment(spec.entry, spec.seed, spec.threads)
        injector = _injector(experiment, spec)
        fingerprints, losses, captured = [], [], None
        for step in range(spec.steps):
            keys = [spec.capture[1:]] if spec.capture and spec.capture[0] == step else []
            after = None
            if injector is not None:
                injector.begin_step(step)
                after = functools.partial(injector.end_step, experiment.optimizer)
            fp, got, loss = fingerprint_experiment_step(
                experiment, step, capture=keys, after_step=after
            )
            fingerprints.append(fp)
            losses.append(loss)
            if keys and tuple(keys[0]) in got:
                captured = got[tuple(keys[0])]
        if injector is not None:
            injector.close()
    finally:
        torch.set_num_threads(previous)
    return RunRecord(fingerprints, environment_manifest(deterministic=False), losses, captured)


def run_entry_in_subprocess(
    spec: EntrySpec, *, timeout: float | None = None, children: Children | None = None
) -> RunRecord:
    """:func:`run_entry` in a fresh interpreter (``python -m longcat_sim.repro.entry_worker``)."""
    with tempfile.TemporaryDirectory(prefix="repro-entry-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.pt"
        spec_path.write_text(json.dumps(spec.to_dict()))
        env = {**os.environ, **WORKER_ENV, "PYTHONPATH": _pythonpath()}
        argv = [sys.executable, "-m", WORKER, "run", str(spec_path), str(out_path)]
        proc = (children or Children()).run(argv, env=env, timeout=timeout)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"entry worker failed (exit {proc.returncode}): " + " | ".join(tail))
        payload = torch.load(io.BytesIO(out_path.read_bytes()), weights_only=True)
    return RunRecord.from_payload(payload)


def _pythonpath() -> str:
    """This process's import path, so the worker imports the entry point as the caller did."""
    paths = [p or os.getcwd() for p in sys.path]
    return os.pathsep.join(dict.fromkeys(paths))


def check_entry_determinism(
    entry: str,
    *,
    runs: int = 2,
    steps: int = 2,
    threads: Sequence[int] = (1,),
    seed: int = 0,
    workers: int = 1,
    fault_in_run: tuple[int, dict[str, Any]] | None = None,
    on_done: Callable[[], None] | None = None,
    in_process: bool = False,
) -> DeterminismReport:
    """``runs`` runs of ``entry`` (each in a fresh process unless ``in_process``), compared
    bitwise with run 0; the first divergence is measured in ULPs. ``fault_in_run=(r, fault)``
    plants a bit flip in run r (a negative control)."""
    spec = EntrySpec(entry=entry, steps=steps, seed=seed)
    runner = run_entry if in_process else run_entry_in_subprocess
    return check_determinism(
        spec,  # type: ignore[arg-type]  # EntrySpec has the fields the harness replaces
        runs,
        threads,
        workers=workers,
        fault_in_run=fault_in_run,
        on_done=on_done,
        runner=runner,  # type: ignore[arg-type]
    )
