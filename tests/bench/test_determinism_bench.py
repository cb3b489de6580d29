"""Overheads of reproducibility, one thread, measured in one benchmark run:

- deterministic mode against the default on a ``small`` training step (batch-invariant linear
  layers, attention, expert GEMMs, SiLU and softmax; fixed-order gradient norm; deterministic
  torch flags). Budget: at most 10 %.
- ABFT (the expert GEMMs on checksum-encoded weights, 8 more output columns, their row-sum
  and row-norm checks, and the combine's check) against the expert FFN's GEMMs on plain
  weights, on the ``small`` MoE with 1024 tokens. Budget: at most 15 %. The re-encoding of the
  checksum rows after each optimizer step is reported beside it (``abft_encode``).

Each round times the two sides back to back (in alternating order) with the process CPU
clock, so load from other processes on the machine affects both alike; the ratio reported is
the median over rounds of the per-round ratios.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch

from longcat_sim.model.config import get_preset
from longcat_sim.model.determinism import DeterministicMode
from longcat_sim.repro.detectors import AbftMonitor
from longcat_sim.repro.moe_step import (
    EXPERT_WEIGHTS,
    CombineOutputs,
    MoEStepConfig,
    expert_rows,
    initial_state,
    plain_weight,
    reencode_,
    stable_topk,
    swiglu_ffn,
)
from longcat_sim.train.config import default_train_config

ROUNDS = 15
GEMM_REPEATS = 5


def cpu_seconds(fn: Callable[[], object]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def moe_operands(tokens: int = 1024):
    """The small preset's dispatched MoE operands: rows per expert, encoded weights, input."""
    sc = MoEStepConfig(get_preset("small").replace(deterministic=True), tokens=tokens)
    state = initial_state(sc, 0)
    cfg = sc.model
    scores = (state.x_TD @ state.params["router"].t()).softmax(-1)
    idx = stable_topk(scores, cfg.moe_topk)
    flat = idx.reshape(-1)
    slots = torch.nonzero(flat < cfg.n_routed_experts).squeeze(1)
    slots = slots[torch.argsort(flat[slots], stable=True)]
    counts = torch.bincount(flat, minlength=cfg.num_experts_total)[: cfg.n_routed_experts]
    rows = expert_rows(counts, slots.shape[0])
    x_SD = state.x_TD.index_select(0, slots // cfg.moe_topk)
    gates = scores.gather(1, idx)
    return rows, x_SD, gates, state, slots, flat >= cfg.n_routed_experts


def plain_expert_ffn(x_SD, plain, rows) -> None:
    """The expert FFN's GEMMs on plain weights (fused gate/up, then down), one GEMM per expert,
    no autograd: the work ABFT protects, and the baseline of its cost."""
    gate_up = x_SD.new_empty(x_SD.shape[0], plain["gate_up"].shape[1])
    y = x_SD.new_empty(x_SD.shape[0], plain["down"].shape[1])
    for e, (s, t) in enumerate(zip(rows.starts, rows.ends, strict=True)):
        torch.mm(x_SD[s:t], plain["gate_up"][e].t(), out=gate_up[s:t])
    inter = gate_up.shape[1] // 2
    hidden = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    for e, (s, t) in enumerate(zip(rows.starts, rows.ends, strict=True)):
        torch.mm(hidden[s:t], plain["down"][e].t(), out=y[s:t])


def abft_workloads() -> dict[str, Callable[[], None]]:
    """The small MoE's expert GEMMs on plain weights (``gemms``), the same GEMMs on checksum-
    encoded weights with every check (``abft``) and the re-encoding of the weights
    (``encode``), each repeated ``GEMM_REPEATS`` times."""
    rows, x_SD, gates, state, slot_S, is_zero_S = moe_operands()
    encoded = {name: state.params[name] for name in EXPERT_WEIGHTS}
    plain = {name: plain_weight(w).contiguous() for name, w in encoded.items()}
    tokens, k = gates.shape
    with torch.no_grad():  # the combine's operands, as the MoE step builds them
        y_SD = swiglu_ffn(x_SD, encoded, rows)["down"]
        x_TD = state.x_TD
        y_slots = x_TD.new_zeros(tokens * k, x_TD.shape[1]).index_copy(0, slot_S, y_SD)
        x_slots = x_TD.repeat_interleave(k, dim=0)
        y_TKD = torch.where(is_zero_S.unsqueeze(-1), x_slots, y_slots).view(tokens, k, -1)
        out_TD = gates[:, 0:1] * y_TKD[:, 0]
        for slot in range(1, k):
            out_TD = out_TD + gates[:, slot : slot + 1] * y_TKD[:, slot]
    scratch = {name: w.clone() for name, w in encoded.items()}

    def gemms() -> None:
        for _ in range(GEMM_REPEATS):
            plain_expert_ffn(x_SD, plain, rows)

    def abft() -> None:
        for _ in range(GEMM_REPEATS):
            monitor = AbftMonitor()
            norms = torch.linalg.vector_norm(x_TD, dim=1)[slot_S // k]
            swiglu_ffn(x_SD, encoded, rows, None, (monitor,), state.scales, norms)
            monitor.on_combine(CombineOutputs(out_TD, gates, y_TKD, (slot_S, x_TD)))
            assert monitor.alarms == 0

    def encode() -> None:
        for _ in range(GEMM_REPEATS):
            for name in EXPERT_WEIGHTS:
                reencode_(scratch[name])

    return {"gemms": gemms, "abft": abft, "encode": encode}


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_overhead_of_deterministic_mode_and_of_abft(benchmark, small_trainers) -> None:
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
    work = abft_workloads()
    ratios: dict[str, list[float]] = {"deterministic": [], "abft": [], "abft_encode": []}
    rounds = iter(range(10**6))

    def one_round() -> None:
        flip = next(rounds) % 2
        order = ("default", "deterministic")[:: -1 if flip else 1]
        seconds = {name: cpu_seconds(lambda n=name: step(n)) for name in order}
        ratios["deterministic"].append(seconds["deterministic"] / seconds["default"] - 1)
        with torch.no_grad():
            if flip:
                t_abft, t_gemm = cpu_seconds(work["abft"]), cpu_seconds(work["gemms"])
            else:
                t_gemm, t_abft = cpu_seconds(work["gemms"]), cpu_seconds(work["abft"])
        ratios["abft"].append(t_abft / t_gemm - 1)
        ratios["abft_encode"].append(cpu_seconds(work["encode"]) / t_gemm)

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)

    medians = {name: statistics.median(values) for name, values in ratios.items()}
    benchmark.extra_info.update({f"{k}_overhead": v for k, v in medians.items()})
    benchmark.extra_info["per_round"] = ratios
    print(
        "\noverhead ratios (median of per-round ratios): "
        + ", ".join(f"{k} {v:.3f}" for k, v in medians.items())
    )
    assert medians["deterministic"] <= 0.10, ratios["deterministic"]
    assert medians["abft"] <= 0.15, ratios["abft"]
