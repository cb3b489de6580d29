"""``longcat-sim calibrate``: measure this host, write a hardware profile, and check the step-time
model against measured ``train --nproc`` runs.

Writes ``host.toml`` into the run directory (``[hardware]`` loads with
``cluster.hardware.load_hardware_file``, so ``simulate --hardware RUN/host.toml`` accepts it;
``[host]`` carries the CPU terms and the per-world-size load terms). The model's own costs
come from one-process training steps (a line over the batch size) and from timing the
forward of the blocks ScMoE overlaps. Then, for every (world size, batch size), it runs
expert-parallel training with ScMoE overlap on and off on alternate steps of one launch (so
both see the same processes and load; off runs the MoE phases back to back, each exchange
waited for at once, nothing overlapping it), and compares the median step times with
:func:`cluster.hoststep.simulate_step` run on the profile as written (what ``simulate
--mode host-ep --profile RUN/host.toml`` predicts). ``--wire-mbit`` runs everything over a
rate-shaped loopback (``longcat_sim.calibrate.wire``) so communication waits on a wire.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from longcat_sim import stages
from longcat_sim.calibrate import measure, wire
from longcat_sim.cluster import hoststep
from longcat_sim.commands.base import CommandOutput
from longcat_sim.config.paths import check_output_dir, path_arg, text_arg
from longcat_sim.errors import UserError
from longcat_sim.model.config import ModelConfig, load_model_config
from longcat_sim.runs import claim_run_dir, config_hash, default_run_dir, write_text_atomic
from longcat_sim.train import distributed, training
from longcat_sim.train.config import default_train_config
from longcat_sim.train.world import check_nproc

WARMUP_STEPS = 2
EXCHANGES_PER_LAYER = 5  # counts, dispatch, combine forward; two reverses in backward

HELP = "measure this host's operator costs, write a hardware TOML, check predicted EP step times"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=text_arg, default="tiny", help="preset or TOML file (default tiny)"
    )
    parser.add_argument(
        "--nproc", default="2,4", help="comma list of process counts to measure (default 2,4)"
    )
    parser.add_argument("--batch-sizes", default="4,8", help="batch sizes (default 4,8)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument(
        "--steps",
        type=int,
        default=100,
        help="training steps per configuration (2 warm-up, then ScMoE on and off alternating)",
    )
    parser.add_argument("--data-cache", type=path_arg, default=None, help="tokenizer/token cache")
    parser.add_argument(
        "--wire-mbit",
        type=float,
        default=None,
        help="run the ranks over a loopback shaped to this rate (a network namespace with a "
        "tc token bucket; needs root) so communication waits on a wire, not on the cores",
    )
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


def _train_config(cfg: ModelConfig, batch: int, steps: int, args: argparse.Namespace):
    return default_train_config(cfg).replace(
        steps=steps,
        batch_size=batch,
        seq_len=args.seq_len,
        warmup_steps=1,
        eval_every=10**6,
        checkpoint_every=10**6,
    )


def _measure_steps(
    cfg: ModelConfig, world: int, batch: int, steps: int, args: argparse.Namespace
) -> dict[bool, dict[str, list[float]]]:
    """Step times, their micro-step part (slowest rank) and the busiest rank's own work (its
    micro-steps less its time in MoE exchanges) of ``train --nproc world`` with ScMoE overlap
    alternating on and off step by step, per overlap setting; the first ``WARMUP_STEPS``
    left out."""
    tc = _train_config(cfg, batch, steps, args)
    cache = None if args.data_cache is None else str(args.data_cache)
    ranks = distributed.launch(distributed.ep_train, world, cfg, tc, cache, (True, False))
    by_overlap: dict[bool, dict[str, list[float]]] = {
        on: {"step": [], "slices": [], "own_work": []} for on in (True, False)
    }
    for i in range(WARMUP_STEPS, tc.steps):
        times = by_overlap[ranks[0]["step_overlap"][i]]
        times["step"].append(max(r["step_seconds"][i] for r in ranks))
        times["slices"].append(max(r["slices_seconds"][i] for r in ranks))
        times["own_work"].append(
            max(r["slices_seconds"][i] - r["exchange_seconds"][i] for r in ranks)
        )
    return by_overlap


def _model_costs(cfg: ModelConfig, seq_len: int) -> tuple[int, float, float]:
    """The dense gradient bytes of one sequence, and the measured forward times (autograd on,
    one sequence, median over layers and repeats) of the dense steps each ScMoE exchange is in
    flight over (``stages.in_flight_over``: FFN_0 + MLA_1 behind the dispatch, FFN_1 behind the
    combine)."""
    from longcat_sim.model.transformer import LongcatFlashForCausalLM

    model = LongcatFlashForCausalLM(cfg, generator=torch.Generator().manual_seed(0))
    core = model.model
    experts = {id(p) for layer in core.layers for p in layer.mlp.experts.parameters()}
    grad_bytes = 4 * sum(p.numel() for p in model.parameters() if id(p) not in experts)
    cos, sin = core.rotary_emb(torch.arange(seq_len))
    x = torch.randn(1, seq_len, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    order = stages.layer_order("shortcut")
    windows = [stages.in_flight_over(order, e) for e in (stages.DISPATCH, stages.COMBINE)]
    timings: list[list[float]] = [[], []]
    for layer in core.layers:
        normed = {stages.ATTENTION_0: layer.post_attention_layernorm[0](x)}

        def window(steps, hidden, layer=layer, normed=normed) -> torch.Tensor:
            for step in steps:
                hidden = layer.dense_step(step, hidden, normed, cos, sin)
            return hidden

        inputs = [x, window(windows[0], x)]  # the combine's window starts where the dispatch's ends
        for _ in range(9):
            for times, steps, hidden in zip(timings, windows, inputs, strict=True):
                times.append(measure.seconds(lambda s=steps, h=hidden: window(s, h)))
    return grad_bytes, statistics.median(timings[0][2:]), statistics.median(timings[1][2:])


def _check_args(args: argparse.Namespace) -> tuple[list[int], list[int], ModelConfig]:
    """(process counts, batch sizes, model) of a valid command line; UserError otherwise."""
    nprocs = _ints(args.nproc, "--nproc")
    batches = sorted(set(_ints(args.batch_sizes, "--batch-sizes")))
    if args.wire_mbit is not None and not (math.isfinite(args.wire_mbit) and args.wire_mbit > 0):
        raise UserError(f"--wire-mbit must be a positive rate in Mbit/s, got {args.wire_mbit}")
    if args.steps < WARMUP_STEPS + 2:
        raise UserError(
            f"--steps must be at least {WARMUP_STEPS + 2} (the first {WARMUP_STEPS} are "
            f"warm-up, then ScMoE overlap alternates on and off), got {args.steps}"
        )
    if args.seq_len < 2:
        raise UserError(f"--seq-len must be at least 2 tokens, got {args.seq_len}")
    if 1 in nprocs:
        raise UserError("--nproc lists multi-process counts (2 or more); 1 is always measured")
    cfg = load_model_config(args.model)
    if args.seq_len > cfg.max_position_embeddings:
        raise UserError(
            f"--seq-len {args.seq_len} exceeds model {cfg.name!r}'s "
            f"{cfg.max_position_embeddings} positions"
        )
    if cfg.topology != "shortcut":
        raise UserError(f"calibrate needs the shortcut topology, model {cfg.name!r} has "
                        f"{cfg.topology!r}: use a preset without topology='conventional'")  # fmt: skip
    for world in nprocs:
        for batch in batches:
            check_nproc(world, cfg, batch)
    # the trainer's own checks (a runnable model that fits in memory), before any measurement
    training.check_compatible(cfg, _train_config(cfg, batches[-1], args.steps, args))
    if args.data_cache is not None:
        check_output_dir(args.data_cache, "--data-cache")
    return nprocs, batches, cfg


def _host(cfg: ModelConfig, seq_len: int) -> measure.HostMeasurements:
    """GEMM rates at the model's shapes, copy bandwidth and per-op overhead of this host."""
    shapes = [
        (32, cfg.hidden_size, cfg.expert_ffn_hidden_size),
        (32, cfg.expert_ffn_hidden_size, cfg.hidden_size),
        (seq_len, cfg.hidden_size, cfg.ffn_hidden_size),
        (seq_len, cfg.hidden_size, cfg.vocab_size),
    ]
    return measure.HostMeasurements(
        cores=os.cpu_count() or 1,
        matmul_gflops=measure.measure_matmul_gflops(shapes),
        mem_gb_s=measure.measure_memory_gb_s(),
        op_overhead_us=measure.measure_op_overhead_us(),
    )


