"""The trainer: one loop for one process, N spawned processes or torchrun's.

:class:`Trainer` builds the model from an explicit generator and composes the step
(:mod:`~longcat_sim.train.step`: ``forward_backward_step`` per slice, ``train_step`` per batch),
the loss (:mod:`~longcat_sim.train.losses`), checkpoints (:mod:`~longcat_sim.train.checkpoint`)
and metrics (:mod:`~longcat_sim.train.metrics`); :meth:`Trainer.train` runs steps, evaluates,
writes ``metrics.jsonl`` and checkpoints into a run directory (rank 0 writes, every rank reads).

A step's batch is a pure function of ``(seed, step)`` (``TokenDataset.batch_at``) and nothing
else draws random numbers during training, so a checkpoint holding the model (with its router
biases), the optimizer and controller state and the step counter resumes bit for bit: N steps
in one go and N/2 + resume + N/2 give identical parameters, at any world size in deterministic
mode.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from longcat_sim.errors import UserError
from longcat_sim.model.abft import keep_checksums
from longcat_sim.model.balance import BiasController
from longcat_sim.model.checkpoint import load_pretrained
from longcat_sim.model.config import ModelConfig
from longcat_sim.model.determinism import deterministic_config
from longcat_sim.model.experts import encode_checksums
from longcat_sim.model.hashing import parameter_hash
from longcat_sim.model.optim import (
    build_adamw,
    initialize_parameters,
    transfer_hyperparameters,
    uniform_hyperparameters,
)
from longcat_sim.model.transformer import LongcatFlashForCausalLM, require_runnable
from longcat_sim.train import checkpoint as ckpt
from longcat_sim.train.config import TrainConfig, check_fits_in_memory, derive_seeds
from longcat_sim.train.data import (
    CorpusData,
    build_corpus_data,
    unigram_cross_entropy,
    unigram_entropy,
)
from longcat_sim.train.metrics import MetricsLog, TrainSummary, window_means
from longcat_sim.train.step import TrainStep
from longcat_sim.train.world import World, check_nproc, current_world


def check_compatible(cfg: ModelConfig, tc: TrainConfig) -> None:
    """One-line errors for settings this model cannot train with."""
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
    if cfg.target_ffn_experts <= 0:
        raise UserError("the FFN-expert target must be > 0 to train with the bias controller")
    if tc.balance_alpha > 0 and cfg.zero_expert_num and cfg.target_ffn_experts >= cfg.moe_topk:
        raise UserError(
            f"the balance loss needs a FFN-expert target < moe_topk={cfg.moe_topk}; lower "
            "--target-ffn-experts or set balance_alpha=0"
        )


def build_model(
    cfg: ModelConfig, tc: TrainConfig
) -> tuple[LongcatFlashForCausalLM, torch.optim.AdamW]:
    """Model drawn from the ``init`` seed stream and its AdamW (Table 1 transfer if asked); with
    ``expert_checksums`` the experts' checksums follow the weights through every AdamW step."""
    generator = torch.Generator().manual_seed(derive_seeds(tc.seed)["init"])
    model = LongcatFlashForCausalLM(cfg, generator=generator)
    lrs: float | dict[str, float] = tc.lr
    if tc.proxy_width:
        proxy = uniform_hyperparameters(tc.lr, cfg.initializer_range)
        hyper = transfer_hyperparameters(proxy, tc.proxy_width, cfg.hidden_size)
        initialize_parameters(model, hyper, generator)
        encode_checksums(model)  # the weights were drawn again
        lrs = {group: h.lr for group, h in hyper.items()}
    model.train()
    optimizer = build_adamw(
        model,
        lrs,  # type: ignore[arg-type]
        weight_decay=tc.weight_decay,
        betas=(tc.beta1, tc.beta2),
        eps=tc.adam_eps,
    )
    if cfg.expert_checksums:
        keep_checksums(model, optimizer)
    return model, optimizer


def trained_config(model_cfg: ModelConfig, tc: TrainConfig) -> ModelConfig:
    """The model config the trainer builds: ``model_cfg``, made deterministic when asked."""
    return deterministic_config(model_cfg) if tc.deterministic else model_cfg


def grow_source(
    checkpoint: str | Path, model_cfg: ModelConfig, steps: int
) -> tuple[Path, dict[str, Any]]:
    """The checkpoint a run grows from (a checkpoint folder, or a run directory's latest) and its
    trainer state: its files match their recorded SHA-256, it stacks into the depth of
    ``model_cfg`` (a :func:`trained_config`) and it lies before ``steps``; one line of
    UserError otherwise. Cheap next to training, so a command checks it before any process."""
    path = ckpt.resolve_checkpoint(checkpoint)
    ckpt.verify_checkpoint(path)
    state = ckpt.read_checkpoint_state(path)
    ckpt.check_growable(state["model_config"], model_cfg)
    step = int(state["step"])
    if step >= steps:
        raise UserError(f"the checkpoint is at step {step}; the grown run needs steps > {step}")
    return path, state


