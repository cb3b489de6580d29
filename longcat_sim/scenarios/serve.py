"""A deployment serving requests over time (``longcat-sim serve``): traffic, instances whose
steps the step model prices, and the figures a serving run is judged by.

Co-located: ``instances`` instances of ``gpus`` GPUs; each step mixes up to
``tokens_per_device`` x gpus prompt tokens (a prompt at most ``tokens_per_device`` or
``chunk_size`` of them per step) into the decode batch. Disaggregated: ``prefill_instances``
prefill instances compute prompts (forwards of up to ``tokens_per_device`` x prefill_gpus
tokens); each prompt's KV cache then moves to the decode pool (its exposed share, as
``simulate --mode disagg`` prices it), where ``instances`` decode instances generate the rest.
The prefill pool does not wait for decode capacity: a transferred cache queues at the decode
pool. Each instance admits requests while its batch cap (``batch_per_device`` x gpus) and its
KV capacity (the HBM left beside weights, activations and reserve) allow.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.cluster.serving import (
    ServingConfig,
    ServingResult,
    latency_summary,
    simulate_serving,
)
from longcat_sim.cluster.serving_stats import json_ready, timeline
from longcat_sim.cluster.traffic import (
    AZURE_TRACES,
    Requests,
    load_trace,
    scale_to_rate,
    synthetic_requests,
)
from longcat_sim.config.serving import DisaggDeployment, ServeDeployment
from longcat_sim.errors import UserError
from longcat_sim.footprint import decode_footprint, prefill_footprint
from longcat_sim.scenarios.disagg import DisaggSetup, exposed_transfer, resolve_disagg
from longcat_sim.scenarios.serve_steps import (
    StepTimes,
    colocated_step_times,
    decode_pool_step_times,
    prefill_pool_step_times,
)

DEFAULT_RATE = 20.0


@dataclass(frozen=True)
class ServeSetup:
    """A resolved serving deployment: its pools, layout, instance counts, SLO and budget."""

    pools: DisaggSetup
    dep: ServeDeployment
    tokens_per_step: int  # prompt tokens per GPU per step

    @property
    def disagg(self) -> bool:
        return self.dep.layout == "disagg"

    @property
    def gpus(self) -> int:
        d = self.dep
        return d.instances * d.gpus + (d.prefill_instances * d.prefill_gpus if self.disagg else 0)

    @property
    def slo_s(self) -> tuple[float, float]:
        return self.dep.slo_ttft_ms / 1e3, self.dep.slo_tpot_ms / 1e3


def load_requests(dep: ServeDeployment) -> Requests:
    """The traffic: a trace (as recorded or scaled to ``rate``) or synthetic requests, cut to
    the first ``duration_s`` seconds."""
    if dep.trace is None:
        rate = DEFAULT_RATE if dep.rate is None else dep.rate
        cv = 1.0 if dep.arrivals == "poisson" else dep.arrival_cv
        req = synthetic_requests(
            rate, dep.duration_s, dep.prompt_len, dep.output_len, dep.seed,
            prompt_cv=dep.prompt_cv, output_cv=dep.output_cv, arrival_cv=cv,
        )  # fmt: skip
    else:
        path = AZURE_TRACES.get(dep.trace, dep.trace)
        req = load_trace(path)
        if dep.rate is not None:
            req = scale_to_rate(req, dep.rate)
        keep = req.arrival_s <= dep.duration_s
        req = Requests(req.arrival_s[keep], req.prompt_tokens[keep], req.output_tokens[keep])
    if not len(req):
        raise UserError(
            f"no request arrives in the first {dep.duration_s:g} s; raise --duration-s or --rate"
        )
    if dep.prefix_hit:
        cached = np.floor(req.prompt_tokens * dep.prefix_hit).astype(np.int64)
        req = Requests(req.arrival_s, req.prompt_tokens - cached, req.output_tokens, cached)
    return req


def resolve_serve(
    dep: ServeDeployment, requests: Requests, assume: list[str] | tuple[str, ...] = ()
) -> ServeSetup:
    """The pools priced at the traffic's mean lengths (a trace's own means)."""
    prompt_len = float(np.mean(requests.cached + requests.prompt_tokens))
    output_len = float(np.mean(requests.output_tokens))
    tokens = dep.prompt_tokens_per_step()
    values = {f.name: getattr(dep, f.name) for f in dataclasses.fields(DisaggDeployment)}
    values |= dict(
        prompt_len=max(1.0, prompt_len),
        output_len=max(1.0, output_len),
        tokens_per_device=tokens,
        gpus=dep.gpus,
        prefill_gpus=dep.prefill_gpus,
    )
    pools = resolve_disagg(DisaggDeployment(**values), assume)
    return ServeSetup(pools=pools, dep=dep, tokens_per_step=tokens)


def kv_capacity_tokens(setup: ServeSetup) -> int:
    """KV tokens one decoding (or co-located) instance holds: HBM beside weights, reserve,
    the activations of a full batch and, co-located, of a prompt chunk."""
    d = setup.pools.decode
    layout = dict(
        ep=d.ep, attention_dtype=d.attention_dtype, redundant_experts=d.redundant_experts,
        attention_tp=d.attention_tp, ffn_tp=d.ffn_tp,
    )  # fmt: skip
    full = decode_footprint(
        d.cfg, d.hw, d.assumptions, batch_per_device=d.batch_per_device, context=1,
        mtp_draft_tokens=d.mtp_draft_tokens, **layout,
    )  # fmt: skip
    free = full.hbm_gb - full.weights_gb - full.reserve_gb - full.activations_gb
    if not setup.disagg:
        chunk = prefill_footprint(
            d.cfg, d.hw, d.assumptions, tokens_per_device=setup.tokens_per_step,
            prompt_len=max(1, round(setup.pools.prefill.prompt_len)), **layout,
        )  # fmt: skip
        free -= chunk.activations_gb
    per_token_gb = full.kv_cache_gb / d.batch_per_device  # context 1
    tokens = math.floor(free / per_token_gb) if free > 0 else 0
    return tokens * d.gpus


def _check_capacity(setup: ServeSetup, requests: Requests, capacity: int) -> None:
    d = setup.pools.decode
    largest = int(np.max(requests.cached + requests.prompt_tokens + requests.output_tokens))
    if capacity < largest:
        what = f"{d.cfg.name} on {d.gpus} x {d.hw.name} (EP{d.ep})"
        raise UserError(
            f"{what} holds {capacity} KV tokens per instance beside its weights, under the "
            f"largest request's {largest}; use more GPUs per instance (--gpus), a smaller "
            "--batch-per-device or --attention-dtype fp8"
        )


def _config(setup: ServeSetup, instances: int, batch_cap: int, capacity: int | None) -> Any:
    d, dep = setup.pools.decode, setup.dep
    return ServingConfig(
        instances=instances,
        batch_cap=batch_cap,
        kv_capacity_tokens=capacity,
        chunk_tokens=min(setup.tokens_per_step, dep.chunk_size or setup.tokens_per_step),
        prefill_budget_tokens=setup.tokens_per_step * d.gpus,
        draft_tokens=d.mtp_draft_tokens,
        acceptance=d.mtp_accept,
        horizon_s=None if dep.drain else dep.duration_s,
        slo_ttft_s=setup.slo_s[0],
        slo_tpot_s=setup.slo_s[1],
    )


@dataclass(frozen=True)
class ServeRun:
    """Per-request times of the whole deployment and the stage runs behind them."""

    requests: Requests
    first_token_s: np.ndarray
    finish_s: np.ndarray
    stages: dict[str, ServingResult]
    step_times: dict[str, StepTimes]
    kv_capacity_tokens: int
    stage_requests: dict[str, np.ndarray]  # per stage, the request behind each of its rows
    kv_transfer_exposed_s: np.ndarray | None = None


def run_colocated(setup: ServeSetup, requests: Requests) -> ServeRun:
    """Co-located instances: chunked prefill inside decode steps."""
    d = setup.pools.decode
    capacity = kv_capacity_tokens(setup)
    _check_capacity(setup, requests, capacity)
    steps = colocated_step_times(setup.pools, setup.tokens_per_step)
    cfg = _config(setup, setup.dep.instances, d.batch_per_device * d.gpus, capacity)
    res = simulate_serving(requests, steps, cfg, seed=setup.dep.seed)
    every = np.arange(len(requests))
    return ServeRun(
        requests, res.first_token_s, res.finish_s, {"colocated": res}, {"colocated": steps},
        capacity, {"colocated": every},
    )  # fmt: skip


def exposed_transfer_s(setup: ServeSetup, requests: Requests) -> np.ndarray:
    """Seconds of each prompt's KV transfer the decode pool waits for."""
    return exposed_transfer(setup.pools, requests.cached + requests.prompt_tokens)


