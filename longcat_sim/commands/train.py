"""``longcat-sim train``: train a runnable model on the standard-library corpus.

The run directory (``--run-dir``) receives ``metrics.jsonl`` (one JSON object per step), atomic
checkpoints under ``checkpoints/`` and the usual ``manifest.json``/``results.json``. The run
spans one process, ``--nproc N`` processes it spawns, or the processes of ``torchrun`` (read from
``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; rank 0 prints and writes, the others leave quietly); FFN
experts are sharded over the processes, every other parameter replicated. Torch runs on
``--threads`` threads per process (default 1): results are bitwise reproducible for a fixed
thread count and process count; with ``--deterministic`` (batch-invariant kernels, fixed-order
sums) they are equal for any ``--threads`` and any process count.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from longcat_sim.commands.base import CommandOutput
from longcat_sim.config.flags import add_config_flags, set_values
from longcat_sim.config.hashing import config_hash as hash_config
from longcat_sim.config.paths import check_output_dir, path_arg, text_arg
from longcat_sim.config.threads import check_threads
from longcat_sim.errors import UserError
from longcat_sim.model.config import CHECK_ONLY_FIELDS, ModelConfig, load_model_config, same_model
from longcat_sim.model.determinism import deterministic_config
from longcat_sim.model.kernels.backend import triton_available, triton_interpreting
from longcat_sim.repro.inject import SITES, check_fault_targets, parse_fault, trainer_faults
from longcat_sim.runs import claim_run_dir, default_run_dir
from longcat_sim.train import config as training_config
from longcat_sim.train import distributed
from longcat_sim.train.checkpoint import (
    latest_checkpoint,
    newest_intact,
    read_checkpoint_state,
    remove_stale,
    verify_checkpoint,
)
from longcat_sim.train.config import TrainConfig
from longcat_sim.train.guard import POLICIES, GuardSettings, guarded_config
from longcat_sim.train.metrics import TrainSummary
from longcat_sim.train.training import grow_source, load_data, trained_config
from longcat_sim.train.world import (
    TRAIN_BACKEND,
    World,
    check_nproc,
    env_world,
    join_env_world,
)

HELP = "train a model with the expert-bias controller; metrics, checkpoints and --resume"


def _preset_defaults() -> dict[str, str]:
    """A train setting's default as ``--help`` shows it: tiny's, then the presets' own."""
    tiny = TrainConfig()
    shown: dict[str, list[str]] = {}
    for preset, values in training_config.PRESET_TRAIN_DEFAULTS.items():
        for name, value in values.items():
            if value != getattr(tiny, name):
                shown.setdefault(name, [f"{getattr(tiny, name):g}"]).append(f"{preset} {value:g}")
    return {name: "; ".join(parts) for name, parts in shown.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, every train setting (a ``TrainConfig`` field) and the run's options."""
    parser.add_argument(
        "--model",
        type=text_arg,
        default=None,
        help="preset name or TOML file (default tiny; on --resume, the checkpoint's model)",
    )
    add_config_flags(parser, TrainConfig, defaults=_preset_defaults())
    parser.add_argument(
        "--target-ffn-experts",
        type=float,
        default=None,
        metavar="TARGET",
        help="average FFN experts per token the bias controller steers to (JSON key "
        "target_ffn_experts)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a train setting (e.g. balance_alpha=0) or a model field (model.num_layers=1)",
    )
    _add_run_arguments(parser)


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a run starts and stops, and what it runs on."""
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        choices=("latest", "latest-valid"),
        default=None,
        help="continue from the latest complete checkpoint, refused when its files do not "
        "match their recorded SHA-256; 'latest-valid': from the newest intact one",
    )
    parser.add_argument(
        "--grow-from",
        type=path_arg,
        default=None,
        metavar="DIR",
        help="start from a shallower run's checkpoint stacked into this model's depth",
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="STEP",
        help="stop (and checkpoint) after this step; the schedule still spans --steps",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1, reproducible)"
    )
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="train in N processes it spawns (over gloo): FFN experts sharded, "
        "every other parameter replicated; with --deterministic the parameters are bitwise "
        "equal for any N (under torchrun the world size comes from WORLD_SIZE)",
    )
    parser.add_argument(
        "--kernels",
        choices=("torch", "triton"),
        default=None,
        help="implementation of the MoE's kernels (the model config's kernels field)",
    )
    parser.add_argument(
        "--data-cache",
        type=path_arg,
        default=None,
        help="tokenizer/token cache folder (default ~/.cache/longcat-sim)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tqdm progress bar on stderr (default: when stderr is a terminal)",
    )
    _add_guard_arguments(parser)


def _add_guard_arguments(parser: argparse.ArgumentParser) -> None:
    """The SDC guard (``longcat_sim/train/guard.py``) and its negative controls."""
    parser.add_argument(
        "--sdc-guard",
        action="store_true",
        help="silent-data-corruption guard: ABFT on the expert GEMMs and the combine, sampled "
        "recompute, loss/gradient/routing validators, at-rest state checks; an alarm replays "
        "the step and attributes it (transient, persistent, genuine); needs --deterministic",
    )
    parser.add_argument(
        "--sdc-policy",
        choices=POLICIES,
        default="continue",
        help="after an SDC event: continue with the clean replay, skip the step's update, or "
        "stop the run (exit 1) keeping the state before the step (default continue)",
    )
    parser.add_argument(
        "--sdc-inject",
        action="append",
        default=[],
        metavar="SITE:BIT[:STEP[:TARGET[:persistent]]]",
        help=f"plant a bit flip (negative control; repeatable; one process); sites: {', '.join(SITES)}",
    )


def _requested_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    train, model = training_config.parse_overrides(args.overrides)
    if args.kernels is not None:
        model["kernels"] = args.kernels
    train.update(set_values(args, TrainConfig))  # a flag wins over --set
    return train, model


def _resume_checkpoint(run_dir: Path, mode: str) -> Path:
    """The checkpoint ``--resume`` continues from, its files checked against their digests
    before any work starts (``latest-valid``: the newest intact one, saying what it skipped)."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise UserError(
            f"--resume: {str(run_dir)!r} holds no complete checkpoint; run without --resume "
            "to start training"
        )
    if mode == "latest":
        verify_checkpoint(latest)
        return latest
    checkpoint, skipped = newest_intact(run_dir)
    for reason in skipped:
        print(f"warning: skipped: {reason}", file=sys.stderr)
    if checkpoint is None:
        raise UserError(f"--resume latest-valid: no checkpoint in {str(run_dir)!r} is intact")
    return checkpoint


