"""The SDC campaign: flip bits at every site, run every detector, count what each one catches.

For each (site, bit) the campaign draws ``trials`` faults (random element, random target
within the site) and runs the MoE-layer step (:mod:`longcat_sim.repro.moe_step`) with each
fault on simulated device 0, with the ABFT and recompute monitors attached. Per detector a
trial ends as

- ``masked``: the faulty step produced bitwise the same values as the clean step (the golden
  run), so there is nothing to detect;
- ``detected``: otherwise, when the detector raised an alarm (a step that crashed counts as
  detected by every detector: the failure is visible; ``crashed`` counts these);
- ``missed``: otherwise.

Then ``clean_runs`` fault-free steps measure false positives (replay mismatches, ABFT and
recompute alarms) and each detector's overhead relative to the unprotected step, and
``attribution_events`` synthetic events per class check the rerun attribution.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from longcat_sim.repro.detectors import (
    ATTRIBUTIONS,
    GENUINE,
    PERSISTENT,
    AbftMonitor,
    RecomputeMonitor,
    RerunStateMachine,
    SpikeValidator,
)
from longcat_sim.repro.inject import SITES, Fault, FaultPlan, site_bits
from longcat_sim.repro.moe_step import (
    PARAMS,
    MoEStepConfig,
    StepCrash,
    StepResult,
    StepState,
    initial_state,
    moe_step,
)

DETECTORS = ("replay", "recompute", "abft")
FLOAT_EXPONENT_BITS = tuple(range(23, 31))
FLOAT_SIGN_BIT = 31
ABFT_SITES = ("expert_gemm", "combine")

_TARGETS: dict[str, tuple[str, ...]] = {
    "weight": PARAMS,
    "gradient": PARAMS,
    "expert_gemm": ("gate_up", "down"),
    "optimizer_state": tuple(f"{p}:{m}" for p in PARAMS for m in ("exp_avg", "exp_avg_sq")),
}


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
    abft_worst_clean_ratio: float
    overhead: dict[str, float]
    attribution: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "results": self.results,
            "false_positives": self.false_positives,
            "clean_runs": self.clean_runs,
            "overhead": self.overhead,
            "abft_checks": self.abft_checks,
            "abft_false_alarm_rate": self.false_positives["abft"] / max(1, self.abft_checks),
            "abft_worst_clean_ratio": self.abft_worst_clean_ratio,
            "attribution": self.attribution,
            "summary": self.summary,
            "seconds": self.seconds,
        }


def state_pool(sc: MoEStepConfig, count: int, chain: int, seed: int) -> list[StepState]:
    """``count`` states: chains of ``chain`` clean steps from independent seeds, so states
    with non-zero optimizer moments and evolved weights are represented."""
    pool: list[StepState] = []
    s = 0
    while len(pool) < count:
        state = initial_state(sc, seed * 7919 + s)
        for _ in range(chain):
            pool.append(state)
            if len(pool) == count:
                break
            state = moe_step(state, sc).next_state
        s += 1
    return pool


def draw_fault(site: str, bit: int, rng: np.random.Generator, step: int, **kw: Any) -> Fault:
    targets = _TARGETS.get(site, ("",))
    target = targets[int(rng.integers(len(targets)))]
    index = int(rng.integers(0, 2**62))
    return Fault(site=site, bit=bit, index=index, target=target, step=step, **kw)


def _run(
    state: StepState,
    sc: MoEStepConfig,
    plan: FaultPlan | None,
    device: int,
    monitors: tuple = (),
) -> StepResult | None:
    injector = plan.injector(state.step, device) if plan is not None else None
    try:
        return moe_step(state, sc, injector=injector, monitors=monitors)
    except StepCrash:
        return None


def _digest(result: StepResult | None) -> str:
    return "crash" if result is None else result.digest()


def fault_trial(
    state: StepState,
    golden: str,
    fault: Fault,
    sc: MoEStepConfig,
    recompute_seed: int,
    recompute_experts: int = 1,
) -> dict[str, str]:
    """Outcome per detector (detected / masked / missed / crashed) of one fault."""
    plan = FaultPlan([fault])
    abft, recompute = AbftMonitor(), RecomputeMonitor(recompute_seed, recompute_experts)
    faulty = _run(state, sc, plan, fault.device, (abft, recompute))
    if faulty is None:
        return dict.fromkeys(DETECTORS, "crashed")
    if faulty.digest() == golden:
        return dict.fromkeys(DETECTORS, "masked")
    replay = _run(state, sc, plan, fault.device + 1)
    alarms = {
        "replay": _digest(replay) != faulty.digest(),
        "recompute": recompute.alarms > 0,
        "abft": abft.alarms > 0,
    }
    return {d: "detected" if alarms[d] else "missed" for d in DETECTORS}


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def clean_runs(
    sc: MoEStepConfig,
    cc: CampaignConfig,
    *,
    on_run: Callable[[], None] | None = None,
) -> tuple[dict[str, int], int, float, dict[str, float], list[float]]:
    """False positives and overheads over fault-free steps (states chained from fresh seeds)."""
    fp = dict.fromkeys(DETECTORS, 0)
    seconds = dict.fromkeys(("base", *DETECTORS), 0.0)
    abft_checks, worst = 0, 0.0
    losses: list[float] = []
    state: StepState | None = None
    for run in range(cc.clean_runs):
        if run % cc.chain == 0:
            state = initial_state(sc, 10**6 + cc.seed * 7919 + run)
        assert state is not None
        base, t_base = _timed(lambda s=state: moe_step(s, sc))
        abft = AbftMonitor()
        with_abft, t_abft = _timed(lambda s=state, m=abft: moe_step(s, sc, monitors=(m,)))
        recompute = RecomputeMonitor(cc.seed + run, cc.recompute_experts)
        with_rec, t_rec = _timed(lambda s=state, m=recompute: moe_step(s, sc, monitors=(m,)))
        replay, t_replay = _timed(lambda s=state: moe_step(s.clone(), sc))
        start = time.perf_counter()
        fp["replay"] += replay.digest() != base.digest()
        t_replay += time.perf_counter() - start
        fp["abft"] += abft.alarms
        fp["recompute"] += recompute.alarms
        if with_abft.digest() != base.digest() or with_rec.digest() != base.digest():
            raise AssertionError("a monitor changed the step's results")
        abft_checks += abft.checks
        worst = max(worst, abft.worst_ratio)
        seconds["base"] += t_base
        seconds["abft"] += t_abft
        seconds["recompute"] += t_rec
        seconds["replay"] += t_replay
        losses.append(base.loss)
        state = base.next_state
        if on_run is not None:
            on_run()
    base = max(seconds["base"], 1e-12)
    overhead = {
        "replay": seconds["replay"] / base,
        "recompute": max(0.0, seconds["recompute"] / base - 1.0),
        "abft": max(0.0, seconds["abft"] / base - 1.0),
    }
    return fp, abft_checks, worst, overhead, losses


def attribution_trials(
    sc: MoEStepConfig,
    cc: CampaignConfig,
    pool: Sequence[StepState],
    validator: SpikeValidator,
    *,
    on_event: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """``attribution_events`` events per class, each attributed by the rerun state machine."""
    rng = np.random.default_rng([cc.seed, 2])
    confusion = {c: dict.fromkeys(ATTRIBUTIONS, 0) for c in ATTRIBUTIONS}
    flagged = dict.fromkeys(ATTRIBUTIONS, 0)
    reruns = 0
    fault_sites = [s for s in SITES if s in cc.sites] or list(SITES)
    for kind in ATTRIBUTIONS:
        for event in range(cc.attribution_events):
            if kind == GENUINE:
                state = initial_state(sc, 2 * 10**6 + cc.seed * 7919 + event, outlier=1e3)
                plan = FaultPlan([])
            else:
                state = pool[event % len(pool)]
                golden = _digest(_run(state, sc, None, 0))
                while True:  # an effective fault: one that changes the step's results
                    site = fault_sites[int(rng.integers(len(fault_sites)))]
                    bit = int(rng.integers(site_bits(site)))
                    fault = draw_fault(site, bit, rng, state.step, persistent=kind == PERSISTENT)
                    if _digest(_run(state, sc, FaultPlan([fault]), 0)) != golden:
                        break
                plan = FaultPlan([fault])
            original = _run(state, sc, plan, 0)
            if original is None or validator.suspicious(original.loss):
                flagged[kind] += 1
            machine = RerunStateMachine(
                lambda device, s=state, p=plan: _digest(_run(s, sc, p, device))
            )
            label = machine.attribute(_digest(original), device=0, other_device=1)
            reruns += machine.reruns
            confusion[kind][label] += 1
            if on_event is not None:
                on_event()
    correct = {k: confusion[k][k] for k in ATTRIBUTIONS}
    n = cc.attribution_events
    return {
        "events_per_class": n,
        "correct": correct,
        "accuracy": {k: correct[k] / n if n else None for k in ATTRIBUTIONS},
        "confusion": confusion,
        "spike_flagged": flagged,
        "reruns": reruns,
    }


def _rate(t: Tally) -> float | None:
    """Detected over non-masked trials; None (JSON null) when every trial was masked."""
    effective = t.detected + t.missed
    return t.detected / effective if effective else None


def summarise(tallies: dict[tuple[str, int, str], Tally], sites: Iterable[str]) -> dict[str, Any]:
    """Detection rates (over non-masked trials) per detector and site; ABFT's exponent/sign
    rate on its sites and the bits where it misses half or more (its blind spot)."""
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
    high = Tally()
    blind: dict[str, list[int]] = {}
    for (s, b, d), v in tallies.items():
        if d != "abft" or s not in ABFT_SITES:
            continue
        if b in FLOAT_EXPONENT_BITS or b == FLOAT_SIGN_BIT:
            high.detected += v.detected
            high.missed += v.missed
        rate = _rate(v)
        if rate is not None and rate < 0.5:
            blind.setdefault(s, []).append(b)
    out["abft_exponent_sign_detection"] = _rate(high)
    out["abft_exponent_sign_trials"] = high.detected + high.missed
    out["abft_blind_bits"] = {s: sorted(v) for s, v in blind.items()}
    return out


def run_campaign(
    sc: MoEStepConfig,
    cc: CampaignConfig,
    *,
    progress: Callable[[int], None] | None = None,
) -> CampaignResult:
    """Fault trials, clean runs and attribution events; ``progress(n)`` after each unit."""
    start = time.perf_counter()
    tick = (lambda: progress(1)) if progress is not None else None
    pool = state_pool(sc, cc.states, cc.chain, cc.seed)
    goldens = [_digest(_run(s, sc, None, 0)) for s in pool]
    rng = np.random.default_rng([cc.seed, 1])
    tallies: dict[tuple[str, int, str], Tally] = {}
    trial_no = 0
    for site in cc.sites:
        for bit in cc.bits_for(site):
            for _ in range(cc.trials):
                i = trial_no % len(pool)
                fault = draw_fault(site, bit, rng, pool[i].step)
                outcome = fault_trial(
                    pool[i], goldens[i], fault, sc, cc.seed + trial_no, cc.recompute_experts
                )
                for det, result in outcome.items():
                    t = tallies.setdefault((site, bit, det), Tally())
                    if result == "crashed":
                        t.crashed += 1
                        t.detected += 1
                    else:
                        setattr(t, result, getattr(t, result) + 1)
                trial_no += 1
                if tick is not None:
                    tick()
    fp, checks, worst, overhead, losses = clean_runs(sc, cc, on_run=tick)
    validator = SpikeValidator(history=list(losses))
    attribution = attribution_trials(sc, cc, pool, validator, on_event=tick)
    results = [
        {
            "site": s,
            "bit": b,
            "detector": d,
            "detected": t.detected,
            "masked": t.masked,
            "missed": t.missed,
            "crashed": t.crashed,
        }
        for (s, b, d), t in tallies.items()
    ]
    return CampaignResult(
        results=results,
        false_positives=fp,
        clean_runs=cc.clean_runs,
        abft_checks=checks,
        abft_worst_clean_ratio=worst,
        overhead=overhead,
        attribution=attribution,
        summary=summarise(tallies, cc.sites),
        seconds=time.perf_counter() - start,
    )


def total_units(cc: CampaignConfig) -> int:
    """How many progress units :func:`run_campaign` reports."""
    trials = sum(len(cc.bits_for(s)) for s in cc.sites) * cc.trials
    return trials + cc.clean_runs + 3 * cc.attribution_events
