"""``longcat-sim train``: train a runnable model on the standard-library corpus.

The run directory (``--out``) receives ``metrics.jsonl`` (one JSON object per step), atomic
checkpoints under ``checkpoints/`` and the usual ``manifest.json``/``results.json``. Torch runs
on ``--threads`` threads (default 1): results are bitwise reproducible for a fixed thread count,
and a different count may change the last bits of reductions (with ``--deterministic`` it does
not: batch-invariant kernels and fixed-order sums).
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from longcat_sim.commands.base import CommandOutput
from longcat_sim.errors import UserError
from longcat_sim.model.config import ModelConfig, load_model_config
from longcat_sim.model.determinism import DeterministicMode
from longcat_sim.train import training

HELP = "train a model with the expert-bias controller; metrics, checkpoints and --resume"

# CLI flag -> TrainConfig field
_FLAG_SETTINGS = {
    "steps": "steps",
    "seed": "seed",
    "batch_size": "batch_size",
    "seq_len": "seq_len",
    "lr": "lr",
    "bias_rate": "bias_rate",
    "eval_every": "eval_every",
    "checkpoint_every": "checkpoint_every",
    "deterministic": "deterministic",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="preset name or TOML file (default tiny; on --resume, the checkpoint's model)",
    )
    parser.add_argument("--out", type=Path, default=None, help="run directory (same as --run-dir)")
    parser.add_argument("--steps", type=int, default=None, help="steps of the whole run")
    parser.add_argument(
        "--target-ffn-experts",
        type=float,
        default=None,
        metavar="K_E",
        help="average FFN experts per token the bias controller steers to (expected_ffn_experts)",
    )
    parser.add_argument("--seed", type=int, default=None, help="root seed (init and data streams)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    parser.add_argument(
        "--bias-rate", type=float, default=None, help="bias adaptation rate μ (0: controller off)"
    )
    parser.add_argument("--eval-every", type=int, default=None, help="validate every N steps")
    parser.add_argument(
        "--checkpoint-every", type=int, default=None, help="checkpoint every N steps"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a train setting (e.g. balance_alpha=0) or a model field (model.num_layers=1)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest complete checkpoint"
    )
    parser.add_argument(
        "--grow-from",
        type=Path,
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
        "--deterministic",
        action="store_true",
        default=None,
        help="deterministic mode: batch-invariant kernels, results equal for any --threads",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="expert-parallel training over N processes (gloo on CPU): dense parameters data "
        "parallel, FFN experts sharded; no checkpoints; with --deterministic the parameters "
        "are bitwise equal for any N",
    )
    parser.add_argument(
        "--data-cache",
        type=Path,
        default=None,
        help="tokenizer/token cache folder (default ~/.cache/longcat-sim)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tqdm progress bar on stderr (default: when stderr is a terminal)",
    )


def _requested_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    train, model = training.parse_overrides(args.overrides)
    for flag, name in _FLAG_SETTINGS.items():
        value = getattr(args, flag)
        if value is not None:
            train[name] = value
    return train, model


def _configs(
    args: argparse.Namespace, run_dir: Path | None
) -> tuple[ModelConfig, training.TrainConfig, Path | None]:
    """Model and train configs for a fresh run, or those of the checkpoint to resume."""
    train_changes, model_changes = _requested_settings(args)
    if args.resume:
        if run_dir is None:
            raise UserError("--resume needs the run directory: pass --out DIR")
        checkpoint = training.latest_checkpoint(run_dir)
        if checkpoint is None:
            raise UserError(
                f"--resume: {str(run_dir)!r} holds no complete checkpoint; run without --resume "
                "to start training"
            )
        state = training.read_checkpoint_state(checkpoint)
        model_cfg: ModelConfig = state["model_config"]
        train_cfg = state["train_config"].replace(**train_changes)
        if args.model is not None or model_changes or args.target_ffn_experts is not None:
            requested = _model_config(args, model_changes, train_cfg)
            if requested != model_cfg:
                raise UserError(
                    f"--resume: the checkpoint in {str(run_dir)!r} was trained with a different "
                    "model config; drop --model/--target-ffn-experts/--set model.* to resume it"
                )
        return model_cfg, train_cfg, checkpoint
    base_cfg = _model_config(args, model_changes, None)
    defaults = training.default_train_config(base_cfg)
    if "steps" in train_changes and "warmup_steps" not in train_changes:
        # a short run keeps the default warmup only if it fits
        train_changes["warmup_steps"] = min(defaults.warmup_steps, train_changes["steps"])
    train_cfg = defaults.replace(**train_changes)
    model_cfg = _model_config(args, model_changes, train_cfg)
    return model_cfg, train_cfg, None


def _model_config(
    args: argparse.Namespace,
    changes: dict[str, Any],
    train_cfg: training.TrainConfig | None,
) -> ModelConfig:
    cfg = load_model_config(args.model or "tiny")
    if changes:
        cfg = cfg.replace(**changes)
    if args.target_ffn_experts is not None and train_cfg is not None:
        cfg = training.with_target_ffn_experts(
            cfg, args.target_ffn_experts, train_cfg.balance_alpha
        )
    return cfg


def run(args: argparse.Namespace) -> CommandOutput:
    if args.threads <= 0:
        raise UserError(f"--threads must be positive, got {args.threads}")
    if args.resume and args.grow_from is not None:
        raise UserError("pass either --resume or --grow-from, not both")
    if args.stop_after is not None and args.stop_after <= 0:
        raise UserError(f"--stop-after must be a positive step, got {args.stop_after}")
    if args.out is not None:
        args.run_dir = args.out
    model_cfg, train_cfg, checkpoint = _configs(args, args.run_dir)
    config_hash = training.run_config_hash(model_cfg, train_cfg)
    if args.run_dir is None:
        args.run_dir = Path("runs") / "train" / config_hash[:12]
    run_dir = Path(args.run_dir)
    if checkpoint is None and training.latest_checkpoint(run_dir) is not None:
        raise UserError(
            f"{str(run_dir)!r} already holds checkpoints; pass --resume to continue it or choose "
            "another --out"
        )
    if args.nproc is not None:
        return _run_expert_parallel(args, model_cfg, train_cfg, config_hash)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    mode = DeterministicMode(threads=args.threads) if train_cfg.deterministic else nullcontext()
    try:
        with mode:
            trainer = training.Trainer(
                model_cfg, train_cfg, run_dir, data_cache=args.data_cache, progress=args.progress
            )
            if checkpoint is not None:
                trainer.load_checkpoint(checkpoint)
            elif args.grow_from is not None:
                trainer.grow_from(args.grow_from)
            summary = trainer.train(stop_after=args.stop_after)
    finally:
        torch.set_num_threads(previous_threads)

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
        "deterministic": train_cfg.deterministic,
        "data": summary.data,
    }
    avg = ", ".join(f"{x:.3f}" for x in summary.avg_ffn_experts_per_token)
    text = "\n".join(
        [
            f"trained {model_cfg.name} to step {summary.step} (from {summary.start_step})",
            f"  final train loss   {summary.final_loss:.4f} nats/token",
            f"  validation loss    {summary.val_loss:.4f} nats/token "
            f"(unigram entropy {summary.val_unigram_entropy:.4f}; train-fitted unigram "
            f"{summary.val_unigram_cross_entropy:.4f})",
            f"  FFN experts/token  [{avg}] per layer, target {summary.target_ffn_experts:g} "
            f"(mean of the last {summary.stats_window} steps)",
            f"  throughput         {summary.tokens_per_s:,.0f} tokens/s on {args.threads} thread(s)",
            f"  parameters sha256  {summary.param_hash}",
            f"  checkpoint         {summary.checkpoint}",
        ]
    )
    return CommandOutput(
        results=results,
        text=text,
        config={"model": model_cfg.to_dict(), "train": train_cfg.to_dict()},
        config_hash=config_hash,
        seeds={"seed": train_cfg.seed, **training.derive_seeds(train_cfg.seed)},
    )


def _run_expert_parallel(
    args: argparse.Namespace,
    model_cfg: ModelConfig,
    train_cfg: training.TrainConfig,
    config_hash: str,
) -> CommandOutput:
    """``--nproc N``: :func:`longcat_sim.train.distributed.ep_train` on N spawned processes."""
    from longcat_sim.train import distributed

    if args.resume or args.grow_from is not None or args.stop_after is not None:
        raise UserError("--nproc trains from scratch: drop --resume, --grow-from and --stop-after")
    distributed.check_nproc(args.nproc, model_cfg, train_cfg.batch_size)
    training.Trainer(model_cfg, train_cfg, args.run_dir, data_cache=args.data_cache)  # data cache
    cache = None if args.data_cache is None else str(args.data_cache)
    ranks = distributed.launch(
        distributed.ep_train, args.nproc, model_cfg, train_cfg, cache, threads=args.threads
    )
    hashes = {r["param_hash"] for r in ranks}
    if len(hashes) != 1:
        raise UserError(f"ranks ended with different parameters ({len(hashes)} hashes)")
    first = ranks[0]
    step_s = [max(r["step_seconds"][i] for r in ranks) for i in range(train_cfg.steps)]
    results = {
        "model": model_cfg.name,
        "steps": train_cfg.steps,
        "nproc": args.nproc,
        "deterministic": train_cfg.deterministic,
        "final_loss": first["losses"][-1],
        "losses": first["losses"],
        "step_seconds": step_s,
        "param_hash": first["param_hash"],
        "state_hash": first["state_hash"],
        "threads": args.threads,
    }
    text = "\n".join(
        [
            f"trained {model_cfg.name} for {train_cfg.steps} steps on {args.nproc} process(es), "
            "experts sharded",
            f"  final train loss   {first['losses'][-1]:.4f} nats/token (LM, batch mean)",
            f"  step time          {sorted(step_s)[len(step_s) // 2]:.3f} s (median)",
            f"  parameters sha256  {first['param_hash']}",
        ]
    )
    return CommandOutput(
        results=results,
        text=text,
        config={"model": model_cfg.to_dict(), "train": train_cfg.to_dict(), "nproc": args.nproc},
        config_hash=config_hash,
        seeds={"seed": train_cfg.seed, **training.derive_seeds(train_cfg.seed)},
    )
