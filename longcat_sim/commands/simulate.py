"""``longcat-sim simulate``: one decode step (``--mode decode``) or one training step
(``--mode train``) of a deployment, priced by the cost model and run on the SimPy streams.

Defaults are the embedded deployments:

- decode: LongCat-Flash on 128 H800, EP128, SBO, 96 requests per GPU, 5000 cached tokens per
  request (the average context of the paper's Table 6 measurements, also the context assumed
  for the Table 7 attention row, which the paper does not state), BF16 attention, as many MTP
  draft tokens as the model has MTP layers (one for LongCat-Flash and DeepSeek-V3, none for
  Qwen3) accepted 90 % of the time (the paper's measured acceptance; 80 % under
  ``--assumptions table7``, Table 7's own assumption), assumption set ``default`` with the
  model's own router spread, the hardware catalogue's GPU-hour price.
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
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from longcat_sim.cluster.trace import chrome_trace_json
from longcat_sim.commands import host_step
from longcat_sim.commands.base import CommandOutput
from longcat_sim.commands.serving import (
    check_fits,
    disagg_warnings,
    memory_line,
    run_disagg_mode,
    run_prefill_mode,
)
from longcat_sim.config.deployment import DecodeDeployment, TrainDeployment
from longcat_sim.config.fields import flag
from longcat_sim.config.flags import add_assume_option, add_config_flags, given, set_values
from longcat_sim.config.paths import check_output_file, path_arg
from longcat_sim.config.serving import DisaggDeployment, PrefillDeployment
from longcat_sim.errors import UserError
from longcat_sim.model.config import load_model_config
from longcat_sim.runs import config_hash, write_text_atomic
from longcat_sim.scenarios.decode import (
    decode_memory,
    decode_results,
    resolve_assumptions,
    resolve_decode,
    resolve_hardware,
    run_decode,
)
from longcat_sim.scenarios.train import run_train, train_trace_records

HELP = (
    "simulate one decode, prefill or training step of a GPU-cluster deployment, a prefill pool "
    "beside a decode pool, or one train --nproc step on a calibrated host"
)

# each mode's deployment config; host-ep reads its own flags (commands.host_step)
DEPLOYMENTS: dict[str, type] = {
    "decode": DecodeDeployment,
    "prefill": PrefillDeployment,
    "disagg": DisaggDeployment,
    "train": TrainDeployment,
}
MODES = (*DEPLOYMENTS, "host-ep")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="decode",
        help="decode (default), prefill, disagg (a prefill pool beside a decode pool), train, "
        "or host-ep (train --nproc on a calibrated host)",
    )
    add_config_flags(parser, *DEPLOYMENTS.values())
    add_assume_option(parser)
    parser.add_argument("--trace", type=path_arg, help="write a Chrome/Perfetto trace.json here")
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
        f"  $ per M tokens      {r['cost_per_m_tokens']:10.3f}  (at ${r['gpu_hour_usd']:g} "
        f"per GPU-hour: {r['gpu_hour_usd_source']})",
        f"  exposed comm share  {r['exposed_comm_share']:10.1%}",
        memory_line(r),
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
            f"  exposed comm share        {r['exposed_comm_share']:10.1%}",
            f"  tokens/GPU/s              {r['tgs']:10.1f}",
        ]
    )


# -- command ----------------------------------------------------------------------------------


def _deployment(args: argparse.Namespace) -> Any:
    """The mode's deployment from the flags given; a flag no field of the mode has is an
    error naming a mode that has it."""
    cls = DEPLOYMENTS[args.mode]
    own = {f.name for f in fields(cls)}
    foreign = {f.name for other in DEPLOYMENTS.values() for f in fields(other)} - own
    wrong = given(args, sorted(foreign))
    if wrong:
        modes = [m for m, c in DEPLOYMENTS.items() if wrong[0] in {f.name for f in fields(c)}]
        raise UserError(
            f"{flag(wrong[0])} applies to --mode {', '.join(modes)}, not --mode {args.mode}"
        )
    return cls(**set_values(args, cls))


def _check_trace_path(path: Path | None) -> None:
    """Refuse, before simulating, a trace path that is a folder or whose folder is missing or
    cannot be written."""
    if path is not None:
        check_output_file(path, "--trace")


def _output(
    results: dict,
    text: str,
    config: dict,
    seed: int,
    trace: Path | None,
    warnings: list[str] | tuple[str, ...] = (),
) -> CommandOutput:
    """What the command line prints and saves; the text names the trace file when one was
    written."""
    return CommandOutput(
        results=results,
        text=text if trace is None else f"{text}\ntrace written to {trace}",
        config=config,
        config_hash=config_hash(config),
        seeds={"routing": seed},
        warnings=tuple(warnings),
    )


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
    host_only = given(args, host_step.OWN)
    if host_only:
        raise UserError(f"{flag(host_only[0])} applies to --mode host-ep, not --mode {args.mode}")
    if args.mode == "train":
        return _run_train(args)
    if args.mode in ("prefill", "disagg"):
        return _run_serving(args)
    dep = _deployment(args)
    setup = resolve_decode(dep, args.assume)
    what = f"{setup.cfg.name} decode on {setup.gpus} x {setup.hw.name}"
    check_fits(decode_memory(setup), what, dep.hbm_check == "refuse")
    result, closed = run_decode(setup)
    results = decode_results(setup, result, closed)
    config = setup.config() | {
        "mode": "decode",
        "hardware_spec": asdict(setup.hw),
        "model_config": setup.cfg.to_dict(),
    }
    if args.trace is not None:
        _write_trace(args.trace, result.records, {k: results[k] for k in ("model", "schedule")})
    return _output(results, _decode_text(results), config, setup.seed, args.trace, setup.warnings())


def _run_train(args: argparse.Namespace) -> CommandOutput:
    dep = _deployment(args)
    cfg = load_model_config(dep.model)
    hw = resolve_hardware(dep.hardware, dep.rdma_gb_s, dep.gpu_hour_usd)
    a = resolve_assumptions(dep.assumptions, args.assume)
    result, config = run_train(dep, cfg, hw, a)
    results = config | {"assumptions_description": a.description} | result.summary()
    if args.trace is not None:
        names = {0: "one micro-batch, stage 0 (streams)"} | {
            s + 1: f"pipeline stage {s}" for s in range(config["pp"])
        }
        _write_trace(args.trace, train_trace_records(result), {"model": cfg.name}, names)
    full_config = config | {"hardware_spec": asdict(hw), "model_config": cfg.to_dict()}
    return _output(results, _train_text(results), full_config, dep.seed, args.trace)


def _run_serving(args: argparse.Namespace) -> CommandOutput:
    dep = _deployment(args)
    enforce = dep.hbm_check == "refuse"
    if args.mode == "disagg":
        if args.trace is not None:
            raise UserError("--trace applies to --mode decode, prefill and train, not disagg")
        results, text, config = run_disagg_mode(dep, args.assume, enforce)
        return _output(results, text, config, dep.seed, None, disagg_warnings(results))
    results, text, config, records = run_prefill_mode(dep, args.assume, enforce)
    if args.trace is not None:
        _write_trace(args.trace, records, {k: results[k] for k in ("model", "schedule", "mode")})
    return _output(results, text, config, dep.seed, args.trace)
