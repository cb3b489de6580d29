"""The SDC campaign: flip bits in the real training step of a model, score every detector.

The step is ``train``'s own (:class:`~longcat_sim.train.training.Trainer`, expert-parallel
path, deterministic mode) with the SDC guard (``longcat_sim/train/guard.py``) attached; faults
land through the injection points the model and trainer expose (``repro/inject.py``). For each
(site, bit) the campaign draws ``trials`` faults (random element and target within the site),
each in a step taken from a pool of states reached by clean training, and per detector a trial
ends as

- ``masked``: the faulty step left bitwise the same state and loss as the clean step;
- ``crashed``: otherwise, when the step failed outright (visible to anyone; counted apart,
  in no detector's rate);
- ``detected``: otherwise, when the detector raised an alarm;
- ``missed``: otherwise.

Detectors: ``replay`` (the step replayed from its snapshot on another device and compared bit
for bit: full duplication), and the guard's online ones, ``abft``, ``recompute``,
``validators`` and ``at_rest``; ``guard`` is any of the online ones. Then ``clean_runs`` clean
guarded steps give the false positives (each also replayed), and ``attribution_events`` events
per class (transient, persistent, genuine) score the rerun attribution.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from longcat_sim.repro.inject import SITES, Fault, FaultPlan, ModelFaultInjector, site_bits
from longcat_sim.train.guard import (
    ATTRIBUTIONS,
    GENUINE,
    PERSISTENT,
    GuardSettings,
    Outcome,
    SdcGuard,
    Snapshot,
)

ONLINE = ("abft", "recompute", "validators", "at_rest")
DETECTORS = ("replay", *ONLINE, "guard")
FLOAT_EXPONENT_BITS = tuple(range(23, 31))
FLOAT_SIGN_BIT = 31
ABFT_SITES = ("expert_gemm", "combine")


@dataclass(frozen=True)
class CampaignConfig:
    sites: tuple[str, ...] = SITES
    bits: tuple[int, ...] | None = None  # None: every bit of each site
    trials: int = 4
    clean_runs: int = 1000
    attribution_events: int = 100
    states: int = 8
    chain: int = 10
    seed: int = 0
    recompute_experts: int = 1

    def bits_for(self, site: str) -> list[int]:
        width = site_bits(site)
        chosen = range(width) if self.bits is None else self.bits
        return [b for b in chosen if 0 <= b < width]


@dataclass
class Tally:
    detected: int = 0
    masked: int = 0
    missed: int = 0
    crashed: int = 0


@dataclass
class CampaignResult:
    results: list[dict[str, Any]]
    false_positives: dict[str, int]
    clean_runs: int
    abft_checks: int
    abft_failed_checks: int
    abft_worst_clean_ratio: float
    overhead: dict[str, float]
    attribution: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "detectors": list(DETECTORS),
            "results": self.results,
            "false_positives": self.false_positives,
            "clean_runs": self.clean_runs,
            "overhead": self.overhead,
            "abft_checks": self.abft_checks,
            "abft_failed_checks": self.abft_failed_checks,
            "abft_false_alarm_rate": self.abft_failed_checks / max(1, self.abft_checks),
            "abft_worst_clean_ratio": self.abft_worst_clean_ratio,
            "attribution": self.attribution,
            "summary": self.summary,
            "seconds": self.seconds,
        }


# ``make_trainer(run_dir, settings)``: a trainer (deterministic mode entered) whose model is
# built for a run guarded with ``settings`` (``guard.guarded_config``), or unguarded (None)
MakeTrainer = Callable[[str, GuardSettings | None], Any]


class Rig:
    """A trainer with the guard attached, states to start trials from, their clean digests
    and where each site's faults may land."""

    def __init__(self, make_trainer: MakeTrainer, cc: CampaignConfig) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="sdc-")
        settings = GuardSettings(seed=cc.seed, recompute_experts=cc.recompute_experts)
        self.trainer = make_trainer(self._tmp.name, settings)
        self.guard = SdcGuard(self.trainer, settings)
        self.targets = site_targets(self.trainer.model)
        self.pool: list[Snapshot] = []
        self.history: list[tuple[float, float]] = []
        for _ in range(cc.states):  # each state after steps (the optimizer has moments)
            for _ in range(cc.chain):
                record = self.trainer.train_step()
                self.history.append((float(record["loss"]), float(record["grad_norm"])))
            self.pool.append(self._snapshot())
        self.goldens = [self.execute(i, None, 0)[0].digest for i in range(len(self.pool))]

    def _snapshot(self) -> Snapshot:
        snap = Snapshot()
        snap.take(self.trainer)
        return snap

    def close(self) -> None:
        self.guard.close()
        self._tmp.cleanup()

    def start(self, state: int) -> None:
        """The trainer at pool state ``state``, the guard's snapshot and checksums with it."""
        self.pool[state].restore(self.trainer)
        self.guard.adopt()
        for check, column in ((self.guard.loss_check, 0), (self.guard.grad_check, 1)):
            check.history = [h[column] for h in self.history[-check.window :]]

    @contextmanager
    def planted(self, plan: FaultPlan | None) -> Iterator[None]:
        """``plan``'s faults planted in the trainer for the block (none when None)."""
        injector = None
        if plan is not None:
            injector = ModelFaultInjector(self.trainer.model, plan)
            injector.attach_trainer(self.trainer)
        self.guard.faults = injector
        try:
            yield
        finally:
            self.guard.faults = None
            if injector is not None:
                injector.close()

    def execute(
        self, state: int, plan: FaultPlan | None, device: int
    ) -> tuple[Outcome, dict[str, Any]]:
        """One step from pool state ``state`` with ``plan``'s faults on ``device``."""
        self.start(state)
        with self.planted(plan):
            return self.guard.execute(device)


