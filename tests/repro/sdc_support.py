"""A tiny deterministic trainer for the SDC guard tests, and runs of it guarded or not."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longcat_sim.model.hashing import parameter_hash
from longcat_sim.repro.fingerprint import RunSpec, spec_configs
from longcat_sim.repro.inject import Fault, FaultPlan, ModelFaultInjector
from longcat_sim.train.guard import GuardSettings, SdcGuard, guarded_config, state_digest
from longcat_sim.train.training import Trainer, load_data

BATCH, SEQ = 2, 32
GUARDED = GuardSettings()  # every online detector


@functools.lru_cache(maxsize=2)
def _configs_and_data(batch: int, seq: int) -> tuple[Any, Any, Any]:
    cfg, tc = spec_configs(RunSpec(steps=100, train={"batch_size": batch, "seq_len": seq}))
    return cfg, tc, load_data(cfg, tc, None)


def make_trainer(
    run_dir: str | Path,
    guard: GuardSettings | None = GUARDED,
    *,
    batch: int = BATCH,
    seq: int = SEQ,
) -> Trainer:
    """The tiny model's deterministic trainer, ``batch`` x ``seq`` tokens a step, its model
    built for a run guarded with ``guard`` (None: unguarded, no checksums); call it inside
    ``DeterministicMode``."""
    cfg, tc, data = _configs_and_data(batch, seq)
    return Trainer(guarded_config(cfg, guard), tc, str(run_dir), data=data)


def full_digest(trainer: Trainer) -> str:
    """Parameters, buffers, optimizer and bias-controller state, as one digest."""
    return state_digest(trainer, {"loss": None}, None)


@dataclass
class Run:
    trainer: Trainer
    records: list[dict[str, Any]]
    guard: SdcGuard | None = None
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def param_hash(self) -> str:
        return parameter_hash(self.trainer.model, include_buffers=True)

    @property
    def digest(self) -> str:
        return full_digest(self.trainer)


def run_steps(
    run_dir: str | Path,
    steps: int,
    *,
    guard: GuardSettings | None = None,
    faults: Sequence[Fault] = (),
) -> Run:
    """``steps`` training steps, guarded when ``guard`` is given (faults planted through a
    :class:`ModelFaultInjector` attached to the trainer), else plain (faults still planted)."""
    trainer = make_trainer(run_dir, guard)
    injector = None
    if faults:
        injector = ModelFaultInjector(trainer.model, FaultPlan(list(faults)))
        injector.attach_trainer(trainer)
    sdc = SdcGuard(trainer, guard, faults=injector) if guard is not None else None
    records = []
    try:
        for _ in range(steps):
            if sdc is not None:
                records.append(sdc.step())
                continue
            if injector is not None:
                injector.begin_step(trainer.step)
            records.append(trainer.train_step())
    finally:
        if sdc is not None:
            sdc.close()
        if injector is not None:
            injector.close()
    events = [e for r in records for e in r.get("sdc_events", [])]
    return Run(trainer, records, sdc, events)
