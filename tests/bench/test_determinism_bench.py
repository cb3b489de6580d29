"""Overheads of reproducibility, one thread, each measured in one benchmark run:

- deterministic mode against the default on a ``small`` training step (batch-invariant linear
  layers, attention, expert GEMMs, SiLU and softmax; fixed-order gradient norm; deterministic
  torch flags). Budget: at most 10 %.
- the SDC guard (``longcat_sim/train/guard.py``) against the unguarded step on the ``tiny``
  model's deterministic training step (4 sequences of 64 tokens): ABFT on the expert GEMMs and the combine with the
  validators and the snapshot a replay needs (``abft_validators``, budget: at most 10 %), and
  every online detector (``guard``: recompute and the at-rest check too, reported only).

Each round times one step of each side back to back (in rotating order) with the process CPU
clock, so load from other processes on the machine affects them alike; the ratio reported is
the median over rounds of the per-round ratios.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest

from longcat_sim.model.config import get_preset
from longcat_sim.model.determinism import DeterministicMode
from longcat_sim.train.config import default_train_config
from longcat_sim.train.guard import GuardSettings, SdcGuard
from tests.repro.sdc_support import make_trainer

ROUNDS = 15
GUARD_ROUNDS = 30
GUARD_BATCH, GUARD_SEQ = 4, 64  # tokens a step: 4 slices of 64 (~80 ms a step, one thread)
GUARD_SETS = {
    "abft_validators": ("abft", "validators"),
    "guard": ("abft", "recompute", "validators", "at_rest"),
}


def cpu_seconds(fn: Callable[[], object]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_overhead_of_deterministic_mode(benchmark, small_trainers) -> None:
    # the batch as one slice, so that the ratio prices the kernels, not the slicing (with one
    # sequence per slice, deterministic mode also pads each slice's expert rows to whole tiles)
    whole = {"slice_size": default_train_config(get_preset("small")).batch_size}
    trainers = small_trainers(
        default=({}, whole), deterministic=({}, {**whole, "deterministic": True})
    )

    def step(name: str) -> None:
        if name == "deterministic":
            with DeterministicMode():
                trainers[name].train_step()
        else:
            trainers[name].train_step()

    for name in trainers:  # warm-up (allocator, first-touch pages)
        step(name)
    ratios: list[float] = []
    rounds = iter(range(10**6))

    def one_round() -> None:
        order = ("default", "deterministic")[:: -1 if next(rounds) % 2 else 1]
        seconds = {name: cpu_seconds(lambda n=name: step(n)) for name in order}
        ratios.append(seconds["deterministic"] / seconds["default"] - 1)

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)

    median = statistics.median(ratios)
    benchmark.extra_info.update({"deterministic_overhead": median, "per_round": ratios})
    print(f"\ndeterministic mode overhead (median of per-round ratios): {median:.3f}")
    assert median <= 0.10, ratios


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_overhead_of_the_sdc_guard(benchmark, tmp_path) -> None:
    """One trainer per side, from the same start: each round takes one step of each side, so
    the sides' states (and costs) stay alike step for step."""
    with DeterministicMode(threads=1):
        steps: dict[str, Callable[[], object]] = {}
        guards = []
        for name in ("plain", *GUARD_SETS):
            settings = GuardSettings(detectors=GUARD_SETS[name]) if name != "plain" else None
            trainer = make_trainer(tmp_path / name, settings, batch=GUARD_BATCH, seq=GUARD_SEQ)
            steps[name] = trainer.train_step
            if settings is not None:
                guards.append(SdcGuard(trainer, settings))
                steps[name] = guards[-1].step
        for _ in range(2):  # warm-up (allocator, first-touch pages, the optimizer state)
            for step in steps.values():
                step()
        sides = list(steps)
        ratios: dict[str, list[float]] = {name: [] for name in GUARD_SETS}
        rounds = iter(range(10**6))

        def one_round() -> None:
            shift = next(rounds) % len(sides)
            seconds = {name: cpu_seconds(steps[name]) for name in sides[shift:] + sides[:shift]}
            for name in GUARD_SETS:
                ratios[name].append(seconds[name] / seconds["plain"] - 1)

        benchmark.pedantic(one_round, rounds=GUARD_ROUNDS, iterations=1)

    for guard in guards:  # a clean run: no alarm, nothing replayed
        assert guard.events == [] and guard.clean_steps == guard.steps == GUARD_ROUNDS + 2
        guard.close()
    medians = {name: statistics.median(values) for name, values in ratios.items()}
    benchmark.extra_info.update({f"{k}_overhead": v for k, v in medians.items()})
    benchmark.extra_info["per_round"] = ratios
    print(
        "\nSDC guard overhead (median of per-round ratios): "
        + ", ".join(f"{k} {v:.3f}" for k, v in medians.items())
    )
    assert medians["abft_validators"] <= 0.10, ratios["abft_validators"]
