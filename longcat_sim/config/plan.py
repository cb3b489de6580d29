"""What ``longcat-sim plan`` searches: the traffic and targets, and the choices it combines."""

from __future__ import annotations

from dataclasses import dataclass

from longcat_sim.config.deployment import ATTENTION_DTYPES, MAX_MTP_DRAFT_TOKENS, ModelChoice
from longcat_sim.config.fields import choice, integer, name, names, number, optional, setting
from longcat_sim.config.serving import LAYOUTS, ServiceLevel
from longcat_sim.config.threads import WORKERS_LIMIT

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class PlanTraffic:
    """The traffic to serve: a rate with mean lengths, or a trace at its recorded rate or
    time-scaled to ``rate``."""

    rate: float | None = setting(
        None,
        "requests per second to serve (unset: a trace's recorded rate; required without one)",
        unit="requests/s",
        check=optional(number(0.0, open_low=True)),
        kind=float,
    )
    prompt_len: float = setting(4096.0, "mean prompt length", unit="tokens", check=number(1.0))
    output_len: float = setting(
        1024.0, "mean output length per request", unit="tokens", check=number(1.0)
    )
    prefix_hit: float = setting(
        0.0, "share of each prompt found in the prefix cache", check=number(0.0, 0.99)
    )
    trace: str | None = setting(
        None,
        "plan for a trace: azure-code, azure-conv or a CSV/JSONL file (its mean lengths)",
        check=optional(name()),
        kind=str,
    )


@dataclass(frozen=True)
class PlanChoices:
    """Every combination of these values is a candidate deployment."""

    hardware: tuple[str, ...] = setting(
        ("H800",), "hardware catalogue names tried", check=names(name()), kind=str
    )
    layout: tuple[str, ...] = setting(
        LAYOUTS, "layouts tried: colocated, disagg", check=names(choice(*LAYOUTS)), kind=str
    )
    gpus: tuple[int, ...] = setting(
        (8, 16, 32, 64, 128),
        "GPUs per co-located or decode instance (its EP group) tried",
        unit="GPUs",
        check=names(integer(1)),
        kind=int,
    )
    batch_per_device: tuple[int, ...] = setting(
        (8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256),
        "batch caps per GPU tried",
        unit="requests",
        check=names(integer(1)),
        kind=int,
    )
    tokens_per_device: tuple[int, ...] = setting(
        (128, 256, 512, 1024, 2048, 4096, 8192, 16384),
        "prompt tokens per GPU per step tried (co-located chunk, or prefill forward budget)",
        unit="tokens",
        check=names(integer(1)),
        kind=int,
    )
    prefill_gpus: tuple[int, ...] = setting(
        (8, 16, 32),
        "GPUs per prefill instance tried (disagg)",
        unit="GPUs",
        check=names(integer(1)),
        kind=int,
    )
    schedule: tuple[str, ...] = setting(
        (), "overlap schedules tried (unset: the model's own)", check=None, kind=str
    )


@dataclass(frozen=True)
class PlanSettings(PlanChoices, PlanTraffic, ServiceLevel, ModelChoice):
    """A planning problem and how to solve it."""

    assumptions: str = setting("default", "assumption set name", check=name())
    seed: int = setting(0, "root seed of arrivals, lengths and sampled routing", check=integer(0))
    attention_dtype: str = setting("bf16", "KV cache dtype", check=choice(*ATTENTION_DTYPES))
    mtp_draft_tokens: int | None = setting(
        None,
        "MTP draft tokens per step (unset: the model's MTP layers)",
        check=optional(integer(0, MAX_MTP_DRAFT_TOKENS)),
        kind=int,
    )
    mtp_accept: float | None = setting(
        None,
        "share of draft tokens accepted (unset: the assumption set's)",
        check=optional(number(0.0, 1.0)),
        kind=float,
    )
    verify: int = setting(10, "cheapest screened candidates verified by serve", check=integer(1))
    verify_duration_s: float | None = setting(
        None,
        "simulated seconds of each verifying run (unset: a request's estimated time in the "
        "system as warm-up, then at least 10 s and 1,000 arrivals)",
        unit="s",
        check=optional(number(1.0, 86400.0)),
        kind=float,
    )
    executor: str = setting(
        "local", "where the work runs: local processes, or a Ray cluster", check=choice(*EXECUTORS)
    )
    address: str | None = setting(
        None,
        "Ray cluster address for --executor ray (unset: a local Ray instance)",
        check=optional(name()),
        kind=str,
    )
    workers: int | None = setting(
        None,
        "local worker processes (unset: every core)",
        check=optional(integer(1)),
        kind=int,
        limit=WORKERS_LIMIT,
    )
