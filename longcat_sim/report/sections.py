"""What ``longcat-sim report`` simulates, section by section, and the gathering of the report
data: the simulated sections (cached by their inputs' hash, ``report.cache``) and other
commands' results (``report.results``).

The output is the plain report data documented in ``reports.inputs``; ``reports.page`` renders
it. Simulated sections go through JSON before use, so a section read back from the cache and
one just computed give the same bytes.

Sections and what they compare:

- ``table7``: the paper's theoretical decode (Table 7) under the ``table7`` assumption set on
  H800, EP128, batch 96, MTP 1 draft at 80 % acceptance.
- ``table6``: measured decode (Table 6, and the DeepSeek-V3 profile data) on 128 H800 under
  the configured assumption set.
- ``timelines``: one deployment (model, hardware, GPUs) under every decode schedule.
- ``pareto``: each compared model over batch sizes on the configured deployment; a point
  that does not fit in HBM (``fits`` false) is never on the front.
- ``memory``: the per-GPU HBM footprint of the same points (weights, KV cache, activations,
  reserve) and the largest batch that fits.
- ``prefill``: each compared model's closed-form prefill forward over prompt lengths (TTFT,
  prompt tokens per GPU per second), and the DeepSeek-V3 prefill profile row.
- ``training_overlap``: the paper's §5 training setting (the training defaults of
  ``longcat-sim simulate --mode train``), without and with ScMoE.
- ``determinism`` and ``sdc``: other commands' results (``--determinism-run``, ``--sdc-run``)
  or, without them, the report's own quick runs of those commands (``report.repro``), cached
  like the sections above.
- ``serving``: the configured model serving a real trace (``longcat-sim serve``), co-located and
  disaggregated, at the trace's recorded rate and time-scaled to a multiple of it: latency
  CDFs, percentiles, goodput, cost and each pool's load over time.

Decode points run through ``longcat-sim simulate``'s setup and runner (``sweep``'s process pool
for many points), so the report and those commands print the same numbers for a deployment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longcat_sim import runs
from longcat_sim.cluster import metrics
from longcat_sim.cluster.assumptions import TABLE7_CONTEXT, Assumptions, get_assumptions
from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.cluster.hardware import Hardware, get_hardware
from longcat_sim.cluster.simulator import simulate_train
from longcat_sim.cluster.streams import EventRecord
from longcat_sim.cluster.traffic import AZURE_TRACES, load_trace
from longcat_sim.config.deployment import DecodeDeployment, TrainDeployment
from longcat_sim.config.report import ReportConfig
from longcat_sim.config.serving import PrefillDeployment, ServeDeployment
from longcat_sim.errors import UserError
from longcat_sim.model.config import ModelConfig, load_model_config
from longcat_sim.processes import process_pool
from longcat_sim.report import repro
from longcat_sim.report.cache import CACHE_DIR, cached_section, code_fingerprint
from longcat_sim.report.results import load_determinism, load_sdc, load_training_run
from longcat_sim.reports.inputs import SERVE_CDFS, SERVE_LAYOUTS, TIMELINE_KEYS
from longcat_sim.reports.inputs import SERVE_FIGURES as PAGE_SERVE_FIGURES
from longcat_sim.scenarios.decode import (
    DecodeSetup,
    decode_memory,
    decode_setup,
    decode_workload,
    resolve_hardware,
    run_decode,
)
from longcat_sim.scenarios.prefill import (
    PrefillSetup,
    closed_form_figures,
    prefill_memory,
    resolve_prefill,
)
from longcat_sim.scenarios.serve import load_requests, resolve_serve, run_serve, serve_results
from longcat_sim.scenarios.sweep import run_points
from longcat_sim.scenarios.train import train_workload
from longcat_sim.stages import (
    ATTENTION_0,
    ATTENTION_CORE,
    ATTENTION_QKV,
    COMBINE,
    DISPATCH,
    ROUTED_EXPERTS,
    SHARED_EXPERTS,
)

# -- published numbers ------------------------------------------------------------------------

# LongCat-Flash paper (arXiv 2509.01322), Table 7: theoretical decode on H800, EP128, batch 96
# per GPU, MTP 1 draft token at 80 % acceptance, FlashMLA 660 TFLOPS, DeepEP 40 GB/s, $2/GPU-h.
TABLE7_PAPER: dict[str, dict[str, Any]] = {
    "deepseek-v3": {
        "overlap": "tbo",
        "attention_tp": 1,
        "attention_us": 471,
        "dispatch_us": 275,
        "experts_us": 77,
        "combine_us": 551,
        "tpot_ms": 30,
        "cost_per_m_tokens": 0.17,
    },
    "qwen3-235b-a22b": {
        "overlap": "tbo",
        "attention_tp": 4,
        "attention_us": 314,
        "dispatch_us": 157,
        "experts_us": 29,
        "combine_us": 315,
        "tpot_ms": 26.2,
        "cost_per_m_tokens": 0.15,
    },
    "longcat-flash": {
        "overlap": "sbo",
        "attention_tp": 1,
        "attention_us": 264,
        "dispatch_us": 236,
        "experts_us": 60,
        "combine_us": 472,
        "tpot_ms": 16,
        "cost_per_m_tokens": 0.09,
    },
}
# (MTP acceptance: the ``table7`` assumption set's ``mtp_accept``, 0.8)
TABLE7_SETTING = {"gpus": 128, "batch_per_device": 96, "mtp_draft_tokens": 1}

# LongCat-Flash paper, Table 6: measured decode on 128 Hopper GPUs (EP128), MTP at ~90 %
# acceptance (paper §6). (attention dtype, average context, tokens/GPU/s, TPS per user)
TABLE6_PAPER = (
    ("bf16", 5000, 3785, 35.0),
    ("bf16", 5000, 2205, 68.9),
    ("bf16", 5000, 804, 100.5),
    ("fp8", 5000, 4230, 26.4),
    ("fp8", 8192, 3240, 33.8),
)
TABLE6_MTP_ACCEPT = 0.9
# deepseek-ai/profile-data: decode on EP128, 128 requests per GPU, 4K context, TBO, balanced
# routing, no speculative decoding: 18,598 tokens/s per 8-GPU node = 2,324 per GPU, 20 TPS per
# user (paper Table 6).
DEEPSEEK_PROFILE = {"context": 4096, "batch_per_device": 128, "tgs": 2324, "tps_per_user": 20.0}

# deepseek-ai/profile-data prefill: H800, EP32, 4K-token prompts, 16K tokens per GPU in two
# micro-batches (TBO), balanced routing: 62,713 tokens/s per 8-GPU node = 7,839 per GPU.
DEEPSEEK_PREFILL_PROFILE = {
    "model": "deepseek-v3",
    "hardware": "H800",
    "ep": 32,
    "prompt_len": 4096,
    "tokens_per_device": 16384,
    "schedule": "tbo",
    "routing": "balanced",
    "measured_tgs": 7839.0,
}

# LongCat-Flash paper §5: share of step time in exposed dispatch/combine, EP 32, 200 Gb/s RDMA
# per GPU, context parallelism 8, the MoE split into 2 token chunks. The setting itself is the
# embedded training default of ``longcat-sim simulate --mode train`` (``TrainDeployment``).
TRAINING_OVERLAP_PAPER = {"baseline": 0.253, "scmoe": 0.084}

# How each compared model is deployed: its overlap schedule and attention tensor parallelism
# (Table 7's choices); other models get SBO on ScMoE layers, TBO otherwise, no attention TP.
DEPLOYMENTS: dict[str, tuple[str, int]] = {
    name: (row["overlap"], row["attention_tp"]) for name, row in TABLE7_PAPER.items()
}


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resolved:
    """A config with its names resolved to the objects they stand for."""

    config: ReportConfig
    model: ModelConfig
    compare: tuple[ModelConfig, ...]
    hardware: Hardware
    assumptions: Assumptions
    train_assumptions: Assumptions

    def identity(self) -> dict[str, Any]:
        """Everything the simulations read: the settings and what each name resolved to."""
        return {
            "settings": self.config.to_dict(),
            "model": self.model.to_dict(),
            "compare": [m.to_dict() for m in self.compare],
            "hardware": dataclasses.asdict(self.hardware),
            "assumptions": dataclasses.asdict(self.assumptions),
            "train_assumptions": dataclasses.asdict(self.train_assumptions),
        }


def resolve(config: ReportConfig) -> Resolved:
    return Resolved(
        config=config,
        model=load_model_config(config.model),
        compare=tuple(load_model_config(m) for m in config.compare_models),
        hardware=get_hardware(config.hardware),
        assumptions=get_assumptions(config.assumptions),
        train_assumptions=get_assumptions(config.train_assumptions),
    )


def config_hash(resolved: Resolved) -> str:
    return runs.config_hash(resolved.identity())


# -- simulations ------------------------------------------------------------------------------
# Decode points go through ``longcat-sim simulate``'s own setup and runner, so a point of the
# report is the number that command prints for the same deployment (every point draws its
# routing and contexts from the same seed, as there).


def _deployment(cfg: ModelConfig) -> tuple[str, int]:
    if cfg.name in DEPLOYMENTS:
        return DEPLOYMENTS[cfg.name]
    return ("sbo" if cfg.layer_type == "scmoe" else "tbo", 1)


def _setup(
    r: Resolved,
    cfg: ModelConfig,
    batch: int,
    schedule: str,
    hw: Hardware | None = None,
    assumptions: Assumptions | None = None,
    **changes: Any,
) -> DecodeSetup:
    """A decode deployment of ``cfg`` on the configured cluster; ``changes`` override settings."""
    c = r.config
    hw = hw or r.hardware
    assumptions = assumptions or r.assumptions
    values: dict[str, Any] = {
        "model": cfg.name,
        "hardware": hw.name,
        "assumptions": assumptions.name,
        "gpus": c.gpus,
        "batch_per_device": batch,
        "context": c.context,
        "attention_dtype": c.attention_dtype,
        "mtp_draft_tokens": c.mtp_draft_tokens,
        "mtp_accept": c.mtp_accept,
        "schedule": schedule,
        "attention_tp": _deployment(cfg)[1],
        "seed": c.seed,
    }
    return decode_setup(DecodeDeployment(**(values | changes)), cfg, hw, assumptions)


def _numbers(record: Mapping[str, Any]) -> dict[str, float]:
    return {k: record[k] for k in ("tps_per_user", "tgs", "cost_per_m_tokens", "tpot_ms")}


def _points(setups: Sequence[DecodeSetup]) -> list[dict[str, Any]]:
    """Simulate on every core; records in the order of ``setups``."""
    return run_points(setups, progress=False)


def table7_section(r: Resolved) -> dict[str, Any]:
    """The paper's Table 7 rows rebuilt under the ``table7`` assumptions (no randomness): the
    per-layer rows from one MoE layer's priced stages, TPOT and cost from the simulated step."""
    h800 = get_hardware("H800")
    ideal = get_assumptions("table7")
    s = TABLE7_SETTING
    setups = [
        _setup(
            r,
            load_model_config(name),
            s["batch_per_device"],
            paper["overlap"],
            hw=h800,
            assumptions=ideal,
            gpus=s["gpus"],
            context=TABLE7_CONTEXT,
            attention_dtype="bf16",
            mtp_draft_tokens=s["mtp_draft_tokens"],
            mtp_accept=None,
        )
        for name, paper in TABLE7_PAPER.items()
    ]
    rows = []
    for setup, record in zip(setups, _points(setups), strict=True):
        w = decode_workload(setup, micro_batches=(1,))
        layer = w.layers[-1]  # an MoE layer (DeepSeek-V3's first three are dense)
        if layer.kind == "scmoe":
            attention = layer.get(ATTENTION_0)
        else:
            attention = layer.get(ATTENTION_QKV) + layer.get(ATTENTION_CORE)
        simulated = {
            "attention_us": attention * 1e6,
            "dispatch_us": layer.get(DISPATCH) * 1e6,
            # the paper's "MoE" column: routed plus shared expert GEMMs
            "experts_us": (layer.get(ROUTED_EXPERTS) + layer.get(SHARED_EXPERTS)) * 1e6,
            "combine_us": layer.get(COMBINE) * 1e6,
            "tpot_ms": record["tpot_ms"],
            "cost_per_m_tokens": record["cost_per_m_tokens"],
        }
        paper = TABLE7_PAPER[setup.cfg.name]
        rows.append(
            {
                "model": setup.cfg.name,
                "overlap": setup.schedule,
                "paper": {k: float(paper[k]) for k in simulated},
                "simulated": simulated,
            }
        )
    return {"context": TABLE7_CONTEXT, "rows": rows}


