"""Bit-flip injection: what a flip does to a value, and when a fault fires."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longcat_sim.model.config import get_preset
from longcat_sim.model.hashing import hash_named_tensors
from longcat_sim.model.transformer import LongcatFlashForCausalLM
from longcat_sim.repro.inject import (
    SITES,
    Fault,
    FaultPlan,
    ModelFaultInjector,
    StepInjector,
    flip_bit_,
    flipped,
    site_bits,
)
from tests.repro.cases import bitwise_equal


def test_flips_of_sign_exponent_and_mantissa_bits_of_float32() -> None:
    x = torch.tensor([1.5, 1.0, 1.5, 1.0])
    flip_bit_(x, 0, 31)  # sign
    flip_bit_(x, 1, 22)  # top mantissa bit: 1.0 -> 1.5
    flip_bit_(x, 2, 23)  # lowest exponent bit: 2^0 -> 2^-1
    flip_bit_(x, 3, 30)  # top exponent bit: 2^0 -> 2^128 = inf
    assert x[:3].tolist() == [-1.5, 1.5, 0.75] and torch.isinf(x[3])


def test_flips_of_int64_routing_values_and_index_wrapping() -> None:
    ids = torch.tensor([5, 5])
    flip_bit_(ids, 1, 1)
    flip_bit_(ids, 2, 63)  # index 2 wraps to element 0; bit 63 is the sign
    assert ids.tolist() == [5 - 2**63, 7]


@settings(max_examples=50)
@given(
    values=st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=8),
    index=st.integers(0, 100),
    bit=st.integers(0, 31),
)
def test_flipping_a_bit_twice_restores_the_tensor_and_once_changes_one_element(
    values, index, bit
) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    once = flipped(x, index, bit)
    changed = (once.view(torch.int32) != x.view(torch.int32)).nonzero().flatten().tolist()
    assert changed == [index % x.numel()]
    assert bitwise_equal(flipped(once, index, bit), x)


def test_flipped_copies_pass_gradients_through_unchanged() -> None:
    x = torch.ones(4, requires_grad=True)
    y = flipped(x * 2, 1, 31)
    assert y.detach().tolist() == [2.0, -2.0, 2.0, 2.0]
    y.sum().backward()
    assert x.grad.tolist() == [2.0] * 4


def test_bad_flips_and_faults_are_refused() -> None:
    with pytest.raises(ValueError, match="out of range"):
        flip_bit_(torch.zeros(2), 0, 32)
    with pytest.raises(ValueError, match="cannot flip"):
        flip_bit_(torch.zeros(2, dtype=torch.bool), 0, 0)
    with pytest.raises(ValueError, match="contiguous"):
        flip_bit_(torch.zeros(4, 4).t(), 0, 0)
    with pytest.raises(ValueError, match="unknown fault site"):
        Fault(site="disk", bit=0)
    with pytest.raises(ValueError, match="out of range for site 'combine'"):
        Fault(site="combine", bit=40)
    assert site_bits("routing_counts") == 64 and site_bits("weight") == 32
    Fault(site="routing_indices", bit=63)


def test_transient_faults_fire_once_and_persistent_ones_on_every_run_of_their_device() -> None:
    transient = Fault(site="combine", bit=3, step=4)
    persistent = Fault(site="activation", bit=3, persistent=True, device=1)
    plan = FaultPlan([transient, persistent])
    x = torch.ones(3)

    def fires(step: int, device: int) -> list[str]:
        inj = plan.injector(step, device)
        inj.at("combine", x)
        inj.at("activation", x)
        return [f.site for f in inj.fired]

    assert fires(3, 0) == []
    assert fires(4, 1) == ["activation"]  # wrong device for the transient one
    assert fires(4, 0) == ["combine"]
    assert fires(4, 0) == []  # a rerun of the same step is clean
    assert fires(9, 1) == ["activation"] and fires(9, 1) == ["activation"]


def test_a_step_injector_respects_targets() -> None:
    inj = StepInjector([Fault(site="expert_gemm", bit=31, target="up")], step=0, device=0)
    x = torch.ones(2)
    assert bitwise_equal(inj.at("expert_gemm", x, target="gate"), x)
    assert inj.at("expert_gemm", x, target="up").tolist() == [-1.0, 1.0]
    assert inj.fired and not inj.wants("expert_gemm")


def tiny_steps(fault: Fault | None, steps: int = 2) -> list[str]:
    """Digest of (logits, gradients, parameters, optimizer state) after each step, or
    ``"crash"`` for a step that raised."""
    cfg = get_preset("tiny").replace(num_layers=1)
    model = LongcatFlashForCausalLM(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    injector = ModelFaultInjector(model, fault) if fault is not None else None
    digests = []
    for step in range(steps):
        if injector is not None:
            injector.begin_step(step)
        try:
            logits = model(ids)
        except RuntimeError:
            digests.append("crash")
            break
        optimizer.zero_grad()
        logits.square().mean().backward()
        optimizer.step()
        if injector is not None:
            injector.end_step(optimizer)
        state = {"logits": logits.detach()}
        for name, p in model.named_parameters():
            state[f"grad.{name}"] = p.grad
            state[f"param.{name}"] = p.detach()
            state[f"exp_avg.{name}"] = optimizer.state[p]["exp_avg"]
        digests.append(hash_named_tensors(state))
    if injector is not None:
        injector.close()
    return digests


@pytest.fixture(scope="module")
def clean_steps() -> list[str]:
    return tiny_steps(None)


@pytest.mark.parametrize("site", [s for s in SITES if s != "expert_gemm"])
def test_model_fault_injector_changes_the_run_from_its_step_on(site, clean_steps) -> None:
    bit = 0 if site.startswith("routing") else 20
    faulty = tiny_steps(Fault(site=site, bit=bit, index=5, step=1))
    assert faulty[0] == clean_steps[0]
    assert faulty[1] != clean_steps[1]


def test_model_fault_injector_refuses_unreachable_sites_and_unknown_targets() -> None:
    model = LongcatFlashForCausalLM(get_preset("tiny").replace(num_layers=1))
    with pytest.raises(ValueError, match="fused MoE kernel"):
        ModelFaultInjector(model, Fault(site="expert_gemm", bit=0))
    with pytest.raises(ValueError, match="does not exist"):
        ModelFaultInjector(model, Fault(site="activation", bit=0, target="nope"))
    with pytest.raises(ValueError, match="does not exist"):
        ModelFaultInjector(model, Fault(site="weight", bit=0, target="nope"))
