"""What ``longcat-sim report`` simulates: its ``[report]`` TOML table and its options."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from longcat_sim.config.deployment import ATTENTION_DTYPES, MAX_MTP_DRAFT_TOKENS
from longcat_sim.config.fields import (
    choice,
    integer,
    name,
    names,
    number,
    optional,
    setting,
    validate,
)
from longcat_sim.config.toml import read_toml
from longcat_sim.errors import UserError


@dataclass(frozen=True)
class ReportConfig:
    """The defaults are the embedded deployment: LongCat-Flash decoding on 128 H800 GPUs
    (EP128) with the realistic ``default`` assumption set, as ``longcat-sim simulate`` runs it."""

    model: str = setting("longcat-flash", "the deployment the timelines show", check=name())
    hardware: str = setting("H800", "hardware catalogue name or TOML file", check=name())
    gpus: int = setting(
        128, "GPUs, one expert-parallel group over all", unit="GPUs", check=integer(1)
    )
    assumptions: str = setting("default", "assumption set of the decode sections", check=name())
    train_assumptions: str = setting(
        "train", "assumption set of the training-overlap section", check=name()
    )
    seed: int = setting(0, "root seed of sampled routing and contexts", check=integer(0))
    context: int = setting(5000, "cached tokens per request", unit="tokens", check=integer(1))
    attention_dtype: str = setting("bf16", "KV cache dtype", check=choice(*ATTENTION_DTYPES))
    mtp_draft_tokens: int = setting(
        1, "MTP draft tokens per step", check=integer(0, MAX_MTP_DRAFT_TOKENS)
    )
    mtp_accept: float | None = setting(
        None,
        "share of draft tokens accepted (unset: the assumption set's mtp_accept)",
        check=optional(number(0.0, 1.0)),
        kind=float,
    )
    timeline_batch_per_device: int = setting(
        96, "requests per GPU in the timelines", unit="requests", check=integer(1)
    )
    timeline_layers: int = setting(
        2, "consecutive layers shown, from the middle of the model", check=integer(1)
    )
    compare_models: tuple[str, ...] = setting(
        ("longcat-flash", "deepseek-v3", "qwen3-235b-a22b"),
        "models compared in the Pareto, memory and prefill sections",
        check=names(name()),
        kind=str,
    )
    batch_per_device: tuple[int, ...] = setting(
        (4, 8, 16, 32, 48, 64, 96, 128, 192, 256),
        "requests per GPU in the Pareto and memory sections",
        unit="requests",
        check=names(integer(1)),
        kind=int,
    )
    prefill_gpus: int = setting(
        32, "GPUs of the prefill section, one expert-parallel group", unit="GPUs", check=integer(1)
    )
    tokens_per_device: int = setting(
        16384,
        "prompt tokens per GPU per prefill forward (raised to the prompt length when shorter)",
        unit="tokens",
        check=integer(1),
    )
    prompt_len: tuple[int, ...] = setting(
        (512, 1024, 2048, 4096, 8192, 16384, 32768),
        "prompt lengths of the prefill section",
        unit="tokens",
        check=names(integer(1)),
        kind=int,
    )
    serve_trace: str = setting(
        "azure-conv",
        "trace the serving section replays: azure-conv, azure-code or a CSV/JSONL file",
        check=name(),
    )
    serve_duration_s: float = setting(
        60.0,
        "simulated seconds of each serving run (the trace's first seconds at that run's rate)",
        unit="s",
        check=number(0.0, 3600.0, open_low=True),
    )
    serve_rate_scale: float = setting(
        10.0,
        "the serving section's second rate: the trace time-scaled to this multiple of its "
        "recorded mean rate",
        check=number(0.0, 1000.0, open_low=True),
    )
    serve_gpus: int = setting(
        32,
        "GPUs per co-located or decode instance in the serving section",
        unit="GPUs",
        check=integer(1),
    )
    serve_prefill_gpus: int = setting(
        16,
        "GPUs per prefill instance in the serving section's disaggregated runs",
        unit="GPUs",
        check=integer(1),
    )

    def __post_init__(self) -> None:
        validate(self, lambda n: f"report setting {n!r}", UserError)

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in fields(self)
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> ReportConfig:
        """From a mapping keyed by field name (lists for the tuple fields)."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise UserError(
                f"{source}: unknown report setting {unknown[0]!r}; valid: {', '.join(sorted(known))}"
            )
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


def load_report_config(
    path: Path | None, overrides: Mapping[str, Any] | None = None
) -> ReportConfig:
    """The default, then a TOML file's ``[report]`` table, then ``overrides`` (options)."""
    table: dict[str, Any] = {}
    source = "options"
    if path is not None:
        source = f"--config {str(path)!r}"
        table = read_toml(path, what=source, table="report", only_table=True)
    return ReportConfig.from_dict(table | dict(overrides or {}), source)
