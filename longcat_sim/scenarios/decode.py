"""One decode step of a deployment: its resolved, checked values and its simulation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from longcat_sim import bridge
from longcat_sim.cluster import closedform, metrics
from longcat_sim.cluster.assumptions import Assumptions, get_assumptions, with_router_spread
from longcat_sim.cluster.hardware import Hardware, get_hardware
from longcat_sim.cluster.schedules import DECODE_SCHEDULES
from longcat_sim.cluster.simulator import DecodeResult, simulate_decode
from longcat_sim.cluster.streams import EventRecord
from longcat_sim.cluster.workload import DecodeWorkload
from longcat_sim.config.deployment import DecodeDeployment
from longcat_sim.config.fields import known
from longcat_sim.errors import UserError
from longcat_sim.footprint import Footprint, decode_footprint
from longcat_sim.model.config import ModelConfig, load_model_config


@dataclass(frozen=True)
class DecodeSetup:
    """One decode deployment, fully resolved (picklable: sweeps ship it to worker processes)."""

    cfg: ModelConfig
    hw: Hardware
    assumptions: Assumptions
    gpus: int
    ep: int
    batch_per_device: int
    context: float
    attention_dtype: str
    mtp_draft_tokens: int
    mtp_accept: float
    schedule: str
    redundant_experts: int
    attention_tp: int
    ffn_tp: int
    seed: int
    router_imbalance_source: str = ""

    def config(self) -> dict[str, Any]:
        """The inputs as plain data, for manifests and flat records."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["model"] = self.cfg.name
        out["hardware"] = self.hw.name
        out["assumptions"] = self.assumptions.name
        out["expert_popularity_sigma"] = self.assumptions.expert_popularity_sigma
        out["gpu_hour_usd"] = self.hw.gpu_hour_usd
        out["gpu_hour_usd_source"] = self.hw.price_source
        del out["cfg"], out["hw"]
        return out

    def warnings(self) -> list[str]:
        """What a reader of the results should know about inputs that are legal but odd."""
        if self.mtp_draft_tokens and self.mtp_accept == 0:
            return [
                f"{self.cfg.name}: {self.mtp_draft_tokens} MTP draft token(s) verified at "
                "acceptance 0 cost every step and gain nothing; --mtp-draft-tokens 0 turns "
                "speculative decoding off"
            ]
        return []


def default_schedule(cfg: ModelConfig) -> str:
    """The overlap a model runs best: SBO with a shortcut branch, else two micro-batches."""
    return "sbo" if cfg.layer_type == "scmoe" else "tbo"


def runs_schedule(cfg: ModelConfig, schedule: str) -> bool:
    """Whether ``cfg`` has the layers ``schedule`` overlaps (SBO: ScMoE's shortcut branch)."""
    return schedule != "sbo" or cfg.layer_type == "scmoe"


def check_schedule(cfg: ModelConfig, schedule: str, option: str = "--schedule") -> None:
    """A known decode or prefill schedule the model can run (SBO needs ScMoE's shortcut
    branch)."""
    known(DECODE_SCHEDULES, schedule, "schedule", UserError)
    if not runs_schedule(cfg, schedule):
        raise UserError(
            f"{option} sbo needs ScMoE layers (a shortcut branch); {cfg.name} has standard MoE "
            "layers: use tbo or sequential"
        )


def check_expert_split(cfg: ModelConfig, ep: int, redundant_experts: int) -> None:
    """EP groups hold whole experts: (FFN experts + replicas) % EP == 0."""
    if cfg.n_routed_experts and (cfg.n_routed_experts + redundant_experts) % ep:
        raise UserError(
            f"--ep {ep} does not divide {cfg.name}'s {cfg.n_routed_experts} experts + "
            f"{redundant_experts} redundant; choose --redundant-experts R with "
            f"(experts + R) % EP == 0 (e.g. R = {(-cfg.n_routed_experts) % ep})"
        )


