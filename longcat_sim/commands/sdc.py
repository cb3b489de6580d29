"""``longcat-sim sdc``: a bit-flip campaign on one MoE layer's training step.

For every site and bit, ``--trials`` faults are injected and the replay, recompute and ABFT
detectors are scored (detected / masked / missed); ``--clean-runs`` fault-free steps give the
false positives and each detector's overhead; ``--attribution-events`` synthetic events per
class (transient, persistent, genuine) score the rerun attribution. Deterministic mode is on.
"""

from __future__ import annotations

import argparse
import math
import sys

from tqdm import tqdm

from longcat_sim.commands.base import CommandOutput
from longcat_sim.config.paths import text_arg
from longcat_sim.config.threads import check_threads
from longcat_sim.errors import UserError
from longcat_sim.model.config import ConfigError, load_model_config
from longcat_sim.model.determinism import DeterministicMode
from longcat_sim.repro.campaign import (
    ABFT_SITES,
    DETECTORS,
    CampaignConfig,
    run_campaign,
    total_units,
)
from longcat_sim.repro.inject import SITES
from longcat_sim.repro.moe_step import MoEStepConfig
from longcat_sim.runs import config_hash

HELP = "bit-flip SDC campaign on an MoE-layer step: detection per site, bit and detector"

# one MoE layer's parameters, gradients and two moments must stay small
MAX_LAYER_BYTES = 2 * 2**30
MAX_BIT = 63  # the widest site holds 64-bit values
MAX_SEED = 2**63 - 1  # seeds torch's and numpy's generators both take
MAX_TOKENS = 2**16  # tokens in the MoE step: a stated limit, far above what a campaign needs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=text_arg, default="tiny", help="preset name or TOML file (default tiny)"
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=128,
        help=f"tokens in the MoE step (default 128; at most {MAX_TOKENS:,})",
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
        "--recompute-experts", type=int, default=1, help="experts recomputed per step"
    )
    parser.add_argument("--seed", type=int, default=0, help="root seed of the campaign")
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
    for flag in ("tokens", "trials", "threads", "recompute_experts"):
        if getattr(args, flag) < 1:
            raise UserError(
                f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}"
            )
    if args.tokens > MAX_TOKENS:
        raise UserError(f"--tokens must be at most {MAX_TOKENS:,}, got {args.tokens}")
    check_threads(args.threads)
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must lie in 0..{MAX_SEED}, got {args.seed}")
    for flag in ("clean_runs", "attribution_events"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")


def run(args: argparse.Namespace) -> CommandOutput:
    _check_counts(args)
    try:
        cfg = load_model_config(args.model)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    layer_params = cfg.num_experts_total * cfg.hidden_size + 3 * (
        cfg.n_routed_experts * cfg.hidden_size * cfg.expert_ffn_hidden_size
    )
    if 16 * layer_params > MAX_LAYER_BYTES:
        raise UserError(
            f"one MoE layer of {cfg.name!r} needs {16 * layer_params / 2**30:.1f} GiB for weights, "
            "gradients and moments; run the campaign on tiny or small"
        )
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
    sc = MoEStepConfig(cfg.replace(deterministic=True), tokens=args.tokens)
    bar = tqdm(
        total=total_units(cc),
        desc="sdc",
        unit="run",
        file=sys.stderr,
        disable=None if args.progress is None else not args.progress,
    )
    with bar, DeterministicMode(threads=args.threads):
        result = run_campaign(sc, cc, progress=bar.update)
    results = result.to_json()
    results["model"] = cfg.name
    config = {"model": cfg.to_dict(), "tokens": args.tokens, "campaign": _plain(cc)}
    return CommandOutput(
        results=results,
        text=_text(results, cfg.name, args),
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
    trials = sum(r["detected"] + r["masked"] + r["missed"] for r in results["results"]) // len(
        DETECTORS
    )
    lines = [
        f"SDC campaign on one MoE layer of {model}: {trials} faults "
        f"({args.trials} per site and bit), detection over non-masked faults",
        f"  {'site':<{width}}  " + "  ".join(f"{d:>9}" for d in DETECTORS),
    ]
    for site in sites:
        lines.append(
            f"  {site:<{width}}  " + "  ".join(f"{_pct(rates[d][site]):>9}" for d in DETECTORS)
        )
    fp = results["false_positives"]
    lines += [
        f"  false positives over {results['clean_runs']} clean steps: "
        + ", ".join(f"{d} {fp[d]}" for d in DETECTORS)
        + f" (ABFT per-check rate {results['abft_false_alarm_rate']:.2g} over "
        f"{results['abft_checks']} checks)",
        "  overhead vs the unprotected step: "
        + ", ".join(f"{d} {v:.3f}" for d, v in results["overhead"].items()),
        f"  ABFT on {', '.join(ABFT_SITES)}: exponent+sign flips detected "
        f"{_pct(summary['abft_exponent_sign_detection'])}; blind bits {summary['abft_blind_bits']}",
    ]
    attribution = results["attribution"]
    if attribution["events_per_class"]:
        lines.append(
            f"  attribution ({attribution['events_per_class']} events per class): "
            + ", ".join(f"{k} {_pct(v)}" for k, v in attribution["accuracy"].items())
        )
    lines.append(f"  wall time {results['seconds']:.1f} s")
    return "\n".join(lines)
