"""``longcat-sim sdc``: a bit-flip campaign on the model's real training step.

For every site and bit, ``--trials`` faults are planted in ``train``'s own step (the
expert-parallel path, deterministic mode, the SDC guard attached) and every detector is scored
(detected / masked / missed): bitwise replay, and the guard's ABFT, recompute, validators and
at-rest checks; ``--clean-runs`` clean guarded steps give the false positives;
``--attribution-events`` events per class (transient, persistent, genuine) score the rerun
attribution; ``--overhead-rounds`` paired rounds time the guard against unguarded steps.
"""

from __future__ import annotations

import argparse
import math
import sys

from tqdm import tqdm

from longcat_sim.commands.base import CommandOutput
from longcat_sim.config.paths import path_arg, text_arg
from longcat_sim.config.threads import check_threads
from longcat_sim.errors import UserError
from longcat_sim.model.config import ConfigError, load_model_config
from longcat_sim.model.determinism import DeterministicMode
from longcat_sim.model.transformer import require_runnable
from longcat_sim.repro.campaign import (
    ABFT_SITES,
    DETECTORS,
    CampaignConfig,
    MakeTrainer,
    guard_overhead,
    run_campaign,
    total_units,
)
from longcat_sim.repro.entry import refuse_options_with_entry
from longcat_sim.repro.fingerprint import RunSpec, checked_spec_configs
from longcat_sim.repro.flips import add_entry_argument, describe_campaign, run_entry_campaign
from longcat_sim.repro.inject import SITES
from longcat_sim.repro.targets import MODEL_SITES
from longcat_sim.runs import config_hash
from longcat_sim.train.guard import GuardSettings, guarded_config

HELP = (
    "bit-flip SDC campaign on the model's real training step: detection per site, bit and detector"
)

MAX_BIT = 63  # the widest site holds 64-bit values
MAX_SEED = 2**63 - 1  # seeds torch's and numpy's generators both take
MAX_TOKENS = 2**16  # tokens per step (batch x sequence): a stated limit, far above a campaign's


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=text_arg, default="tiny", help="preset name or TOML file (default tiny)"
    )
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per step (default 2)")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per sequence (default 32)")
    parser.add_argument(
        "--byte-budget", type=int, default=2**19, help="corpus bytes (smaller builds faster)"
    )
    parser.add_argument(
        "--data-cache", type=path_arg, default=None, help="tokenizer/token cache folder"
    )
    parser.add_argument(
        "--sites", default="all", help=f"comma-separated sites or 'all' ({', '.join(SITES)})"
    )
    parser.add_argument(
        "--bits",
        default="all",
        help="bits to flip: 'all' (every bit of each site), or a list/ranges like 0-22,31",
    )
    parser.add_argument("--trials", type=int, default=4, help="faults per (site, bit)")
    parser.add_argument(
        "--clean-runs", type=int, default=1000, help="fault-free steps (false positives)"
    )
    parser.add_argument(
        "--attribution-events", type=int, default=100, help="synthetic events per class"
    )
    parser.add_argument(
        "--recompute-experts", type=int, default=1, help="expert blocks recomputed per MoE call"
    )
    parser.add_argument(
        "--overhead-rounds",
        type=int,
        default=5,
        help="paired rounds timing the guard against unguarded steps (0: skip)",
    )
    parser.add_argument("--seed", type=int, default=0, help="root seed of the campaign")
    add_entry_argument(parser)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )


def parse_sites(text: str) -> tuple[str, ...]:
    if text.strip() == "all":
        return SITES
    sites = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in sites if s not in SITES]
    if unknown or not sites:
        raise UserError(f"unknown --sites {unknown or text!r}; choose from all, {', '.join(SITES)}")
    return sites


def parse_bits(text: str) -> tuple[int, ...] | None:
    if text.strip() == "all":
        return None
    bits: list[int] = []
    for item in (item.strip() for item in text.split(",")):
        if not item:
            continue
        lo, sep, hi = item.partition("-")
        try:
            first, last = int(lo), int(hi if sep else lo)
        except ValueError:
            raise UserError(
                f"--bits expects 'all' or integers and ranges like 0-22,31; got {text!r}"
            ) from None
        if not 0 <= first <= last <= MAX_BIT:  # checked before a range is expanded
            raise UserError(f"--bits must lie in 0..{MAX_BIT}, low to high, got {text!r}")
        bits.extend(range(first, last + 1))
    if not bits:
        raise UserError(f"--bits selects no bit, got {text!r}")
    return tuple(sorted(set(bits)))


