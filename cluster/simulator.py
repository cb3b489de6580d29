"""Run a decode step or a training step on the streams and summarise it. No I/O.

Symmetric ranks form equivalence classes and only one representative GPU per class is
simulated: for decode the pace-setting rank, whose stage times the workload already carries;
for training one GPU per pipeline stage. The cost of a simulation therefore depends on layers,
micro-batches and pipeline stages, not on the number of GPUs in the cluster.

Training runs in two levels: one micro-batch's forward and backward through the stage's layers
(tasks per stage and token chunk), whose durations then become the F, B and W blocks of the
pipeline schedule. Point-to-point traffic between pipeline stages is not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from longcat_sim.cluster import metrics
from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.cluster.schedules import (
    DECODE_SCHEDULES,
    PIPELINES,
    TRAIN_SCHEDULES,
    decode_tasks,
    pipeline_tasks,
    train_layer_tasks,
)
from longcat_sim.cluster.streams import EventRecord, Task, run_tasks
from longcat_sim.cluster.workload import DecodeWorkload, TrainWorkload


@dataclass(frozen=True)
class DecodeResult:
    """One decode step on the pace-setting GPU. Times per step unless the name says per layer."""

    schedule: str
    n_layers: int
    step_ms: float
    tpl_us: float  # per layer, excluding the per-step overhead
    tpot_ms: float
    tps_per_user: float
    tgs: float
    cost_per_m_tokens: float
    per_layer_us: dict[str, float]  # busy time of each stage group per layer that runs it
    comm_us: float
    exposed_comm_us: float
    hidden_comm_us: float
    exposed_comm_share: float
    records: tuple[EventRecord, ...] = field(repr=False)

    def summary(self) -> dict[str, Any]:
        """Every field except the event records, ready for JSON."""
        return {k: v for k, v in self.__dict__.items() if k != "records"}


@dataclass(frozen=True)
class TrainResult:
    """One optimizer step of one pipeline stage (every stage does the same work)."""

    schedule: str
    pipeline: str
    step_ms: float
    forward_ms: float  # F block: one micro-batch through the stage's layers
    backward_ms: float  # B block (includes W unless the pipeline defers it)
    weight_grad_ms: float  # deferred W block (zero-bubble pipelines), else 0
    bubble_ms: float  # idle compute of a stage: step - micro-batches x (F + B + W)
    bubble_share: float
    comm_ms: float
    exposed_comm_ms: float
    exposed_comm_share: float  # exposed communication / step time
    tgs: float  # training tokens per GPU per second
    cost_per_m_tokens: float
    records: tuple[EventRecord, ...] = field(repr=False)  # one micro-batch: forward, then backward
    pipeline_records: tuple[EventRecord, ...] = field(repr=False)

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("records", "pipeline_records")}


def _jittered(tasks: list[Task], rng: np.random.Generator | None, jitter: float) -> list[Task]:
    """Scale every duration by a Gamma factor of mean 1 and coefficient of variation ``jitter``."""
    if not jitter >= 0.0:
        raise ClusterInputError(f"jitter must be >= 0 (a coefficient of variation), got {jitter}")
    if jitter == 0.0:
        return tasks
    if rng is None:
        raise ClusterInputError("jitter > 0 needs a numpy Generator: pass rng=")
    shape = 1.0 / jitter**2
    factors = rng.gamma(shape, 1.0 / shape, size=len(tasks))
    return [replace(t, duration=t.duration * float(f)) for t, f in zip(tasks, factors, strict=True)]


def _check_step(step_s: float) -> None:
    if not step_s > 0.0:
        raise ClusterInputError("the step takes no time: give the workload non-zero stage times")


def simulate_decode(
    workload: DecodeWorkload,
    schedule: str,
    *,
    rng: np.random.Generator | None = None,
    jitter: float = 0.0,
) -> DecodeResult:
    """Simulate one decode step under ``schedule`` (``sbo``, ``sequential`` or ``tbo``).

    With ``jitter`` > 0 every task's duration is scaled by an independent random factor (mean 1,
    coefficient of variation ``jitter``) drawn from ``rng``; the same seed gives the same result.
    """
    if schedule not in DECODE_SCHEDULES:
        raise ClusterInputError(
            f"unknown decode schedule {schedule!r}; choose one of {', '.join(DECODE_SCHEDULES)}"
        )
    tasks = decode_tasks(workload.layers, workload.layers_half, schedule, workload.overhead_s)
    records = run_tasks(_jittered(tasks, rng, jitter))
    step_s = metrics.makespan(records)
    _check_step(step_s)
    n_layers = len(workload.layers_half if schedule == "tbo" else workload.layers)
    overhead_s = sum(r.duration for r in records if r.name == "overhead")
    tpot = metrics.tpot_ms(step_s, workload.mtp_draft_tokens, workload.mtp_accept)
    tgs = metrics.tgs(workload.batch_per_device, tpot / 1e3)
    comm = metrics.comm_overlap(records)
    return DecodeResult(
        schedule=schedule,
        n_layers=n_layers,
        step_ms=step_s * 1e3,
        tpl_us=(step_s - overhead_s) / n_layers * 1e6,
        tpot_ms=tpot,
        tps_per_user=metrics.tps_per_user(tpot),
        tgs=tgs,
        cost_per_m_tokens=metrics.cost_per_m_tokens(workload.gpu_hour_usd, tgs),
        per_layer_us=metrics.per_layer_us(records),
        comm_us=comm.comm_s * 1e6,
        exposed_comm_us=comm.exposed_s * 1e6,
        hidden_comm_us=comm.hidden_s * 1e6,
        exposed_comm_share=metrics.exposed_comm_share(comm.exposed_s, step_s),
        records=records,
    )


def simulate_train(workload: TrainWorkload, schedule: str, pipeline: str = "none") -> TrainResult:
    """Simulate one training step: ``schedule`` ``scmoe`` (model/block.py's shortcut topology:
    the MoE beside the whole dense branch), ``conventional`` (its conventional topology: the
    MoE after the second attention, beside FFN_1) or ``baseline`` (the serial layer: the MoE
    after the first attention, every later dense stage waiting for it), ``pipeline`` ``none``
    (micro-batches back to back), ``1f1b`` or ``zb`` (ZB1P)."""
    if schedule not in TRAIN_SCHEDULES:
        raise ClusterInputError(
            f"unknown training schedule {schedule!r}; choose one of {', '.join(TRAIN_SCHEDULES)}"
        )
    if pipeline not in PIPELINES:
        raise ClusterInputError(
            f"unknown pipeline {pipeline!r}; choose one of {', '.join(PIPELINES)}"
        )
    fwd_tasks, bwd_tasks, weight_s = train_layer_tasks(
        workload.layers, schedule, workload.moe_chunks, defer_weight_grad=pipeline == "zb"
    )
    fwd = run_tasks(fwd_tasks)
    bwd = run_tasks(bwd_tasks)
    forward_s = metrics.makespan(fwd)
    backward_s = metrics.makespan(bwd)
    blocks = run_tasks(
        pipeline_tasks(
            pipeline,
            workload.pipeline_stages,
            workload.microbatches,
            forward_s,
            backward_s,
            weight_s,
        )
    )
    step_s = metrics.makespan(blocks)
    _check_step(step_s)
    m = workload.microbatches
    bubble_s = max(step_s - m * (forward_s + backward_s + weight_s), 0.0)
    comm_f, comm_b = metrics.comm_overlap(fwd), metrics.comm_overlap(bwd)
    exposed_s = m * (comm_f.exposed_s + comm_b.exposed_s)
    tgs = metrics.tgs(workload.tokens_per_step / workload.gpus, step_s)
    shifted = tuple(replace(r, start=r.start + forward_s, end=r.end + forward_s) for r in bwd)
    return TrainResult(
        schedule=schedule,
        pipeline=pipeline,
        step_ms=step_s * 1e3,
        forward_ms=forward_s * 1e3,
        backward_ms=backward_s * 1e3,
        weight_grad_ms=weight_s * 1e3,
        bubble_ms=bubble_s * 1e3,
        bubble_share=bubble_s / step_s if step_s > 0 else 0.0,
        comm_ms=m * (comm_f.comm_s + comm_b.comm_s) * 1e3,
        exposed_comm_ms=exposed_s * 1e3,
        exposed_comm_share=metrics.exposed_comm_share(exposed_s, step_s),
        tgs=tgs,
        cost_per_m_tokens=metrics.cost_per_m_tokens(workload.gpu_hour_usd, tgs),
        records=fwd + shifted,
        pipeline_records=blocks,
    )