def table6_section(r: Resolved) -> dict[str, Any]:
    """Table 6 rows and the DeepSeek-V3 profile, simulated on 128 H800 under the configured
    assumption set."""
    common = {"hw": get_hardware("H800"), "gpus": 128}
    longcat = load_model_config("longcat-flash")
    setups = [
        _setup(
            r,
            longcat,
            round(tgs / tps),
            "sbo",
            context=context,
            attention_dtype=dtype,
            mtp_draft_tokens=1,
            mtp_accept=TABLE6_MTP_ACCEPT,
            **common,
        )
        for dtype, context, tgs, tps in TABLE6_PAPER
    ]
    p = DEEPSEEK_PROFILE
    setups.append(
        _setup(
            r,
            load_model_config("deepseek-v3"),
            p["batch_per_device"],
            "tbo",
            assumptions=r.assumptions.replace(routing="balanced", context_cv=0.0),
            context=p["context"],
            attention_dtype="bf16",
            mtp_draft_tokens=0,
            attention_tp=1,
            **common,
        )
    )
    papers = [{"tgs": float(tgs), "tps_per_user": tps} for _, _, tgs, tps in TABLE6_PAPER]
    papers.append({"tgs": float(p["tgs"]), "tps_per_user": p["tps_per_user"]})
    labels = [f"LongCat-Flash, row {i + 1}" for i in range(len(TABLE6_PAPER))]
    labels.append("DeepSeek-V3 profile (balanced)")
    rows = []
    for setup, record, paper, label in zip(setups, _points(setups), papers, labels, strict=True):
        rows.append(
            {
                "label": label,
                "model": setup.cfg.name,
                "schedule": setup.schedule,
                "attention_dtype": setup.attention_dtype,
                "context": int(setup.context),
                "batch_per_device": setup.batch_per_device,
                "paper": paper,
                "simulated": {k: record[k] for k in ("tgs", "tps_per_user", "tpot_ms")},
            }
        )
    return {"assumptions": r.assumptions.name, "rows": rows}


