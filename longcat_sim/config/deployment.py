"""Deployment configs: what ``simulate``, ``sweep`` and the report deploy, one field per value.

Names (model, hardware, assumptions, schedule, pipeline) are checked here to be names; the
scenarios resolve them against the engines' catalogues (``model.config`` presets,
``cluster.hardware``, ``cluster.assumptions``, ``cluster.schedules``), which own those lists.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from longcat_sim.config.fields import choice, flag, integer, name, number, optional, setting
from longcat_sim.config.fields import validate as _validate
from longcat_sim.errors import UserError

ATTENTION_DTYPES = ("bf16", "fp8")
# Stated upper limits where no physical bound exists; each is named in its option's help. A
# decode step samples one context per request of an EP group, so the group's requests (EP x
# batch per GPU) are bounded too, keeping a step's memory and time small.
MAX_GPUS = 2**20
MAX_BATCH_PER_DEVICE = 2**20
MAX_REDUNDANT_EXPERTS = 2**20
MAX_GROUP_REQUESTS = 2**24
MAX_MTP_DRAFT_TOKENS = 64  # speculative tokens per decode step
MAX_REQUEST_TOKENS = 10_000_000  # a prompt, output or cached context, far past any model's window
HBM_CHECKS = ("refuse", "report")


def _rdma_gb_s(default: float | None) -> Any:
    return setting(
        default,
        "override of the RDMA bandwidth per GPU and direction (unset: the hardware's own)",
        unit="GB/s",
        check=optional(number(0.0, open_low=True)),
        kind=float,
    )


def _gpus(default: int | None, help: str, *, unset: bool = True) -> Any:
    """A GPU count (``unset``: None is allowed and means the ``help``'s fallback)."""
    check = optional(integer(1, MAX_GPUS)) if unset else integer(1, MAX_GPUS)
    return setting(default, help, unit="GPUs", check=check, kind=int, limit=f"at most {MAX_GPUS:,}")


def model_schedule() -> Any:
    """A layer's overlap schedule; unset, the model's own."""
    return setting(
        None,
        "overlap schedule of a layer (unset: the model's own; with a shortcut branch sbo, or "
        "scmoe in training; without, tbo, or baseline in training)",
        check=optional(name()),
        kind=str,
    )


def hbm_check() -> Any:
    return setting(
        "refuse",
        "a deployment whose GPUs cannot hold it: refuse it, or report it priced and flagged",
        check=choice(*HBM_CHECKS),
    )


@dataclass(frozen=True)
class ModelChoice:
    """Which model: what ``params`` reads, and the first value of every deployment."""

    model: str = setting("longcat-flash", "model preset name or TOML file", check=name())

    def __post_init__(self) -> None:
        _validate(self, flag, UserError)


@dataclass(frozen=True)
class Deployment(ModelChoice):
    """Values every deployment has (the decode and training defaults differ)."""

    hardware: str = setting("H800", "hardware catalogue name or TOML file", check=name())
    rdma_gb_s: float | None = _rdma_gb_s(None)
    gpus: int | None = _gpus(None, "GPUs in the deployment")
    ep: int | None = _gpus(None, "expert-parallel group size")
    schedule: str = setting("sbo", "overlap schedule of a layer", check=name())
    redundant_experts: int = setting(
        0,
        "expert replicas per layer",
        unit="experts",
        check=integer(0, MAX_REDUNDANT_EXPERTS),
        limit=f"at most {MAX_REDUNDANT_EXPERTS:,}",
    )
    assumptions: str = setting("default", "assumption set name", check=name())
    seed: int = setting(0, "root seed of sampled routing and contexts", check=integer(0))
    gpu_hour_usd: float | None = setting(
        None,
        "price of one GPU for one hour (unset: the hardware catalogue's)",
        unit="USD",
        check=optional(number(0.0)),
        kind=float,
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DecodeDeployment(Deployment):
    """One decode step: the embedded default is LongCat-Flash on 128 H800, EP128, SBO, with
    as many MTP draft tokens as the model has MTP layers."""

    gpus: int = _gpus(128, "GPUs in the deployment", unset=False)
    ep: int | None = _gpus(None, "expert-parallel group size (unset: all GPUs)")
    schedule: str | None = model_schedule()
    batch_per_device: int = setting(
        96,
        "requests per GPU",
        unit="requests",
        check=integer(1, MAX_BATCH_PER_DEVICE),
        limit=f"at most {MAX_BATCH_PER_DEVICE:,}, and EP x this at most {MAX_GROUP_REQUESTS:,}",
    )
    context: float = setting(
        5000.0,
        "cached tokens each request attends to",
        unit="tokens",
        check=number(1.0, MAX_REQUEST_TOKENS),
    )
    attention_dtype: str = setting("bf16", "KV cache dtype", check=choice(*ATTENTION_DTYPES))
    mtp_draft_tokens: int | None = setting(
        None,
        "MTP draft tokens per step (0: no speculative decoding; unset: the model's MTP layers)",
        check=optional(integer(0, MAX_MTP_DRAFT_TOKENS)),
        kind=int,
    )
    mtp_accept: float | None = setting(
        None,
        "share of draft tokens accepted (unset: the assumption set's mtp_accept)",
        check=optional(number(0.0, 1.0)),
        kind=float,
    )
    attention_tp: int = setting(1, "attention tensor parallelism", check=integer(1))
    ffn_tp: int = setting(1, "dense FFN tensor parallelism", check=integer(1))
    hbm_check: str = hbm_check()

    def __post_init__(self) -> None:
        super().__post_init__()
        group = self.gpus if self.ep is None else self.ep
        if group * self.batch_per_device > MAX_GROUP_REQUESTS:
            raise UserError(
                f"--ep {group} x --batch-per-device {self.batch_per_device} is "
                f"{group * self.batch_per_device:,} requests in one EP group, more than the "
                f"{MAX_GROUP_REQUESTS:,} a step samples; lower either"
            )


@dataclass(frozen=True)
class TrainDeployment(Deployment):
    """One training step: the paper's sec. 5 setting (EP32, CP8, 200 Gb/s RDMA, ScMoE)."""

    rdma_gb_s: float | None = _rdma_gb_s(25.0)  # 200 Gb/s RDMA per GPU (paper sec. 5.3)
    gpus: int | None = _gpus(None, "GPUs in the deployment (unset: EP x PP)")
    ep: int = _gpus(32, "expert-parallel group size", unset=False)
    cp: int = setting(8, "context parallelism of attention", check=integer(1))
    pp: int = setting(1, "pipeline stages", check=integer(1))
    seq_len: int = setting(8192, "tokens per training sequence", unit="tokens", check=integer(1))
    tokens_per_microbatch: int = setting(
        4096, "tokens per GPU per micro-batch", unit="tokens", check=integer(1)
    )
    microbatches: int = setting(8, "micro-batches per step", check=integer(1))
    moe_chunks: int = setting(2, "MoE token chunks", check=integer(1))
    schedule: str | None = model_schedule()
    pipeline: str = setting("none", "pipeline schedule", check=name())
    assumptions: str = setting("train", "assumption set name", check=name())


@dataclass(frozen=True)
class HostStep:
    """One ``train --nproc`` step on the host a calibration profile describes
    (``simulate --mode host-ep``); its schedule is ``simulate``'s ``--schedule``."""

    profile: str | None = setting(
        None, "host.toml written by longcat-sim calibrate", check=optional(name()), kind=str
    )
    nproc: int = setting(2, "processes", unit="processes", check=integer(1))
    batch_size: int = setting(8, "sequences per step", unit="sequences", check=integer(1))

    def __post_init__(self) -> None:
        _validate(self, flag, UserError)
