"""Settings of a training run: :class:`TrainConfig`, per-preset defaults, ``--set`` parsing,
the FFN-expert target, seed streams and the memory check."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from longcat_sim.errors import UserError
from longcat_sim.model import costs
from longcat_sim.model.balance import BiasRateSchedule
from longcat_sim.model.config import ConfigError, ModelConfig
from longcat_sim.model.optim import PAPER_ADAM_EPS
from longcat_sim.train.data import DEFAULT_BYTE_BUDGET

SEED_STREAMS = ("init", "data")

# -- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run. ``steps`` is the length of the LR (and bias-rate) schedule.

    Losses: ``lm + mtp_weight·mtp + balance (α = balance_alpha over balance_groups device
    groups, summed over layers) + hidden z-loss (λ = z_loss)``. The paper publishes neither α,
    λ nor μ (spec §2-§3); the defaults here are chosen for the small presets.

    A step runs its batch as ``batch_size / slice_size`` slices of ``slice_size`` sequences,
    one forward and backward each; the losses are per slice, weighted by its share of the
    batch. Gradients do not depend on how the slices are spread over processes.
    """

    steps: int = 300
    batch_size: int = 8
    seq_len: int = 64
    slice_size: int = 1
    seed: int = 0
    # optimizer and schedule
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = PAPER_ADAM_EPS
    grad_clip: float = 1.0
    proxy_width: int = 0  # > 0: transfer lr and init variance from this width (Table 1)
    # expert-bias controller (Eq. 2); bias_rate 0 switches it off
    bias_rate: float = 0.1
    bias_rate_kind: str = "constant"
    bias_rate_final: float = 0.0
    bias_rate_decay: float = 1.0
    # auxiliary losses
    balance_alpha: float = 1e-3
    balance_groups: int = 4
    z_loss: float = 1e-6
    mtp_weight: float = 0.3
    # bookkeeping
    eval_every: int = 50
    eval_batches: int = 8  # 0: the whole validation split
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    stats_window: int = 50
    # data
    byte_budget: int = DEFAULT_BYTE_BUDGET
    val_fraction: float = 0.05
    split_seed: int = 0
    # reproducibility: batch-invariant kernels and a fixed-order gradient norm
    deterministic: bool = False

    def __post_init__(self) -> None:
        _validate_train_config(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(
                f"unknown train setting {unknown[0]!r}; valid settings: {', '.join(sorted(known))}"
            )
        return cls(**data)

    def replace(self, **changes: Any) -> TrainConfig:
        return self.from_dict({**self.to_dict(), **changes})

    def rate_schedule(self) -> BiasRateSchedule:
        try:
            return BiasRateSchedule(
                initial=self.bias_rate,
                kind=self.bias_rate_kind,  # type: ignore[arg-type]
                final=self.bias_rate_final,
                total_steps=self.steps,
                decay=self.bias_rate_decay,
            )
        except ConfigError as exc:
            raise UserError(str(exc)) from None


# Settings that change bookkeeping (or extend the schedule) but not the state a resumed run
# starts from; every other setting must match the checkpoint.
RESUMABLE_CHANGES = frozenset(
    {"steps", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "stats_window"}
)

# Per-preset defaults: enough steps for the bias controller to reach its target.
PRESET_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "small": dict(
        steps=400,
        batch_size=8,
        seq_len=128,
        lr=2e-3,
        warmup_steps=30,
        bias_rate=0.6,
        balance_groups=8,
        eval_every=100,
        eval_batches=0,
        checkpoint_every=100,
    ),
}


def default_train_config(model_cfg: ModelConfig) -> TrainConfig:
    """The defaults for ``model_cfg.name`` (tiny's for models without their own)."""
    return TrainConfig(**PRESET_TRAIN_DEFAULTS.get(model_cfg.name, {}))


