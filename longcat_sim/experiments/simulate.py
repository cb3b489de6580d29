"""``longcat-sim simulate``: one decode step (``--mode decode``) or one training step
(``--mode train``) of a deployment, priced by the cost model and run on the SimPy streams.

Defaults are the embedded deployments:

- decode: LongCat-Flash on 128 H800, EP128, SBO, 96 requests per GPU, 5000 cached tokens per
  request (the average context of the paper's Table 6 measurements, also the context assumed
  for the Table 7 attention row, which the paper does not state), BF16 attention, one MTP draft
  token accepted 90 % of the time (the paper's measured acceptance; 80 % under ``--assumptions
  table7``, Table 7's own assumption), assumption set ``default``.
- train: LongCat-Flash on H800 with 200 Gb/s RDMA per GPU (25 GB/s), EP 32 with CP 8,
  sequences of 8192 tokens, 4096 tokens per GPU per micro-batch split into 2 MoE chunks,
  dispatch/combine as pipelined all-gather / reduce-scatter, ScMoE schedule, 8 micro-batches
  without pipeline parallelism (V-ZB leaves zero theoretical bubbles), assumption set ``train``.
  ``--schedule scmoe`` is model/block.py's shortcut topology, ``conventional`` its conventional
  one (the MoE reads the second attention's output, beside FFN_1), ``baseline`` the serial layer
  without overlap (the MoE after the first attention, every later dense stage waiting for it),
  the paper's "without ScMoE" reference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from cluster import closedform, metrics
from cluster.assumptions import Assumptions, assumption_names, get_assumptions
from cluster.hardware import Hardware, get_hardware, hardware_names
from cluster.schedules import DECODE_SCHEDULES, PIPELINES, TRAIN_SCHEDULES
from cluster.simulator import DecodeResult, TrainResult, simulate_decode, simulate_train
from cluster.streams import EventRecord
from cluster.trace import chrome_trace_json
from longcat_sim import bridge
from longcat_sim.artifacts import write_text_atomic
from longcat_sim.errors import UserError
from longcat_sim.experiments import host_step
from longcat_sim.experiments.base import CommandOutput
from model.config import ModelConfig, load_model_config

HELP = (
    "simulate one decode or training step of a GPU-cluster deployment, or one train --nproc "
    "step on a calibrated host"
)

MODES = ("decode", "train", "host-ep")
MTP_ACCEPT = 0.9  # LongCat-Flash MTP acceptance, ~90 % on test sets (paper sec. 6.1.2)
TABLE7_MTP_ACCEPT = 0.8  # Table 7's assumption (paper sec. 6.3.2)

DECODE_DEFAULTS: dict[str, Any] = {
    "model": "longcat-flash",
    "hardware": "H800",
    "gpus": 128,
    "batch_per_device": 96,
    "context": 5000.0,
    "attention_dtype": "bf16",
    "mtp_draft_tokens": 1,
    "schedule": "sbo",
    "redundant_experts": 0,
    "assumptions": "default",
    "attention_tp": 1,
    "ffn_tp": 1,
    "seed": 0,
}
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
DECODE_ONLY = (
    "batch_per_device",
    "context",
    "attention_dtype",
    "mtp_draft_tokens",
    "mtp_accept",
    "attention_tp",
    "ffn_tp",
)
TRAIN_ONLY = (
    "cp",
    "pp",
    "seq_len",
    "tokens_per_microbatch",
    "microbatches",
    "moe_chunks",
    "pipeline",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="decode",
        help="decode (default), train, or host-ep (train --nproc on a calibrated host)",
    )
    parser.add_argument("--model", help="preset name or TOML file (default longcat-flash)")
    parser.add_argument(
        "--hardware",
        help=f"catalogue name ({', '.join(hardware_names())}) or hardware TOML (default H800)",
    )
    parser.add_argument(
        "--rdma-gb-s",
        type=float,
        help="override the RDMA bandwidth per GPU and direction, GB/s (train default 25)",
    )
    parser.add_argument("--gpus", type=int, help="GPUs in the deployment (decode default 128)")
    parser.add_argument(
        "--ep", type=int, help="expert-parallel group size (decode: --gpus; train: 32)"
    )
    parser.add_argument(
        "--schedule",
        help=f"decode: {', '.join(DECODE_SCHEDULES)} (default sbo); "
        f"train: {', '.join(TRAIN_SCHEDULES)} (default scmoe; conventional: the MoE after "
        "the second attention, beside FFN_1; baseline: the MoE in series, no overlap)",
    )
    parser.add_argument(
        "--redundant-experts", type=int, help="expert replicas per layer (default 0)"
    )
    parser.add_argument(
        "--assumptions",
        help=f"assumption set: {', '.join(assumption_names())} (decode default, train train)",
    )
    parser.add_argument(
        "--assume",
        action="append",
        default=[],
        metavar="TERM=VALUE",
        help="override one term of the assumption set, e.g. routing=balanced (repeatable)",
    )
    parser.add_argument("--seed", type=int, help="root seed of sampled routing and contexts (0)")
    parser.add_argument("--trace", type=Path, help="write a Chrome/Perfetto trace.json here")
    decode = parser.add_argument_group("decode")
    decode.add_argument("--batch-per-device", type=int, help="requests per GPU (default 96)")
    decode.add_argument(
        "--context", type=float, help="cached tokens each request attends to (default 5000)"
    )
    decode.add_argument("--attention-dtype", help="KV cache dtype: bf16 (default) or fp8")
    decode.add_argument(
        "--mtp-draft-tokens", type=int, help="MTP draft tokens per step (default 1; 0: none)"
    )
    decode.add_argument(
        "--mtp-accept",
        type=float,
        help=f"draft acceptance (default {MTP_ACCEPT}; {TABLE7_MTP_ACCEPT} with table7)",
    )
    decode.add_argument("--attention-tp", type=int, help="attention tensor parallelism (default 1)")
    decode.add_argument("--ffn-tp", type=int, help="dense FFN tensor parallelism (default 1)")
    train = parser.add_argument_group("train")
    train.add_argument("--cp", type=int, help="context parallelism of attention (default 8)")
    train.add_argument("--pp", type=int, help="pipeline stages (default 1)")
    train.add_argument("--seq-len", type=int, help="tokens per training sequence (default 8192)")
    train.add_argument(
        "--tokens-per-microbatch", type=int, help="tokens per GPU per micro-batch (default 4096)"
    )
    train.add_argument("--microbatches", type=int, help="micro-batches per step (default 8)")
    train.add_argument("--moe-chunks", type=int, help="MoE token chunks (default 2)")
    train.add_argument(
        "--pipeline", help=f"pipeline schedule: {', '.join(PIPELINES)} (default none)"
    )
    host_step.add_arguments(parser)


# -- decode -----------------------------------------------------------------------------------


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

    def config(self) -> dict[str, Any]:
        """The inputs as plain data, for manifests and flat records."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["model"] = self.cfg.name
        out["hardware"] = self.hw.name
        out["assumptions"] = self.assumptions.name
        del out["cfg"], out["hw"]
        return out


