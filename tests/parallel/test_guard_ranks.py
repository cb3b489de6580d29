"""The SDC guard over two ranks: the reduced dense gradients' digests are cross-checked, a
gradient corrupted on one rank is caught, replayed, attributed to that rank and repaired (both
ranks end with the parameters of a clean run); with the cross-check off the same fault goes
unseen until the ranks' parameters disagree at the end (the negative control)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from longcat_sim.model.config import get_preset
from longcat_sim.repro.fingerprint import RunSpec, spec_configs
from longcat_sim.repro.inject import Fault, FaultPlan, ModelFaultInjector
from longcat_sim.train import distributed
from longcat_sim.train.data import build_corpus_data
from longcat_sim.train.guard import GuardSettings, guarded_config
from longcat_sim.train.world import TRAIN_BACKEND

BYTE_BUDGET = 2**18
FAULTY_RANK, STEP = 1, 2


def gradient_fault_on_rank_1(trainer) -> ModelFaultInjector:
    """A flip in rank 1's reduced embedding gradient at step 2 (rank r is device r)."""
    fault = Fault(site="gradient", bit=30, step=STEP, device=FAULTY_RANK,
                  target="model.embed_tokens.weight")  # fmt: skip
    injector = ModelFaultInjector(trainer.model, FaultPlan([fault]))
    injector.attach_trainer(trainer)
    return injector


def routing_fault_on_rank_1(trainer) -> ModelFaultInjector:
    """Rank 1's routing ids pushed out of range at step 1: its step fails mid-forward while
    rank 0 goes on into the expert exchange."""
    fault = Fault(site="routing_indices", bit=40, step=1, device=FAULTY_RANK)
    injector = ModelFaultInjector(trainer.model, FaultPlan([fault]))
    injector.attach_trainer(trainer)
    return injector


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("data-cache")
    build_corpus_data(get_preset("tiny").vocab_size, 32, byte_budget=BYTE_BUDGET, cache_dir=folder)
    return str(folder)


def _train(run_dir: Path, cache: str, guard: GuardSettings | None, faults=None):
    spec = RunSpec(steps=5, train={"batch_size": 2, "seq_len": 32}, byte_budget=BYTE_BUDGET)
    cfg, tc = spec_configs(spec)
    cfg = guarded_config(cfg, guard)
    run = distributed.RankRun(cfg, tc, str(run_dir), data_cache=cache, guard=guard, faults=faults)
    summary = distributed.launch(distributed.train_rank, 2, run, backend=TRAIN_BACKEND)[0]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, [e for r in records for e in r.get("sdc_events", [])]


def test_a_corrupted_rank_is_caught_named_and_repaired(tmp_path, cache) -> None:
    clean, _ = _train(tmp_path / "clean", cache, None)
    guarded, events = _train(tmp_path / "guarded", cache, GuardSettings(), gradient_fault_on_rank_1)
    assert [(e["step"], e["detectors"], e["attribution"], e["ranks"]) for e in events] == [
        (STEP, ["grad_digest"], "transient", [FAULTY_RANK])
    ]
    assert guarded.param_hash == clean.param_hash
    blind = GuardSettings(detectors=("abft", "recompute", "at_rest"))
    with pytest.raises(Exception, match="different parameters"):
        _train(tmp_path / "blind", cache, blind, gradient_fault_on_rank_1)


class Hung(Exception):
    pass


def test_a_step_failing_on_one_rank_stops_the_run(tmp_path, cache) -> None:
    """A step that fails on one rank only cannot be replayed together (its peer waits in a
    collective): the run stops with the rank's error instead of hanging (an alarm after 120 s
    would end a hang)."""

    def hung(*_):
        raise Hung("the run hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        with pytest.raises(Exception, match="rank 1") as caught:
            _train(tmp_path / "run", cache, GuardSettings(), routing_fault_on_rank_1)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not isinstance(caught.value, Hung)
