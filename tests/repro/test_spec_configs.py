"""``longcat-sim determinism`` and ``sdc`` check, before any run starts, the very configs their
runs train with: one function builds them for both."""

from __future__ import annotations

import pytest

from longcat_sim.repro import fingerprint
from longcat_sim.repro.fingerprint import RunSpec
from longcat_sim.train import data, training


@pytest.mark.parametrize(
    "train", [{}, {"batch_size": 4, "seq_len": 32}, {"warmup_steps": 1}], ids=repr
)
def test_the_checked_configs_are_the_runs_configs(train, monkeypatch, tmp_path) -> None:
    built: list[tuple] = []
    monkeypatch.setattr(data, "build_corpus_data", lambda *a, **k: None)  # no corpus needed
    monkeypatch.setattr(training, "build_corpus_data", lambda *a, **k: None)
    monkeypatch.setattr(training, "Trainer", lambda cfg, tc, *a, **k: built.append((cfg, tc)))
    spec = RunSpec(model="tiny", steps=3, seed=5, train=train, byte_budget=2**18)
    fingerprint.build_trainer(spec, tmp_path)
    assert fingerprint.checked_spec_configs(spec) == built[0]


def test_a_changed_setting_is_seen() -> None:
    """Negative control: the comparison sees a setting the run would train with."""
    spec = RunSpec(model="tiny", steps=3)
    other = RunSpec(model="tiny", steps=3, train={"batch_size": 4})
    assert fingerprint.checked_spec_configs(spec) != fingerprint.checked_spec_configs(other)