def timeline_layers(n_layers: int, count: int) -> list[int]:
    """``count`` consecutive layers from the middle of the model (steady state)."""
    count = min(count, n_layers)
    first = (n_layers - count) // 2
    return list(range(first, first + count))


def _event(record: EventRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "group": metrics.STAGE_GROUPS.get(record.name, record.name),
        "stream": record.stream,
        "start_us": record.start * 1e6,
        "end_us": record.end * 1e6,
        "layer": record.layer,
        "microbatch": record.microbatch,
    }


def timelines_section(r: Resolved) -> dict[str, Any]:
    """The configured deployment under every decode schedule; events of the middle layers."""
    c = r.config
    layers = timeline_layers(r.model.num_layers, c.timeline_layers)
    wanted = set(layers)
    schedules = {}
    for schedule in ("sequential", "tbo", "sbo"):
        result, _ = run_decode(_setup(r, r.model, c.timeline_batch_per_device, schedule))
        schedules[schedule] = {
            "tpl_us": result.tpl_us,
            "tpot_ms": result.tpot_ms,
            "step_ms": result.step_ms,
            "tgs": result.tgs,
            "exposed_comm_share": result.exposed_comm_share,
            "events": [_event(e) for e in result.records if e.layer in wanted],
        }
    return {
        "model": r.model.name,
        "batch_per_device": c.timeline_batch_per_device,
        "layers": layers,
        "schedules": schedules,
    }