def _configs(
    args: argparse.Namespace, run_dir: Path | None
) -> tuple[ModelConfig, training_config.TrainConfig, Path | None]:
    """Model and train configs for a fresh run, or those of the checkpoint to resume."""
    train_changes, model_changes = _requested_settings(args)
    if args.resume:
        # the checks the weights carry belong to this run, not to the checkpoint's
        checks = {name: model_changes.pop(name, False) for name in CHECK_ONLY_FIELDS}
        if run_dir is None:
            raise UserError("--resume needs the run directory: pass --run-dir DIR")
        checkpoint = _resume_checkpoint(run_dir, args.resume)
        state = read_checkpoint_state(checkpoint)
        model_cfg: ModelConfig = state["model_config"]
        train_cfg = state["train_config"].replace(**train_changes)
        if train_cfg.steps < int(state["step"]):
            raise UserError(
                f"--resume: the checkpoint is at step {int(state['step'])}, past --steps "
                f"{train_cfg.steps}; give --steps {int(state['step'])} or more"
            )
        if args.model is not None or model_changes or args.target_ffn_experts is not None:
            requested = trained_config(_model_config(args, model_changes, train_cfg), train_cfg)
            if not same_model(requested, model_cfg):
                raise UserError(
                    f"--resume: the checkpoint in {str(run_dir)!r} was trained with a different "
                    "model config; drop --model/--kernels/--target-ffn-experts/--set model.* to "
                    "resume it"
                )
        return model_cfg.replace(**checks), train_cfg, checkpoint
    base_cfg = _model_config(args, model_changes, None)
    defaults = training_config.default_train_config(base_cfg)
    if "steps" in train_changes and "warmup_steps" not in train_changes:
        # a short run keeps the default warmup only if it fits
        train_changes["warmup_steps"] = min(defaults.warmup_steps, train_changes["steps"])
    train_cfg = defaults.replace(**train_changes)
    model_cfg = _model_config(args, model_changes, train_cfg)
    return model_cfg, train_cfg, None


