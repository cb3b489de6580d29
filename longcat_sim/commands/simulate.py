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
from dataclasses import asdict
from pathlib import Path
from typing import Any

from longcat_sim.cluster.assumptions import assumption_names
from longcat_sim.cluster.hardware import hardware_names
from longcat_sim.cluster.schedules import DECODE_SCHEDULES, PIPELINES, TRAIN_SCHEDULES
from longcat_sim.cluster.trace import chrome_trace_json
from longcat_sim.commands import host_step
from longcat_sim.commands.base import CommandOutput
from longcat_sim.errors import UserError
from longcat_sim.model.config import load_model_config
from longcat_sim.runs import write_text_atomic
from longcat_sim.scenarios.decode import (
    DECODE_DEFAULTS,
    MTP_ACCEPT,
    TABLE7_MTP_ACCEPT,
    decode_results,
    decode_setup,
    resolve_assumptions,
    resolve_hardware,
    run_decode,
)
from longcat_sim.scenarios.train import TRAIN_DEFAULTS, run_train, train_trace_records

HELP = (
    "simulate one decode or training step of a GPU-cluster deployment, or one train --nproc "
    "step on a calibrated host"
)

MODES = ("decode", "train", "host-ep")

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
