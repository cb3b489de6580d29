"""Serving deployments beyond one decode step: a prefill pool (``simulate --mode prefill``) and
a prefill pool beside a decode pool (``simulate --mode disagg``), one field per value."""

from __future__ import annotations

from dataclasses import dataclass

from longcat_sim.config.deployment import (
    ATTENTION_DTYPES,
    MAX_REQUEST_TOKENS,
    DecodeDeployment,
    Deployment,
    hbm_check,
    model_schedule,
)
from longcat_sim.config.fields import choice, integer, name, number, optional, setting
from longcat_sim.errors import UserError

KV_TRANSFERS = ("layerwise", "after_prefill")


@dataclass(frozen=True)
class PromptLoad:
    """The prompts a prefill GPU computes per forward."""

    tokens_per_device: int = setting(
        16384, "prompt tokens computed per GPU per forward", unit="tokens", check=integer(1)
    )
    prompt_len: float = setting(
        4096.0, "mean prompt length", unit="tokens", check=number(1.0, MAX_REQUEST_TOKENS)
    )
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
        check=optional(number(1.0, MAX_REQUEST_TOKENS)),
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
        1024.0,
        "mean output length per request",
        unit="tokens",
        check=number(1.0, MAX_REQUEST_TOKENS),
    )
    kv_transfer: str = setting(
        "layerwise",
        "send each layer's KV cache as prefill finishes it (layerwise) or all at the end",
        check=choice(*KV_TRANSFERS),
    )


LAYOUTS = ("colocated", "disagg")
ARRIVALS = ("poisson", "gamma")


@dataclass(frozen=True)
class Traffic:
    """Requests over time: synthetic (a rate, an arrival process, length distributions) or a
    trace replayed as recorded or time-scaled to ``rate``."""

    rate: float | None = setting(
        None,
        "requests per second (unset: a trace's recorded rate; 20 without a trace)",
        unit="requests/s",
        check=optional(number(0.0, open_low=True)),
        kind=float,
    )
    arrivals: str = setting(
        "poisson", "arrival process: poisson, or gamma (bursty)", check=choice(*ARRIVALS)
    )
    arrival_cv: float = setting(
        2.0,
        "coefficient of variation of gamma inter-arrival times (1: Poisson; above: burstier)",
        check=number(0.05, 100.0),
    )
    output_cv: float = setting(
        0.0, "coefficient of variation of output lengths (gamma)", check=number(0.0, 10.0)
    )
    duration_s: float = setting(
        60.0,
        "simulated seconds of traffic (a trace: its first duration_s seconds)",
        unit="s",
        check=number(0.0, 86400.0, open_low=True),
    )
    warmup_s: float = setting(
        0.0,
        "requests arriving before this are served but left out of the latency figures",
        unit="s",
        check=number(0.0, 86400.0),
    )
    drain: bool = setting(
        False,
        "after duration_s, stop arrivals and serve until every request has finished",
        kind=bool,
    )
    trace: str | None = setting(
        None,
        "replay a trace: azure-code, azure-conv or a CSV/JSONL file with a timestamp and "
        "input and output token columns",
        check=optional(name()),
        kind=str,
    )


@dataclass(frozen=True)
class ServiceLevel:
    """Latency targets a request must meet to count toward goodput."""

    slo_ttft_ms: float = setting(
        2000.0, "time-to-first-token target", unit="ms", check=number(0.0, open_low=True)
    )
    slo_tpot_ms: float = setting(
        50.0, "time-per-output-token target", unit="ms", check=number(0.0, open_low=True)
    )
    slo_percentile: float = setting(
        90.0, "percentile at which both targets must hold", check=number(1.0, 100.0)
    )


@dataclass(frozen=True)
class ServeDeployment(Traffic, ServiceLevel, DisaggDeployment):
    """Instances serving requests over time: co-located instances (chunked prefill mixed into
    decode steps) or a prefill pool beside a decode pool. ``gpus`` is one instance's GPUs (its
    EP group and DP-attention ranks); ``batch_per_device`` caps the requests each GPU holds."""

    layout: str = setting(
        "colocated",
        "colocated (chunked prefill inside decode steps) or disagg (prefill pool, KV transfer, "
        "decode pool)",
        check=choice(*LAYOUTS),
    )
    instances: int = setting(
        1, "co-located or decode instances, each of gpus GPUs", check=integer(1)
    )
    prefill_instances: int = setting(
        1, "prefill instances (disagg), each of prefill_gpus GPUs", check=integer(1)
    )
    gpus: int = setting(32, "GPUs per instance", unit="GPUs", check=integer(1), kind=int)
    prefill_gpus: int = setting(
        16, "GPUs per prefill instance (disagg)", unit="GPUs", check=integer(1)
    )
    batch_per_device: int = setting(
        64, "most requests each GPU holds (the batch cap)", unit="requests", check=integer(1)
    )
    tokens_per_device: int | None = setting(
        None,
        "prompt tokens per GPU per step: a prefill forward's budget (disagg; unset: 16384) or "
        "the chunk mixed into each decode step (colocated; unset: 512)",
        unit="tokens",
        check=optional(integer(1)),
        kind=int,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warmup_s >= self.duration_s:
            raise UserError(
                f"--warmup-s {self.warmup_s:g} leaves nothing of --duration-s "
                f"{self.duration_s:g}; make the warm-up shorter than the duration"
            )

    def prompt_tokens_per_step(self) -> int:
        """``tokens_per_device`` with its per-layout default."""
        if self.tokens_per_device is not None:
            return self.tokens_per_device
        return 16384 if self.layout == "disagg" else 512
