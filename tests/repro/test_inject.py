"""Bit-flip injection: what a flip does to a value, and when a fault fires."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longcat_sim.errors import UserError
from longcat_sim.model.config import get_preset
from longcat_sim.model.hashing import hash_named_tensors
from longcat_sim.model.probes import ExpertCall, MoEProbe, add_probe
from longcat_sim.model.transformer import LongcatFlashForCausalLM
from longcat_sim.repro.inject import (
    SITES,
    Fault,
    FaultPlan,
    ModelFaultInjector,
    StepInjector,
    flip_bit_,
    flipped,
    parse_fault,
    site_bits,
    trainer_faults,
)
from tests.repro.cases import bitwise_equal
from tests.repro.sdc_support import make_trainer


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


@pytest.mark.parametrize("site", SITES)
def test_model_fault_injector_changes_the_run_from_its_step_on(site, clean_steps) -> None:
    bit = 0 if site.startswith("routing") else 20
    faulty = tiny_steps(Fault(site=site, bit=bit, index=5, step=1))
    assert faulty[0] == clean_steps[0]
    assert faulty[1] != clean_steps[1]


class Capture(MoEProbe):
    """Keeps copies of the GEMM outputs of every call it sees."""

    def __init__(self) -> None:
        self.calls: list[dict[str, torch.Tensor]] = []

    def on_experts(self, call: ExpertCall) -> None:
        outputs = {"gate": call.pre_gate_RI, "up": call.pre_up_RI, "down": call.y_RD}
        self.calls.append({k: v.detach().clone() for k, v in outputs.items()})


def gemm_outputs(target: str | None) -> dict[str, torch.Tensor]:
    """Layer 0's expert GEMM outputs in one forward, with an ``expert_gemm`` fault at
    ``target`` (None: no fault); the fault's probe runs before the capturing one."""
    torch.manual_seed(0)
    model = LongcatFlashForCausalLM(get_preset("tiny").replace(num_layers=1))
    moe = model.model.layers[0].mlp
    capture = Capture()
    add_probe(moe, capture)
    injector = None
    if target is not None:
        injector = ModelFaultInjector(model, Fault(site="expert_gemm", bit=30, target=target))
        injector.begin_step(0)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    if injector is not None:
        injector.close()
        assert moe.probe is capture  # closing detaches the fault's probe only
    (call,) = capture.calls
    return call


@pytest.mark.parametrize(
    ("target", "changed"),
    [
        ("model.layers.0.mlp:gate", {"gate", "down"}),
        ("model.layers.0.mlp:up", {"up", "down"}),
        ("model.layers.0.mlp:down", {"down"}),
        ("model.layers.0.mlp", {"gate", "down"}),  # the first GEMM that runs
    ],
)
def test_expert_gemm_faults_land_in_the_named_gemm(target, changed) -> None:
    clean, faulty = gemm_outputs(None), gemm_outputs(target)
    differ = {name for name in clean if not bitwise_equal(clean[name], faulty[name])}
    assert differ == changed
    flips = (clean["gate"].view(torch.int32) != faulty["gate"].view(torch.int32)).sum()
    assert int(flips) == ("gate" in changed)  # one element, one flip


def test_faults_fire_only_on_their_device() -> None:
    model = LongcatFlashForCausalLM(get_preset("tiny").replace(num_layers=1))
    name = "model.layers.0.mlp.experts.up_proj"
    weight = dict(model.named_parameters())[name]
    before = weight.detach().clone()
    fault = Fault(site="weight", bit=31, index=3, target=name, persistent=True, device=1)
    injector = ModelFaultInjector(model, fault, device=0)
    injector.begin_step(0)
    assert bitwise_equal(weight.detach(), before)
    injector.begin_step(1, device=1)
    assert weight.detach().view(-1)[3] == -before.view(-1)[3]
    injector.close()


def test_optimizer_state_faults_pick_the_named_moment() -> None:
    model = LongcatFlashForCausalLM(get_preset("tiny").replace(num_layers=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long)).square().mean().backward()
    optimizer.step()
    name = "model.layers.0.mlp.experts.down_proj"
    state = optimizer.state[dict(model.named_parameters())[name]]
    copies = {k: state[k].clone() for k in ("exp_avg", "exp_avg_sq")}
    fault = Fault(site="optimizer_state", bit=31, index=0, target=f"{name}:exp_avg_sq")
    injector = ModelFaultInjector(model, [fault], optimizer=optimizer)
    injector.begin_step(0)
    assert bitwise_equal(state["exp_avg"], copies["exp_avg"])
    assert not bitwise_equal(state["exp_avg_sq"], copies["exp_avg_sq"])
    injector.close()