def resolve_assumptions(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Assumptions:
    """A named assumption set with ``TERM=VALUE`` overrides; its name records them."""
    base = get_assumptions(name)
    changes: dict[str, Any] = {}
    for item in overrides:
        term, sep, text = str(item).partition("=")
        term = term.strip().replace("-", "_")
        if not sep or not hasattr(base, term) or term in ("name", "description"):
            raise UserError(
                f"--assume takes TERM=VALUE with TERM one of the assumption terms "
                f"({', '.join(f.name for f in fields(base)[1:-1])}); got {item!r}"
            )
        current = getattr(base, term)
        if current is None:  # an optional number left to the model
            current = 0.0
        text = text.strip()
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise UserError(f"--assume {term} takes true or false, got {text!r}")
            changes[term] = text.lower() in ("true", "1")
        elif isinstance(current, int | float):
            try:
                changes[term] = float(text)
            except ValueError:
                raise UserError(f"--assume {term} takes a number, got {text!r}") from None
        else:
            changes[term] = text
    if not changes:
        return base
    label = ",".join(f"{k}={v}" for k, v in changes.items())
    return base.replace(name=f"{base.name}+{label}", **changes)


def resolve_hardware(
    name: str, rdma_gb_s: float | None, gpu_hour_usd: float | None = None
) -> Hardware:
    """A catalogue entry or hardware file with the deployment's overrides."""
    hw = get_hardware(name)
    if rdma_gb_s is not None:
        hw = hw.replace(rdma_gb_s=rdma_gb_s)
    if gpu_hour_usd is not None:
        hw = hw.replace(gpu_hour_usd=gpu_hour_usd, price_source="--gpu-hour-usd")
    return hw


def resolve_decode(dep: DecodeDeployment, assume: Sequence[str] = ()) -> DecodeSetup:
    """A decode deployment with its names resolved (``assume``: TERM=VALUE overrides)."""
    return decode_setup(
        dep,
        load_model_config(dep.model),
        resolve_hardware(dep.hardware, dep.rdma_gb_s),
        resolve_assumptions(dep.assumptions, assume),
    )


def decode_setup(
    dep: DecodeDeployment, cfg: ModelConfig, hw: Hardware, assumptions: Assumptions
) -> DecodeSetup:
    """Check what ties a deployment's values together and resolve the defaults that depend on
    others (EP = all GPUs, MTP draft tokens from the model's MTP layers, MTP acceptance from
    the assumption set, the router's spread from the model, the GPU-hour price from the
    hardware); each value was checked by its field."""
    gpus = dep.gpus
    ep = gpus if dep.ep is None else dep.ep
    if gpus % ep:
        raise UserError(f"--gpus {gpus} is not a multiple of --ep {ep}; GPUs form whole EP groups")
    schedule = default_schedule(cfg) if dep.schedule is None else dep.schedule
    check_schedule(cfg, schedule)
    check_expert_split(cfg, ep, dep.redundant_experts)
    accept = assumptions.mtp_accept if dep.mtp_accept is None else dep.mtp_accept
    drafts = cfg.mtp_layers if dep.mtp_draft_tokens is None else dep.mtp_draft_tokens
    assumptions, spread_source = with_router_spread(assumptions, cfg.name)
    if dep.gpu_hour_usd is not None:
        hw = hw.replace(gpu_hour_usd=dep.gpu_hour_usd, price_source="--gpu-hour-usd")
    return DecodeSetup(
        cfg=cfg,
        hw=hw,
        assumptions=assumptions,
        gpus=gpus,
        ep=ep,
        batch_per_device=dep.batch_per_device,
        context=float(dep.context),
        attention_dtype=dep.attention_dtype,
        mtp_draft_tokens=drafts,
        mtp_accept=float(accept),
        schedule=schedule,
        redundant_experts=dep.redundant_experts,
        attention_tp=dep.attention_tp,
        ffn_tp=dep.ffn_tp,
        seed=dep.seed,
        router_imbalance_source=spread_source,
    )


def decode_workload(
    setup: DecodeSetup, micro_batches: tuple[int, ...] | None = None
) -> DecodeWorkload:
    """The priced decode step of a deployment (``micro_batches``: default by schedule, 2 for
    TBO, else 1)."""
    if micro_batches is None:
        micro_batches = (2,) if setup.schedule == "tbo" else (1,)
    return bridge.decode_workload(
        setup.cfg,
        hardware=setup.hw,
        assumptions=setup.assumptions,
        ep=setup.ep,
        batch_per_device=setup.batch_per_device,
        context=setup.context,
        attention_dtype=setup.attention_dtype,
        mtp_draft_tokens=setup.mtp_draft_tokens,
        mtp_accept=setup.mtp_accept,
        redundant_experts=setup.redundant_experts,
        rng=np.random.default_rng(setup.seed),
        attention_tp=setup.attention_tp,
        ffn_tp=setup.ffn_tp,
        micro_batches=micro_batches,
    )


def run_decode(setup: DecodeSetup) -> tuple[DecodeResult, float]:
    """Price and simulate one decode step; also return the schedule's closed-form step (s)."""
    workload = decode_workload(setup)
    result = simulate_decode(workload, setup.schedule)
    return result, closedform.step_time(workload, setup.schedule)


def exposed_attention_us(records: Sequence[EventRecord]) -> float:
    """Microseconds per layer of attention compute during which no communication stream of its
    GPU is busy, averaged over the layers that run attention (as ``per_layer_us``).

    Under SBO that is MLA_0 (``attn0``) whenever the dispatch covers FFN_0 + MLA_1's QKV and the
    combine covers MLA_1's core, the regime of the paper's Table 7, whose LongCat-Flash
    "attention per layer" row is this exposed MLA_0; a standard MoE layer's attention is all
    exposed (the router waits for it). Under ``sequential`` it is all attention. Under TBO it is
    the attention the other micro-batch's dispatch/combine does not hide (Table 7's TBO rows
    list the whole attention, hidden)."""
    exposed = 0.0
    layers: set[tuple[int, int]] = set()
    for gpu in {r.gpu for r in records}:
        rows = [r for r in records if r.gpu == gpu]
        comm = metrics.union((r.start, r.end) for r in rows if r.is_comm)
        for r in rows:
            if metrics.STAGE_GROUPS.get(r.name) == "attention":
                hidden = metrics.intersection_measure([(r.start, r.end)], comm)
                exposed += r.duration - hidden
                layers.add((gpu, r.layer))
    return exposed / len(layers) * 1e6 if layers else 0.0


def decode_results(setup: DecodeSetup, result: DecodeResult, closed_step_s: float) -> dict:
    """The JSON of one decode simulation: inputs, then the numbers it is judged by.

    ``per_layer_us["attention"]`` is all attention compute of a layer (both MLA blocks of a
    LongCat-Flash layer); ``per_layer_us["attention_exposed"]`` is the part no communication
    hides (:func:`exposed_attention_us`)."""
    out = setup.config()
    out["mode"] = "decode"
    out["assumptions_description"] = setup.assumptions.description
    out.update(result.summary())
    per_layer = {}
    for key, value in out["per_layer_us"].items():
        per_layer[key] = value
        if key == "attention":
            per_layer["attention_exposed"] = exposed_attention_us(result.records)
    out["per_layer_us"] = per_layer
    out["closed_form_step_ms"] = closed_step_s * 1e3
    out["total_tokens_per_s"] = result.tgs * setup.gpus
    out["events"] = len(result.records)
    return out | decode_memory(setup).to_dict()


def decode_memory(setup: DecodeSetup) -> Footprint:
    """HBM per GPU of the decode deployment: weights, the requests' KV cache, activations."""
    return decode_footprint(
        setup.cfg,
        setup.hw,
        setup.assumptions,
        ep=setup.ep,
        batch_per_device=setup.batch_per_device,
        context=max(1, round(setup.context)),
        attention_dtype=setup.attention_dtype,
        redundant_experts=setup.redundant_experts,
        attention_tp=setup.attention_tp,
        ffn_tp=setup.ffn_tp,
        mtp_draft_tokens=setup.mtp_draft_tokens,
    )
