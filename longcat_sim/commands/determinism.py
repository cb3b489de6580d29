"""``longcat-sim determinism``: rerun a short training in separate processes, compare bitwise.

Every run trains ``--steps`` steps of ``--model`` in deterministic mode in a fresh Python
process, cycling through ``--threads``, and fingerprints every step (activations, loss,
gradients, parameters, optimizer state). Runs are compared with run 0; on a mismatch the first
divergent (step, module, tensor) is reported with its largest absolute and ULP difference.
``--inject SITE:BIT[:STEP[:TARGET]]`` plants one bit flip in the last run: a negative control
that must be found and localised.

``--entry package.module:function`` runs the same check on user code instead of ``--model``:
the function builds a :class:`longcat_sim.repro.Experiment` from a seed (see
docs/reproducibility.md). Exit code 0: all runs bitwise identical; 1: some run differs
(including under ``--inject``); 2: bad input.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from longcat_sim.commands.base import CommandOutput
from longcat_sim.config.paths import path_arg, text_arg
from longcat_sim.config.threads import WORKERS_LIMIT, check_threads, check_workers
from longcat_sim.errors import UserError
from longcat_sim.model.config import ConfigError, ModelConfig, load_model_config
from longcat_sim.model.transformer import require_runnable
from longcat_sim.repro.fingerprint import RunSpec, checked_spec_configs
from longcat_sim.repro.harness import DeterminismReport, check_determinism
from longcat_sim.repro.inject import SITES, Fault, check_fault_targets, parse_fault
from longcat_sim.runs import config_hash

if TYPE_CHECKING:
    from longcat_sim.train.config import TrainConfig

HELP = "rerun training in separate processes in deterministic mode and compare bit for bit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=text_arg, default="tiny", help="preset name or TOML file (default tiny)"
    )
    parser.add_argument(
        "--entry",
        default=None,
        metavar="MODULE:FUNCTION",
        help="check user code: the function builds an Experiment from a seed (replaces --model)",
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
        metavar="SITE:BIT[:STEP[:TARGET[:persistent]]]",
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


def _check_common(args: argparse.Namespace) -> tuple[list[int], Fault | None]:
    if args.runs < 2:
        raise UserError(f"--runs must be at least 2 to compare anything, got {args.runs}")
    if args.steps < 1:
        raise UserError(f"--steps must be positive, got {args.steps}")
    if args.workers < 1:
        raise UserError(f"--workers must be positive, got {args.workers}")
    check_workers(args.workers)
    threads = parse_threads(args.threads)
    fault = parse_fault(args.inject) if args.inject else None
    if fault is not None and fault.step >= args.steps:
        raise UserError(f"--inject step {fault.step} is past the last step {args.steps - 1}")
    return threads, fault


def _progress(args: argparse.Namespace) -> tqdm:
    return tqdm(
        total=args.runs,
        desc="determinism",
        unit="run",
        file=sys.stderr,
        disable=None if args.progress is None else not args.progress,
    )


def run(args: argparse.Namespace) -> CommandOutput:
    threads, fault = _check_common(args)
    if getattr(args, "entry", None) is not None:
        return _run_entry(args, threads, fault)
    try:
        cfg = load_model_config(args.model)
        require_runnable(cfg)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    train = {k: v for k in ("batch_size", "seq_len") if (v := getattr(args, k)) is not None}
    data_cache = None if args.data_cache is None else str(args.data_cache)
    options = {k: getattr(args, k) for k in ("model", "steps", "seed", "byte_budget")}
    spec = RunSpec(**options, deterministic=True, train=train, data_cache=data_cache)
    spec_cfg, tc = checked_spec_configs(spec)
    if fault is not None:
        check_fault_targets(spec_cfg, [fault], "--inject")
    _warm_data_cache(spec, spec_cfg, tc)
    try:
        with _progress(args) as bar:
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
    config = {"model": cfg.to_dict(), "spec": spec.to_dict()}
    return _output(args, report, threads, fault, cfg.name, config)


def _run_entry(args: argparse.Namespace, threads: list[int], fault: Fault | None) -> CommandOutput:
    """The rerun check on the Experiment an entry point builds (each run a fresh process)."""
    from longcat_sim.repro.entry import build_experiment, refuse_options_with_entry
    from longcat_sim.repro.library import check_entry_determinism
    from longcat_sim.repro.targets import MODEL_SITES, check_target

    builtin = ("model", "batch_size", "seq_len", "byte_budget", "data_cache")
    refuse_options_with_entry(args, builtin, "the runs train your experiment")
    if fault is not None and fault.site not in MODEL_SITES:
        raise UserError(f"--inject with --entry takes a site among {', '.join(MODEL_SITES)}")
    experiment = build_experiment(args.entry, args.seed)  # fails here, not in every run
    if fault is not None and fault.target:
        check_target(experiment.model, fault.site, fault.target)
    try:
        with _progress(args) as bar:
            report = check_entry_determinism(
                args.entry,
                runs=args.runs,
                steps=args.steps,
                threads=threads,
                seed=args.seed,
                workers=args.workers,
                fault_in_run=(args.runs - 1, fault.to_dict()) if fault else None,
                on_done=lambda: bar.update(1),
            )
    except RuntimeError as exc:
        raise UserError(str(exc)) from None
    config = {"entry": args.entry, "steps": args.steps, "seed": args.seed}
    return _output(args, report, threads, fault, args.entry, config)


def _output(
    args: argparse.Namespace,
    report: DeterminismReport,
    threads: list[int],
    fault: Fault | None,
    name: str,
    config: dict[str, Any],
) -> CommandOutput:
    """Results, text and exit code (1 when a run differs) of a determinism check."""
    results = report.to_json()
    results["model"] = name
    results["injected"] = None if fault is None else fault.to_dict()
    mode = "user code" if getattr(args, "entry", None) else "deterministic"
    lines = [
        f"{report.identical}/{report.runs} runs bitwise identical to run 0 "
        f"({name}, {report.steps} steps, {mode}, threads {threads})",
        f"  final step digest  {results['final_step_digest']}",
        f"  run threads        {report.run_threads}",
        f"  wall time          {report.seconds:.1f} s",
    ]
    div = report.first_divergence
    if div is not None:
        lines.append(f"  first divergence   run {report.divergent_run}: {div.describe()}")
    config = {**config, "runs": args.runs, "threads": threads, "inject": results["injected"]}
    warnings = ()
    if fault is not None and report.all_identical:
        warnings = (
            f"--inject {args.inject}: the negative control changed nothing (the fault never "
            "fired, or it was masked); its run is identical to the others",
        )
    return CommandOutput(
        results=results,
        text="\n".join(lines),
        config=config,
        config_hash=config_hash(config),
        seeds={"seed": args.seed},
        warnings=warnings,
        exit_code=0 if report.all_identical else 1,
    )


def _warm_data_cache(spec: RunSpec, cfg: ModelConfig, tc: TrainConfig) -> None:
    """Build the tokenizer cache once, before parallel workers would each train it."""
    from longcat_sim.train.data import build_corpus_data

    build_corpus_data(
        cfg.vocab_size, tc.seq_len, byte_budget=spec.byte_budget, cache_dir=spec.data_cache
    )