def _model_config(
    args: argparse.Namespace,
    changes: dict[str, Any],
    train_cfg: training_config.TrainConfig | None,
) -> ModelConfig:
    cfg = load_model_config(args.model or "tiny")
    if changes:
        cfg = cfg.replace(**changes)
    if args.target_ffn_experts is not None and train_cfg is not None:
        cfg = training_config.with_target_ffn_experts(
            cfg, args.target_ffn_experts, train_cfg.balance_alpha
        )
    return cfg


def _check_flags(args: argparse.Namespace) -> None:
    check_threads(args.threads)
    if args.resume and args.grow_from is not None:
        raise UserError("pass either --resume or --grow-from, not both")
    if args.stop_after is not None and args.stop_after <= 0:
        raise UserError(f"--stop-after must be a positive step, got {args.stop_after}")
    if args.data_cache is not None:
        check_output_dir(args.data_cache, "--data-cache")
    if args.sdc_inject and not args.sdc_guard:
        raise UserError("--sdc-inject plants faults for the SDC guard; add --sdc-guard")


def _guard_settings(
    args: argparse.Namespace, train_cfg: training_config.TrainConfig
) -> GuardSettings | None:
    """The SDC guard's settings, or None for an unguarded run."""
    if not args.sdc_guard:
        return None
    if not train_cfg.deterministic:
        raise UserError(
            "--sdc-guard replays a step and compares it bit for bit; add --deterministic"
        )
    return GuardSettings(policy=args.sdc_policy, seed=train_cfg.seed)


def _planted_faults(
    args: argparse.Namespace,
    model_cfg: ModelConfig,
    train_cfg: training_config.TrainConfig,
    nproc: int,
) -> Any:
    """The faults ``--sdc-inject`` plants (checked before any work), or None."""
    if not args.sdc_inject:
        return None
    faults = [parse_fault(text, "--sdc-inject") for text in args.sdc_inject]
    if nproc > 1:
        raise UserError("--sdc-inject runs in one process; drop --nproc")
    if any(f.step >= train_cfg.steps for f in faults):
        raise UserError(f"--sdc-inject: a fault's step is past the last step {train_cfg.steps - 1}")
    check_fault_targets(trained_config(model_cfg, train_cfg), faults)
    return functools.partial(trainer_faults, faults=faults)


