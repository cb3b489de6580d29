"""One training step of a deployment on the cluster simulator."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from longcat_sim import bridge
from longcat_sim.cluster.assumptions import Assumptions, with_router_spread
from longcat_sim.cluster.hardware import Hardware
from longcat_sim.cluster.schedules import PIPELINES, TRAIN_SCHEDULES
from longcat_sim.cluster.simulator import TrainResult, simulate_train
from longcat_sim.cluster.workload import TrainWorkload
from longcat_sim.config.deployment import TrainDeployment
from longcat_sim.config.fields import known
from longcat_sim.errors import UserError
from longcat_sim.model.config import ModelConfig
from longcat_sim.scenarios.decode import check_expert_split

TRAIN_DEFAULTS: dict[str, Any] = TrainDeployment().to_dict()


def train_schedule(dep: TrainDeployment, cfg: ModelConfig) -> str:
    """The schedule asked for, or the model's own: the shortcut overlap where it has one."""
    if dep.schedule is not None:
        return dep.schedule
    return "scmoe" if cfg.layer_type == "scmoe" else "baseline"


def train_workload(
    dep: TrainDeployment, cfg: ModelConfig, hw: Hardware, a: Assumptions
) -> tuple[TrainWorkload, int]:
    """(the priced training step, GPUs): check what ties the deployment's values together."""
    schedule = train_schedule(dep, cfg)
    known(TRAIN_SCHEDULES, schedule, "schedule", UserError)
    if schedule != "baseline" and cfg.layer_type != "scmoe":
        raise UserError(
            f"--schedule {schedule} overlaps ScMoE layers (a shortcut branch); {cfg.name} has "
            "standard MoE layers: use --schedule baseline"
        )
    known(PIPELINES, dep.pipeline, "pipeline", UserError)
    group = dep.ep * dep.pp
    gpus = group if dep.gpus is None else dep.gpus
    if gpus % group:
        raise UserError(
            f"--gpus {gpus} is not a multiple of EP x PP = {group}; the grid is EP x PP x DP"
        )
    if dep.ep % dep.cp:
        raise UserError(f"--cp {dep.cp} must divide --ep {dep.ep} (CP runs inside EP)")
    check_expert_split(cfg, dep.ep, dep.redundant_experts)
    workload = bridge.train_workload(
        cfg,
        hardware=hw,
        assumptions=a,
        microbatch_tokens=dep.tokens_per_microbatch,
        microbatches=dep.microbatches,
        pipeline_stages=dep.pp,
        data_parallel=gpus // group,
        seq_len=dep.seq_len,
        ep=dep.ep,
        cp=dep.cp,
        moe_chunks=dep.moe_chunks,
        redundant_experts=dep.redundant_experts,
        rng=np.random.default_rng(dep.seed),
    )
    return workload, gpus


def run_train(
    dep: TrainDeployment, cfg: ModelConfig, hw: Hardware, a: Assumptions
) -> tuple[TrainResult, dict]:
    """Simulate one training step; also return the deployment as plain data (GPUs and DP
    resolved, names as given, the router's spread resolved for the model)."""
    a, spread_source = with_router_spread(a, cfg.name)
    dep = replace(dep, schedule=train_schedule(dep, cfg))
    workload, gpus = train_workload(dep, cfg, hw, a)
    result = simulate_train(workload, dep.schedule, dep.pipeline)
    config = dep.to_dict() | {
        "mode": "train",
        "model": cfg.name,
        "hardware": hw.name,
        "rdma_gb_s": hw.rdma_gb_s,
        "assumptions": a.name,
        "expert_popularity_sigma": a.expert_popularity_sigma,
        "router_imbalance_source": spread_source,
        "gpus": gpus,
        "dp": gpus // (dep.ep * dep.pp),
    }
    return result, config


def train_trace_records(result: TrainResult) -> tuple:
    """One micro-batch's layer timeline as GPU class 0, the pipeline blocks as classes 1.. (one
    per pipeline stage), so both fit in one trace."""
    blocks = tuple(replace(r, gpu=r.gpu + 1) for r in result.pipeline_records)
    return result.records + blocks
