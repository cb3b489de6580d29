"""Faults planted into an entry point's fingerprinted run land before the state is hashed."""

from __future__ import annotations

import pytest

from longcat_sim.repro.compare import first_divergence
from longcat_sim.repro.inject import Fault
from longcat_sim.repro.library import EntrySpec, run_entry

ENTRY = "tests.repro.entry_models:two_layer"


@pytest.mark.parametrize(
    ("target", "tensor"),
    [("", "state.exp_avg.weight"), ("inp.weight:exp_avg_sq", "state.exp_avg_sq.weight")],
)
def test_an_optimizer_state_fault_in_the_last_step_is_fingerprinted(target, tensor) -> None:
    clean = run_entry(EntrySpec(entry=ENTRY, steps=1))
    fault = Fault(site="optimizer_state", bit=30, step=0, target=target).to_dict()
    faulty = run_entry(EntrySpec(entry=ENTRY, steps=1, fault=fault))
    found = first_divergence(clean.fingerprints, faulty.fingerprints)
    assert found is not None, "the flipped moment left the step's fingerprint unchanged"
    assert (found.step, found.module, found.tensor) == (0, "inp", tensor)
    assert run_entry(EntrySpec(entry=ENTRY, steps=1)).fingerprints == clean.fingerprints