def run(args: argparse.Namespace) -> CommandOutput:
    _check_flags(args)
    model_cfg, train_cfg, checkpoint = _configs(args, args.run_dir)
    guard = _guard_settings(args, train_cfg)
    model_cfg = guarded_config(model_cfg, guard)  # the expert weights carry their checksums
    config_hash = training_config.run_config_hash(model_cfg, train_cfg)
    if args.sdc_guard:  # a guarded run, and one with planted faults, is its own configuration
        config_hash = hash_config({"run": config_hash, **_guard_config(args)})
    if args.run_dir is None:
        args.run_dir = default_run_dir("train", config_hash)
    run_dir = claim_run_dir(args.run_dir, "train")
    if checkpoint is None and latest_checkpoint(run_dir) is not None:
        raise UserError(
            f"{str(run_dir)!r} already holds checkpoints; pass --resume to continue it or choose "
            "another --run-dir"
        )
    world = env_world()
    nproc = world.size if world is not None else (args.nproc or 1)
    if world is not None and args.nproc not in (None, world.size):
        raise UserError(f"--nproc {args.nproc} differs from torchrun's WORLD_SIZE={world.size}")
    check_nproc(nproc, model_cfg, train_cfg.batch_size, train_cfg.slice_size)
    _check_kernels(model_cfg, train_cfg, nproc)
    if args.grow_from is not None and world is None:  # before any process starts
        grow_source(args.grow_from, trained_config(model_cfg, train_cfg), train_cfg.steps)
    faults = _planted_faults(args, model_cfg, train_cfg, nproc)
    rank_run = distributed.RankRun(
        model_cfg, train_cfg, str(run_dir),
        data_cache=None if args.data_cache is None else str(args.data_cache),
        resume_from=None if checkpoint is None else str(checkpoint),
        grow_from=None if args.grow_from is None else str(args.grow_from),
        stop_after=args.stop_after, progress=args.progress, guard=guard, faults=faults,
    )  # fmt: skip
    summary = _train(rank_run, args.threads, nproc, world)
    return _output(args, model_cfg, train_cfg, config_hash, summary)


def _check_kernels(
    model_cfg: ModelConfig, train_cfg: training_config.TrainConfig, nproc: int
) -> None:
    """Refuse, before any work, kernels the trainer cannot run: Triton runs the model's own
    MoE, in one process, and on the CPU only under the interpreter."""
    if train_cfg.deterministic:
        deterministic_config(model_cfg)  # raises for kernels other than torch
    if model_cfg.kernels == "triton" and nproc > 1:
        raise UserError(
            f"--kernels triton runs in one process; with {nproc} processes the experts run in "
            "the expert-parallel exchange: use --kernels torch or one process"
        )
    if model_cfg.kernels == "triton" and not (triton_available() and triton_interpreting()):
        raise UserError(
            "--kernels triton: the trainer's tensors are on the CPU, where Triton kernels need "
            "the triton package and TRITON_INTERPRET=1; use --kernels torch"
        )


def _train(run: distributed.RankRun, threads: int, nproc: int, world: World | None) -> TrainSummary:
    """Train in this process (one process, or this rank of torchrun's world) or in ``nproc``
    spawned processes; ranks of torchrun other than 0 leave once the run is complete. A run
    that stops (an error, a stop signal) leaves its complete checkpoints and no partial one."""
    try:
        return _train_ranks(run, threads, nproc, world)
    except BaseException:
        if world is None or world.is_main:  # the checkpoints' one writer has stopped
            remove_stale(Path(run.run_dir))
        raise


def _train_ranks(
    run: distributed.RankRun, threads: int, nproc: int, world: World | None
) -> TrainSummary:
    if world is None and nproc > 1:
        load_data(run.model_cfg, run.train_cfg, run.data_cache)  # the cache, built once
        ranks = distributed.launch(
            distributed.train_rank, nproc, run, backend=TRAIN_BACKEND, threads=threads
        )
        assert ranks[0] is not None  # rank 0 returns the summary
        return ranks[0]
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if world is not None:
            join_env_world(world)
        summary = distributed.run_training(run, world)
        if world is not None:
            world.barrier()  # no rank tears down while a peer's collective is in flight
    finally:
        torch.set_num_threads(previous_threads)
        if world is not None and world.distributed and dist.is_initialized():
            dist.destroy_process_group()
    if world is not None and not world.is_main:
        _leave()
    return summary


