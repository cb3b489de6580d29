"""The public reproducibility library (``longcat_sim.repro``) through the pytest plugin's
``repro`` fixture, on modules defined in tests: each property holds where it should and its
negative control finds the counterexample, naming the first divergent module."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from longcat_sim.model.config import get_preset
from longcat_sim.model.determinism import DeterministicMode
from longcat_sim.repro import PropertyViolation
from longcat_sim.repro.strategies import float_batches, token_batches, with_index, with_permutation
from tests.repro.cases import model_for
from tests.repro.entry_models import Scale, TwoLayer

DET = get_preset("tiny").replace(num_layers=1, deterministic=True).to_dict()
DEFAULT = {**DET, "deterministic": False}
# the repro fixture holds no state between examples
SHARED_FIXTURE = [HealthCheck.function_scoped_fixture]


@pytest.fixture(scope="module")
def two_layer() -> TwoLayer:
    torch.manual_seed(0)
    return TwoLayer()


@settings(max_examples=8, deadline=None, suppress_health_check=SHARED_FIXTURE)
@given(case=with_index(token_batches(DET["vocab_size"], max_batch=5, max_len=12)))
def test_batch_invariance_holds_for_the_deterministic_in_house_model(repro, case) -> None:
    batch, index = case
    with DeterministicMode():
        repro.batch_invariance(model_for(DET, 0), batch, index).check()


def test_batch_invariance_fails_for_the_default_model_at_the_moe(repro) -> None:
    batch = torch.randint(0, DET["vocab_size"], (3, 12), generator=torch.Generator().manual_seed(3))
    found = repro.expect_counterexample(repro.batch_invariance(model_for(DEFAULT, 0), batch, 2))
    assert found.module == "model.layers.0.mlp"


def test_stock_linear_is_not_batch_invariant(repro, two_layer) -> None:
    """nn.Linear on one row takes another kernel than on several: the first module differs."""
    batch = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    found = repro.expect_counterexample(repro.batch_invariance(two_layer, batch, 0))
    assert found.module == "inp" and found.max_ulp > 0


@settings(max_examples=10, deadline=None, suppress_health_check=SHARED_FIXTURE)
@given(case=with_index(float_batches(8)))
def test_an_elementwise_module_is_batch_invariant_unless_its_rows_are_coupled(repro, case) -> None:
    batch, index = case
    model = Scale()
    repro.batch_invariance(model, batch, index).check()
    wrapped = torch.nn.Sequential(model)
    with repro.coupled_rows(wrapped, "0"):
        found = repro.expect_counterexample(repro.batch_invariance(wrapped, batch, max(index, 1)))
    assert found.module == "0"


@settings(max_examples=8, deadline=None, suppress_health_check=SHARED_FIXTURE)
@given(case=with_permutation(token_batches(DET["vocab_size"], max_batch=5, max_len=12)))
# a rotary table as long as the batch is not permuted with the rows
@example(case=(torch.tensor([[172, 47, 117], [192, 323, 251], [195, 359, 9]]), [0, 2, 1]))
def test_permutation_invariance_of_the_deterministic_model_and_its_negative_control(
    repro, case
) -> None:
    batch, perm = case
    model = model_for(DET, 0)
    with DeterministicMode():
        repro.permutation_invariance(model, batch, perm).check()
        if perm[0] != 0:  # row 0 moves: a module adding row 0 to every row sees another row 0
            with repro.coupled_rows(model, "model.embed_tokens"):
                outcome = repro.permutation_invariance(model, batch, perm)
            assert repro.expect_counterexample(outcome).module == "model.embed_tokens"


@pytest.mark.repro_threads(1, 2)
def test_thread_invariance_uses_the_marker_and_names_the_perturbed_module(repro, two_layer) -> None:
    assert repro.threads == (1, 2)
    batch = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    repro.thread_invariance(two_layer, batch).check()
    with repro.thread_dependent(two_layer, "act"):
        outcome = repro.thread_invariance(two_layer, batch)
    with pytest.raises(PropertyViolation, match="module 'act'"):
        outcome.check()


@pytest.mark.repro_entry("tests.repro.entry_models:two_layer")
def test_rerun_determinism_in_process_holds_and_a_planted_flip_is_found(repro) -> None:
    from longcat_sim.repro import check_entry_determinism
    from longcat_sim.repro.inject import Fault

    repro.rerun_determinism(steps=2, in_process=True).check()
    fault = Fault("gradient", bit=0, step=1, target="out.weight").to_dict()
    report = check_entry_determinism(repro.entry, steps=2, fault_in_run=(1, fault), in_process=True)
    div = report.first_divergence
    assert div is not None and (div.step, div.module, div.tensor) == (1, "out", "grad.weight")
    assert div.max_ulp == 1


@pytest.mark.slow  # two worlds of fresh processes (1 and 2 ranks) per check, about 5 s each
def test_world_size_invariance_runs_holds_elementwise_and_fails_through_a_gemm(repro) -> None:
    repro.world_size_invariance("tests.repro.entry_models:scale_pair").check()
    outcome = repro.world_size_invariance("tests.repro.entry_models:two_layer")
    assert repro.expect_counterexample(outcome).module == "inp"


def test_properties_reject_bad_arguments(repro, two_layer) -> None:
    batch = torch.randn(3, 8)
    with pytest.raises(ValueError, match="outside a batch"):
        repro.batch_invariance(two_layer, batch, 3)
    with pytest.raises(ValueError, match="not a permutation"):
        repro.permutation_invariance(two_layer, batch, [0, 0, 1])
    with pytest.raises(AssertionError, match="expected a counterexample"):
        repro.expect_counterexample(repro.batch_invariance(Scale(), batch, 1))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("no_colon", "is not 'package.module:function'"),
        ("tests.repro.no_such_module:f", "cannot import"),
        ("tests.repro.entry_models:missing", "has no function 'missing'"),
        ("tests.repro.entry_models:not_an_experiment", "must return an Experiment"),
    ],
)
def test_bad_entry_points_are_one_line_user_errors(entry, message) -> None:
    from longcat_sim.errors import UserError
    from longcat_sim.repro import build_experiment

    with pytest.raises(UserError, match=message) as info:
        build_experiment(entry)
    assert "\n" not in str(info.value)


def test_hypothesis_thread_pairs_are_one_against_more() -> None:
    from longcat_sim.repro.strategies import thread_pairs

    @settings(max_examples=5)
    @given(pair=thread_pairs)
    def check(pair) -> None:
        assert pair[0] == 1 and pair[1] >= 2

    check()
    assert st is not None


def test_every_public_name_resolves_without_importing_torch_first() -> None:
    import subprocess
    import sys

    code = (
        "import sys, longcat_sim.repro as r; assert 'torch' not in sys.modules; "
        "[getattr(r, n) for n in r.__all__]; print(len(r.__all__))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 25