def test_model_fault_injector_refuses_unknown_targets() -> None:
    model = LongcatFlashForCausalLM(get_preset("tiny").replace(num_layers=1))
    with pytest.raises(ValueError, match="is not a MoE layer"):
        ModelFaultInjector(model, Fault(site="expert_gemm", bit=0, target="model.layers.0"))
    with pytest.raises(ValueError, match="does not exist"):
        ModelFaultInjector(model, Fault(site="expert_gemm", bit=0, target="model.layers.9.mlp"))
    with pytest.raises(ValueError, match="does not exist"):
        ModelFaultInjector(model, Fault(site="activation", bit=0, target="nope"))
    with pytest.raises(ValueError, match="does not exist"):
        ModelFaultInjector(model, Fault(site="weight", bit=0, target="nope"))
    with pytest.raises(ValueError, match="does not exist"):
        ModelFaultInjector(model, Fault(site="gradient", bit=0, target="model.layers.0.mlp"))


def test_targets_match_a_layer_or_one_of_its_gemms() -> None:
    inj = StepInjector([Fault(site="expert_gemm", bit=31, target="m.mlp")], step=0, device=0)
    x = torch.ones(1)
    assert bitwise_equal(inj.at("expert_gemm", x, target="m.ml:gate"), x)
    assert bitwise_equal(inj.at("expert_gemm", x, target="m.mlp2:gate"), x)
    assert inj.at("expert_gemm", x, target="m.mlp:down").tolist() == [-1.0]
    narrow = StepInjector([Fault(site="expert_gemm", bit=31, target="m.mlp:up")], 0, 0)
    assert bitwise_equal(narrow.at("expert_gemm", x, target="m.mlp:gate"), x)
    assert narrow.at("expert_gemm", x, target="m.mlp:up").tolist() == [-1.0]


@pytest.mark.parametrize(
    ("text", "fault"),
    [
        ("expert_gemm:30", Fault(site="expert_gemm", bit=30)),
        ("expert_gemm:30:2", Fault(site="expert_gemm", bit=30, step=2)),
        ("combine:31:8::persistent", Fault(site="combine", bit=31, step=8, persistent=True)),
        (
            "weight:27:6:model.layers.0.mlp.experts.up_proj",
            Fault(site="weight", bit=27, step=6, target="model.layers.0.mlp.experts.up_proj"),
        ),
        (
            "expert_gemm:3:1:model.layers.0.mlp:down",
            Fault(site="expert_gemm", bit=3, step=1, target="model.layers.0.mlp:down"),
        ),
        (
            "expert_gemm:3:1:model.layers.0.mlp:down:persistent",
            Fault(
                site="expert_gemm", bit=3, step=1, target="model.layers.0.mlp:down", persistent=True
            ),
        ),
        ("routing_counts:63", Fault(site="routing_counts", bit=63)),
    ],
)
def test_parse_fault(text, fault) -> None:
    assert parse_fault(text) == fault


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("combine", "--sdc-inject expects SITE:BIT"),
        ("combine:x", "BIT and STEP must be integers"),
        ("combine:1:y", "BIT and STEP must be integers"),
        ("disk:1", "unknown fault site 'disk'"),
        ("combine:32", "out of range for site 'combine'"),
        ("combine:-1", "out of range"),
        ("combine:1:-2", "must be >= 0"),
    ],
)
def test_parse_fault_refuses_bad_text_in_one_line(text, message) -> None:
    with pytest.raises(UserError, match=message) as info:
        parse_fault(text, "--sdc-inject")
    assert "\n" not in str(info.value) and "--sdc-inject" in str(info.value)


def test_trainer_faults_turns_a_missing_target_into_a_user_error(tmp_path) -> None:
    trainer = make_trainer(tmp_path)
    with pytest.raises(UserError, match="--sdc-inject: fault target module 'nope'"):
        trainer_faults(trainer, [Fault(site="combine", bit=1, target="nope")])
    assert trainer.stepper.gradient_hooks == []
    injector = trainer_faults(trainer, [Fault(site="gradient", bit=1)])
    assert trainer.stepper.gradient_hooks == [injector.on_gradients]
    injector.close()
    assert trainer.stepper.gradient_hooks == []