def _single_process(cfg: ModelConfig, batches: list[int], args: argparse.Namespace) -> dict:
    """The model's compute in one process: a straight line of step time over the batch size."""
    fit_batches = sorted({1, 2, *batches})
    single = [_measure_steps(cfg, 1, b, args.steps, args) for b in fit_batches]
    single_s = [statistics.median([*s[True]["step"], *s[False]["step"]]) for s in single]
    t_slice, t_fixed = measure.fit_single_process(fit_batches, single_s)
    if not t_slice > 0:
        raise UserError(
            f"one-process step times {[round(s * 1e3, 2) for s in single_s]} ms at batch sizes "
            f"{fit_batches} do not grow with the batch (slope {t_slice:.3g} s per sequence): the "
            "host's noise hides the model's work; raise --seq-len or --steps"
        )
    return {"batch_sizes": fit_batches, "step_s": single_s, "t_slice_s": t_slice,
            "t_fixed_s": t_fixed}  # fmt: skip


def _probe_worlds(
    cfg: ModelConfig,
    host: measure.HostMeasurements,
    nprocs: list[int],
    batches: list[int],
    args: argparse.Namespace,
    single: dict,
) -> dict:
    """The host under load, per process count: compute bursts as long as the model's compute
    between two exchanges, interleaved with collectives of the model's sizes. Fills
    ``host.worlds`` and adds the ScMoE window times to ``single``; returns the probe record."""
    exchanges_per_slice = EXCHANGES_PER_LAYER * cfg.num_layers
    mm_s = measure.median_seconds(measure.compute_burst(1, cfg.hidden_size), 25, warmup=0)
    burst_reps = max(1, round(single["t_slice_s"] / exchanges_per_slice / mm_s))
    grad_bytes, hide_dispatch, hide_combine = _model_costs(cfg, args.seq_len)
    single.update(t_dispatch_hide_s=hide_dispatch, t_combine_hide_s=hide_combine)
    rows = int(4 * args.seq_len * cfg.target_ffn_experts * cfg.hidden_size)
    a2a_sizes = (8 * cfg.n_routed_experts, rows, 8 * rows)
    gather_sizes = (4096, grad_bytes, grad_bytes * max(batches) // min(nprocs))
    # the two ScMoE windows at the model's sizes: GEMM bursts as long as the blocks overlapped
    window_reps = tuple(max(1, round(t / mm_s)) for t in (hide_dispatch, hide_combine))
    contention: dict[int, list[dict[str, list[float]]]] = {}
    for world in nprocs:
        contention[world] = distributed.launch(measure.contention_probe, world, cfg, args.seq_len)
        probe = measure.LoadProbe(a2a_sizes, gather_sizes, burst_reps, cfg.hidden_size,
                                  window_reps=window_reps, window_bytes=rows)  # fmt: skip
        probes = distributed.launch(measure.load_probe, world, probe)
        host.worlds[world] = measure.world_terms_from_probe(
            _slowest(probes), measure.compute_slowdown(contention[world])
        )
    host.model = hoststep.EpModelTerms(
        seq_len=args.seq_len,
        hidden=cfg.hidden_size,
        layers=cfg.num_layers,
        n_routed_experts=cfg.n_routed_experts,
        ffn_slots_per_token=cfg.target_ffn_experts,
        t_slice_s=single["t_slice_s"],
        t_fixed_s=single["t_fixed_s"],
        t_dispatch_hide_s=hide_dispatch,
        t_combine_hide_s=hide_combine,
        grad_bytes_per_slice=grad_bytes,
        expert_weight_bytes=4 * cfg.n_routed_experts * cfg.expert_ffn_hidden_size * cfg.hidden_size,
    )
    return {"burst_reps": burst_reps, "contention": contention, "a2a_sizes": a2a_sizes,
            "gather_sizes": gather_sizes}  # fmt: skip


def _config_records(
    world: int, batch: int, steps: dict, profile: hoststep.HostProfile
) -> list[dict[str, Any]]:
    """Measured against predicted step time, ScMoE on then off, of one (world, batch)."""
    records = []
    for scmoe in (True, False):
        measured = statistics.median(steps[scmoe]["step"])
        step = hoststep.EpStep(world, batch, scmoe)
        simulated = hoststep.simulate_step(profile, step)
        simulated.pop("records")
        records.append(
            {
                "nproc": world,
                "batch_size": batch,
                "scmoe": scmoe,
                "measured_s": measured,
                "measured_slices_s": statistics.median(steps[scmoe]["slices"]),
                # the busiest rank's micro-steps less its time in MoE exchanges
                "measured_own_work_s": statistics.median(steps[scmoe]["own_work"]),
                "measured_steps_s": steps[scmoe]["step"],
                "predicted_s": simulated["step_s"],
                "simulated": simulated,
                "closed_form": hoststep.step_closed_form(profile, step),
                "error": simulated["step_s"] / measured - 1.0,
            }
        )
    return records


def _gain_record(world: int, batch: int, steps: dict, predicted: list[dict]) -> dict[str, Any]:
    """ScMoE's gain, paired: each on step against the off step right after it, on the
    micro-steps (forward, backward, exchanges: all that overlap changes; the gradient gathers
    and the optimizer after them are the same work either way)."""
    pairs = [off - on for on, off in zip(steps[True]["slices"], steps[False]["slices"],
                                         strict=False)]  # fmt: skip
    step_pairs = [off - on for on, off in zip(steps[True]["step"], steps[False]["step"],
                                              strict=False)]  # fmt: skip
    m_gain = statistics.median(pairs)
    # the interval treats the pairs as independent; neighbouring steps share the host's slow
    # drifts, which the pairing (adjacent steps) mostly cancels
    low, high = measure.median_interval(pairs)
    on, off = predicted
    p_gain = off["predicted_s"] - on["predicted_s"]
    return {
        "nproc": world,
        "batch_size": batch,
        "measured_gain_s": m_gain,
        "measured_gain_95_s": [low, high],  # of the median, distribution-free
        "pairs_gaining": sum(p > 0 for p in pairs),
        "pairs": len(pairs),
        "measured_step_gain_s": statistics.median(step_pairs),
        "step_pairs_gaining": sum(p > 0 for p in step_pairs),
        "predicted_gain_s": p_gain,
        "sign_correct": (m_gain > 0) == (p_gain > 0),
    }


def _measured_runs(
    cfg: ModelConfig,
    nprocs: list[int],
    batches: list[int],
    profile: hoststep.HostProfile,
    args: argparse.Namespace,
) -> tuple[list[dict], list[dict]]:
    """Per (world, batch): the configurations' records and ScMoE's gain."""
    configs, gains = [], []
    for world in nprocs:
        for batch in batches:
            steps = _measure_steps(cfg, world, batch, args.steps, args)
            records = _config_records(world, batch, steps, profile)
            configs += records
            gains.append(_gain_record(world, batch, steps, records))
    return configs, gains


def _summary(
    host: measure.HostMeasurements, profile_path: Path, single: dict, probe: dict,
    configs: list[dict], gains: list[dict],
) -> dict[str, Any]:  # fmt: skip
    errors = [abs(r["error"]) for r in configs]
    return {
        "host": host.to_dict(),
        "overlap_efficiency": {w: t.overlap_efficiency for w, t in host.worlds.items()},
        "profile": str(profile_path),
        "single_process": single,
        "probe": probe,
        "configs": configs,
        "median_abs_error": statistics.median(errors) if errors else None,
        "scmoe_gain": gains,
        "scmoe_sign_correct_all": all(g["sign_correct"] for g in gains) if gains else None,
        # configurations whose measured gain's 95 % interval excludes zero
        "scmoe_gain_resolved": sum(
            g["measured_gain_95_s"][0] > 0 or g["measured_gain_95_s"][1] < 0 for g in gains
        ),
    }


def _text(host: measure.HostMeasurements, results: dict[str, Any]) -> str:
    single = results["single_process"]
    lines = [
        f"host: {host.cores} cores, GEMM {max(host.matmul_gflops.values()):.1f} GFLOP/s, "
        f"copy {host.mem_gb_s:.1f} GB/s, op {host.op_overhead_us:.1f} us",
        f"  one process: {single['t_slice_s'] * 1e3:.1f} ms per sequence + "
        f"{single['t_fixed_s'] * 1e3:.1f} ms per step",
    ]
    for world, t in sorted(host.worlds.items()):
        lines.append(
            f"  W={world} under load: compute x{t.compute_slowdown:.2f}; all_to_all "
            f"{t.a2a_latency_us:.0f} us + bytes / {t.a2a_gb_s:.2f} GB/s, overlapped "
            f"{t.a2a_async_latency_us:.0f} us; all_gather {t.gather_latency_us:.0f} us + "
            f"bytes / {t.gather_gb_s:.2f} GB/s"
        )
    for r in results["configs"]:
        lines.append(
            f"  W={r['nproc']} B={r['batch_size']} ScMoE={'on ' if r['scmoe'] else 'off'}: "
            f"measured {r['measured_s'] * 1e3:7.1f} ms  predicted {r['predicted_s'] * 1e3:7.1f} ms "
            f"({r['error']:+.1%})"
        )
    gains = results["scmoe_gain"]
    for g in gains:
        low, high = g["measured_gain_95_s"]
        lines.append(
            f"  ScMoE gain W={g['nproc']} B={g['batch_size']}: measured "
            f"{g['measured_gain_s'] * 1e3:+.1f} ms (95 %: {low * 1e3:+.1f} to {high * 1e3:+.1f}; "
            f"{g['pairs_gaining']}/{g['pairs']} pairs), "
            f"predicted {g['predicted_gain_s'] * 1e3:+.1f} ms"
        )
    if results["configs"]:
        lines.append(
            f"median |error| {results['median_abs_error']:.1%}; ScMoE gain sign correct "
            f"in {sum(g['sign_correct'] for g in gains)}/{len(gains)} (measured gain resolved "
            f"from zero in {results['scmoe_gain_resolved']})"
        )
    lines.append(f"profile: {results['profile']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> CommandOutput:
    nprocs, batches, cfg = _check_args(args)
    config = {
        "model": cfg.to_dict(),
        "nproc": nprocs,
        "batch_sizes": batches,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "wire_mbit": args.wire_mbit,
        "measure_runs": not args.no_measure_runs,
    }
    digest = config_hash(config)
    if args.run_dir is None:  # the directory the command line writes the manifest into
        args.run_dir = default_run_dir("calibrate", digest)
    claim_run_dir(args.run_dir, "calibrate")
    if args.wire_mbit is not None:
        wire.enter_shaped_network(args.wire_mbit)
    torch.set_num_threads(1)
    host = _host(cfg, args.seq_len)
    with tempfile.TemporaryDirectory() as tmp:  # builds the data cache once, before any launch
        training.Trainer(cfg, _train_config(cfg, batches[0], 1, args), tmp,
                         data_cache=args.data_cache)  # fmt: skip
    single = _single_process(cfg, batches, args)
    probe = _probe_worlds(cfg, host, nprocs, batches, args, single)
    run_dir = Path(args.run_dir)
    write_text_atomic(run_dir / "host.toml", host.to_toml())
    # predictions come from the profile as written, as simulate --mode host-ep reads it
    profile = hoststep.load_host_profile(run_dir / "host.toml")
    configs, gains = [], []
    if not args.no_measure_runs:
        configs, gains = _measured_runs(cfg, nprocs, batches, profile, args)
    results = _summary(host, run_dir / "host.toml", single, probe, configs, gains)
    return CommandOutput(
        results=results, text=_text(host, results), config=config, config_hash=digest
    )


def _slowest(probes: list[dict]) -> dict:
    """Per term, the slowest rank's value (a collective ends when its last rank does)."""
    out = dict(probes[0])
    for key in (k for k in out if k.endswith("_s")):  # the timed terms; sizes stay as they are
        values = [p[key] for p in probes]
        out[key] = (
            max(values) if key == "compute_s" else [max(v) for v in zip(*values, strict=True)]
        )
    return out
