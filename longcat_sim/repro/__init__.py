"""Reproducibility for any ``torch.nn.Module``: fingerprints, reruns in fresh processes,
invariance properties naming the first divergent module, and bit-flip campaigns with
detectors. See docs/reproducibility.md.

Names are imported on first use, so ``python -m longcat_sim.repro.<worker>`` runs each worker
module once and importing the package costs nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOME = {
    "DeterminismReport": "harness",
    "Divergence": "compare",
    "first_divergence": "compare",
    "ulp_difference": "compare",
    "Entry": "fingerprint",
    "StepFingerprint": "fingerprint",
    "Experiment": "entry",
    "build_experiment": "entry",
    "load_entry": "entry",
    "EntrySpec": "library",
    "check_entry_determinism": "library",
    "fingerprint_experiment_step": "library",
    "run_entry": "library",
    "add_entry_argument": "flips",
    "describe_campaign": "flips",
    "run_campaign": "flips",
    "run_entry_campaign": "flips",
    "PropertyResult": "properties",
    "PropertyViolation": "properties",
    "batch_invariance": "properties",
    "coupled_rows": "properties",
    "expect_counterexample": "properties",
    "num_threads": "properties",
    "permutation_invariance": "properties",
    "rerun_determinism": "properties",
    "thread_dependent": "properties",
    "thread_invariance": "properties",
    "ModuleDivergence": "trace",
    "trace_outputs": "trace",
    "world_size_invariance": "world",
}

__all__ = [
    "DeterminismReport",
    "Divergence",
    "Entry",
    "EntrySpec",
    "Experiment",
    "ModuleDivergence",
    "PropertyResult",
    "PropertyViolation",
    "StepFingerprint",
    "add_entry_argument",
    "batch_invariance",
    "build_experiment",
    "check_entry_determinism",
    "coupled_rows",
    "describe_campaign",
    "expect_counterexample",
    "fingerprint_experiment_step",
    "first_divergence",
    "load_entry",
    "num_threads",
    "permutation_invariance",
    "rerun_determinism",
    "run_campaign",
    "run_entry",
    "run_entry_campaign",
    "thread_dependent",
    "thread_invariance",
    "trace_outputs",
    "ulp_difference",
    "world_size_invariance",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from longcat_sim.repro.compare import Divergence, first_divergence, ulp_difference
    from longcat_sim.repro.entry import Experiment, build_experiment, load_entry
    from longcat_sim.repro.fingerprint import Entry, StepFingerprint
    from longcat_sim.repro.flips import (
        add_entry_argument,
        describe_campaign,
        run_campaign,
        run_entry_campaign,
    )
    from longcat_sim.repro.harness import DeterminismReport
    from longcat_sim.repro.library import (
        EntrySpec,
        check_entry_determinism,
        fingerprint_experiment_step,
        run_entry,
    )
    from longcat_sim.repro.properties import (
        PropertyResult,
        PropertyViolation,
        batch_invariance,
        coupled_rows,
        expect_counterexample,
        num_threads,
        permutation_invariance,
        rerun_determinism,
        thread_dependent,
        thread_invariance,
    )
    from longcat_sim.repro.trace import ModuleDivergence, trace_outputs
    from longcat_sim.repro.world import world_size_invariance