def run_disagg(setup: ServeSetup, requests: Requests) -> ServeRun:
    """The prefill pool's run, then the decode pool's on the transferred requests."""
    dep, d = setup.dep, setup.pools.decode
    capacity = kv_capacity_tokens(setup)
    _check_capacity(setup, requests, capacity)
    pre_steps = prefill_pool_step_times(setup.pools)
    p = setup.pools.prefill
    # a forward takes as many prompts as its budget holds in chunks of the mean computed
    # length (or the chunk cap); the rest wait in the prefill instance's queue
    per_forward = max(
        1, math.ceil(p.tokens_per_device * p.gpus / p.computed_per_prompt_per_forward)
    )
    pre_cfg = dataclasses.replace(
        _config(setup, dep.prefill_instances, per_forward, None),
        chunk_tokens=min(p.tokens_per_device, p.chunk_size or p.tokens_per_device),
        prefill_budget_tokens=p.tokens_per_device * p.gpus,
        draft_tokens=0,
    )
    prompts = dataclasses.replace(requests, output_tokens=np.ones(len(requests), dtype=np.int64))
    pre = simulate_serving(prompts, pre_steps, pre_cfg, seed=dep.seed)
    exposed = exposed_transfer_s(setup, requests)
    first = pre.first_token_s + exposed
    finish = np.where(requests.output_tokens == 1, first, np.nan)
    go = np.flatnonzero(np.isfinite(first) & (requests.output_tokens > 1))
    go = go[np.argsort(first[go], kind="stable")]
    dec_steps = decode_pool_step_times(setup.pools)
    stages, step_times = {"prefill": pre}, {"prefill": pre_steps, "decode": dec_steps}
    rows = {"prefill": np.arange(len(requests)), "decode": go}
    if len(go):
        held = requests.cached[go] + requests.prompt_tokens[go] + 1
        moved = Requests(
            first[go], np.zeros(len(go), dtype=np.int64), requests.output_tokens[go] - 1, held
        )
        cfg = _config(setup, dep.instances, d.batch_per_device * d.gpus, capacity)
        dec = simulate_serving(moved, dec_steps, cfg, seed=dep.seed)
        finish[go] = dec.finish_s
        stages["decode"] = dec
    return ServeRun(requests, first, finish, stages, step_times, capacity, rows, exposed)


