"""One prefill forward of a deployment: its resolved, checked values, its price and its
simulation, and what a user reads from it (TTFT without queueing, prompt tokens per GPU per
second)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from longcat_sim import bridge
from longcat_sim.cluster import closedform
from longcat_sim.cluster.assumptions import Assumptions
from longcat_sim.cluster.hardware import Hardware
from longcat_sim.cluster.simulator import DecodeResult, simulate_decode
from longcat_sim.cluster.workload import DecodeWorkload
from longcat_sim.config.serving import PrefillDeployment
from longcat_sim.errors import UserError
from longcat_sim.footprint import Footprint, prefill_footprint
from longcat_sim.model.config import ModelConfig, load_model_config
from longcat_sim.scenarios.decode import (
    check_expert_split,
    check_schedule,
    default_schedule,
    resolve_assumptions,
    resolve_hardware,
)


@dataclass(frozen=True)
class PrefillSetup:
    """One prefill deployment, fully resolved (picklable)."""

    cfg: ModelConfig
    hw: Hardware
    assumptions: Assumptions
    gpus: int
    ep: int
    tokens_per_device: int
    prompt_len: float
    prompt_cv: float
    chunk_size: int | None
    prefix_hit: float
    attention_dtype: str
    schedule: str
    redundant_experts: int
    attention_tp: int
    ffn_tp: int
    seed: int

    def config(self) -> dict[str, Any]:
        """The inputs as plain data, for manifests and flat records."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out |= {"model": self.cfg.name, "hardware": self.hw.name}
        out["assumptions"] = self.assumptions.name
        del out["cfg"], out["hw"]
        return out

    @property
    def new_tokens_per_prompt(self) -> float:
        """Prompt tokens computed per prompt (the rest come from the prefix cache)."""
        return max(1.0, self.prompt_len * (1.0 - self.prefix_hit))

    @property
    def computed_per_prompt_per_forward(self) -> float:
        """Tokens of one prompt computed in one forward (a chunk, or all its new tokens)."""
        per_forward = min(self.new_tokens_per_prompt, float(self.tokens_per_device))
        if self.chunk_size is not None:
            per_forward = min(per_forward, float(self.chunk_size))
        return per_forward

    @property
    def forwards_per_prompt(self) -> int:
        """Forwards a prompt's computed tokens need: one unless chunked or longer than what a
        GPU computes per forward."""
        return math.ceil(self.new_tokens_per_prompt / self.computed_per_prompt_per_forward)


def resolve_prefill(
    dep: PrefillDeployment, assume: list[str] | tuple[str, ...] = (), pool: str = ""
) -> PrefillSetup:
    """A prefill deployment with its names resolved (``assume``: TERM=VALUE overrides;
    ``pool``: the prefix of its options, ``prefill-`` for a disaggregated prefill pool)."""
    cfg = load_model_config(dep.model)
    gpus = dep.gpus
    ep = gpus if dep.ep is None else dep.ep
    if gpus % ep:
        raise UserError(
            f"--{pool}gpus {gpus} is not a multiple of --{pool}ep {ep}; GPUs form whole EP groups"
        )
    schedule = default_schedule(cfg) if dep.schedule is None else dep.schedule
    check_schedule(cfg, schedule, f"--{pool}schedule")
    check_expert_split(cfg, ep, dep.redundant_experts)
    return PrefillSetup(
        cfg=cfg,
        hw=resolve_hardware(dep.hardware, dep.rdma_gb_s, dep.gpu_hour_usd),
        assumptions=resolve_assumptions(dep.assumptions, assume),
        gpus=gpus,
        ep=ep,
        tokens_per_device=dep.tokens_per_device,
        prompt_len=float(dep.prompt_len),
        prompt_cv=float(dep.prompt_cv),
        chunk_size=dep.chunk_size,
        prefix_hit=float(dep.prefix_hit),
        attention_dtype=dep.attention_dtype,
        schedule=schedule,
        redundant_experts=dep.redundant_experts,
        attention_tp=dep.attention_tp,
        ffn_tp=dep.ffn_tp,
        seed=dep.seed,
    )


