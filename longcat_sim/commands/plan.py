"""``longcat-sim plan``: the cheapest deployment that serves a traffic within its SLOs.

Every combination of the listed choices is screened in closed form, the cheapest that pass
are verified by ``serve``, and the verified ones are ranked by $ per million output tokens
(``scenarios.plan``). Work runs on every local core, or on a Ray cluster with
``--executor ray``.
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import asdict, fields
from typing import Any

import numpy as np

from longcat_sim.cluster.serving_stats import json_ready
from longcat_sim.cluster.traffic import AZURE_TRACES, load_trace
from longcat_sim.commands.base import CommandOutput
from longcat_sim.config.fields import flag
from longcat_sim.config.flags import add_assume_option, add_config_flags, given, set_values
from longcat_sim.config.plan import PlanChoices, PlanSettings
from longcat_sim.config.threads import check_workers
from longcat_sim.errors import UserError
from longcat_sim.runs import config_hash
from longcat_sim.scenarios.plan import PlanProblem, run_plan

HELP = (
    "find the cheapest deployment (hardware, GPUs, layout, prefill:decode split, batch caps) "
    "that serves a traffic within TTFT and TPOT targets, verified by serve"
)
_TRACE_FIXES = ("prompt_len", "output_len")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser, PlanSettings)
    add_assume_option(parser)


def _problem(s: PlanSettings, assume: list[str]) -> PlanProblem:
    """The traffic's rate and mean lengths (a trace's own, at its recorded rate unless
    ``rate`` is given)."""
    prompt, output, rate = s.prompt_len, s.output_len, s.rate
    if s.trace is not None:
        trace = load_trace(AZURE_TRACES.get(s.trace, s.trace))
        prompt = float(np.mean(trace.prompt_tokens))
        output = float(np.mean(trace.output_tokens))
        rate = trace.mean_rate if rate is None else rate
    if rate is None:
        raise UserError("plan needs --rate (requests per second) or a --trace")
    return PlanProblem(
        model=s.model, rate=rate, prompt_len=prompt, output_len=output,
        slo_ttft_ms=s.slo_ttft_ms, slo_tpot_ms=s.slo_tpot_ms, slo_percentile=s.slo_percentile,
        assumptions=s.assumptions, assume=tuple(assume), mtp_draft_tokens=s.mtp_draft_tokens,
        mtp_accept=s.mtp_accept, attention_dtype=s.attention_dtype, prefix_hit=s.prefix_hit,
        trace=s.trace, seed=s.seed,
    )  # fmt: skip


def _shape(r: dict[str, Any]) -> str:
    decode = f"{r['instances']} x {r['gpus']} {r['hardware']} b{r['batch_per_device']}"
    if r["layout"] == "disagg":
        return (
            f"disagg: prefill {r['prefill_instances']} x {r['prefill_gpus']} "
            f"(t{r['tokens_per_device']}) + decode {decode}"
        )
    return f"colocated: {decode} c{r['tokens_per_device']}"


def _line(r: dict[str, Any]) -> str:
    ttft = r.get("served_ttft_at_slo_percentile_ms")
    tpot = r.get("served_tpot_at_slo_percentile_ms")
    ttft_s = "n/a" if ttft is None else f"{ttft:.0f}"
    tpot_s = "n/a" if tpot is None else f"{tpot:.1f}"
    return (
        f"  {_shape(r):58} {r['total_gpus']:6d} GPUs  ${r['cost_per_m_tokens']:.3f}/M  "
        f"TTFT {ttft_s} ms  TPOT {tpot_s} ms  {r['reason'] or 'winner'}"
    )


def _text(problem: PlanProblem, out: dict[str, Any]) -> str:
    q = f"P{problem.slo_percentile:g}"
    lines = [
        f"plan: {problem.model}, {problem.rate:g} requests/s, prompts {problem.prompt_len:.0f} "
        f"and outputs {problem.output_len:.0f} tokens, TTFT {q} <= {problem.slo_ttft_ms:g} ms, "
        f"TPOT {q} <= {problem.slo_tpot_ms:g} ms",
        f"  screened {out['screened']} configurations ({out['distinct_steps']} distinct steps "
        f"priced) in {out['screen_s']:.1f} s: {out['screened_feasible']} pass; verified "
        f"{len(out['verified'])} with serve in {out['verify_s']:.1f} s",
        "  screened out: "
        + (", ".join(f"{k} {v}" for k, v in out["screened_out"].items()) or "none"),
    ]
    w = out["winner"]
    if w is None:
        lines.append("  no verified candidate met the SLO; widen the choices or the targets")
    else:
        good = w.get("served_cost_per_m_good_tokens")
        lines.append(
            f"  winner: {_shape(w)}, {w['total_gpus']} GPUs, ${w['cost_per_m_tokens']:.3f} per "
            "M output tokens at the offered rate"
            + ("" if good is None else f" (${good:.3f} per M tokens that met both targets)")
        )
    lines.append("  verified (cheapest first):")
    lines += [_line(r) for r in out["verified"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> CommandOutput:
    if args.trace is not None and given(args, _TRACE_FIXES):
        raise UserError(f"{flag(given(args, _TRACE_FIXES)[0])} does not apply with --trace")
    if args.address is not None and args.executor != "ray":
        raise UserError("--address applies to --executor ray")
    if args.workers is not None and args.executor == "ray":
        raise UserError("--workers applies to --executor local; Ray uses its cluster's CPUs")
    if args.workers is not None:
        check_workers(args.workers)
    settings = PlanSettings(**set_values(args, PlanSettings))
    problem = _problem(settings, args.assume)
    choices = PlanChoices(**{f.name: getattr(settings, f.name) for f in fields(PlanChoices)})
    res = run_plan(
        problem, choices, verify=settings.verify, verify_duration_s=settings.verify_duration_s,
        executor=settings.executor, address=settings.address, workers=settings.workers,
    )  # fmt: skip
    reasons = Counter(r["reason"].split(" ")[0] for r in res.screened if r["reason"])
    out = json_ready({
        "problem": asdict(problem),
        "winner": res.winner,
        "verified": res.verified,
        "screened": len(res.screened),
        "screened_feasible": sum(1 for r in res.screened if not r["reason"]),
        "screened_out": dict(reasons.most_common()),
        "screened_cheapest": res.screened[:20],
        "distinct_steps": res.distinct_steps,
        "screen_s": res.screen_s,
        "verify_s": res.verify_s,
    })  # fmt: skip
    config = asdict(settings) | {"assume": list(args.assume)}
    for key in ("executor", "address", "workers"):
        config.pop(key)  # where it ran does not change the answer
    return CommandOutput(
        results=out,
        text=_text(problem, out),
        config=config,
        config_hash=config_hash(config),
        seeds={"traffic": settings.seed},
    )