def draw_fault(
    site: str, bit: int, rng: np.random.Generator, step: int, targets: dict[str, list[str]], **kw
) -> Fault:
    choices = targets.get(site, [""])
    target = choices[int(rng.integers(len(choices)))]
    index = int(rng.integers(0, 2**62))
    return Fault(site=site, bit=bit, index=index, target=target, step=step, **kw)


def site_targets(model: torch.nn.Module) -> dict[str, list[str]]:
    """Where each site's faults may land in ``model``: every parameter (weights, gradients,
    both AdamW moments), every MoE layer's GEMMs and combine, every router, and the outputs
    of the dense blocks."""
    params = [n for n, p in model.named_parameters() if p.requires_grad]
    moes = [n for n, m in model.named_modules() if hasattr(m, "probe")]
    routers = [f"{n}.router" for n in moes]
    dense = [n for n, _ in model.named_modules() if re.search(r"\.(mlps|self_attn)\.\d+$", n)]
    return {
        "weight": params,
        "gradient": params,
        "optimizer_state": [f"{p}:{m}" for p in params for m in ("exp_avg", "exp_avg_sq")],
        "expert_gemm": [f"{m}:{g}" for m in moes for g in ("gate", "up", "down")],
        "combine": moes,
        "routing_indices": routers,
        "routing_counts": routers,
        "activation": dense,
    }


def fault_trial(rig: Rig, state: int, fault: Fault) -> dict[str, str]:
    """Outcome per detector (detected / masked / missed / crashed) of one fault."""
    plan = FaultPlan([fault])
    faulty, alarms = rig.execute(state, plan, fault.device)
    if faulty.record is None:
        return dict.fromkeys(DETECTORS, "crashed")
    if faulty.digest == rig.goldens[state]:
        return dict.fromkeys(DETECTORS, "masked")
    replay, _ = rig.execute(state, plan, fault.device + 1)
    seen = {
        "replay": replay.digest != faulty.digest,
        **{d: d in alarms for d in ONLINE},
        "guard": any(d in alarms for d in ONLINE),
    }
    return {d: "detected" if seen[d] else "missed" for d in DETECTORS}


def clean_runs(rig: Rig, cc: CampaignConfig, on_run: Callable[[], None] | None) -> dict:
    """False positives over ``cc.clean_runs`` clean guarded steps of continued training, each
    also replayed from its snapshot and compared (ABFT checks counted in the first execution)."""
    guard = rig.guard
    rig.start(len(rig.pool) - 1)
    fp = dict.fromkeys(DETECTORS, 0)
    abft = guard.tallies["abft"]
    checks, failed, abft.worst_ratio = 0, 0, 0.0
    for _ in range(cc.clean_runs):
        before, alarms_before = abft.checks, abft.alarms
        outcome, alarms = guard.execute(guard.settings.device)
        checks += abft.checks - before
        failed += abft.alarms - alarms_before
        for d in ONLINE:
            fp[d] += d in alarms
        fp["guard"] += any(d in alarms for d in ONLINE)
        if outcome.record is None:
            raise RuntimeError(f"a clean step failed: {outcome.error}")
        guard.restore()
        replay, _ = guard.execute(guard.settings.device)
        fp["replay"] += replay.digest != outcome.digest
        guard.accept(outcome.record)
        if on_run is not None:
            on_run()
    return {
        "false_positives": fp,
        "abft_checks": checks,
        "abft_failed_checks": failed,
        "abft_worst_clean_ratio": abft.worst_ratio,
    }