def pareto_section(r: Resolved) -> dict[str, Any]:
    """Every compared model at every batch size, on its own overlap schedule, with whether the
    point fits in HBM."""
    batches = sorted(r.config.batch_per_device)
    setups = [_setup(r, cfg, batch, _deployment(cfg)[0]) for cfg in r.compare for batch in batches]
    pairs = iter(zip(setups, _points(setups), strict=True))
    models = {}
    for cfg in r.compare:
        points = []
        for b in batches:
            setup, record = next(pairs)
            memory = decode_memory(setup).to_dict()
            points.append(
                {
                    "batch_per_device": b,
                    **_numbers(record),
                    "fits": bool(memory["fits"]),
                    "hbm_used_gb": memory["hbm_used_gb"],
                }
            )
        models[cfg.name] = {"schedule": _deployment(cfg)[0], "points": points}
    return {"models": models}


def memory_section(r: Resolved) -> dict[str, Any]:
    """Per-GPU HBM of every compared model at the Pareto section's batch sizes on the configured
    decode deployment, and the largest batch that fits."""
    batches = sorted(r.config.batch_per_device)
    models = {}
    for cfg in r.compare:
        schedule = _deployment(cfg)[0]
        points, largest = [], 0
        for b in batches:
            memory = decode_memory(_setup(r, cfg, b, schedule)).to_dict()
            largest = memory["max_batch_per_device"]
            points.append(
                {
                    "batch_per_device": b,
                    "hbm_used_gb": memory["hbm_used_gb"],
                    "fits": bool(memory["fits"]),
                    "hbm_breakdown_gb": dict(memory["hbm_breakdown_gb"]),
                }
            )
        models[cfg.name] = {"schedule": schedule, "max_batch_per_device": largest, "points": points}
    return {
        "hardware": r.hardware.name,
        "hbm_gb": r.hardware.hbm_gb,
        "gpus": r.config.gpus,
        "context": r.config.context,
        "models": models,
    }


