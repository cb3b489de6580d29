"""``longcat-sim calibrate``: measure this host, write a hardware profile, and check the step-time
model against measured ``train --nproc`` runs.

Writes ``host.toml`` into the run directory (``[hardware]`` loads with
``cluster.hardware.load_hardware_file``, so ``simulate --hardware RUN/host.toml`` accepts it;
``[host]`` carries the CPU-specific terms). Then, for every (world size, ScMoE on/off, batch
size), it runs expert-parallel training, measures the median step time and compares it with
:func:`longcat_sim.calibration.predict_step_seconds`. ScMoE off is the conventional topology,
where nothing can overlap the all-to-all.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch

from longcat_sim import calibration, distributed, training
from longcat_sim.artifacts import write_text_atomic
from longcat_sim.errors import UserError
from longcat_sim.experiments.base import CommandOutput
from model.config import ModelConfig, load_model_config

# Forward FFN_0 + MLA_1 + FFN_1 as a share of one slice's forward+backward: 3 of the layer's
# 5 dense blocks, and the forward is about a third of forward+backward.
HIDEABLE_SHARE = 3 / 5 / 3

HELP = "measure this host's operator costs, write a hardware TOML, check predicted EP step times"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="preset or TOML file (default tiny)")
    parser.add_argument("--worlds", default="2,4", help="world sizes to measure (default 2,4)")
    parser.add_argument("--batch-sizes", default="4,8", help="batch sizes (default 4,8)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=6, help="training steps per configuration")
    parser.add_argument("--data-cache", type=Path, default=None, help="tokenizer/token cache")
    parser.add_argument(
        "--no-measure-runs",
        action="store_true",
        help="only calibrate the host and write the profile (no training runs)",
    )


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} needs comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{flag} needs positive integers, got {text!r}")
    return values


def _measure_steps(cfg: ModelConfig, world: int, batch: int, args: argparse.Namespace) -> float:
    """Median step time (the first step left out) of ``train --nproc world``."""
    tc = training.default_train_config(cfg).replace(
        steps=args.steps,
        batch_size=batch,
        seq_len=args.seq_len,
        warmup_steps=1,
        eval_every=10**6,
        checkpoint_every=10**6,
    )
    with tempfile.TemporaryDirectory() as tmp:
        training.Trainer(cfg, tc, tmp, data_cache=args.data_cache)  # builds the data cache once
    cache = None if args.data_cache is None else str(args.data_cache)
    ranks = distributed.launch(distributed.ep_train, world, cfg, tc, cache)
    steps = [max(r["step_seconds"][i] for r in ranks) for i in range(1, tc.steps)]
    return statistics.median(steps)


def _dense_grad_bytes(cfg: ModelConfig) -> int:
    from model.transformer import LongcatFlashForCausalLM

    model = LongcatFlashForCausalLM(cfg, generator=torch.Generator().manual_seed(0))
    experts = {id(p) for layer in model.model.layers for p in layer.mlp.experts.parameters()}
    return 4 * sum(p.numel() for p in model.parameters() if id(p) not in experts)


def run(args: argparse.Namespace) -> CommandOutput:
    worlds = _ints(args.worlds, "--worlds")
    batches = _ints(args.batch_sizes, "--batch-sizes")
    if args.steps < 2:
        raise UserError(f"--steps must be at least 2 (the first step is warm-up), got {args.steps}")
    cfg = load_model_config(args.model)
    for world in worlds:
        for batch in batches:
            distributed.check_nproc(world, cfg, batch)
    cores = os.cpu_count() or 1
    torch.set_num_threads(1)
    shapes = [
        (32, cfg.hidden_size, cfg.expert_ffn_hidden_size),
        (32, cfg.expert_ffn_hidden_size, cfg.hidden_size),
        (args.seq_len, cfg.hidden_size, cfg.ffn_hidden_size),
        (args.seq_len, cfg.hidden_size, cfg.vocab_size),
    ]
    host = calibration.HostProfile(
        cores=cores,
        matmul_gflops=calibration.measure_matmul_gflops(shapes),
        mem_gb_s=calibration.measure_memory_gb_s(),
        op_overhead_us=calibration.measure_op_overhead_us(),
    )
    for world in worlds:
        probes = distributed.launch(calibration.comm_probe, world)
        alpha, beta = calibration.fit_alpha_beta(probes[0]["sizes"], probes[0]["seconds"])
        host.a2a_latency_us[world] = alpha * 1e6
        host.a2a_gb_s[world] = beta / 1e9
        host.overlap_efficiency[world] = statistics.median(p["overlap_efficiency"] for p in probes)
    run_dir = Path(args.run_dir or Path("runs") / "calibrate" / "latest")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "host.toml", host.to_toml())

    rows = []
    grad_bytes = _dense_grad_bytes(cfg)
    if not args.no_measure_runs:
        for topology in ("shortcut", "conventional"):
            model_cfg = cfg.replace(topology=topology)
            single = [_measure_steps(model_cfg, 1, b, args) for b in sorted(set(batches))]
            t_slice, t_fixed = calibration.fit_single_process(sorted(set(batches)), single)
            for world in worlds:
                for batch in batches:
                    measured = _measure_steps(model_cfg, world, batch, args)
                    workload = calibration.StepWorkload(
                        world=world,
                        batch_size=batch,
                        seq_len=args.seq_len,
                        hidden=cfg.hidden_size,
                        layers=cfg.num_layers,
                        ffn_slots_per_token=cfg.expected_ffn_experts,
                        scmoe=topology == "shortcut",
                        t_slice_s=t_slice,
                        t_hideable_s=t_slice * HIDEABLE_SHARE,
                        t_fixed_s=t_fixed,
                        grad_bytes_per_slice=grad_bytes,
                    )
                    predicted = calibration.predict_step_seconds(workload, host)
                    rows.append(
                        {
                            "world": world,
                            "batch_size": batch,
                            "scmoe": topology == "shortcut",
                            "measured_s": measured,
                            "predicted_s": predicted["step"],
                            "terms": predicted,
                            "error": predicted["step"] / measured - 1.0,
                            "single_process_fit": {"t_slice_s": t_slice, "t_fixed_s": t_fixed},
                        }
                    )
    errors = [abs(r["error"]) for r in rows]
    signs = []
    for world in worlds:
        for batch in batches:
            pair = {r["scmoe"]: r for r in rows if r["world"] == world and r["batch_size"] == batch}
            if len(pair) == 2:
                m_gain = pair[False]["measured_s"] - pair[True]["measured_s"]
                p_gain = pair[False]["predicted_s"] - pair[True]["predicted_s"]
                signs.append(
                    {
                        "world": world,
                        "batch_size": batch,
                        "measured_gain_s": m_gain,
                        "predicted_gain_s": p_gain,
                        "sign_correct": (m_gain > 0) == (p_gain > 0),
                    }
                )
    results = {
        "host": host.to_dict(),
        "profile": str(run_dir / "host.toml"),
        "configs": rows,
        "median_abs_error": statistics.median(errors) if errors else None,
        "scmoe_gain": signs,
        "scmoe_sign_correct_all": all(s["sign_correct"] for s in signs) if signs else None,
    }
    lines = [
        f"host: {cores} cores, GEMM {max(host.matmul_gflops.values()):.1f} GFLOP/s, "
        f"copy {host.mem_gb_s:.1f} GB/s, op {host.op_overhead_us:.1f} us"
    ]
    for world in worlds:
        lines.append(
            f"  gloo all_to_all W={world}: {host.a2a_latency_us[world]:.0f} us + "
            f"bytes / {host.a2a_gb_s[world]:.2f} GB/s; overlap efficiency "
            f"{host.overlap_efficiency[world]:+.2f}"
        )
    for r in rows:
        lines.append(
            f"  W={r['world']} B={r['batch_size']} ScMoE={'on ' if r['scmoe'] else 'off'}: "
            f"measured {r['measured_s'] * 1e3:7.1f} ms  predicted {r['predicted_s'] * 1e3:7.1f} ms "
            f"({r['error']:+.1%})"
        )
    if errors:
        lines.append(
            f"median |error| {results['median_abs_error']:.1%}; ScMoE gain sign correct "
            f"in {sum(s['sign_correct'] for s in signs)}/{len(signs)}"
        )
    lines.append(f"profile: {run_dir / 'host.toml'}")
    return CommandOutput(
        results=results,
        text="\n".join(lines),
        config={
            "model": cfg.to_dict(),
            "worlds": worlds,
            "batch_sizes": batches,
            "seq_len": args.seq_len,
            "steps": args.steps,
        },
        config_hash="calibrate-" + cfg.name,
    )