def _check_int(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(
            f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}"
        )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(
            f"unknown {name.replace('_', ' ')} {value!r}; choose one of {', '.join(choices)}"
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


def resolve_hardware(name: str, rdma_gb_s: float | None) -> Hardware:
    hw = get_hardware(name)
    if rdma_gb_s is not None:
        hw = hw.replace(rdma_gb_s=rdma_gb_s)
    return hw


def decode_setup(
    *,
    cfg: ModelConfig,
    hw: Hardware,
    assumptions: Assumptions,
    gpus: int,
    ep: int | None,
    batch_per_device: int,
    context: float,
    attention_dtype: str,
    mtp_draft_tokens: int,
    mtp_accept: float | None,
    schedule: str,
    redundant_experts: int,
    attention_tp: int,
    ffn_tp: int,
    seed: int,
) -> DecodeSetup:
    """Check a decode deployment's command-line values and resolve the defaults that depend on
    others (EP = all GPUs, MTP acceptance by assumption set)."""
    _check_int("gpus", gpus)
    ep = gpus if ep is None else ep
    _check_int("ep", ep)
    if gpus % ep:
        raise UserError(f"--gpus {gpus} is not a multiple of --ep {ep}; GPUs form whole EP groups")
    _check_int("batch_per_device", batch_per_device)
    _check_int("mtp_draft_tokens", mtp_draft_tokens, 0)
    _check_int("redundant_experts", redundant_experts, 0)
    _check_int("attention_tp", attention_tp)
    _check_int("ffn_tp", ffn_tp)
    _check_int("seed", seed, 0)
    _check_choice("schedule", schedule, DECODE_SCHEDULES)
    _check_choice("attention dtype", attention_dtype, ("bf16", "fp8"))
    if not (isinstance(context, int | float) and np.isfinite(context) and context >= 1):
        raise UserError(f"--context must be a number of cached tokens >= 1, got {context!r}")
    if mtp_accept is None:
        table7 = assumptions.name.split("+")[0] == "table7"
        mtp_accept = TABLE7_MTP_ACCEPT if table7 else MTP_ACCEPT
    if not 0.0 <= mtp_accept <= 1.0:
        raise UserError(f"--mtp-accept must lie in [0, 1], got {mtp_accept}")
    if cfg.n_routed_experts and (cfg.n_routed_experts + redundant_experts) % ep:
        raise UserError(
            f"--ep {ep} does not divide {cfg.name}'s {cfg.n_routed_experts} experts + "
            f"{redundant_experts} redundant; choose --redundant-experts R with "
            f"(experts + R) % EP == 0 (e.g. R = {(-cfg.n_routed_experts) % ep})"
        )
    return DecodeSetup(
        cfg=cfg,
        hw=hw,
        assumptions=assumptions,
        gpus=gpus,
        ep=ep,
        batch_per_device=batch_per_device,
        context=float(context),
        attention_dtype=attention_dtype,
        mtp_draft_tokens=mtp_draft_tokens,
        mtp_accept=float(mtp_accept),
        schedule=schedule,
        redundant_experts=redundant_experts,
        attention_tp=attention_tp,
        ffn_tp=ffn_tp,
        seed=seed,
    )


def run_decode(setup: DecodeSetup) -> tuple[DecodeResult, float]:
    """Price and simulate one decode step; also return the schedule's closed-form step (s)."""
    workload = bridge.decode_workload(
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
        micro_batches=(2,) if setup.schedule == "tbo" else (1,),
    )
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
    return out


def _decode_text(r: dict) -> str:
    lines = [
        f"decode: {r['model']} on {r['gpus']} x {r['hardware']}, EP{r['ep']}, {r['schedule']}, "
        f"batch {r['batch_per_device']} per GPU, assumptions {r['assumptions']}",
        f"  attention context {r['context']:g} tokens per request ({r['attention_dtype']} "
        f"KV cache); "
        + (
            f"MTP {r['mtp_draft_tokens']} draft token(s) accepted {r['mtp_accept']:.0%}"
            if r["mtp_draft_tokens"]
            else "no speculative decoding"
        ),
        "  per layer (us): "
        + ", ".join(f"{k} {v:.1f}" for k, v in r["per_layer_us"].items() if v > 0),
        f"  time per layer      {r['tpl_us']:10.1f} us",
        f"  TPOT                {r['tpot_ms']:10.2f} ms  (closed form step "
        f"{r['closed_form_step_ms']:.3f} ms, simulated {r['step_ms']:.3f} ms)",
        f"  TPS per user        {r['tps_per_user']:10.1f}",
        f"  tokens/GPU/s        {r['tgs']:10.1f}",
        f"  $ per M tokens      {r['cost_per_m_tokens']:10.3f}",
        f"  exposed comm share  {r['exposed_comm_share']:10.1%}",
    ]
    return "\n".join(lines)


# -- training ---------------------------------------------------------------------------------


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
        _check_int(name, values[name])
    _check_int("redundant_experts", values["redundant_experts"], 0)
    _check_int("seed", values["seed"], 0)
    _check_choice("schedule", values["schedule"], TRAIN_SCHEDULES)
    _check_choice("pipeline", values["pipeline"], PIPELINES)
    group = values["ep"] * values["pp"]
    gpus = group if values["gpus"] is None else values["gpus"]
    _check_int("gpus", gpus)
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


def _train_text(r: dict) -> str:
    return "\n".join(
        [
            f"train: {r['model']} on {r['gpus']} x {r['hardware']} ({r['rdma_gb_s']:g} GB/s RDMA), "
            f"EP{r['ep']} CP{r['cp']} PP{r['pp']} DP{r['dp']}, {r['schedule']}, "
            f"pipeline {r['pipeline']}, assumptions {r['assumptions']}",
            f"  {r['microbatches']} micro-batches of {r['tokens_per_microbatch']} tokens per GPU "
            f"in {r['moe_chunks']} MoE chunks, sequences of {r['seq_len']}",
            f"  step                      {r['step_ms']:10.1f} ms",
            f"  forward / backward / W    {r['forward_ms']:.1f} / {r['backward_ms']:.1f} / "
            f"{r['weight_grad_ms']:.1f} ms per micro-batch",
            f"  bubbles                   {r['bubble_ms']:10.1f} ms ({r['bubble_share']:.1%})",
            f"  non-overlapped comm share {r['non_overlapped_comm_share']:10.1%}",
            f"  tokens/GPU/s              {r['tgs']:10.1f}",
        ]
    )


# -- command ----------------------------------------------------------------------------------


def _config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _values(
    args: argparse.Namespace, defaults: dict[str, Any], other_only: tuple[str, ...]
) -> dict:
    given = [name for name in other_only if getattr(args, name, None) is not None]
    if given:
        other = "train" if args.mode == "decode" else "decode"
        flag = "--" + given[0].replace("_", "-")
        raise UserError(f"{flag} applies to --mode {other}, not --mode {args.mode}")
    values = {
        k: getattr(args, k, None) for k in (*defaults, "gpus", "ep", "rdma_gb_s", "mtp_accept")
    }
    for key, default in defaults.items():
        if values.get(key) is None:
            values[key] = default
    return values


def _check_trace_path(path: Path | None) -> None:
    """Refuse, before simulating, a trace path whose folder is missing or that is a folder."""
    if path is None:
        return
    if not path.parent.is_dir():
        raise UserError(
            f"--trace {str(path)!r}: folder {str(path.parent)!r} does not exist; create it or "
            "choose a path in an existing folder"
        )
    if path.is_dir():
        raise UserError(f"--trace {str(path)!r} is a folder; give a file path such as trace.json")


def _with_trace_line(text: str, path: Path | None) -> str:
    return text if path is None else f"{text}\ntrace written to {path}"


def _write_trace(
    path: Path, records, metadata: dict[str, Any], gpu_names: dict[int, str] | None = None
) -> None:
    try:
        text = chrome_trace_json(records, metadata=metadata, gpu_names=gpu_names)
        write_text_atomic(path, text)
    except OSError as exc:
        raise UserError(f"cannot write trace {str(path)!r}: {exc.strerror or exc}") from None


def run(args: argparse.Namespace) -> CommandOutput:
    _check_trace_path(args.trace)
    if args.mode == "host-ep":
        return host_step.run(args)
    host_only = [n for n in host_step.OWN if getattr(args, n, None) is not None]
    if host_only:
        flag = "--" + host_only[0].replace("_", "-")
        raise UserError(f"{flag} applies to --mode host-ep, not --mode {args.mode}")
    if args.mode == "train":
        return _run_train(args)
    v = _values(args, DECODE_DEFAULTS, TRAIN_ONLY)
    assumptions = resolve_assumptions(v["assumptions"], args.assume)
    setup = decode_setup(
        cfg=load_model_config(v["model"]),
        hw=resolve_hardware(v["hardware"], v["rdma_gb_s"]),
        assumptions=assumptions,
        gpus=v["gpus"],
        ep=v["ep"],
        batch_per_device=v["batch_per_device"],
        context=v["context"],
        attention_dtype=v["attention_dtype"],
        mtp_draft_tokens=v["mtp_draft_tokens"],
        mtp_accept=v["mtp_accept"],
        schedule=v["schedule"],
        redundant_experts=v["redundant_experts"],
        attention_tp=v["attention_tp"],
        ffn_tp=v["ffn_tp"],
        seed=v["seed"],
    )
    result, closed = run_decode(setup)
    results = decode_results(setup, result, closed)
    config = setup.config() | {
        "mode": "decode",
        "hardware_spec": asdict(setup.hw),
        "model_config": setup.cfg.to_dict(),
    }
    if args.trace is not None:
        _write_trace(args.trace, result.records, {k: results[k] for k in ("model", "schedule")})
    return CommandOutput(
        results=results,
        text=_with_trace_line(_decode_text(results), args.trace),
        config=config,
        config_hash=_config_hash(config),
        seeds={"routing": setup.seed},
    )


def _run_train(args: argparse.Namespace) -> CommandOutput:
    v = _values(args, TRAIN_DEFAULTS, DECODE_ONLY)
    cfg = load_model_config(v["model"])
    hw = resolve_hardware(v["hardware"], v["rdma_gb_s"])
    a = resolve_assumptions(v["assumptions"], args.assume)
    result, config = run_train(v, cfg, hw, a)
    results = config | {"assumptions_description": a.description} | result.summary()
    if args.trace is not None:
        names = {0: "one micro-batch, stage 0 (streams)"} | {
            s + 1: f"pipeline stage {s}" for s in range(config["pp"])
        }
        _write_trace(args.trace, train_trace_records(result), {"model": cfg.name}, names)
    full_config = config | {"hardware_spec": asdict(hw), "model_config": cfg.to_dict()}
    return CommandOutput(
        results=results,
        text=_with_trace_line(_train_text(results), args.trace),
        config=full_config,
        config_hash=_config_hash(full_config),
        seeds={"routing": v["seed"]},
    )


def train_trace_records(result: TrainResult) -> tuple:
    """One micro-batch's layer timeline as GPU class 0, the pipeline blocks as classes 1.. (one
    per pipeline stage), so both fit in one trace."""
    blocks = tuple(replace(r, gpu=r.gpu + 1) for r in result.pipeline_records)
    return result.records + blocks


__all__ = [
    "DecodeSetup",
    "decode_results",
    "decode_setup",
    "run_decode",
    "run_train",
]
