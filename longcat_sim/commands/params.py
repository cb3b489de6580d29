"""``longcat-sim params``: total, activated and KV-cache sizes of a model, from the analytic count."""

from __future__ import annotations

import argparse

from longcat_sim.commands.base import CommandOutput
from longcat_sim.config.deployment import ModelChoice
from longcat_sim.config.flags import add_config_flags, set_values
from longcat_sim.model import costs
from longcat_sim.model.config import load_model_config

HELP = "parameter counts (total, activated) and KV-cache bytes per token of a model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser, ModelChoice)


def run(args: argparse.Namespace) -> CommandOutput:
    cfg = load_model_config(ModelChoice(**set_values(args, ModelChoice)).model)
    k_lo = max(0, cfg.moe_topk - cfg.zero_expert_num)
    k_hi = min(cfg.moe_topk, cfg.n_routed_experts)
    results = {
        "model": cfg.name,
        "total_params": costs.total_params(cfg),
        "mtp_params": costs.mtp_params(cfg),
        "activated_params_min": costs.activated_params(cfg, k_lo),
        "activated_params_max": costs.activated_params(cfg, k_hi),
        "activated_params_expected": costs.activated_params(cfg, cfg.target_ffn_experts),
        "target_ffn_experts": cfg.target_ffn_experts,
        "kv_cache_bytes_per_token": costs.kv_cache_bytes_per_token(cfg, dtype_bytes=2),
    }
    activated = [(k_lo, results["activated_params_min"])]
    if k_hi != k_lo:
        activated.append((k_hi, results["activated_params_max"]))
    rows = [
        ("total parameters", f"{results['total_params'] / 1e9:.3f} B"),
        ("MTP module (not in total)", f"{results['mtp_params'] / 1e9:.3f} B"),
        *((f"activated, {k} FFN experts", f"{n / 1e9:.3f} B") for k, n in activated),
        (
            f"activated, K_e = {cfg.target_ffn_experts:g}",
            f"{results['activated_params_expected'] / 1e9:.3f} B",
        ),
        ("KV cache, bf16", f"{results['kv_cache_bytes_per_token']:,d} B/token"),
    ]
    width = max(len(label) for label, _ in rows)
    text = "\n".join(
        [f"model {cfg.name}", *(f"  {label:<{width}}  {value:>14}" for label, value in rows)]
    )
    return CommandOutput(
        results=results, text=text, config=cfg.to_dict(), config_hash=cfg.config_hash()
    )