def _prefill_setup(
    r: Resolved, cfg: ModelConfig, prompt_len: int, tokens: int, **changes: Any
) -> PrefillSetup:
    """A prefill forward of ``cfg`` on the configured hardware, under the configured assumption
    set unless ``changes`` says otherwise (``hw``, ``assumptions``, deployment values)."""
    hw = changes.pop("hw", r.hardware)
    assumptions = changes.pop("assumptions", r.assumptions)
    values: dict[str, Any] = {
        "model": cfg.name,
        "hardware": hw.name,
        "gpus": r.config.prefill_gpus,
        "tokens_per_device": tokens,
        "prompt_len": float(prompt_len),
        "seed": r.config.seed,
    }
    setup = resolve_prefill(PrefillDeployment(**(values | changes)))
    return dataclasses.replace(setup, hw=hw, assumptions=assumptions)


def _prefill_point(setup: PrefillSetup) -> dict[str, Any]:
    figures = closed_form_figures(setup)
    memory = prefill_memory(setup)
    return {
        "prompt_len": round(setup.prompt_len),
        "tokens_per_device": setup.tokens_per_device,
        "forward_ms": figures.forward_s * 1e3,
        "ttft_ms": figures.ttft_s * 1e3,
        "input_tgs": figures.input_tgs,
        "cost_per_m_input_tokens": figures.cost_per_m_input_tokens,
        "hbm_used_gb": memory.used_gb,
        "fits": memory.fits,
    }