def _effective_fault(rig: Rig, state: int, rng, sites: list[str], persistent: bool) -> Fault:
    """A fault that changes the step's result and raises an online alarm."""
    step = rig.pool[state].step
    for _ in range(10_000):
        site = sites[int(rng.integers(len(sites)))]
        bit = int(rng.integers(site_bits(site)))
        fault = draw_fault(site, bit, rng, step, rig.targets, persistent=persistent)
        outcome, alarms = rig.execute(state, FaultPlan([fault]), 0)
        if alarms and outcome.digest != rig.goldens[state]:
            return fault
    raise RuntimeError("no effective fault found in 10,000 draws")


def _genuine_state(rig: Rig, state: int, scale: float = 30.0) -> None:
    """Pool state ``state`` with the output head scaled: a genuine, data-driven loss spike
    (the state itself is what it is; every replay sees the same)."""
    rig.start(state)
    with torch.no_grad():
        rig.trainer.model.lm_head.weight.mul_(scale)
    rig.guard.adopt()


def attribution_trials(rig: Rig, cc: CampaignConfig, on_event: Callable[[], None] | None) -> dict:
    """``attribution_events`` events per class, each attributed by the guard's replays."""
    rng = np.random.default_rng([cc.seed, 2])
    confusion = {c: dict.fromkeys(ATTRIBUTIONS, 0) for c in ATTRIBUTIONS}
    flagged = dict.fromkeys(ATTRIBUTIONS, 0)
    sites = list(cc.sites)
    for kind in ATTRIBUTIONS:
        for event in range(cc.attribution_events):
            state = event % len(rig.pool)
            plan = None
            if kind == GENUINE:
                _genuine_state(rig, state)
            else:
                fault = _effective_fault(rig, state, rng, sites, kind == PERSISTENT)
                plan = FaultPlan([fault])
                rig.start(state)
            with rig.planted(plan):
                original, alarms = rig.guard.execute(0)
                flagged[kind] += bool(alarms)
                label, _ = rig.guard.attribute(original)
            confusion[kind][label] += 1
            if on_event is not None:
                on_event()
    n = cc.attribution_events
    correct = {k: confusion[k][k] for k in ATTRIBUTIONS}
    return {
        "events_per_class": n,
        "correct": correct,
        "accuracy": {k: correct[k] / n if n else None for k in ATTRIBUTIONS},
        "confusion": confusion,
        "alarm_flagged": flagged,
    }


def _rate(t: Tally) -> float | None:
    """Detected over the trials that changed the step without crashing it; None (JSON null)
    when there were none."""
    effective = t.detected + t.missed
    return t.detected / effective if effective else None


def summarise(tallies: dict[tuple[str, int, str], Tally], sites: Iterable[str]) -> dict[str, Any]:
    """Detection rates (over non-masked trials) per detector and site; ABFT's exponent/sign
    rate on the expert GEMMs and the combine, and the bits where it misses half or more."""
    sites = list(sites)
    out: dict[str, Any] = {"detection_rate": {}}
    for det in DETECTORS:
        per_site = {}
        for site in sites:
            t = Tally()
            for (s, _b, d), v in tallies.items():
                if s == site and d == det:
                    t.detected += v.detected
                    t.missed += v.missed
            per_site[site] = _rate(t)
        out["detection_rate"][det] = per_site
    high, gemm_high = Tally(), Tally()
    blind: dict[str, list[int]] = {}
    for (s, b, d), v in tallies.items():
        if d != "abft" or s not in ABFT_SITES:
            continue
        if b in FLOAT_EXPONENT_BITS or b == FLOAT_SIGN_BIT:
            for t in (high, gemm_high) if s == "expert_gemm" else (high,):
                t.detected += v.detected
                t.missed += v.missed
        rate = _rate(v)
        if rate is not None and rate < 0.5:
            blind.setdefault(s, []).append(b)
    out["abft_exponent_sign_detection"] = _rate(high)
    out["abft_exponent_sign_trials"] = high.detected + high.missed
    out["abft_expert_gemm_exponent_sign_detection"] = _rate(gemm_high)
    out["abft_blind_bits"] = {s: sorted(v) for s, v in blind.items()}
    return out


def fault_trials(rig: Rig, cc: CampaignConfig, tick: Callable[[], None] | None) -> dict:
    """Every (site, bit) times ``cc.trials`` faults; tallies per (site, bit, detector)."""
    rng = np.random.default_rng([cc.seed, 1])
    tallies: dict[tuple[str, int, str], Tally] = {}
    trial_no = 0
    for site in cc.sites:
        for bit in cc.bits_for(site):
            for _ in range(cc.trials):
                state = trial_no % len(rig.pool)
                fault = draw_fault(site, bit, rng, rig.pool[state].step, rig.targets)
                for det, result in fault_trial(rig, state, fault).items():
                    t = tallies.setdefault((site, bit, det), Tally())
                    setattr(t, result, getattr(t, result) + 1)
                trial_no += 1
                if tick is not None:
                    tick()
    return tallies