def run_serve(setup: ServeSetup, requests: Requests) -> ServeRun:
    """Serve ``requests`` on the setup's layout (engine input errors become user errors)."""
    try:
        return (run_disagg if setup.disagg else run_colocated)(setup, requests)
    except ClusterInputError as exc:
        raise UserError(str(exc)) from None


def waiting_percentile(run: ServeRun, end: float, q: float, since_s: float = 0.0) -> float:
    """The ``q``-th percentile TTFT over every arrived request, one still waiting for its first
    token counted at its age so far (a lower bound): unlike the finished requests' percentile,
    it cannot look good while a queue grows."""
    arrived = (run.requests.arrival_s <= end) & (run.requests.arrival_s >= since_s)
    first = np.where(np.isnan(run.first_token_s), end, run.first_token_s)
    ttft = (first - run.requests.arrival_s)[arrived]
    return float(np.percentile(ttft, q)) if len(ttft) else math.nan


def _ms(summary: dict) -> dict:
    """Latency statistics in milliseconds (``ttft_p90_s`` -> ``ttft_p90_ms``)."""
    out = {}
    for key, value in summary.items():
        if key.endswith("_s") and key.split("_")[0] in ("ttft", "tpot", "e2e", "itl"):
            out[key[:-2] + "_ms"] = value * 1e3
        else:
            out[key] = value
    return out


def _cdf_ms(values: np.ndarray) -> list[float]:
    """Percentiles 0, 1, ..., 100 of the finite ``values`` in ms (empty when none)."""
    finite = values[np.isfinite(values)]
    return (np.percentile(finite, np.arange(101)) * 1e3).tolist() if len(finite) else []


def _pool_figures(name: str, res: ServingResult, steps: StepTimes, gpus: int) -> dict:
    return {
        f"{name}_busy_share": float(res.busy_share.mean()),
        f"{name}_steps": len(res.step_s),
        f"{name}_step_nodes_priced": steps.nodes_priced,
        f"{name}_timeline": timeline(res, instances=len(res.busy_share)),
        f"{name}_gpus": gpus,
    }