def _validate_train_config(tc: TrainConfig) -> None:
    positive = ("steps", "batch_size", "seq_len", "slice_size", "eval_every", "checkpoint_every",
                "keep_checkpoints", "stats_window", "byte_budget", "balance_groups")  # fmt: skip
    for name in positive:
        value = getattr(tc, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"train setting {name!r} must be a positive integer, got {value!r}")
    for name in ("warmup_steps", "seed", "proxy_width", "split_seed", "eval_batches"):
        value = getattr(tc, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserError(f"train setting {name!r} must be an integer >= 0, got {value!r}")
    non_negative = ("lr", "weight_decay", "adam_eps", "grad_clip", "bias_rate",
                    "bias_rate_final", "balance_alpha", "z_loss", "mtp_weight")  # fmt: skip
    for name in non_negative:
        value = getattr(tc, name)
        if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:
            raise UserError(f"train setting {name!r} must be a number >= 0, got {value!r}")
    if tc.lr <= 0:
        raise UserError(f"lr must be positive, got {tc.lr}")
    if tc.warmup_steps > tc.steps:
        raise UserError(
            f"warmup_steps={tc.warmup_steps} exceeds steps={tc.steps}; lower it with "
            "--set warmup_steps=N"
        )
    for name in ("beta1", "beta2", "min_lr_ratio"):
        if not 0.0 <= getattr(tc, name) <= 1.0:
            raise UserError(f"train setting {name!r} must lie in [0, 1], got {getattr(tc, name)}")
    if tc.batch_size % tc.slice_size:
        raise UserError(f"slice_size={tc.slice_size} must divide batch_size={tc.batch_size}")
    if not 0.0 < tc.val_fraction < 1.0:
        raise UserError(f"val_fraction must lie strictly between 0 and 1, got {tc.val_fraction}")


def _coerce_setting(kind: str, key: str, text: str) -> Any:
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "bool":
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
    except ValueError:
        raise UserError(f"setting {key!r} needs a {kind}, got {text!r}") from None
    return text


def parse_overrides(items: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``KEY=VALUE`` strings into (train settings, model fields); ``model.FIELD`` keys go to the
    model, the rest to :class:`TrainConfig`. Values are converted to the field's type."""
    train_types = {f.name: str(f.type) for f in fields(TrainConfig)}
    model_types = {f.name: str(f.type) for f in fields(ModelConfig)}
    train: dict[str, Any] = {}
    model: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        if key.startswith("model."):
            name = key.removeprefix("model.")
            if name not in model_types:
                raise UserError(
                    f"unknown model field {name!r} in --set; valid: {', '.join(sorted(model_types))}"
                )
            model[name] = _coerce_setting(model_types[name], key, text.strip())
        else:
            if key not in train_types:
                raise UserError(
                    f"unknown train setting {key!r} in --set; valid: "
                    f"{', '.join(sorted(train_types))} or model.FIELD"
                )
            train[key] = _coerce_setting(train_types[key], key, text.strip())
    return train, model


def with_target_ffn_experts(cfg: ModelConfig, target: float, balance_alpha: float) -> ModelConfig:
    """``cfg`` with ``target_ffn_experts = target``, or a one-line error naming the range."""
    lo = max(0, cfg.moe_topk - cfg.zero_expert_num)
    hi = min(cfg.moe_topk, cfg.n_routed_experts)
    strict_hi = cfg.zero_expert_num > 0 and balance_alpha > 0 and hi == cfg.moe_topk
    in_range = (
        math.isfinite(target)
        and target > 0
        and lo <= target
        and (target < hi if strict_hi else target <= hi)
    )
    if not in_range:
        upper = f"{hi})" if strict_hi else f"{hi}]"
        lower = f"({lo}" if lo == 0 else f"[{lo}"
        raise UserError(
            f"--target-ffn-experts {target:g} is out of range for model {cfg.name!r}: it must lie "
            f"in {lower}, {upper} (top-k {cfg.moe_topk} over {cfg.n_routed_experts} FFN + "
            f"{cfg.zero_expert_num} zero experts)"
        )
    return cfg.replace(target_ffn_experts=float(target))


def derive_seeds(seed: int) -> dict[str, int]:
    """Independent 63-bit seeds for the named streams (``SeedSequence.spawn`` of ``seed``)."""
    children = np.random.SeedSequence(seed).spawn(len(SEED_STREAMS))
    out = {}
    for name, child in zip(SEED_STREAMS, children, strict=True):
        words = child.generate_state(2, dtype=np.uint32)
        out[name] = int((int(words[0]) << 32 | int(words[1])) >> 1)
    return out


def run_config_hash(model_cfg: ModelConfig, tc: TrainConfig) -> str:
    blob = json.dumps(
        {"model": model_cfg.to_dict(), "train": tc.to_dict()}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def training_bytes(cfg: ModelConfig) -> int:
    """Float32 weights, gradients and two Adam moments: 16 bytes per parameter."""
    return 16 * (costs.total_params(cfg) + costs.mtp_params(cfg))


def check_fits_in_memory(cfg: ModelConfig) -> None:
    """Refuse a model whose training state alone exceeds this machine's memory."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return
    needed = training_bytes(cfg)
    if needed > physical:
        raise UserError(
            f"model {cfg.name!r} needs about {needed / 2**30:,.0f} GiB for weights, gradients "
            f"and Adam moments, more than this machine's {physical / 2**30:,.0f} GiB; train "
            "tiny or small"
        )
