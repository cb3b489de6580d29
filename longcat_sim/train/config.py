"""Settings of a training run: :class:`TrainConfig`, per-preset defaults, ``--set`` parsing,
the FFN-expert target, seed streams and the memory check."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from longcat_sim.config.fields import Check, integer, number, setting, validate
from longcat_sim.config.hashing import config_hash
from longcat_sim.errors import UserError
from longcat_sim.model import costs
from longcat_sim.model.balance import BiasRateSchedule
from longcat_sim.model.config import ConfigError, ModelConfig
from longcat_sim.model.optim import PAPER_ADAM_EPS
from longcat_sim.train.data import DEFAULT_BYTE_BUDGET

SEED_STREAMS = ("init", "data")
RATE_KINDS = ("constant", "cosine", "exponential")

_COUNT, _SIZE = integer(1), integer(0)
_POS, _NON_NEG, _SHARE = number(0.0, open_low=True), number(0.0), number(0.0, 1.0)
_OPEN_SHARE = Check(
    "must lie strictly between 0 and 1",
    lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0.0 < v < 1.0,
)
_BETA = Check(  # Adam needs a decay below 1
    "must lie in [0, 1)",
    lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0.0 <= v < 1.0,
)
_RATE_KINDS = Check("must be constant, cosine or exponential", lambda v: v in RATE_KINDS)
_BOOL = Check("must be true or false", lambda v: isinstance(v, bool))

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

    steps: int = setting(
        300, "steps of the whole run (the LR schedule's length)", unit="steps", check=_COUNT
    )
    batch_size: int = setting(8, "sequences per step", unit="sequences", check=_COUNT)
    seq_len: int = setting(64, "tokens per sequence", unit="tokens", check=_COUNT)
    slice_size: int = setting(
        1,
        "sequences per forward/backward slice (divides batch_size)",
        unit="sequences",
        check=_COUNT,
    )
    seed: int = setting(0, "root seed (init and data streams)", check=_SIZE)
    # optimizer and schedule
    lr: float = setting(3e-3, "peak learning rate", check=_POS)
    warmup_steps: int = setting(20, "linear LR warmup (at most steps)", unit="steps", check=_SIZE)
    min_lr_ratio: float = setting(0.1, "final LR as a share of the peak", check=_SHARE)
    weight_decay: float = setting(0.1, "AdamW weight decay", check=_NON_NEG)
    beta1: float = setting(0.9, "Adam first-moment decay", check=_BETA)
    beta2: float = setting(0.95, "Adam second-moment decay", check=_BETA)
    adam_eps: float = setting(PAPER_ADAM_EPS, "Adam epsilon", check=_NON_NEG)
    grad_clip: float = setting(1.0, "global gradient-norm clip", check=_NON_NEG)
    proxy_width: int = setting(
        0, "transfer lr and init variance from this width (0: off; Table 1)", check=_SIZE
    )
    # expert-bias controller (Eq. 2); bias_rate 0 switches it off
    bias_rate: float = setting(0.1, "bias adaptation rate μ (0: controller off)", check=_NON_NEG)
    bias_rate_kind: str = setting("constant", "schedule of μ", check=_RATE_KINDS)
    bias_rate_final: float = setting(
        0.0, "μ at the end of a cosine/exponential schedule", check=_NON_NEG
    )
    bias_rate_decay: float = setting(
        1.0, "per-step factor of an exponential μ schedule", check=number(0.0, 1.0, open_low=True)
    )
    # auxiliary losses
    balance_alpha: float = setting(1e-3, "balance-loss weight α", check=_NON_NEG)
    balance_groups: int = setting(4, "device groups of the balance loss", check=_COUNT)
    z_loss: float = setting(1e-6, "hidden z-loss weight λ", check=_NON_NEG)
    mtp_weight: float = setting(0.3, "multi-token-prediction loss weight", check=_NON_NEG)
    # bookkeeping
    eval_every: int = setting(50, "validate every N steps", unit="steps", check=_COUNT)
    eval_batches: int = setting(
        8, "validation batches (0: the whole validation split)", unit="batches", check=_SIZE
    )
    checkpoint_every: int = setting(100, "checkpoint every N steps", unit="steps", check=_COUNT)
    keep_checkpoints: int = setting(2, "checkpoints kept on disk", check=_COUNT)
    stats_window: int = setting(
        50, "steps the FFN-experts statistics average over", unit="steps", check=_COUNT
    )
    # data
    byte_budget: int = setting(DEFAULT_BYTE_BUDGET, "corpus bytes read", unit="bytes", check=_COUNT)
    val_fraction: float = setting(0.05, "share of the corpus held out", check=_OPEN_SHARE)
    split_seed: int = setting(0, "seed of the train/validation split", check=_SIZE)
    # reproducibility: batch-invariant kernels and a fixed-order gradient norm
    deterministic: bool = setting(
        False,
        "batch-invariant kernels and fixed-order sums: results equal for any --threads and "
        "any --nproc",
        check=_BOOL,
    )

    def __post_init__(self) -> None:
        _validate(self)

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


def _validate(tc: TrainConfig) -> None:
    validate(tc, lambda n: f"train setting {n!r}", UserError)
    if tc.warmup_steps > tc.steps:
        raise UserError(
            f"warmup_steps={tc.warmup_steps} exceeds steps={tc.steps}; lower it with "
            "--set warmup_steps=N"
        )
    if tc.batch_size % tc.slice_size:
        raise UserError(f"slice_size={tc.slice_size} must divide batch_size={tc.batch_size}")


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
    """The run's config hash: model and train settings, as the manifest records them."""
    return config_hash({"model": model_cfg.to_dict(), "train": tc.to_dict()})


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
