"""The training loop: LM + MTP + balance + z losses, the expert-bias controller, checkpoints.

- ``TrainConfig``: every setting that shapes a run's trajectory, with per-preset defaults.
- ``Trainer``: builds the model from an explicit generator, trains step by step, evaluates,
  writes ``metrics.jsonl`` (one JSON object per step) and checkpoints into a run directory.

A step's batch is a pure function of ``(seed, step)`` (``TokenDataset.batch_at``) and nothing
else draws random numbers during training, so a checkpoint holding the model (with its router
biases), the optimizer and controller state and the step counter resumes bit for bit: N steps
in one go and N/2 + resume + N/2 give identical parameters.

Checkpoint layout: ``RUN/checkpoints/step-00000100/`` with ``config.json`` and
``model.safetensors`` (Hugging Face format), ``trainer_state.pt`` (optimizer, controller, step,
configs) and the marker ``COMPLETE``, written last. The directory is assembled under a temporary
name and renamed into place, so a crash never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from longcat_sim.errors import UserError
from longcat_sim.model import costs
from longcat_sim.model.balance import (
    BIAS_BUFFER,
    BiasController,
    BiasRateSchedule,
    find_routers,
    hidden_z_loss,
    router_stats,
    stack_counts,
    total_balance_loss,
)
from longcat_sim.model.checkpoint import load_pretrained, save_pretrained
from longcat_sim.model.config import ConfigError, ModelConfig
from longcat_sim.model.determinism import clip_grad_norm_fixed_order, deterministic_config
from longcat_sim.model.growth import grow_config, grow_optimizer_state, grow_state_dict
from longcat_sim.model.hashing import parameter_hash
from longcat_sim.model.optim import (
    PAPER_ADAM_EPS,
    build_adamw,
    initialize_parameters,
    lr_multiplier,
    set_lr_multiplier,
    transfer_hyperparameters,
    uniform_hyperparameters,
)
from longcat_sim.model.transformer import LongcatFlashForCausalLM, require_runnable
from longcat_sim.runs import write_bytes_atomic, write_json_atomic, write_text_atomic
from longcat_sim.train.data import (
    DEFAULT_BYTE_BUDGET,
    CorpusData,
    build_corpus_data,
    unigram_cross_entropy,
    unigram_entropy,
)

METRICS_NAME = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
STATE_NAME = "trainer_state.pt"
MARKER_NAME = "COMPLETE"
STATE_FORMAT = "longcat-sim-train-state-v1"
SEED_STREAMS = ("init", "data")


# -- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run. ``steps`` is the length of the LR (and bias-rate) schedule.

    Losses: ``lm + mtp_weight·mtp + balance (α = balance_alpha over balance_groups device
    groups, summed over layers) + hidden z-loss (λ = z_loss)``. The paper publishes neither α,
    λ nor μ (spec §2-§3); the defaults here are chosen for the small presets.
    """

    steps: int = 300
    batch_size: int = 8
    seq_len: int = 64
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
    positive = ("steps", "batch_size", "seq_len", "eval_every", "checkpoint_every",
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
    """``cfg`` with ``expected_ffn_experts = target``, or a one-line error naming the range."""
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
    return cfg.replace(expected_ffn_experts=float(target))


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


# -- checkpoints ---------------------------------------------------------------------------------


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of ``run_dir`` (those with the marker), oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.name.startswith("step-") and (p / MARKER_NAME).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the latest complete checkpoint of a run directory."""
    path = Path(path)
    if (path / MARKER_NAME).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise UserError(
            f"{str(path)!r} holds no complete checkpoint; give a run directory written by "
            "'longcat-sim train' or one of its checkpoints/step-* folders"
        )
    return latest


def read_checkpoint_state(checkpoint: str | Path) -> dict[str, Any]:
    """The trainer state of a complete checkpoint (configs as objects, tensors on CPU)."""
    path = Path(checkpoint)
    try:
        state = torch.load(io.BytesIO((path / STATE_NAME).read_bytes()), weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise UserError(f"cannot read {str(path / STATE_NAME)!r}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"{str(path)!r} is not a {STATE_FORMAT} checkpoint")
    state["model_config"] = ModelConfig.from_dict(state["model_config"])
    state["train_config"] = TrainConfig.from_dict(state["train_config"])
    return state


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the trainer ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSummary:
    """What a run reports; the window statistics are read back from ``metrics.jsonl``."""

    start_step: int
    step: int
    final_loss: float
    val_loss: float
    val_unigram_entropy: float  # plug-in entropy of the validation targets themselves
    val_unigram_cross_entropy: float  # a unigram model fitted on train, scored on them
    train_unigram_entropy: float
    avg_ffn_experts_per_token: list[float]
    ffn_experts_std_per_token: list[float]
    target_ffn_experts: float
    stats_window: int
    tokens_per_s: float
    param_hash: str
    checkpoint: str
    data: dict[str, Any] = field(default_factory=dict)
    grown_from: str | None = None


class Trainer:
    """One training run in ``run_dir``: model, optimizer, controller, data and bookkeeping."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        run_dir: str | Path,
        *,
        data: CorpusData | None = None,
        data_cache: str | Path | None = None,
        progress: bool | None = False,
    ) -> None:
        if train_cfg.deterministic:
            model_cfg = deterministic_config(model_cfg)
        self.model_cfg = model_cfg
        self.tc = train_cfg
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.seeds = derive_seeds(train_cfg.seed)
        self._check_compatible()
        self.data = data if data is not None else self._load_data(data_cache)
        if self.data.tokenizer.vocab_size != model_cfg.vocab_size:
            raise UserError(
                f"the data's tokenizer has {self.data.tokenizer.vocab_size} ids but the model's "
                f"vocab_size is {model_cfg.vocab_size}"
            )
        if self.data.dataset.seq_len != train_cfg.seq_len:
            raise UserError(
                f"the dataset cuts windows of {self.data.dataset.seq_len} tokens but seq_len is "
                f"{train_cfg.seq_len}"
            )
        self.model, self.optimizer = self._build(model_cfg, train_cfg)
        self.routers = find_routers(self.model)
        self.controller = BiasController(model_cfg, train_cfg.rate_schedule())
        self.step = 0
        self.grown_from: str | None = None

    # -- construction --------------------------------------------------------------------------
    def _check_compatible(self) -> None:
        cfg, tc = self.model_cfg, self.tc
        require_runnable(cfg)
        check_fits_in_memory(cfg)
        if tc.seq_len > cfg.max_position_embeddings:
            raise UserError(
                f"seq_len={tc.seq_len} exceeds the model's max_position_embeddings="
                f"{cfg.max_position_embeddings}"
            )
        if cfg.n_routed_experts % tc.balance_groups:
            raise UserError(
                f"balance_groups={tc.balance_groups} must divide n_routed_experts="
                f"{cfg.n_routed_experts}; pick a divisor with --set balance_groups=D"
            )
        if cfg.expected_ffn_experts <= 0:
            raise UserError("expected_ffn_experts must be > 0 to train with the bias controller")
        if (
            tc.balance_alpha > 0
            and cfg.zero_expert_num
            and cfg.expected_ffn_experts >= cfg.moe_topk
        ):
            raise UserError(
                f"the balance loss needs expected_ffn_experts < moe_topk={cfg.moe_topk}; lower "
                "the target or set balance_alpha=0"
            )

    def _load_data(self, cache: str | Path | None) -> CorpusData:
        return build_corpus_data(
            self.model_cfg.vocab_size,
            self.tc.seq_len,
            byte_budget=self.tc.byte_budget,
            val_fraction=self.tc.val_fraction,
            split_seed=self.tc.split_seed,
            cache_dir=cache,
        )

    def _build(
        self, cfg: ModelConfig, tc: TrainConfig
    ) -> tuple[LongcatFlashForCausalLM, torch.optim.AdamW]:
        """Model drawn from the ``init`` seed stream and its AdamW (Table 1 transfer if asked)."""
        generator = torch.Generator().manual_seed(derive_seeds(tc.seed)["init"])
        model = LongcatFlashForCausalLM(cfg, generator=generator)
        lrs: float | dict[str, float] = tc.lr
        if tc.proxy_width:
            proxy = uniform_hyperparameters(tc.lr, cfg.initializer_range)
            hyper = transfer_hyperparameters(proxy, tc.proxy_width, cfg.hidden_size)
            initialize_parameters(model, hyper, generator)
            lrs = {group: h.lr for group, h in hyper.items()}
        model.train()
        optimizer = build_adamw(
            model,
            lrs,  # type: ignore[arg-type]
            weight_decay=tc.weight_decay,
            betas=(tc.beta1, tc.beta2),
            eps=tc.adam_eps,
        )
        return model, optimizer

    # -- state transfer ------------------------------------------------------------------------
    def load_checkpoint(self, checkpoint: str | Path) -> None:
        """Continue from ``checkpoint``: its model config must equal this run's, and its train
        config too except for :data:`RESUMABLE_CHANGES`."""
        path = Path(checkpoint)
        state = read_checkpoint_state(path)
        if state["model_config"] != self.model_cfg:
            raise UserError(f"checkpoint {str(path)!r} was written for a different model config")
        saved, ours = state["train_config"].to_dict(), self.tc.to_dict()
        differ = sorted(k for k in ours if ours[k] != saved[k] and k not in RESUMABLE_CHANGES)
        if differ:
            raise UserError(
                f"cannot resume with changed train settings ({', '.join(differ)}); use the "
                "checkpoint's settings or start a new run directory"
            )
        self.model.load_state_dict(load_pretrained(path).state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.controller.load_state_dict(state["bias_controller"])
        self.step = int(state["step"])
        self.grown_from = state.get("grown_from")
        self.model.train()

    def grow_from(self, checkpoint: str | Path) -> None:
        """Start from a shallower checkpoint stacked into this model's depth (spec §3.4).

        Weights, router biases and Adam moments are copied layer ``i mod L_small``; the step
        counter (hence the data position and LR schedule) and the controller state carry on.
        """
        path = resolve_checkpoint(checkpoint)
        state = read_checkpoint_state(path)
        small_cfg: ModelConfig = state["model_config"]
        factor, rest = divmod(self.model_cfg.num_layers, small_cfg.num_layers)
        expected = grow_config(small_cfg, max(factor, 1)).to_dict()
        target = self.model_cfg.to_dict()
        differ = sorted(k for k in target if k != "name" and target[k] != expected[k])
        if rest or factor < 2 or differ:
            raise UserError(
                f"cannot grow {small_cfg.name!r} ({small_cfg.num_layers} layers) into "
                f"{self.model_cfg.name!r} ({self.model_cfg.num_layers} layers): the target must "
                "have a whole multiple (>= 2) of its layers and otherwise the same fields"
                + (f" (differs in {', '.join(differ)})" if differ else "")
            )
        step = int(state["step"])
        if step >= self.tc.steps:
            raise UserError(f"the checkpoint is at step {step}; the grown run needs steps > {step}")
        small = load_pretrained(path).train()
        self.model.load_state_dict(
            grow_state_dict(small.state_dict(), small_cfg.num_layers, factor)
        )
        small_optimizer = build_adamw(small, 1.0)
        small_optimizer.load_state_dict(state["optimizer"])
        grow_optimizer_state(
            small, small_optimizer, self.model, self.optimizer, small_cfg.num_layers
        )
        controller = {
            key: None if value is None else value.repeat(factor, 1)
            for key, value in state["bias_controller"].items()
        }
        self.controller.load_state_dict(controller)
        self.step = step
        self.grown_from = str(path)

    # -- one step --------------------------------------------------------------------------------
    def losses(self, input_ids: torch.Tensor, targets: torch.Tensor):
        """Total loss, its named terms (floats) and the model output for one batch."""
        cfg, tc = self.model_cfg, self.tc
        out = self.model.forward_detailed(input_ids, compute_mtp=tc.mtp_weight > 0)
        lm = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())
        total = lm
        terms = {"lm_loss": lm}
        if out.mtp_logits is not None:
            mtp = F.cross_entropy(
                out.mtp_logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten()
            )
            total = total + tc.mtp_weight * mtp
            terms["mtp_loss"] = mtp
        if tc.balance_alpha > 0:
            balance = total_balance_loss(out.router, cfg, tc.balance_groups, tc.balance_alpha)
            total = total + balance
            terms["balance_loss"] = balance
        if tc.z_loss > 0:
            z = hidden_z_loss(out.hidden_pre_norm, tc.z_loss)
            total = total + z
            terms["z_loss"] = z
        return total, {k: v.item() for k, v in terms.items()}, out

    def train_step(self) -> dict[str, Any]:
        """One optimizer step and bias update; returns the step's metrics record."""
        tc, step = self.tc, self.step
        start = time.perf_counter()
        inputs, targets = self.data.dataset.batch_at(step, tc.batch_size, self.seeds["data"])
        input_ids, target_ids = torch.from_numpy(inputs), torch.from_numpy(targets)
        multiplier = lr_multiplier(
            step, warmup_steps=tc.warmup_steps, total_steps=tc.steps, min_ratio=tc.min_lr_ratio
        )
        set_lr_multiplier(self.optimizer, multiplier)
        total, terms, out = self.losses(input_ids, target_ids)
        if not math.isfinite(total.item()):
            raise UserError(
                f"training diverged at step {step} (loss {total.item()}); lower --lr or raise "
                "warmup_steps"
            )
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
        clip = clip_grad_norm_fixed_order if tc.deterministic else torch.nn.utils.clip_grad_norm_
        grad_norm = clip(self.model.parameters(), max_norm)
        self.optimizer.step()
        if tc.bias_rate > 0:
            self.controller.update(self.routers, stack_counts(out.router), step)
        elapsed = time.perf_counter() - start
        self.step += 1

        stats = router_stats(out.router, self.model_cfg.n_routed_experts)
        n_ffn = self.model_cfg.n_routed_experts
        biases = [getattr(r, BIAS_BUFFER)[:n_ffn].detach().double() for r in self.routers]
        n_tokens = input_ids.numel()
        return {
            "step": step,
            "loss": total.item(),
            **terms,
            "lr": tc.lr * multiplier,
            "grad_norm": float(grad_norm),
            "ffn_experts_mean": [s.ffn_experts_mean for s in stats],
            "ffn_experts_std": [s.ffn_experts_std for s in stats],
            "zero_slot_share": [s.zero_slot_share for s in stats],
            "max_load_ratio": [s.max_load_ratio for s in stats],
            "bias_rate": self.controller.schedule.rate_at(step),
            "bias_ffn_mean": [b.mean().item() for b in biases],
            "bias_ffn_min": [b.min().item() for b in biases],
            "bias_ffn_max": [b.max().item() for b in biases],
            "tokens": n_tokens,
            "step_seconds": elapsed,
            "tokens_per_s": n_tokens / elapsed if elapsed > 0 else math.inf,
        }

    def _eval_batches(self):
        limit = self.tc.eval_batches or None
        return self.data.dataset.eval_batches(self.tc.batch_size, limit)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token cross-entropy (nats/token) over the first ``eval_batches`` batches
        of validation windows (the same windows every time)."""
        self.model.eval()
        total, count = 0.0, 0
        try:
            for inputs, targets in self._eval_batches():
                logits = self.model(torch.from_numpy(inputs))
                loss = F.cross_entropy(
                    logits.flatten(0, 1).float(),
                    torch.from_numpy(targets).flatten(),
                    reduction="sum",
                )
                total += loss.item()
                count += targets.size
        finally:
            self.model.train()
        return total / count

    # -- checkpoints ---------------------------------------------------------------------------
    def _step_name(self) -> str:
        return f"step-{self.step:08d}"

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` atomically (temporary folder, marker last, rename)."""
        root = self.run_dir / CHECKPOINTS_DIR
        root.mkdir(parents=True, exist_ok=True)
        final = root / self._step_name()
        tmp = root / f".tmp-{self._step_name()}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        save_pretrained(self.model, tmp)
        state = {
            "format": STATE_FORMAT,
            "step": self.step,
            "model_config": self.model_cfg.to_dict(),
            "train_config": self.tc.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "bias_controller": self.controller.state_dict(),
            "data": {"seed": self.seeds["data"], "next_step": self.step},
            "rng": None,  # training draws no random numbers: batches are pure in (seed, step)
            "grown_from": self.grown_from,
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_bytes_atomic(tmp / STATE_NAME, buffer.getvalue())
        write_json_atomic(
            tmp / MARKER_NAME, {"step": self.step, "param_hash": parameter_hash(self.model)}
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in checkpoint_dirs(self.run_dir)[: -self.tc.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    # -- metrics -------------------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_NAME

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        lines = self.metrics_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def _truncate_metrics(self) -> None:
        """Drop records of steps at or past the current step (left by an interrupted run)."""
        records = [r for r in self.read_metrics() if r["step"] < self.step]
        write_text_atomic(
            self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        )

    # -- the loop ------------------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> TrainSummary:
        """Train from ``self.step`` to ``tc.steps`` (or ``stop_after``), then evaluate and save."""
        tc = self.tc
        end = tc.steps if stop_after is None else min(stop_after, tc.steps)
        start_step = self.step
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (self.run_dir / CHECKPOINTS_DIR).glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a crash mid-save; one writer per run
        self._truncate_metrics()
        tokens, seconds = 0, 0.0
        bar = tqdm(
            total=tc.steps, initial=start_step, desc="train", unit="step", file=sys.stderr,
            disable=None if self.progress is None else not self.progress, dynamic_ncols=True,
        )  # fmt: skip
        val_loss = math.nan
        with bar, self.metrics_path.open("a") as metrics:
            while self.step < end:
                record = self.train_step()
                tokens += record["tokens"]
                seconds += record["step_seconds"]
                if self.step % tc.eval_every == 0 or self.step == end:
                    val_loss = self.evaluate()
                    record["val_loss"] = val_loss
                metrics.write(json.dumps(record, sort_keys=True) + "\n")
                metrics.flush()
                if self.step % tc.checkpoint_every == 0 and self.step != end:
                    self.save_checkpoint()
                bar.update(1)
                bar.set_postfix(
                    loss=f"{record['lm_loss']:.3f}",
                    ffn=f"{np.mean(record['ffn_experts_mean']):.2f}",
                    refresh=False,
                )
        latest = latest_checkpoint(self.run_dir)
        if start_step == self.step:
            val_loss = self.evaluate()
        if start_step == self.step and latest is not None and latest.name == self._step_name():
            checkpoint = latest  # resumed at the end: the checkpoint already holds this state
        else:
            checkpoint = self.save_checkpoint()
        return self._summary(start_step, val_loss, tokens / seconds if seconds else 0.0, checkpoint)

    def _summary(
        self, start_step: int, val_loss: float, tokens_per_s: float, checkpoint: Path
    ) -> TrainSummary:
        records = self.read_metrics()
        window = records[-self.tc.stats_window :]
        layers = self.model_cfg.num_layers
        mean = [float(np.mean([r["ffn_experts_mean"][i] for r in window])) for i in range(layers)]
        std = [float(np.mean([r["ffn_experts_std"][i] for r in window])) for i in range(layers)]
        dataset = self.data.dataset
        val_targets = np.concatenate([t.ravel() for _, t in self._eval_batches()])
        return TrainSummary(
            start_step=start_step,
            step=self.step,
            final_loss=records[-1]["lm_loss"] if records else math.nan,
            val_loss=val_loss,
            val_unigram_entropy=unigram_entropy(val_targets),
            val_unigram_cross_entropy=unigram_cross_entropy(
                dataset.tokens["train"], val_targets, self.model_cfg.vocab_size
            ),
            train_unigram_entropy=dataset.unigram_entropy("train"),
            avg_ffn_experts_per_token=mean if window else [],
            ffn_experts_std_per_token=std if window else [],
            target_ffn_experts=self.model_cfg.expected_ffn_experts,
            stats_window=len(window),
            tokens_per_s=tokens_per_s,
            param_hash=parameter_hash(self.model),
            checkpoint=str(checkpoint),
            data=dict(self.data.fingerprint),
            grown_from=self.grown_from,
        )