def run_campaign(
    make_trainer: MakeTrainer,
    cc: CampaignConfig,
    *,
    progress: Callable[[int], None] | None = None,
    overhead: dict[str, float] | None = None,
) -> CampaignResult:
    """Fault trials, clean runs and attribution events; ``progress(n)`` after each unit."""
    start = time.perf_counter()
    tick = (lambda: progress(1)) if progress is not None else None
    rig = Rig(make_trainer, cc)
    try:
        tallies = fault_trials(rig, cc, tick)
        clean = clean_runs(rig, cc, tick)
        attribution = attribution_trials(rig, cc, tick)
    finally:
        rig.close()
    results = [
        {"site": s, "bit": b, "detector": d, "detected": t.detected, "masked": t.masked,
         "missed": t.missed, "crashed": t.crashed}
        for (s, b, d), t in tallies.items()
    ]  # fmt: skip
    return CampaignResult(
        results=results,
        false_positives=clean["false_positives"],
        clean_runs=cc.clean_runs,
        abft_checks=clean["abft_checks"],
        abft_failed_checks=clean["abft_failed_checks"],
        abft_worst_clean_ratio=clean["abft_worst_clean_ratio"],
        overhead=overhead or {},
        attribution=attribution,
        summary=summarise(tallies, cc.sites),
        seconds=time.perf_counter() - start,
    )


def total_units(cc: CampaignConfig) -> int:
    """How many progress units :func:`run_campaign` reports."""
    trials = sum(len(cc.bits_for(s)) for s in cc.sites) * cc.trials
    return trials + cc.clean_runs + 3 * cc.attribution_events


OVERHEAD_SETS: dict[str, tuple[str, ...]] = {
    "abft_validators": ("abft", "validators"),
    "guard": ONLINE,
}


def guard_overhead(
    make_trainer: MakeTrainer, rounds: int = 5, steps: int = 2, warmup: int = 2
) -> dict[str, float]:
    """Per-step time of guarded training over unguarded, as ratios minus one: ``abft_validators``
    (ABFT, with the checksums the model keeps through its optimizer steps, and the validators,
    with the snapshot the replays need) and ``guard`` (every online detector). The unguarded
    side trains a model without checksums, the guarded sides one with them, from the same start;
    each round times ``steps`` steps from that start on each side, in an order that rotates from
    round to round, with the process's CPU clock (other processes' load touches every side
    alike); the result is the median of the per-round ratios."""
    with tempfile.TemporaryDirectory(prefix="sdc-overhead-") as tmp:
        plain = _Start(make_trainer(f"{tmp}/plain", None), warmup)
        checked = _Start(make_trainer(f"{tmp}/guarded", GuardSettings()), warmup)
        sides: dict[str, tuple[_Start, GuardSettings | None]] = {"plain": (plain, None)}
        for name, on in OVERHEAD_SETS.items():
            sides[name] = (checked, GuardSettings(detectors=on))
        order = list(sides)
        ratios: dict[str, list[float]] = {name: [] for name in OVERHEAD_SETS}
        for r in range(rounds):
            shift = r % len(order)
            seconds = {
                name: sides[name][0].timed(steps, sides[name][1])
                for name in order[shift:] + order[:shift]
            }
            for name in OVERHEAD_SETS:
                ratios[name].append(seconds[name] / seconds["plain"] - 1.0)
    return {name: float(np.median(values)) for name, values in ratios.items()}


class _Start:
    """A trainer after ``warmup`` steps, and that state kept to time steps from."""

    def __init__(self, trainer: Any, warmup: int) -> None:
        self.trainer = trainer
        for _ in range(warmup):
            trainer.train_step()
        self.state = Snapshot()
        self.state.take(trainer)

    def timed(self, steps: int, settings: GuardSettings | None) -> float:
        """CPU seconds of ``steps`` steps from the kept state, guarded with ``settings``."""
        self.state.restore(self.trainer)
        if settings is None:
            return _timed_steps(self.trainer.train_step, steps)
        guard = SdcGuard(self.trainer, settings)
        try:
            return _timed_steps(guard.step, steps)
        finally:
            guard.close()


def _timed_steps(step: Callable[[], Any], steps: int) -> float:
    begin = time.process_time()
    for _ in range(steps):
        step()
    return time.process_time() - begin
