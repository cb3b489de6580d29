"""The public library on models no one here wrote: Hugging Face LongcatFlash and Mixtral
(tiny configs, random weights, CPU).

Rerun determinism holds (two runs of 2 training steps, bitwise); batch invariance does not
hold for the stock models, and the property names the first divergent module (the negative
control). Measured values are printed (``pytest -s``)."""

from __future__ import annotations

import time

import pytest
import torch

from tests.repro.hf_models import VOCAB, longcat_flash_model, mixtral_model

pytest.importorskip("transformers")


def test_longcat_flash_reruns_in_fresh_processes_are_bitwise_equal(repro) -> None:
    start = time.perf_counter()
    outcome = repro.rerun_determinism(
        "tests.repro.hf_models:longcat_flash", steps=2, runs=2, workers=2
    )
    print(f"longcat_flash rerun: {outcome.describe()} in {time.perf_counter() - start:.1f} s")
    outcome.check()


def test_mixtral_reruns_are_bitwise_equal(repro) -> None:
    outcome = repro.rerun_determinism("tests.repro.hf_models:mixtral", steps=3, in_process=True)
    assert outcome.holds, outcome.describe()


def find_batch_counterexample(repro, model, index: int = 1):
    """The first (threads, batch) whose batch-invariance check fails; None if none does."""
    for threads in (1, 2):
        for size in (2, 4, 8):
            batch = torch.randint(
                0, VOCAB, (size, 16), generator=torch.Generator().manual_seed(size)
            )
            with repro.api.num_threads(threads):
                outcome = repro.batch_invariance(model, batch, index)
            if not outcome.holds:
                return threads, size, outcome
    return None


@pytest.mark.parametrize("build", [longcat_flash_model, mixtral_model], ids=["longcat", "mixtral"])
def test_stock_model_is_not_batch_invariant_and_the_module_is_named(repro, build) -> None:
    torch.manual_seed(0)
    model = build()
    found = find_batch_counterexample(repro, model)
    assert found is not None, "batch invariance held for every batch size and thread count tried"
    threads, size, outcome = found
    divergence = repro.expect_counterexample(outcome)
    print(f"{build.__name__}: {threads} thread(s), batch {size}: {divergence.describe()}")
    assert divergence.module in dict(model.named_modules())
    assert divergence.module.startswith("model.layers.")
    assert divergence.max_ulp is not None and divergence.max_ulp > 0