def prefill_section(r: Resolved) -> dict[str, Any]:
    """Every compared model's closed-form prefill forward (its default overlap) over prompt
    lengths, and the DeepSeek-V3 profile row under the configured set with balanced routing."""
    c = r.config
    models = {}
    for cfg in r.compare:
        setups = [
            _prefill_setup(r, cfg, n, max(c.tokens_per_device, n)) for n in sorted(c.prompt_len)
        ]
        models[cfg.name] = {
            "schedule": setups[0].schedule,
            "points": [_prefill_point(s) for s in setups],
        }
    p = DEEPSEEK_PREFILL_PROFILE
    profile = _prefill_setup(
        r,
        load_model_config(p["model"]),
        p["prompt_len"],
        p["tokens_per_device"],
        hw=get_hardware(p["hardware"]),
        assumptions=r.assumptions.replace(routing=p["routing"]),
        gpus=p["ep"],
        schedule=p["schedule"],
    )
    return {
        "hardware": r.hardware.name,
        "gpus": c.prefill_gpus,
        "tokens_per_device": c.tokens_per_device,
        "assumptions": r.assumptions.name,
        "models": models,
        "profile": {
            **{k: v for k, v in p.items() if k != "measured_tgs"},
            "label": "DeepSeek-V3 prefill profile (balanced)",
            "measured_tgs": p["measured_tgs"],
            "simulated_tgs": _prefill_point(profile)["input_tgs"],
        },
    }


def training_overlap_section(r: Resolved) -> dict[str, Any]:
    """LongCat-Flash training in the paper's §5 setting (``longcat-sim simulate --mode train``
    defaults), without (baseline) and with ScMoE."""
    d = TrainDeployment(seed=r.config.seed)
    cfg = load_model_config(d.model)
    w, _ = train_workload(d, cfg, resolve_hardware(d.hardware, d.rdma_gb_s), r.train_assumptions)
    simulated = {}
    for schedule in ("baseline", "scmoe"):
        result = simulate_train(w, schedule, d.pipeline)
        simulated[schedule] = {
            "exposed_comm_share": result.exposed_comm_share,
            "step_ms": result.step_ms,
            "comm_ms": result.comm_ms,
            "exposed_comm_ms": result.exposed_comm_ms,
        }
    return {"paper": dict(TRAINING_OVERLAP_PAPER), "simulated": simulated}


# -- serving ------------------------------------------------------------------------------------

# what a serving run keeps of ``serve_results``: the figures the page draws, and a few more
SERVE_FIGURES = (
    "rate",
    "requests",
    "requests_finished",
    "total_gpus",
    "slo_met",
    "kv_capacity_tokens",
    *PAGE_SERVE_FIGURES,
)


def _serve_deployment(r: Resolved, layout: str, rate: float | None) -> ServeDeployment:
    """``longcat-sim serve``'s deployment of the configured model for one serving run."""
    c = r.config
    values: dict[str, Any] = {
        "model": c.model,
        "hardware": c.hardware,
        "assumptions": c.assumptions,
        "seed": c.seed,
        "layout": layout,
        "gpus": c.serve_gpus,
        "trace": c.serve_trace,
        "rate": rate,
        "duration_s": c.serve_duration_s,
    }
    if layout == "disagg":
        values["prefill_gpus"] = c.serve_prefill_gpus
    return ServeDeployment(**values)


def _serve_run(dep: ServeDeployment) -> dict[str, Any]:
    """One ``longcat-sim serve`` run (its results JSON); a process pool's task."""
    requests = load_requests(dep)
    setup = resolve_serve(dep, requests)
    return serve_results(setup, run_serve(setup, requests))


def _serve_pools(out: Mapping[str, Any], instances: Mapping[str, int]) -> dict[str, Any]:
    """Each pool's load over time; KV capacity (all its instances) for the pools that decode."""
    pools = {}
    for pool, count in instances.items():
        if f"{pool}_timeline" not in out:
            continue
        pools[pool] = {
            "instances": count,
            "busy_share": out[f"{pool}_busy_share"],
            "kv_capacity_tokens": None if pool == "prefill" else out["kv_capacity_tokens"] * count,
            "timeline": {k: out[f"{pool}_timeline"][k] for k in TIMELINE_KEYS},
        }
    return pools


