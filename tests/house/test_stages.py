"""The ScMoE stage order exists once, in ``longcat_sim.stages``: the model's layer (local and
expert-parallel), the calibration's overlap windows and the simulator's layer programs all
follow it."""

from __future__ import annotations

import pytest
import torch

from longcat_sim import stages
from longcat_sim.cluster import schedules
from longcat_sim.model.config import get_preset
from longcat_sim.model.transformer import LongcatFlashForCausalLM

CFG = get_preset("tiny")
PHASE_STEPS = {phase: step for step, phase in stages.MOE_PHASES.items()}


def _recorded_order(topology: str, overlap: bool, expert_parallel: bool) -> tuple[str, ...]:
    """The steps one layer's forward reaches, named by the stage vocabulary."""
    from longcat_sim.model.parallel import ExpertParallelMoE

    cfg = CFG.replace(topology=topology)
    core = LongcatFlashForCausalLM(cfg, generator=torch.Generator().manual_seed(3)).model
    layer = core.layers[0]
    events: list[str] = []
    blocks = [
        *zip(stages.ATTENTIONS, layer.self_attn, strict=True),
        *zip(stages.DENSE_FFNS, layer.mlps, strict=True),
    ]
    for step, block in blocks:
        block.register_forward_pre_hook(lambda *_, step=step: events.append(step))
    moe = ExpertParallelMoE(layer.mlp, overlap=overlap) if expert_parallel else layer.mlp
    for phase, step in PHASE_STEPS.items():
        original = getattr(moe, phase)

        def traced(*args, step=step, original=original):
            events.append(step)
            return original(*args)

        object.__setattr__(moe, phase, traced)
    layer.mlp = moe
    x = torch.randn(1, 8, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    cos, sin = core.rotary_emb(torch.arange(8))
    layer(x, cos, sin)
    return tuple(events)


@pytest.mark.parametrize("topology", ["shortcut", "conventional"])
@pytest.mark.parametrize("expert_parallel", [False, True])
def test_the_layer_runs_its_steps_in_the_one_order(topology, expert_parallel):
    recorded = _recorded_order(topology, True, expert_parallel)
    assert recorded == stages.layer_order(topology)
    # negative control: the other topology's order is told apart
    other = {"shortcut": "conventional", "conventional": "shortcut"}[topology]
    assert recorded != stages.layer_order(other)


def test_without_overlap_the_moe_phases_run_back_to_back():
    recorded = _recorded_order("shortcut", False, True)
    assert recorded == stages.layer_order("shortcut", overlap=False)
    assert recorded == stages.LAYER_ORDER["serial"]
    assert stages.in_flight_over(recorded, stages.DISPATCH) == ()


def test_each_exchange_is_in_flight_over_its_dense_steps():
    order = stages.layer_order("shortcut")
    assert stages.in_flight_over(order, stages.DISPATCH) == (
        stages.DENSE_FFN_0,
        stages.ATTENTION_1,
    )
    assert stages.in_flight_over(order, stages.COMBINE) == (stages.DENSE_FFN_1,)
    conventional = stages.layer_order("conventional")
    assert stages.in_flight_over(conventional, stages.DISPATCH) == (stages.DENSE_FFN_1,)
    assert stages.in_flight_over(conventional, stages.COMBINE) == ()


def test_the_calibration_times_the_windows_of_the_one_order(monkeypatch):
    from longcat_sim.commands import calibrate
    from longcat_sim.model.block import LongcatDecoderLayer

    calls: list[str] = []
    original = LongcatDecoderLayer.dense_step

    def recording(self, step, *args, **kwargs):
        calls.append(step)
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(LongcatDecoderLayer, "dense_step", recording)
    calibrate._model_costs(CFG.replace(num_layers=1), 8)
    order = stages.layer_order("shortcut")
    dispatch = stages.in_flight_over(order, stages.DISPATCH)
    combine = stages.in_flight_over(order, stages.COMBINE)
    # the windows' inputs once, then nine timed repeats of both windows
    assert tuple(calls) == dispatch + (dispatch + combine) * 9
    # negative control: the conventional order has other windows
    conventional = stages.layer_order("conventional")
    assert stages.in_flight_over(conventional, stages.DISPATCH) != dispatch


@pytest.mark.parametrize(
    ("schedule", "topology", "flow"),
    [
        ("baseline", "serial", stages.SERIAL_FLOW),
        ("conventional", "conventional", stages.CONVENTIONAL_FLOW),
    ],
)
def test_the_simulator_issues_the_model_order(schedule, topology, flow):
    program = schedules.train_forward_program("scmoe", schedule, 1)
    issued = tuple(op.stage for op in program.ops)
    assert issued == stages.cluster_order(stages.LAYER_ORDER[topology])
    assert stages.follows_flow(issued, flow)


def test_every_scmoe_program_follows_the_one_dataflow():
    flow = stages.LAYER_FLOW["scmoe"]
    assert schedules.DATAFLOW["scmoe"] is flow
    programs = [
        schedules.SEQUENTIAL_PROGRAMS["scmoe"],
        schedules.SBO_PROGRAMS["scmoe"],
        schedules.TBO_PROGRAMS["scmoe"],
        *(schedules.train_forward_program("scmoe", "scmoe", c) for c in (1, 2)),
    ]
    for program in programs:
        issued = tuple(dict.fromkeys(op.stage for op in program.ops))
        assert stages.follows_flow(issued, flow), issued
    assert stages.follows_flow(stages.cluster_order(stages.layer_order("shortcut")), flow)


def test_a_reordered_or_other_topology_order_is_told_apart():
    shortcut = stages.cluster_order(stages.layer_order("shortcut"))
    # the shortcut routes before attention 1 has run: not an order of the conventional flow
    assert not stages.follows_flow(shortcut, stages.CONVENTIONAL_FLOW)
    swapped = list(shortcut)
    i, j = swapped.index(stages.DISPATCH), swapped.index(stages.ROUTED_EXPERTS)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    assert not stages.follows_flow(swapped, stages.LAYER_FLOW["scmoe"])
    assert not stages.follows_flow(shortcut[:-1], stages.LAYER_FLOW["scmoe"])


@pytest.mark.parametrize("phase", ["decode", "train"])
@pytest.mark.parametrize("preset", ["longcat-flash", "deepseek-v3"])
def test_the_cost_model_speaks_the_vocabulary(preset, phase):
    """Every layer kind's costs name exactly the stages of its flow (with ``ffn_tp=2`` the
    tensor-parallel stages are there too): none missing, none extra."""
    from longcat_sim.model import costs

    layers = costs.layer_costs(get_preset(preset), tokens=8, context=64, phase=phase, ffn_tp=2)
    assert {layer.kind for layer in layers} == (
        {"scmoe"} if preset == "longcat-flash" else {"dense", "moe"}
    )
    for layer in layers:
        flow = stages.LAYER_FLOW[layer.kind]
        assert set(layer.stages) == set(flow) - {stages.OUT}, layer.kind
        for comm in layer.comms:
            assert stages.stream_of(comm.stage) == "comm", comm.stage
        for op in layer.ops:
            assert stages.stream_of(op.stage) == "compute", op.stage