def prefill_workload(setup: PrefillSetup) -> DecodeWorkload:
    """The priced forward: two micro-batches under TBO, compute sharing the SMs with the
    communication kernels under TBO and SBO."""
    return bridge.prefill_workload(
        setup.cfg,
        hardware=setup.hw,
        assumptions=setup.assumptions,
        ep=setup.ep,
        tokens_per_device=setup.tokens_per_device,
        prompt_len=setup.prompt_len,
        prompt_cv=setup.prompt_cv,
        prefix_hit=setup.prefix_hit,
        chunk_size=setup.chunk_size,
        attention_dtype=setup.attention_dtype,
        redundant_experts=setup.redundant_experts,
        rng=np.random.default_rng(setup.seed),
        attention_tp=setup.attention_tp,
        ffn_tp=setup.ffn_tp,
        micro_batches=2 if setup.schedule == "tbo" else 1,
        overlapped=setup.schedule in ("tbo", "sbo"),
    )


def prefill_memory(setup: PrefillSetup) -> Footprint:
    """HBM per GPU of the forward: weights, the prompts' KV cache until sent, activations."""
    return prefill_footprint(
        setup.cfg,
        setup.hw,
        setup.assumptions,
        ep=setup.ep,
        tokens_per_device=setup.tokens_per_device,
        prompt_len=max(1, round(setup.prompt_len)),
        attention_dtype=setup.attention_dtype,
        redundant_experts=setup.redundant_experts,
        attention_tp=setup.attention_tp,
        ffn_tp=setup.ffn_tp,
        micro_batches=2 if setup.schedule == "tbo" else 1,
        kv_tokens_per_token=setup.prompt_len / setup.computed_per_prompt_per_forward,
    )


@dataclass(frozen=True)
class PrefillFigures:
    """What one forward's time means to a user."""

    forward_s: float
    ttft_s: float
    input_tgs: float  # prompt tokens (cached ones included) per GPU per second
    computed_tgs: float  # prompt tokens computed per GPU per second
    cost_per_m_input_tokens: float


def prefill_figures(setup: PrefillSetup, forward_s: float, gpu_hour_usd: float) -> PrefillFigures:
    """TTFT without queueing (the forwards a prompt needs), throughput and cost per token."""
    computed = setup.tokens_per_device / forward_s
    served = computed * setup.prompt_len / setup.new_tokens_per_prompt
    return PrefillFigures(
        forward_s=forward_s,
        ttft_s=setup.forwards_per_prompt * forward_s,
        input_tgs=served,
        computed_tgs=computed,
        cost_per_m_input_tokens=gpu_hour_usd / (served * 3600.0) * 1e6,
    )


def closed_form_figures(setup: PrefillSetup) -> PrefillFigures:
    """The figures from the schedule's closed form alone (no event simulation): what a planner
    screens thousands of configurations with."""
    workload = prefill_workload(setup)
    return prefill_figures(
        setup, closedform.step_time(workload, setup.schedule), workload.gpu_hour_usd
    )


def run_prefill(setup: PrefillSetup) -> tuple[DecodeResult, DecodeWorkload, float]:
    """Price and simulate one forward; also the schedule's closed-form forward (s)."""
    workload = prefill_workload(setup)
    result = simulate_decode(workload, setup.schedule)
    return result, workload, closedform.step_time(workload, setup.schedule)


# step figures of a decode result that mean nothing for one prefill forward
_DECODE_ONLY = ("tpot_ms", "tps_per_user", "tgs", "cost_per_m_tokens", "step_ms")


def prefill_results(
    setup: PrefillSetup, result: DecodeResult, workload: DecodeWorkload, closed_s: float
) -> dict[str, Any]:
    """The JSON of one prefill simulation: inputs, then the numbers it is judged by."""
    out = setup.config()
    out["mode"] = "prefill"
    out["assumptions_description"] = setup.assumptions.description
    summary = result.summary()
    figures = prefill_figures(setup, result.step_ms / 1e3, workload.gpu_hour_usd)
    out |= {k: v for k, v in summary.items() if k not in _DECODE_ONLY}
    out |= {
        "forward_ms": figures.forward_s * 1e3,
        "closed_form_forward_ms": closed_s * 1e3,
        "forwards_per_prompt": setup.forwards_per_prompt,
        "ttft_ms": figures.ttft_s * 1e3,
        "input_tgs": figures.input_tgs,
        "computed_tgs": figures.computed_tgs,
        "total_input_tokens_per_s": figures.input_tgs * setup.gpus,
        "cost_per_m_input_tokens": figures.cost_per_m_input_tokens,
        "events": len(result.records),
    }
    return out | prefill_memory(setup).to_dict()