def serving_section(r: Resolved) -> dict[str, Any]:
    """The configured model serving the first ``serve_duration_s`` seconds of a trace,
    co-located and disaggregated, at the trace's recorded rate and time-scaled to
    ``serve_rate_scale`` times its mean rate; the four runs share the cores."""
    c = r.config
    try:
        recorded = load_trace(AZURE_TRACES.get(c.serve_trace, c.serve_trace)).mean_rate
    except ClusterInputError as exc:
        raise UserError(f"report setting 'serve_trace': {exc}") from None
    plan = [
        (layout, scale, _serve_deployment(r, layout, None if scale == 1.0 else recorded * scale))
        for layout in SERVE_LAYOUTS
        for scale in (1.0, c.serve_rate_scale)
    ]
    # the most requests first: the co-located run at the scaled rate takes longest
    order = sorted(range(len(plan)), key=lambda i: (-plan[i][1], plan[i][0]))
    workers = min(len(plan), os.cpu_count() or 1)
    if workers > 1:
        with process_pool(workers) as pool:  # killed on an exception
            futures = {i: pool.submit(_serve_run, plan[i][2]) for i in order}
            outs = [futures[i].result() for i in range(len(plan))]
    else:
        outs = [_serve_run(dep) for _, _, dep in plan]
    runs = []
    for (layout, scale, dep), out in zip(plan, outs, strict=True):
        instances = {"colocated": dep.instances}
        if layout == "disagg":
            instances = {"prefill": dep.prefill_instances, "decode": dep.instances}
        runs.append(
            {
                "layout": layout,
                "rate_scale": scale,
                **{k: out[k] for k in SERVE_FIGURES},
                **{k: out[k] for k in SERVE_CDFS},
                "pools": _serve_pools(out, instances),
            }
        )
    first = plan[0][2]
    return {
        "model": r.model.name,
        "hardware": r.hardware.name,
        "trace": c.serve_trace,
        "recorded_rate": recorded,
        "duration_s": c.serve_duration_s,
        "gpus": c.serve_gpus,
        "prefill_gpus": c.serve_prefill_gpus,
        "slo_ttft_ms": first.slo_ttft_ms,
        "slo_tpot_ms": first.slo_tpot_ms,
        "slo_percentile": first.slo_percentile,
        "runs": runs,
    }


def _serving_reads(r: Resolved) -> dict[str, Any]:
    """The serving section's cache key: its settings, what the names resolved to and the
    trace's bytes."""
    trace = Path(AZURE_TRACES.get(r.config.serve_trace, r.config.serve_trace))
    try:
        digest = hashlib.sha256(trace.read_bytes()).hexdigest()
    except (OSError, ValueError):  # ValueError: a NUL in the name
        digest = None  # the run itself names the problem
    serve = ("seed", "serve_trace", "serve_duration_s", "serve_rate_scale", "serve_gpus")
    return {
        **_reads(r, *serve, "serve_prefill_gpus", model=True),
        "trace_sha256": digest,
    }


_DEPLOYMENT_SETTINGS = (
    "gpus",
    "seed",
    "context",
    "attention_dtype",
    "mtp_draft_tokens",
    "mtp_accept",
)


def _reads(r: Resolved, *settings: str, model: bool = False, compare: bool = False) -> dict:
    """The part of a resolved config a decode section reads (its cache key)."""
    reads: dict[str, Any] = {
        "settings": {k: v for k, v in r.config.to_dict().items() if k in settings},
        "hardware": dataclasses.asdict(r.hardware),
        "assumptions": dataclasses.asdict(r.assumptions),
    }
    if model:
        reads["model"] = r.model.to_dict()
    if compare:
        reads["compare"] = [m.to_dict() for m in r.compare]
    return reads


