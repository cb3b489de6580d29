"""One training step of a deployment on the cluster simulator."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from longcat_sim import bridge
from longcat_sim.cluster.assumptions import Assumptions
from longcat_sim.cluster.hardware import Hardware
from longcat_sim.cluster.schedules import PIPELINES, TRAIN_SCHEDULES
from longcat_sim.cluster.simulator import TrainResult, simulate_train
from longcat_sim.errors import UserError
from longcat_sim.model.config import ModelConfig
from longcat_sim.scenarios.decode import check_choice, check_int

TRAIN_DEFAULTS: dict[str, Any] = {
    "model": "longcat-flash",
    "hardware": "H800",
    "rdma_gb_s": 25.0,  # 200 Gb/s RDMA per accelerator (paper sec. 5.3)
    "ep": 32,
    "cp": 8,
    "pp": 1,
    "seq_len": 8192,
    "tokens_per_microbatch": 4096,
    "microbatches": 8,
    "moe_chunks": 2,
    "schedule": "scmoe",
    "pipeline": "none",
    "redundant_experts": 0,
    "assumptions": "train",
    "seed": 0,
}


def run_train(
    values: dict[str, Any], cfg: ModelConfig, hw: Hardware, a: Assumptions
) -> tuple[TrainResult, dict]:
    for name in (
        "ep",
        "cp",
        "pp",
        "seq_len",
        "tokens_per_microbatch",
        "microbatches",
        "moe_chunks",
    ):
        check_int(name, values[name])
    check_int("redundant_experts", values["redundant_experts"], 0)
    check_int("seed", values["seed"], 0)
    check_choice("schedule", values["schedule"], TRAIN_SCHEDULES)
    check_choice("pipeline", values["pipeline"], PIPELINES)
    group = values["ep"] * values["pp"]
    gpus = group if values["gpus"] is None else values["gpus"]
    check_int("gpus", gpus)
    if gpus % group:
        raise UserError(
            f"--gpus {gpus} is not a multiple of EP x PP = {group}; the grid is EP x PP x DP"
        )
    if values["ep"] % values["cp"]:
        raise UserError(f"--cp {values['cp']} must divide --ep {values['ep']} (CP runs inside EP)")
    if cfg.n_routed_experts and (cfg.n_routed_experts + values["redundant_experts"]) % values["ep"]:
        raise UserError(
            f"--ep {values['ep']} does not divide {cfg.name}'s {cfg.n_routed_experts} experts + "
            f"{values['redundant_experts']} redundant; choose --redundant-experts R with "
            f"(experts + R) % EP == 0"
        )
    workload = bridge.train_workload(
        cfg,
        hardware=hw,
        assumptions=a,
        microbatch_tokens=values["tokens_per_microbatch"],
        microbatches=values["microbatches"],
        pipeline_stages=values["pp"],
        data_parallel=gpus // group,
        seq_len=values["seq_len"],
        ep=values["ep"],
        cp=values["cp"],
        moe_chunks=values["moe_chunks"],
        redundant_experts=values["redundant_experts"],
        rng=np.random.default_rng(values["seed"]),
    )
    result = simulate_train(workload, values["schedule"], values["pipeline"])
    config = {k: values[k] for k in TRAIN_DEFAULTS} | {
        "mode": "train",
        "model": cfg.name,
        "hardware": hw.name,
        "rdma_gb_s": hw.rdma_gb_s,
        "assumptions": a.name,
        "gpus": gpus,
        "dp": gpus // group,
    }
    return result, config


def train_trace_records(result: TrainResult) -> tuple:
    """One micro-batch's layer timeline as GPU class 0, the pipeline blocks as classes 1.. (one
    per pipeline stage), so both fit in one trace."""
    blocks = tuple(replace(r, gpu=r.gpu + 1) for r in result.pipeline_records)
    return result.records + blocks
