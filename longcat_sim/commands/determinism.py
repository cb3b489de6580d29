"""``longcat-sim determinism``: rerun a short training in separate processes, compare bitwise.

Every run trains ``--steps`` steps of ``--model`` in deterministic mode in a fresh Python
process, cycling through ``--threads``, and fingerprints every step (activations, loss,
gradients, parameters, optimizer state). Runs are compared with run 0; on a mismatch the first
divergent (step, module, tensor) is reported with its largest absolute and ULP difference.
``--inject SITE:BIT[:STEP[:TARGET]]`` plants one bit flip in the last run: a negative control
that must be found and localised.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from tqdm import tqdm

from longcat_sim.commands.base import CommandOutput
from longcat_sim.config.paths import check_output_dir, path_arg, text_arg
from longcat_sim.config.threads import WORKERS_LIMIT, check_threads, check_workers
from longcat_sim.errors import UserError
from longcat_sim.model.config import ConfigError, ModelConfig, load_model_config
from longcat_sim.model.transformer import require_runnable
from longcat_sim.repro.fingerprint import RunSpec, spec_configs
from longcat_sim.repro.harness import check_determinism
from longcat_sim.repro.inject import SITES, Fault
from longcat_sim.runs import config_hash

if TYPE_CHECKING:
    from longcat_sim.train.config import TrainConfig

HELP = "rerun training in separate processes in deterministic mode and compare bit for bit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=text_arg, default="tiny", help="preset name or TOML file (default tiny)"
    )
    parser.add_argument("--steps", type=int, default=10, help="training steps per run")
    parser.add_argument("--runs", type=int, default=20, help="independent runs to compare")
    parser.add_argument(
        "--threads",
        default="1",
        help="comma-separated thread counts the runs cycle through (e.g. 1,2)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help=f"runs executed at the same time (default 1; {WORKERS_LIMIT})",
    )
    parser.add_argument("--seed", type=int, default=0, help="root seed of the runs")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence")
    parser.add_argument(
        "--byte-budget", type=int, default=2**19, help="corpus bytes (smaller trains faster)"
    )
    parser.add_argument(
        "--data-cache", type=path_arg, default=None, help="tokenizer/token cache folder"
    )
    parser.add_argument(
        "--inject",
        default=None,
        metavar="SITE:BIT[:STEP[:TARGET]]",
        help=f"plant a bit flip in the last run (negative control); sites: {', '.join(SITES)}",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )


def parse_threads(text: str) -> list[int]:
    try:
        threads = [int(item) for item in str(text).split(",") if item.strip()]
    except ValueError:
        raise UserError(f"--threads expects comma-separated integers, got {text!r}") from None
    if not threads or min(threads) < 1:
        raise UserError(f"--threads needs positive thread counts, got {text!r}")
    for count in threads:
        check_threads(count)
    return threads


def parse_fault(text: str) -> Fault:
    parts = text.split(":")
    if not 2 <= len(parts) <= 4:
        raise UserError(f"--inject expects SITE:BIT[:STEP[:TARGET]], got {text!r}")
    try:
        site, bit = parts[0], int(parts[1])
        step = int(parts[2]) if len(parts) > 2 and parts[2] else 0
        target = parts[3] if len(parts) > 3 else ""
        return Fault(site=site, bit=bit, step=step, target=target)
    except ValueError as exc:
        raise UserError(f"--inject {text!r}: {exc}") from None


def run(args: argparse.Namespace) -> CommandOutput:
    if args.runs < 2:
        raise UserError(f"--runs must be at least 2 to compare anything, got {args.runs}")
    if args.steps < 1:
        raise UserError(f"--steps must be positive, got {args.steps}")
    if args.workers < 1:
        raise UserError(f"--workers must be positive, got {args.workers}")
    check_workers(args.workers)
    threads = parse_threads(args.threads)
    try:
        cfg = load_model_config(args.model)
        require_runnable(cfg)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    train = {k: v for k in ("batch_size", "seq_len") if (v := getattr(args, k)) is not None}
    fault = parse_fault(args.inject) if args.inject else None
    if fault is not None and fault.step >= args.steps:
        raise UserError(f"--inject step {fault.step} is past the last step {args.steps - 1}")
    data_cache = None if args.data_cache is None else str(args.data_cache)
    options = {k: getattr(args, k) for k in ("model", "steps", "seed", "byte_budget")}
    spec = RunSpec(**options, deterministic=True, train=train, data_cache=data_cache)
    _warm_data_cache(spec)
    bar = tqdm(
        total=args.runs,
        desc="determinism",
        unit="run",
        file=sys.stderr,
        disable=None if args.progress is None else not args.progress,
    )
    try:
        with bar:
            report = check_determinism(
                spec,
                args.runs,
                threads,
                workers=args.workers,
                fault_in_run=(args.runs - 1, fault.to_dict()) if fault else None,
                on_done=lambda: bar.update(1),
            )
    except RuntimeError as exc:
        raise UserError(str(exc)) from None
    results = report.to_json()
    results["model"] = cfg.name
    results["injected"] = None if fault is None else fault.to_dict()
    div = report.first_divergence
    lines = [
        f"{report.identical}/{report.runs} runs bitwise identical to run 0 "
        f"({cfg.name}, {report.steps} steps, deterministic, threads {threads})",
        f"  final step digest  {results['final_step_digest']}",
        f"  run threads        {report.run_threads}",
        f"  wall time          {report.seconds:.1f} s",
    ]
    if div is not None:
        lines.append(f"  first divergence   run {report.divergent_run}: {div.describe()}")
    config = {
        "model": cfg.to_dict(),
        "spec": spec.to_dict(),
        "runs": args.runs,
        "threads": threads,
        "inject": results["injected"],
    }
    return CommandOutput(
        results=results,
        text="\n".join(lines),
        config=config,
        config_hash=config_hash(config),
        seeds={"seed": args.seed},
    )


def _check_spec(spec: RunSpec) -> tuple[ModelConfig, TrainConfig]:
    """The configs every run builds from ``spec`` (``repro.fingerprint.spec_configs``, the
    runs' own), checked here with the trainer's own checks, so a bad setting is one line
    before any process starts rather than a failure in every worker."""
    from longcat_sim.train.training import check_compatible

    cfg, tc = spec_configs(spec)
    if tc.seq_len > cfg.max_position_embeddings:
        raise UserError(
            f"--seq-len {tc.seq_len} exceeds the model's max_position_embeddings "
            f"{cfg.max_position_embeddings}"
        )
    check_compatible(cfg, tc)
    if spec.data_cache is not None:
        check_output_dir(spec.data_cache, "--data-cache")
    return cfg, tc


def _warm_data_cache(spec: RunSpec) -> None:
    """Check the runs' settings, then build the tokenizer cache once, before parallel workers
    would each train it."""
    from longcat_sim.train.data import build_corpus_data

    cfg, tc = _check_spec(spec)
    build_corpus_data(
        cfg.vocab_size, tc.seq_len, byte_budget=spec.byte_budget, cache_dir=spec.data_cache
    )