def load_data(cfg: ModelConfig, tc: TrainConfig, cache: str | Path | None) -> CorpusData:
    """The corpus a run trains on (tokenizer and tokens cached under ``cache``)."""
    return build_corpus_data(
        cfg.vocab_size,
        tc.seq_len,
        byte_budget=tc.byte_budget,
        val_fraction=tc.val_fraction,
        split_seed=tc.split_seed,
        cache_dir=cache,
    )


class Trainer:
    """One training run in ``run_dir`` on this process's rank of ``world`` (default: the
    initialised process group, or a world of one)."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        run_dir: str | Path,
        *,
        data: CorpusData | None = None,
        data_cache: str | Path | None = None,
        progress: bool | None = False,
        world: World | None = None,
        overlap: bool | tuple[bool, ...] = True,
        expert_parallel: bool | None = None,
    ) -> None:
        """``expert_parallel`` unset: the expert-parallel MoE (the same numerics at every
        world size) with the torch kernels, the model's own MoE with the Triton kernels, which
        run in one process only."""
        model_cfg = trained_config(model_cfg, train_cfg)
        self.model_cfg, self.tc, self.run_dir = model_cfg, train_cfg, Path(run_dir)
        self.world = world if world is not None else current_world()
        self.progress = progress if self.world.is_main else False
        self.seeds = derive_seeds(train_cfg.seed)
        check_compatible(model_cfg, train_cfg)
        check_nproc(self.world.size, model_cfg, train_cfg.batch_size, train_cfg.slice_size)
        self.data = data if data is not None else load_data(model_cfg, train_cfg, data_cache)
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
        self.model, self.optimizer = build_model(model_cfg, train_cfg)
        self.controller = BiasController(model_cfg, train_cfg.rate_schedule())
        if expert_parallel is None:
            expert_parallel = model_cfg.kernels == "torch"
        self.stepper = TrainStep(
            self.model, self.optimizer, self.controller, train_cfg, self.world,
            overlap=overlap, expert_parallel=expert_parallel,
        )  # fmt: skip
        self.metrics = MetricsLog(self.run_dir)
        self.step = 0
        self.grown_from: str | None = None
        self.guard: Any = None  # train/guard.py SdcGuard, when the run is guarded
        self.stopped: str | None = None  # why the guard stopped the run early

    @property
    def routers(self) -> list[torch.nn.Module]:
        return self.stepper.routers

    @property
    def metrics_path(self) -> Path:
        return self.metrics.path

    def read_metrics(self) -> list[dict[str, Any]]:
        return self.metrics.read()

    # -- state transfer ------------------------------------------------------------------------
    def load_checkpoint(self, checkpoint: str | Path) -> None:
        """Continue from ``checkpoint`` (written at any world size)."""
        path = Path(checkpoint)
        marker = ckpt.verify_checkpoint(path)
        state = ckpt.read_checkpoint_state(path)
        ckpt.check_resumable(state, self.model_cfg, self.tc, path)
        self.model.load_state_dict(load_pretrained(path).state_dict())
        ckpt.check_param_hash(self.model, marker, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.controller.load_state_dict(state["bias_controller"])
        self.step = int(state["step"])
        self.grown_from = state.get("grown_from")
        self.model.train()

    def grow_from(self, checkpoint: str | Path) -> None:
        """Start from a shallower checkpoint stacked into this model's depth (spec §3.4); the
        step counter (hence the data position and LR schedule) and the controller carry on."""
        path, state = grow_source(checkpoint, self.model_cfg, self.tc.steps)
        ckpt.grow_into(path, state, self.model, self.optimizer, self.controller)
        self.step = int(state["step"])
        self.grown_from = str(path)

    def save_checkpoint(self) -> Path:
        """Rank 0 writes ``checkpoints/step-N`` atomically; every rank waits for it."""
        path = self.run_dir / ckpt.CHECKPOINTS_DIR / ckpt.step_name(self.step)
        if self.world.is_main:
            state = {
                "step": self.step,
                "model_config": self.model_cfg.to_dict(),
                "train_config": self.tc.to_dict(),
                "optimizer": self.optimizer.state_dict(),
                "bias_controller": self.controller.state_dict(),
                "data": {"seed": self.seeds["data"], "next_step": self.step},
                "rng": None,  # training draws no random numbers: batches are pure in (seed, step)
                "grown_from": self.grown_from,
                "nproc": self.world.size,
            }
            path = ckpt.write_checkpoint(self.run_dir, self.model, state, self.tc.keep_checkpoints)
        self.world.barrier()
        return path

    # -- steps ---------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """One optimizer step and bias update; returns the step's metrics record."""
        inputs, targets = self.data.dataset.batch_at(
            self.step, self.tc.batch_size, self.seeds["data"]
        )
        record = self.stepper.train_step(
            self.step, torch.from_numpy(inputs), torch.from_numpy(targets)
        )
        self.step += 1
        return record

    def _eval_batches(self):
        limit = self.tc.eval_batches or None
        return self.data.dataset.eval_batches(self.tc.batch_size, limit)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token cross-entropy (nats/token) over the first ``eval_batches`` batches
        of validation windows (the same windows every time, on every rank)."""
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
        if not math.isfinite(total):
            raise UserError(
                f"training diverged by step {self.step} (validation loss {total / count}); "
                "lower --lr or raise --adam-eps or warmup_steps"
            )
        return total / count

    # -- the loop ------------------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> TrainSummary:
        """Train from ``self.step`` to ``tc.steps`` (or ``stop_after``), then evaluate and save."""
        tc = self.tc
        end = tc.steps if stop_after is None else min(stop_after, tc.steps)
        start_step = self.step
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale(self.run_dir)
            if self.metrics.truncate(self.step):
                print(
                    f"warning: {self.metrics.path.name}: dropped a torn last line (an "
                    "interrupted write); the records up to it are kept",
                    file=sys.stderr,
                )
        self.world.barrier()
        tokens, seconds, val_loss = 0, 0.0, math.nan
        bar = tqdm(
            total=tc.steps, initial=start_step, desc="train", unit="step", file=sys.stderr,
            disable=None if self.progress is None else not self.progress, dynamic_ncols=True,
        )  # fmt: skip
        log = self.metrics.path.open("a") if self.world.is_main else None
        try:
            while self.step < end:
                record = self.guard.step() if self.guard is not None else self.train_step()
                tokens += record["tokens"]
                seconds += record["step_seconds"]
                if self.step % tc.eval_every == 0 or self.step == end:
                    val_loss = record["val_loss"] = self.evaluate()
                if log is not None:
                    log.write(json.dumps(record, sort_keys=True) + "\n")
                    log.flush()
                if "sdc_stop" in record:  # the guard's stop policy: end here, state kept
                    self.stopped = record["sdc_stop"]
                    break
                if self.step % tc.checkpoint_every == 0 and self.step != end:
                    self.save_checkpoint()
                bar.update(1)
                bar.set_postfix(
                    loss=f"{record['lm_loss']:.3f}",
                    ffn=f"{np.mean(record['ffn_experts_mean']):.2f}",
                    refresh=False,
                )
        finally:
            bar.close()
            if log is not None:
                log.close()
        return self._finish(start_step, val_loss, tokens / seconds if seconds else 0.0)

    def _finish(self, start_step: int, val_loss: float, tokens_per_s: float) -> TrainSummary:
        """Evaluate a run that made no step, write its last checkpoint (unless resumed at the
        end: the checkpoint then holds this state already) and summarise it."""
        if start_step == self.step:
            val_loss = self.evaluate()
        latest = ckpt.latest_checkpoint(self.run_dir)
        self.world.barrier()
        if (
            start_step == self.step
            and latest is not None
            and latest.name == ckpt.step_name(self.step)
        ):
            checkpoint = latest
        else:
            checkpoint = self.save_checkpoint()
        return self._summary(start_step, val_loss, tokens_per_s, checkpoint)

    def _summary(
        self, start_step: int, val_loss: float, tokens_per_s: float, checkpoint: Path
    ) -> TrainSummary:
        records = self.metrics.read()
        window = records[-self.tc.stats_window :]
        layers = self.model_cfg.num_layers
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
            avg_ffn_experts_per_token=window_means(window, "ffn_experts_mean", layers),
            ffn_experts_std_per_token=window_means(window, "ffn_experts_std", layers),
            target_ffn_experts=self.model_cfg.target_ffn_experts,
            stats_window=len(window),
            tokens_per_s=tokens_per_s,
            param_hash=parameter_hash(self.model),
            checkpoint=str(checkpoint),
            nproc=self.world.size,
            data=dict(self.data.fingerprint),
            grown_from=self.grown_from,
            sdc_guard=self.guard.summary() if self.guard is not None else None,
            stopped=self.stopped,
        )