def _check_counts(args: argparse.Namespace) -> None:
    for flag in ("batch_size", "seq_len", "trials", "threads", "recompute_experts", "byte_budget"):
        if getattr(args, flag) < 1:
            raise UserError(
                f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}"
            )
    if args.batch_size * args.seq_len > MAX_TOKENS:
        raise UserError(
            f"--batch-size x --seq-len must be at most {MAX_TOKENS:,} tokens, got "
            f"{args.batch_size * args.seq_len:,}"
        )
    check_threads(args.threads)
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must lie in 0..{MAX_SEED}, got {args.seed}")
    for flag in ("clean_runs", "attribution_events", "overhead_rounds"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")


def _spec(args: argparse.Namespace, cc: CampaignConfig) -> RunSpec:
    """The training the campaign corrupts: ``train``'s step on the chosen model and sizes."""
    steps = cc.states * cc.chain + cc.clean_runs + 2 * cc.attribution_events + 16
    train = {"batch_size": args.batch_size, "seq_len": args.seq_len}
    data_cache = None if args.data_cache is None else str(args.data_cache)
    return RunSpec(model=args.model, steps=steps, seed=args.seed, train=train,
                   byte_budget=args.byte_budget, data_cache=data_cache)  # fmt: skip


def _trainer_factory(spec: RunSpec) -> MakeTrainer:
    """Checks the spec as ``train`` would (one line on a bad setting), builds the corpus once,
    and returns ``make_trainer(run_dir, guard_settings)``."""
    from longcat_sim.train.training import Trainer, load_data

    cfg, tc = checked_spec_configs(spec)
    data = load_data(cfg, tc, spec.data_cache)
    return lambda run_dir, guard: Trainer(guarded_config(cfg, guard), tc, run_dir, data=data)


def run(args: argparse.Namespace) -> CommandOutput:
    _check_counts(args)
    if args.entry is not None:
        return _run_entry(args)
    try:
        cfg = load_model_config(args.model)
        require_runnable(cfg)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    if args.recompute_experts > cfg.n_routed_experts:
        raise UserError(
            f"--recompute-experts {args.recompute_experts} exceeds the {cfg.n_routed_experts} "
            f"routed experts of model {cfg.name!r}; choose 1 to {cfg.n_routed_experts}"
        )
    sites, bits = parse_sites(args.sites), parse_bits(args.bits)
    cc = CampaignConfig(
        sites=sites,
        bits=bits,
        trials=args.trials,
        clean_runs=args.clean_runs,
        attribution_events=args.attribution_events,
        seed=args.seed,
        recompute_experts=args.recompute_experts,
    )
    if not any(cc.bits_for(s) for s in sites):
        raise UserError(f"--bits {args.bits!r} selects no bit of the chosen sites")
    spec = _spec(args, cc)
    with DeterministicMode(threads=args.threads):
        make_trainer = _trainer_factory(spec)
        bar = tqdm(
            total=total_units(cc),
            desc="sdc",
            unit="run",
            file=sys.stderr,
            disable=None if args.progress is None else not args.progress,
        )
        with bar:
            overhead = (
                guard_overhead(make_trainer, rounds=args.overhead_rounds)
                if args.overhead_rounds
                else {}
            )
            result = run_campaign(make_trainer, cc, progress=bar.update, overhead=overhead)
    results = result.to_json()
    results["model"] = cfg.name
    results["tokens_per_step"] = args.batch_size * args.seq_len
    guarded = guarded_config(cfg, GuardSettings())  # the model the campaign trains
    config = {"model": guarded.to_dict(), "spec": spec.to_dict(), "campaign": _plain(cc)}
    return CommandOutput(
        results=results,
        text=_text(results, cfg.name, args),
        config=config,
        config_hash=config_hash(config),
        seeds={"seed": args.seed},
    )


def _run_entry(args: argparse.Namespace) -> CommandOutput:
    """The campaign on a user's experiment (``--entry``): its weights, activations, gradients
    and optimizer state, scored by replay and the validators."""
    builtin = ("model", "batch_size", "seq_len", "byte_budget", "data_cache", "clean_runs",
               "attribution_events", "overhead_rounds", "recompute_experts")  # fmt: skip
    refuse_options_with_entry(args, builtin, "the campaign runs your experiment")
    sites = tuple(s for s in parse_sites(args.sites) if s in MODEL_SITES)
    if not sites:
        raise UserError(f"--entry runs the sites {', '.join(MODEL_SITES)}; pick some of them")
    bits = parse_bits(args.bits)
    if bits is not None and max(bits) > 31:
        raise UserError(
            f"--entry flips float32 values: --bits must lie in 0..31, got {args.bits!r}"
        )
    bits = tuple(range(32)) if bits is None else bits
    results = run_entry_campaign(
        args.entry, sites=sites, bits=bits, trials=args.trials, seed=args.seed,
        threads=args.threads,
    )  # fmt: skip
    config = {"entry": args.entry, "sites": list(sites), "bits": list(bits), "trials": args.trials}
    return CommandOutput(
        results=results,
        text=describe_campaign(results),
        config=config,
        config_hash=config_hash(config),
        seeds={"seed": args.seed},
    )


def _plain(cc: CampaignConfig) -> dict:
    return {
        "sites": list(cc.sites),
        "bits": None if cc.bits is None else list(cc.bits),
        "trials": cc.trials,
        "clean_runs": cc.clean_runs,
        "attribution_events": cc.attribution_events,
        "states": cc.states,
        "chain": cc.chain,
        "seed": cc.seed,
        "recompute_experts": cc.recompute_experts,
    }


def _pct(x: float) -> str:
    return "   n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:5.1f}%"


def _text(results: dict, model: str, args: argparse.Namespace) -> str:
    summary = results["summary"]
    rates = summary["detection_rate"]
    sites = list(next(iter(rates.values())).keys())
    width = max(len(s) for s in sites)
    per_site = {site: [0, 0] for site in sites}  # trials, crashed (counted on one detector)
    for row in results["results"]:
        if row["detector"] == DETECTORS[0]:
            n = row["detected"] + row["masked"] + row["missed"] + row["crashed"]
            per_site[row["site"]][0] += n
            per_site[row["site"]][1] += row["crashed"]
    trials = sum(n for n, _ in per_site.values())
    lines = [
        f"SDC campaign on the training step of {model} ({args.batch_size} x {args.seq_len} "
        f"tokens): {trials} faults ({args.trials} per site and bit), detection over the faults "
        "that changed the step without crashing it",
        f"  {'site':<{width}}  " + "  ".join(f"{d:>9}" for d in (*DETECTORS, "crashed")),
    ]
    for site in sites:
        n, crashed = per_site[site]
        cells = [f"{_pct(rates[d][site]):>9}" for d in DETECTORS]
        cells.append(f"{_pct(crashed / n if n else None):>9}")
        lines.append(f"  {site:<{width}}  " + "  ".join(cells))
    fp = results["false_positives"]
    summary_gemm = summary["abft_expert_gemm_exponent_sign_detection"]
    lines += [
        f"  false positives over {results['clean_runs']} clean runs: "
        + ", ".join(f"{d} {fp[d]}" for d in DETECTORS)
        + f" (ABFT per-check rate {results['abft_false_alarm_rate']:.2g} over "
        f"{results['abft_checks']} checks)",
        "  guard overhead per step (paired rounds, median): "
        + (
            ", ".join(f"{d} {100 * v:+.1f}%" for d, v in results["overhead"].items())
            or "not measured"
        ),
        f"  ABFT on {', '.join(ABFT_SITES)}: exponent+sign flips detected "
        f"{_pct(summary['abft_exponent_sign_detection'])} (expert GEMMs alone "
        f"{_pct(summary_gemm)}); blind bits {summary['abft_blind_bits']}",
    ]
    attribution = results["attribution"]
    if attribution["events_per_class"]:
        lines.append(
            f"  attribution ({attribution['events_per_class']} events per class): "
            + ", ".join(f"{k} {_pct(v)}" for k, v in attribution["accuracy"].items())
        )
    lines.append(f"  wall time {results['seconds']:.1f} s")
    return "\n".join(lines)
