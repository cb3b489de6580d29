"""Serving deployments beyond one decode step: a prefill pool (``simulate --mode prefill``) and
a prefill pool beside a decode pool (``simulate --mode disagg``), one field per value."""

from __future__ import annotations

from dataclasses import dataclass

from longcat_sim.config.deployment import (
    ATTENTION_DTYPES,
    DecodeDeployment,
    Deployment,
    hbm_check,
    model_schedule,
)
from longcat_sim.config.fields import choice, integer, name, number, optional, setting

KV_TRANSFERS = ("layerwise", "after_prefill")


@dataclass(frozen=True)
class PromptLoad:
    """The prompts a prefill GPU computes per forward."""

    tokens_per_device: int = setting(
        16384, "prompt tokens computed per GPU per forward", unit="tokens", check=integer(1)
    )
    prompt_len: float = setting(4096.0, "mean prompt length", unit="tokens", check=number(1.0))
    prompt_cv: float = setting(
        0.0, "coefficient of variation of prompt lengths (gamma)", check=number(0.0, 10.0)
    )
    chunk_size: int | None = setting(
        None,
        "chunked prefill: most tokens of one prompt per forward (unset: whole prompts)",
        unit="tokens",
        check=optional(integer(1)),
        kind=int,
    )
    prefix_hit: float = setting(
        0.0,
        "share of each prompt found in the prefix cache (its compute skipped)",
        check=number(0.0, 0.99),
    )


@dataclass(frozen=True)
class PrefillDeployment(PromptLoad, Deployment):
    """One prefill forward: the embedded default is DeepSeek-V3's published prefill setting
    applied to LongCat-Flash (32 H800, EP32, 4K-token prompts, 16K tokens per GPU)."""

    gpus: int = setting(32, "GPUs in the deployment", unit="GPUs", check=integer(1), kind=int)
    schedule: str | None = model_schedule()
    attention_dtype: str = setting("bf16", "KV cache dtype", check=choice(*ATTENTION_DTYPES))
    attention_tp: int = setting(1, "attention tensor parallelism", check=integer(1))
    ffn_tp: int = setting(1, "dense FFN tensor parallelism", check=integer(1))
    hbm_check: str = hbm_check()


@dataclass(frozen=True)
class DisaggDeployment(PromptLoad, DecodeDeployment):
    """A prefill pool and a decode pool with their own GPUs, EP and schedule; the decode
    pool's values keep their ``simulate --mode decode`` names, the prefill pool's are named
    ``prefill_*``. Prompt KV caches move to the decode pool over RDMA."""

    context: float | None = setting(
        None,
        "cached tokens each decode request attends to (unset: prompt_len + output_len / 2)",
        unit="tokens",
        check=optional(number(1.0)),
        kind=float,
    )
    prefill_gpus: int = setting(32, "GPUs in the prefill pool", unit="GPUs", check=integer(1))
    prefill_hardware: str | None = setting(
        None,
        "hardware of the prefill pool (unset: the decode pool's)",
        check=optional(name()),
        kind=str,
    )
    prefill_ep: int | None = setting(
        None,
        "expert-parallel group size of the prefill pool (unset: all its GPUs)",
        unit="GPUs",
        check=optional(integer(1)),
        kind=int,
    )
    prefill_schedule: str | None = model_schedule()
    output_len: float = setting(
        1024.0, "mean output length per request", unit="tokens", check=number(1.0)
    )
    kv_transfer: str = setting(
        "layerwise",
        "send each layer's KV cache as prefill finishes it (layerwise) or all at the end",
        check=choice(*KV_TRANSFERS),
    )
