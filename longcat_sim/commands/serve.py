"""``longcat-sim serve``: a deployment serving requests over time, on the SimPy clock.

Traffic is synthetic (Poisson or gamma arrivals at ``--rate``, gamma lengths) or a trace
(``--trace azure-code``, ``azure-conv`` or a CSV/JSONL file) replayed as recorded or
time-scaled to ``--rate``. Instances are co-located (``--layout colocated``: chunked prefill
inside decode steps) or a prefill pool beside a decode pool (``--layout disagg``); the step
model prices every step (``scenarios.serve_steps``).
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from longcat_sim.commands.base import CommandOutput
from longcat_sim.commands.serving import check_fits
from longcat_sim.config.fields import flag
from longcat_sim.config.flags import add_assume_option, add_config_flags, given, set_values
from longcat_sim.config.paths import check_output_file, path_arg
from longcat_sim.config.serving import ServeDeployment
from longcat_sim.errors import UserError
from longcat_sim.runs import config_hash, write_text_atomic
from longcat_sim.scenarios.decode import decode_memory
from longcat_sim.scenarios.prefill import prefill_memory
from longcat_sim.scenarios.serve import load_requests, resolve_serve, run_serve, serve_results

HELP = (
    "serve requests over time on co-located or disaggregated instances: TTFT, TPOT and "
    "end-to-end percentiles, throughput, goodput, SLO attainment and cost"
)

# fields ``serve`` takes from ``simulate``'s configs but sets itself
_NOT_HERE = {"context": "serve derives each step's context from the requests it holds"}
# fields a trace fixes
_TRACE_FIXES = ("prompt_len", "prompt_cv", "output_len", "output_cv", "arrivals", "arrival_cv")
_DISAGG_ONLY = (
    "prefill_instances", "prefill_gpus", "prefill_hardware", "prefill_ep", "prefill_schedule",
    "kv_transfer",
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser, ServeDeployment)
    add_assume_option(parser)
    parser.add_argument(
        "--trace-out",
        type=path_arg,
        help="write a Perfetto trace.json here: one track per instance, a flow from each "
        "sampled request's prefill to its decode",
    )


def _deployment(args: argparse.Namespace) -> ServeDeployment:
    for name, why in _NOT_HERE.items():
        if getattr(args, name, None) is not None:
            raise UserError(f"{flag(name)} does not apply to serve: {why}")
    if args.trace is not None and given(args, _TRACE_FIXES):
        wrong = given(args, _TRACE_FIXES)[0]
        raise UserError(f"{flag(wrong)} does not apply with --trace: the trace sets it")
    if (args.arrivals or "poisson") != "gamma" and args.arrival_cv is not None:
        raise UserError("--arrival-cv applies to --arrivals gamma")
    if (args.layout or "colocated") != "disagg" and given(args, _DISAGG_ONLY):
        raise UserError(f"{flag(given(args, _DISAGG_ONLY)[0])} applies to --layout disagg")
    values = set_values(args, ServeDeployment)
    values.pop("context", None)
    return ServeDeployment(**values)


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _text(r: dict[str, Any]) -> str:
    pools = f"{r['instances']} x {r['gpus']} {r['hardware']} (EP{r['ep']}, {r['schedule']})"
    if r["layout"] == "disagg":
        pools = (
            f"prefill {r['prefill_instances']} x {r['prefill_gpus']} {r['prefill_hardware']} "
            f"(EP{r['prefill_ep']}) + decode {pools}"
        )
    traffic = r["trace"] or "synthetic"
    met = "met" if r["slo_met"] else "MISSED"
    lines = [
        f"serve: {r['model']} {r['layout']}, {pools}, {r['total_gpus']} GPUs",
        f"  traffic {traffic}: {r['requests']} requests over {r['duration_s']:g} s "
        f"({r['rate']:.2f}/s), mean prompt {r['prompt_len']:.0f}, output {r['output_len']:.0f}",
        f"  finished {r['requests_finished']}, still in the system {r['requests_in_system']}",
        "             mean      P50      P90      P99",
    ]
    for name in ("ttft", "tpot", "itl", "e2e"):
        if f"{name}_mean_ms" in r:
            values = [r[f"{name}_{s}_ms"] for s in ("mean", "p50", "p90", "p99")]
            lines.append(f"  {name.upper():5} ms" + "".join(f"{_num(v, '.1f'):>9}" for v in values))
    lines += [
        f"  SLO P{r['slo_percentile']:g}: TTFT {_num(r['ttft_at_slo_percentile_ms'], '.0f')} ms "
        f"(target {r['slo_ttft_ms']:g}), TPOT {_num(r['tpot_at_slo_percentile_ms'], '.1f')} ms "
        "(target "
        f"{r['slo_tpot_ms']:g}): {met}; goodput {r['goodput_requests_per_s']:.2f} requests/s, "
        f"attainment {r['slo_attainment']:.1%}",
        f"  tokens/s: input {r['input_tokens_per_s']:.0f} ({r['input_tgs']:.0f} per "
        f"{'prefill ' if r['layout'] == 'disagg' else ''}GPU), output "
        f"{r['output_tokens_per_s']:.0f} ({r['tgs']:.1f} per "
        f"{'decode ' if r['layout'] == 'disagg' else ''}GPU, "
        f"{r['output_tokens_per_gpu_s']:.1f} over all)",
        f"  $ per M output tokens {_num(r['cost_per_m_tokens'], '.3f')}",
    ]
    return "\n".join(lines)


def _check_memory(setup: Any) -> None:
    d = setup.pools.decode
    enforce = setup.dep.hbm_check == "refuse"
    check_fits(decode_memory(d), f"{d.cfg.name} on {d.gpus} x {d.hw.name}", enforce)
    if setup.disagg:
        p = setup.pools.prefill
        what = f"{p.cfg.name} prefill on {p.gpus} x {p.hw.name}"
        check_fits(prefill_memory(p), what, enforce)


def run(args: argparse.Namespace) -> CommandOutput:
    if args.trace_out is not None:
        check_output_file(args.trace_out, "--trace-out")
    dep = _deployment(args)
    requests = load_requests(dep)
    setup = resolve_serve(dep, requests, args.assume)
    _check_memory(setup)
    run_ = run_serve(setup, requests)
    results = serve_results(setup, run_)
    results["requests_in_system"] = results["requests_arrived"] - results["requests_finished"]
    config = {f.name: getattr(dep, f.name) for f in fields(ServeDeployment)}
    config |= {"tokens_per_device": setup.tokens_per_step, "assume": list(args.assume)}
    text = _text(results)
    if args.trace_out is not None:
        from longcat_sim.cluster.serving_trace import serving_trace_json

        try:
            meta = {
                "model": results["model"],
                "hardware": results["hardware"],
                "layout": dep.layout,
                "instances": dep.instances,
                "gpus": dep.gpus,
                "config_hash": config_hash(config),
            }
            trace = serving_trace_json(run_.stages, run_.stage_requests, metadata=meta)
            write_text_atomic(args.trace_out, trace)
        except OSError as exc:
            raise UserError(f"cannot write {str(args.trace_out)!r}: {exc.strerror}") from None
        text += f"\ntrace written to {args.trace_out}"
    return CommandOutput(
        results=results,
        text=text,
        config=config,
        config_hash=config_hash(config),
        seeds={"traffic": dep.seed},
    )


__all__ = ["HELP", "add_arguments", "run"]