# Section -> (how to compute it, what it reads). Table 7 reads nothing configurable; Table 6
# runs on the paper's H800 and reads the assumptions and seed; the training overlap reads the
# training assumptions and seed.
SECTIONS: dict[str, tuple[Callable[[Resolved], dict[str, Any]], Callable[[Resolved], Any]]] = {
    "table7": (table7_section, lambda r: None),
    "table6": (
        table6_section,
        lambda r: {"assumptions": dataclasses.asdict(r.assumptions), "seed": r.config.seed},
    ),
    "timelines": (
        timelines_section,
        lambda r: _reads(
            r, *_DEPLOYMENT_SETTINGS, "timeline_batch_per_device", "timeline_layers", model=True
        ),
    ),
    "pareto": (
        pareto_section,
        lambda r: _reads(r, *_DEPLOYMENT_SETTINGS, "batch_per_device", compare=True),
    ),
    "memory": (
        memory_section,
        lambda r: _reads(r, *_DEPLOYMENT_SETTINGS, "batch_per_device", compare=True),
    ),
    "prefill": (
        prefill_section,
        lambda r: _reads(
            r,
            "seed",
            "prefill_gpus",
            "tokens_per_device",
            "prompt_len",
            compare=True,
        ),
    ),
    "training_overlap": (
        training_overlap_section,
        lambda r: {
            "assumptions": dataclasses.asdict(r.train_assumptions),
            "seed": r.config.seed,
        },
    ),
    "serving": (serving_section, _serving_reads),
}


# -- gathering --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gathered:
    data: dict[str, Any]
    computed: tuple[str, ...]  # sections simulated (or run) now
    reused: tuple[str, ...]  # sections read from the cache
    warnings: tuple[str, ...] = ()


def title(r: Resolved) -> str:
    from longcat_sim.reports.tables import model_label

    return f"{model_label(r.model.name)} on {r.config.gpus} {r.hardware.name} GPUs"


@dataclass
class _Repro:
    """The determinism and SDC parts of the report data, as they are gathered."""

    data: dict[str, Any]
    provenance: dict[str, Any]
    computed: list[str]
    reused: list[str]
    warnings: list[str]


_LOADERS = {"determinism": load_determinism, "sdc": load_sdc}


def _repro_results(
    run_dir: Path,
    given: Mapping[str, tuple[Path, dict[str, Any]]],
    runner: repro.Runner | None,
) -> _Repro:
    """Determinism and SDC: the result read from the run given for each (path, result), else
    the report's quick run of the command (``runner``; none: skipped)."""
    out = _Repro({}, {}, [], [], [])
    code = repro.repro_fingerprint() if runner is not None else ""
    for name in _LOADERS:
        if name in given:
            path, out.data[name] = given[name]
            out.provenance[name] = repro.given(path)
            continue
        if runner is None:
            out.data[name], out.provenance[name] = None, repro.skipped(name)
            continue
        quick = repro.quick_run(name, runner, run_dir / CACHE_DIR, code)
        out.data[name], out.provenance[name] = quick.result, quick.origin
        if quick.warning:
            out.warnings.append(quick.warning)
        elif quick.cached:
            out.reused.append(name)
        else:
            out.computed.append(name)
    return out


def gather(
    resolved: Resolved,
    run_dir: Path,
    *,
    train_runs: Sequence[Path] = (),
    determinism_run: Path | None = None,
    sdc_run: Path | None = None,
    repro_runner: repro.Runner | None = None,
) -> Gathered:
    """Report data for ``resolved``: simulated sections (cached under ``run_dir/cache``), the
    results of the runs given and, for determinism and SDC without a run, the quick runs of
    ``repro_runner`` (cached too; without it they are skipped)."""
    training = [load_training_run(p) for p in train_runs]
    paths = {"determinism": determinism_run, "sdc": sdc_run}
    given = {  # read first: bad input is one line before anything is simulated
        name: (path, _LOADERS[name](path)) for name, path in paths.items() if path is not None
    }
    code = code_fingerprint()
    data: dict[str, Any] = {
        "meta": {
            "title": title(resolved),
            "config_hash": config_hash(resolved),
            "config": resolved.config.to_dict(),
        }
    }
    computed, reused = [], []
    for name, (compute, inputs) in SECTIONS.items():
        section, hit = cached_section(
            run_dir / CACHE_DIR, name, inputs(resolved), lambda c=compute: c(resolved), code
        )
        data[name] = section
        (reused if hit else computed).append(name)
    rep = _repro_results(run_dir, given, repro_runner)
    data["training_runs"] = training
    data.update(rep.data)
    data["provenance"] = rep.provenance
    return Gathered(
        data=data,
        computed=(*computed, *rep.computed),
        reused=(*reused, *rep.reused),
        warnings=tuple(rep.warnings),
    )
