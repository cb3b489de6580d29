"""``simulate --mode prefill`` and ``--mode disagg``: one prefill forward of a deployment, and a
prefill pool beside a decode pool compared with the same traffic served co-located."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from longcat_sim.cluster.streams import EventRecord
from longcat_sim.config.serving import DisaggDeployment, PrefillDeployment
from longcat_sim.errors import UserError
from longcat_sim.footprint import Footprint, infeasible_message
from longcat_sim.scenarios.decode import decode_memory
from longcat_sim.scenarios.disagg import colocated_results, disagg_results, resolve_disagg
from longcat_sim.scenarios.prefill import (
    prefill_memory,
    prefill_results,
    resolve_prefill,
    run_prefill,
)


def check_fits(fp: Footprint, what: str, enforce: bool) -> None:
    """Refuse, with one line, a deployment whose GPUs cannot hold it."""
    if enforce and not fp.fits:
        raise UserError(infeasible_message(fp, what) + "; --hbm-check report prices it anyway")


def _prefill_text(r: dict[str, Any]) -> str:
    sched = r["schedule"]
    return "\n".join(
        [
            f"prefill: {r['model']} on {r['gpus']} x {r['hardware']}, EP{r['ep']}, {sched}, "
            f"{r['tokens_per_device']} prompt tokens per GPU per forward, "
            f"assumptions {r['assumptions']}",
            f"  prompts of {r['prompt_len']:g} tokens (cv {r['prompt_cv']:g}), prefix-cache hit "
            f"{r['prefix_hit']:.0%}, chunk {r['chunk_size'] or 'whole prompts'}",
            "  per layer (us): "
            + ", ".join(f"{k} {v:.1f}" for k, v in r["per_layer_us"].items() if v > 0),
            f"  forward             {r['forward_ms']:10.1f} ms  (closed form "
            f"{r['closed_form_forward_ms']:.1f} ms)",
            f"  TTFT (no queueing)  {r['ttft_ms']:10.1f} ms  ({r['forwards_per_prompt']} "
            "forward(s) per prompt)",
            f"  prompt tokens/GPU/s {r['input_tgs']:10.1f}",
            f"  $ per M input tok   {r['cost_per_m_input_tokens']:10.4f}",
            f"  exposed comm share  {r['exposed_comm_share']:10.1%}",
            memory_line(r),
        ]
    )


def memory_line(r: dict[str, Any]) -> str:
    parts = r["hbm_breakdown_gb"]
    largest = r.get("max_batch_per_device", r.get("max_tokens_per_device"))
    return (
        f"  HBM per GPU         {r['hbm_used_gb']:10.1f} GB of {r['hbm_gb']:g} "
        f"({'fits' if r['fits'] else 'DOES NOT FIT'}; weights {parts['weights']:.1f}, KV "
        f"{parts['kv_cache']:.1f}, activations {parts['activations']:.1f}, reserve "
        f"{parts['reserve']:.1f}; largest that fits {largest})"
    )


def run_prefill_mode(
    dep: PrefillDeployment, assume: list[str], enforce_hbm: bool
) -> tuple[dict[str, Any], str, dict[str, Any], tuple[EventRecord, ...]]:
    """(results, text, config, trace records) of one prefill forward."""
    setup = resolve_prefill(dep, assume)
    what = f"{setup.cfg.name} prefill on {setup.gpus} x {setup.hw.name}"
    check_fits(prefill_memory(setup), what, enforce_hbm)
    result, workload, closed = run_prefill(setup)
    results = prefill_results(setup, result, workload, closed)
    config = setup.config() | {
        "mode": "prefill",
        "hardware_spec": asdict(setup.hw),
        "model_config": setup.cfg.to_dict(),
    }
    return results, _prefill_text(results), config, result.records


def _disagg_text(r: dict[str, Any]) -> str:
    c = r["colocated"]
    return "\n".join(
        [
            f"disagg: {r['model']}: prefill pool {r['prefill_gpus']} x {r['prefill_hardware']} "
            f"(EP{r['prefill_ep']}, {r['prefill_schedule']}), decode pool {r['decode_gpus']} x "
            f"{r['hardware']} (EP{r['ep']}, {r['schedule']}, batch {r['batch_per_device']}), KV "
            f"transfer {r['kv_transfer']}",
            f"  prompts {r['prompt_len']:g} tokens, outputs {r['output_len']:g} tokens",
            f"  TTFT (no queueing)  {r['ttft_ms']:10.1f} ms  (KV transfer exposed "
            f"{r['kv_transfer_exposed_ms']:.2f} ms)",
            f"  TPOT                {r['tpot_ms']:10.2f} ms  (decode batch in flight "
            f"{r['decode_batch_in_flight']} of {r['batch_per_device']} per GPU)",
            f"  requests/s          {r['requests_per_s']:10.1f}  (prefill pool "
            f"{r['prefill_requests_per_s']:.1f}, decode pool {r['decode_requests_per_s']:.1f}; "
            f"{r['bottleneck']} bound)",
            f"  balanced ratio      {r['balanced_prefill_per_decode_gpu']:10.4g} prefill GPUs "
            "per decode GPU",
            f"  output tok/GPU/s    {r['output_tokens_per_gpu_s']:10.1f}  (all GPUs)",
            f"  $ per M tokens      {r['cost_per_m_tokens']:10.3f} output (all GPUs); "
            f"{r['cost_per_m_input_tokens']:.4f} input, {r['cost_per_m_output_tokens']:.3f} "
            "output by pool",
            f"  co-located          chunk {c['chunk_tokens']} prompt tokens per GPU per step: "
            f"TTFT {c['ttft_ms']:.1f} ms, TPOT {c['tpot_ms']:.2f} ms, {c['tgs']:.1f} output "
            f"tok/GPU/s, ${c['cost_per_m_tokens']:.3f} per M output tokens, HBM "
            f"{c['hbm_used_gb']:.1f} of {c['hbm_gb']:g} GB per GPU"
            + ("" if c["fits"] else " (DOES NOT FIT)"),
        ]
    )


def disagg_warnings(results: dict[str, Any]) -> list[str]:
    """Lines a reader should see: a pool that would not fit when priced anyway."""
    return [
        f"the {pool} pool does not fit in HBM ({results[key]['hbm_used_gb']:.1f} of "
        f"{results[key]['hbm_gb']:g} GB per GPU)"
        for pool, key in (("prefill", "prefill_memory"), ("decode", "decode_memory"))
        if not results[key]["fits"]
    ]


def run_disagg_mode(
    dep: DisaggDeployment, assume: list[str], enforce_hbm: bool
) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(results, text, config) of a prefill pool beside a decode pool."""
    setup = resolve_disagg(dep, assume)
    p, d = setup.prefill, setup.decode
    prefill_fp, decode_fp = prefill_memory(p), decode_memory(d)
    check_fits(prefill_fp, f"the prefill pool ({p.gpus} x {p.hw.name})", enforce_hbm)
    check_fits(decode_fp, f"the decode pool ({d.gpus} x {d.hw.name})", enforce_hbm)
    inputs = d.config() | {
        "prefill_gpus": p.gpus,
        "prefill_ep": p.ep,
        "prefill_schedule": p.schedule,
        "prefill_hardware": p.hw.name,
        "prefill_gpu_hour_usd_source": p.hw.price_source,
        "tokens_per_device": p.tokens_per_device,
        "prompt_len": p.prompt_len,
        "prompt_cv": p.prompt_cv,
        "chunk_size": p.chunk_size,
        "prefix_hit": p.prefix_hit,
        "output_len": setup.output_len,
    }
    results = inputs | disagg_results(setup)
    results |= {
        "fits": prefill_fp.fits and decode_fp.fits,
        "prefill_memory": prefill_fp.to_dict(),
        "decode_memory": decode_fp.to_dict(),
        "colocated": colocated_results(setup),
    }
    config = inputs | {
        "mode": "disagg",
        "hardware_spec": asdict(d.hw),
        "model_config": d.cfg.to_dict(),
    }
    return results, _disagg_text(results), config