def _leave() -> NoReturn:
    """A torchrun rank other than 0, its part done: exit at once, so that no thread of the
    torn-down process group is destroyed during interpreter finalization."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _output(
    args: argparse.Namespace,
    model_cfg: ModelConfig,
    train_cfg: training_config.TrainConfig,
    config_hash: str,
    summary: TrainSummary,
) -> CommandOutput:
    results = {
        "model": model_cfg.name,
        "steps": summary.step,
        "start_step": summary.start_step,
        "final_loss": summary.final_loss,
        "val_loss": summary.val_loss,
        "val_unigram_entropy": summary.val_unigram_entropy,
        "val_unigram_cross_entropy": summary.val_unigram_cross_entropy,
        "train_unigram_entropy": summary.train_unigram_entropy,
        "avg_ffn_experts_per_token": summary.avg_ffn_experts_per_token,
        "ffn_experts_std_per_token": summary.ffn_experts_std_per_token,
        "stats_window": summary.stats_window,
        "target_ffn_experts": summary.target_ffn_experts,
        "tokens_per_s": summary.tokens_per_s,
        "param_hash": summary.param_hash,
        "checkpoint": summary.checkpoint,
        "grown_from": summary.grown_from,
        "threads": args.threads,
        "nproc": summary.nproc,
        "kernels": model_cfg.kernels,
        "deterministic": train_cfg.deterministic,
        "data": summary.data,
        "sdc_guard": summary.sdc_guard,
        "stopped": summary.stopped,
    }
    avg = ", ".join(f"{x:.3f}" for x in summary.avg_ffn_experts_per_token)
    text = "\n".join(
        [
            f"trained {model_cfg.name} to step {summary.step} (from {summary.start_step}) on "
            f"{summary.nproc} process(es)",
            f"  final train loss   {summary.final_loss:.4f} nats/token",
            f"  validation loss    {summary.val_loss:.4f} nats/token "
            f"(unigram entropy {summary.val_unigram_entropy:.4f}; train-fitted unigram "
            f"{summary.val_unigram_cross_entropy:.4f})",
            f"  FFN experts/token  [{avg}] per layer, target {summary.target_ffn_experts:g} "
            f"(mean of the last {summary.stats_window} steps)",
            f"  throughput         {summary.tokens_per_s:,.0f} tokens/s, {args.threads} "
            "thread(s) per process",
            f"  parameters sha256  {summary.param_hash}",
            f"  checkpoint         {summary.checkpoint}",
            *_guard_lines(summary),
        ]
    )
    config = {"model": model_cfg.to_dict(), "train": train_cfg.to_dict()}
    if args.sdc_guard:
        config.update(_guard_config(args))
    return CommandOutput(
        results=results,
        text=text,
        config=config,
        warnings=_unfired_warnings(summary),
        config_hash=config_hash,
        seeds={"seed": train_cfg.seed, **training_config.derive_seeds(train_cfg.seed)},
        exit_code=1 if summary.stopped else 0,
    )


def _guard_config(args: argparse.Namespace) -> dict[str, Any]:
    """What the manifest (and the run's hash) records of the SDC guard."""
    return {"sdc_guard": True, "sdc_policy": args.sdc_policy, "sdc_inject": list(args.sdc_inject)}


def _unfired_warnings(summary: TrainSummary) -> tuple[str, ...]:
    guard = summary.sdc_guard or {}
    return tuple(
        f"--sdc-inject {f['site']}:{f['bit']}:{f['step']}: the fault never fired (its step did "
        "not run, or there was nothing to corrupt yet, e.g. optimizer moments before step 1)"
        for f in guard.get("planted_unfired", [])
    )


def _guard_lines(summary: TrainSummary) -> list[str]:
    guard = summary.sdc_guard
    if guard is None:
        return []
    by = ", ".join(f"{k} {v}" for k, v in guard["attribution"].items())
    lines = [
        f"  SDC guard          {guard['alarmed_steps']} event(s) in {guard['steps']} steps ({by}); "
        f"{guard['abft_checks']:,} ABFT checks, policy {guard['policy']}"
    ]
    if summary.stopped:
        lines.append(f"  stopped            {summary.stopped}")
    return lines