def serve_results(setup: ServeSetup, run: ServeRun) -> dict[str, Any]:
    """The JSON of a serving run: what was deployed and offered, then latency percentiles and
    CDFs, throughput per GPU, goodput and SLO attainment, cost, and load over time."""
    dep, d, p = setup.dep, setup.pools.decode, setup.pools.prefill
    req, end = run.requests, max(res.end_s for res in run.stages.values())
    out: dict[str, Any] = {
        "mode": "serve", "layout": dep.layout, "model": d.cfg.name, "hardware": d.hw.name,
        "gpus": dep.gpus, "instances": dep.instances, "ep": d.ep, "schedule": d.schedule,
        "batch_per_device": d.batch_per_device, "tokens_per_device": setup.tokens_per_step,
        "mtp_draft_tokens": d.mtp_draft_tokens, "mtp_accept": d.mtp_accept,
        "total_gpus": setup.gpus, "trace": dep.trace,
        "rate": len(req) / dep.duration_s, "prompt_len": p.prompt_len, "output_len": setup.pools.output_len,
        "kv_capacity_tokens": run.kv_capacity_tokens,
    }  # fmt: skip
    if setup.disagg:
        out |= {
            "prefill_gpus": p.gpus, "prefill_instances": dep.prefill_instances,
            "prefill_ep": p.ep, "prefill_schedule": p.schedule, "prefill_hardware": p.hw.name,
            "kv_transfer": setup.pools.kv_transfer,
            "kv_transfer_exposed_mean_ms": float(np.mean(run.kv_transfer_exposed_s)) * 1e3,
        }  # fmt: skip
    kept = req.arrival_s >= dep.warmup_s
    summary = latency_summary(
        req.arrival_s[kept], run.first_token_s[kept], run.finish_s[kept],
        req.output_tokens[kept], end, setup.slo_s, min(dep.warmup_s, end),
    )  # fmt: skip
    # goodput over the arrival window [warm-up, duration] (a drained run ends later)
    window = min(end, dep.duration_s) - min(dep.warmup_s, end)
    summary["goodput_requests_per_s"] = summary["requests_met_slo"] / window if window > 0 else 0.0
    out |= _ms(summary)
    decoding = run.stages.get("decode", run.stages.get("colocated"))
    if decoding is not None:
        out |= _ms({k: v for k, v in decoding.summary.items() if k.startswith("itl_")})
    q = dep.slo_percentile
    ttft_q = waiting_percentile(run, end, q, dep.warmup_s)
    tpot = (run.finish_s - run.first_token_s) / np.maximum(req.output_tokens - 1, 1)
    tpot = np.where((req.output_tokens > 1) & kept, tpot, np.nan)
    finite = tpot[np.isfinite(tpot)]
    tpot_q = float(np.percentile(finite, q)) if len(finite) else math.nan
    out |= {
        "slo_ttft_ms": dep.slo_ttft_ms, "slo_tpot_ms": dep.slo_tpot_ms, "slo_percentile": q,
        "ttft_at_slo_percentile_ms": ttft_q * 1e3, "tpot_at_slo_percentile_ms": tpot_q * 1e3,
        "slo_met": bool(ttft_q <= setup.slo_s[0] and tpot_q <= setup.slo_s[1]),
    }  # fmt: skip
    out |= _throughput(setup, run)
    out["ttft_cdf_ms"] = _cdf_ms((run.first_token_s - req.arrival_s)[kept])
    out["tpot_cdf_ms"] = _cdf_ms(tpot)
    out["e2e_cdf_ms"] = _cdf_ms((run.finish_s - req.arrival_s)[kept])
    for name, res in run.stages.items():
        gpus = p.gpus * dep.prefill_instances if name == "prefill" else d.gpus * dep.instances
        out |= _pool_figures(name, res, run.step_times[name], gpus)
    out["undefined"] = sorted(
        k for k, v in out.items() if isinstance(v, float) and not math.isfinite(v)
    )
    return json_ready(out)


def _throughput(setup: ServeSetup, run: ServeRun) -> dict[str, float]:
    """Tokens per second in total and per GPU, and $ per million output tokens. ``tgs`` and
    ``input_tgs`` are per GPU of the pool that does the work (all GPUs co-located; the decode
    and the prefill pool's disaggregated), as ``simulate --mode disagg`` reports them;
    ``output_tokens_per_gpu_s`` is over every GPU."""
    dep, d, p = setup.dep, setup.pools.decode, setup.pools.prefill
    end = max(res.end_s for res in run.stages.values())
    first_stage = run.stages["prefill" if setup.disagg else "colocated"]
    summary = first_stage.summary
    inputs = summary["throughput_input_tokens_per_s"] * first_stage.end_s
    decode_gpus = dep.instances * d.gpus
    if setup.disagg:
        outputs = float(np.count_nonzero(run.first_token_s <= end))
        if "decode" in run.stages:
            dec = run.stages["decode"]
            outputs += dec.summary["throughput_output_tokens_per_s"] * dec.end_s
        prefill_gpus = dep.prefill_instances * p.gpus
        usd_h = decode_gpus * d.hw.gpu_hour_usd + prefill_gpus * p.hw.gpu_hour_usd
    else:
        outputs = summary["throughput_output_tokens_per_s"] * first_stage.end_s
        prefill_gpus = decode_gpus
        usd_h = decode_gpus * d.hw.gpu_hour_usd
    output_rate, input_rate = outputs / end, inputs / end
    cost = usd_h / (output_rate * 3600.0) * 1e6 if output_rate > 0 else math.inf
    return {
        "input_tokens_per_s": input_rate,
        "output_tokens_per_s": output_rate,
        "input_tgs": input_rate / prefill_gpus,
        "tgs": output_rate / decode_gpus,
        "output_tokens_per_gpu_s": output_rate / setup.gpus,
        "prompt_tokens_offered": int(run.requests.prompt_tokens.sum()),
        "gpu_hour_usd_total": usd_h,
        "cost_per_m_tokens": cost,
    }
