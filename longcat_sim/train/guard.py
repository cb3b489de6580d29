"""The silent-data-corruption guard of a training run (``train --sdc-guard``).

Online detectors run inside every step of the real model:

- ``abft``: checksums of every expert GEMM and of the combine (``model/abft.py``), against the
  encoding the expert weights carry when the model is built with ``expert_checksums``
  (:func:`guarded_config`), refreshed after every optimizer step;
- ``recompute``: one sampled expert block per MoE call recomputed and compared bit for bit;
- ``validators``: the loss and the gradient norm must be finite and within ``spike_factor`` of
  the median of the recent clean steps; routing ids must name experts and the per-expert counts
  must be the ids' histogram; a step that raises is suspicious too;
- ``at_rest``: parameters, buffers and optimizer state must still equal the snapshot taken
  right after the previous step;
- ``grad_digest`` (several ranks): every rank's reduced dense gradients must have one digest; a
  rank that disagrees with the others is named.

On an alarm the step is replayed from the snapshot, in the manner of Megatron-LM's rerun state
machine: on the same device (a different result: a **transient** fault), then on another one
(a different result: a **persistent** fault of the first device), else the result stands
(**genuine**: data-driven, e.g. a real loss spike). Replays compare digests of the whole state
after the step, so the run must be deterministic. A single process simulates the devices: an
injected fault (``longcat_sim/repro/inject.py``) knows which device it lives on.

Policies: ``continue`` (keep the clean result: the replay's, or the original when genuine),
``skip`` (drop the step's update, move on to the next batch) and ``stop`` (restore the state
before the step and stop the run). Every event is kept in the step's ``metrics.jsonl`` record
under ``sdc_events``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from longcat_sim.errors import UserError
from longcat_sim.model.abft import AbftProbe, CheckTally, RecomputeProbe, moe_layers
from longcat_sim.model.balance import find_routers
from longcat_sim.model.config import ModelConfig
from longcat_sim.model.experts import encode_checksums
from longcat_sim.model.hashing import update_digest as hash_update
from longcat_sim.model.probes import add_probe, remove_probe

POLICIES = ("continue", "skip", "stop")
DETECTORS = ("abft", "recompute", "validators", "at_rest", "grad_digest")
TRANSIENT, PERSISTENT, GENUINE = "transient", "persistent", "genuine"
ATTRIBUTIONS = (TRANSIENT, PERSISTENT, GENUINE)


class StepFaults(Protocol):
    """Faults planted into a guarded run (a negative control); see ``repro/inject.py``."""

    def begin_step(self, step: int, device: int) -> None: ...


@dataclass(frozen=True)
class GuardSettings:
    policy: str = "continue"
    spike_factor: float = 10.0
    window: int = 32
    min_history: int = 8
    recompute_experts: int = 1
    seed: int = 0
    device: int = 0
    other_device: int = 1
    detectors: tuple[str, ...] = DETECTORS  # which online detectors run

    def __post_init__(self) -> None:
        unknown = sorted(set(self.detectors) - set(DETECTORS))
        if unknown:
            raise ValueError(f"unknown guard detectors {unknown}; choose from {DETECTORS}")
        if self.policy not in POLICIES:
            raise UserError(
                f"--sdc-policy must be one of {', '.join(POLICIES)}, got {self.policy!r}"
            )


def guarded_config(model_cfg: ModelConfig, settings: GuardSettings | None) -> ModelConfig:
    """The model config a run guarded with ``settings`` builds: its expert weights carry the
    checksums the ``abft`` detector verifies."""
    if settings is None or "abft" not in settings.detectors or model_cfg.expert_checksums:
        return model_cfg
    return dataclasses.replace(model_cfg, expert_checksums=True)


class Snapshot:
    """A copy of everything a step reads and writes: parameters, buffers, optimizer and bias
    controller state, the step counter. Tensors are copied into buffers kept from one snapshot
    to the next; the optimizer's whole state is deep-copied only when its layout changes (at
    its first step)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.copies: list[torch.Tensor] = []
        self.optimizer: dict[str, Any] = {}
        self.controller: Any = None
        self.step = 0
        self._listed: tuple[Any, list[str], list[torch.Tensor], tuple] | None = None

    def _live(self, trainer: Any) -> tuple[list[str], list[torch.Tensor]]:
        """Names and tensors of the live state. Kept from call to call while the model, the
        optimizer and each parameter's optimizer state are the same objects (AdamW updates its
        tensors in place); a restore, or a state replaced or added, lists them again."""
        optimizer = trainer.optimizer
        key = (id(trainer.model), id(optimizer), *map(id, optimizer.state.values()))
        if self._listed is not None and self._listed[0] == key:
            return self._listed[1], self._listed[2]
        model = trainer.model
        names, tensors = [], []
        for name, value in (*model.named_parameters(), *model.named_buffers()):
            names.append(name)
            tensors.append(value)
        for index, param in enumerate(model.parameters()):
            state = optimizer.state.get(param)
            for key_name, value in (state or {}).items():
                if isinstance(value, torch.Tensor):
                    names.append(f"optimizer.{index}.{key_name}")
                    tensors.append(value)
        # the key's objects stay referenced with it, so that none of their ids is reused
        self._listed = (key, names, tensors, (model, optimizer, *optimizer.state.values()))
        return names, tensors

    @torch.no_grad()
    def take(self, trainer: Any) -> None:
        names, tensors = self._live(trainer)
        if names == self.names:
            torch._foreach_copy_(self.copies, tensors)
        else:
            self.names, self.copies = names, [t.detach().clone() for t in tensors]
            self.optimizer = copy.deepcopy(trainer.optimizer.state_dict())
        self.controller = copy.deepcopy(trainer.controller.state_dict())
        self.step = trainer.step

    @torch.no_grad()
    def restore(self, trainer: Any) -> None:
        self._listed = None
        names, tensors = self._live(trainer)
        if names != self.names:
            trainer.optimizer.load_state_dict(copy.deepcopy(self.optimizer))
            self._listed = None
            names, tensors = self._live(trainer)
        torch._foreach_copy_(tensors, self.copies)
        trainer.controller.load_state_dict(copy.deepcopy(self.controller))
        trainer.step = self.step

    def changed(self, trainer: Any) -> list[str]:
        """Names of the state tensors that no longer equal the snapshot."""
        names, tensors = self._live(trainer)
        if names != self.names:
            return ["optimizer state layout"]
        return [
            n for n, t, c in zip(names, tensors, self.copies, strict=True) if not torch.equal(t, c)
        ]


@dataclass
class SpikeValidator:
    """A value is suspicious when it is not finite or exceeds ``factor`` times the median of
    the recent clean values (once ``min_history`` of them are known)."""

    factor: float = 10.0
    window: int = 32
    min_history: int = 8
    history: list[float] = field(default_factory=list)

    def suspicious(self, value: float) -> bool:
        if not math.isfinite(value):
            return True
        if len(self.history) < self.min_history:
            return False
        recent = sorted(abs(v) for v in self.history[-self.window :])
        return abs(value) > self.factor * max(recent[len(recent) // 2], 1e-30)

    def observe(self, value: float) -> None:
        self.history.append(value)
        del self.history[: -self.window]


class RoutingValidator:
    """Forward hook on routers: ids must name one of the N + Z experts and the counts must be
    the ids' histogram."""

    def __init__(self, tally: CheckTally) -> None:
        self.tally = tally

    def __call__(self, module: Any, _inputs: Any, output: Any) -> None:
        ids, counts = output.topk_idx_TK, output.counts_E
        experts = counts.shape[0]
        in_range = bool(((ids >= 0) & (ids < experts)).all())
        self.tally.checks += 1
        histogram = torch.bincount(ids.clamp(0, experts - 1).reshape(-1), minlength=experts)
        if not (in_range and torch.equal(histogram.to(counts.dtype), counts)):
            self.tally.alarms += 1
            self.tally.where.append("routing")


def state_digest(trainer: Any, record: dict[str, Any] | None, error: str | None) -> str:
    """SHA-256 of the state after a step (parameters, buffers, optimizer and controller state)
    and its loss; a step that raised digests its error."""
    if record is None:
        return "error:" + hashlib.sha256(str(error).encode()).hexdigest()
    digest = hashlib.sha256(repr(record.get("loss")).encode())
    for name, value in trainer.model.state_dict().items():
        hash_update(digest, name, value)
    for index, state in sorted(trainer.optimizer.state_dict()["state"].items()):
        for key, value in sorted(state.items()):
            if isinstance(value, torch.Tensor):
                hash_update(digest, f"opt.{index}.{key}", value)
    for key, value in sorted(trainer.controller.state_dict().items()):
        if isinstance(value, torch.Tensor):
            hash_update(digest, f"controller.{key}", value)
    return digest.hexdigest()


def disagreeing_ranks(world: Any, params: list[torch.nn.Parameter]) -> list[int]:
    """The ranks whose gradients of ``params`` have another digest than the largest group of
    equal ones, or every rank when no group is larger than the others (the same list on every
    rank)."""
    digest = hashlib.sha256()
    for i, p in enumerate(params):
        if p.grad is not None:
            hash_update(digest, str(i), p.grad)
    words = torch.frombuffer(bytearray(digest.digest()), dtype=torch.int64).clone()
    every = [tuple(row.tolist()) for row in world.gather_rows(words)]
    groups: dict[tuple, list[int]] = {}
    for rank, value in enumerate(every):
        groups.setdefault(value, []).append(rank)
    if len(groups) == 1:
        return []
    sizes = sorted((len(g) for g in groups.values()), reverse=True)
    largest = max(groups.values(), key=len)
    return [r for r in range(world.size) if sizes[0] == sizes[1] or r not in largest]


@dataclass
class Outcome:
    """A step's result: its record, or the error it raised; ``digest`` of the state after it
    (taken when asked for, before the state moves on)."""

    record: dict[str, Any] | None
    error: str | None
    digest: str = ""
    exception: BaseException | None = None


def moe_probes(
    model: Any, settings: GuardSettings, tallies: dict[str, CheckTally]
) -> list[tuple[Any, Any]]:
    """``(MoE layer, probe)`` for the ``abft`` and ``recompute`` detectors of ``settings``; the
    expert weights' checksums are encoded from the weights as they are now (loaded, grown)."""
    on, layers = set(settings.detectors), moe_layers(model)
    if "abft" in on and not all(moe.experts.expert_checksums for _, moe in layers):
        raise ValueError(
            "the abft detector needs expert weights that carry checksums: build the model "
            "from guarded_config(model_cfg, settings)"
        )
    encode_checksums(model)
    probes: list[tuple[Any, Any]] = []
    for index, (_, moe) in enumerate(layers):
        if "abft" in on:
            probes.append((moe, AbftProbe(moe.experts, index, tallies["abft"])))
        if "recompute" in on:
            recompute = RecomputeProbe(
                index, tallies["recompute"], settings.seed, settings.recompute_experts
            )
            probes.append((moe, recompute))
    return probes


class SdcGuard:
    """Guards every step of ``trainer`` (:meth:`step` replaces ``trainer.train_step``)."""

    def __init__(
        self, trainer: Any, settings: GuardSettings | None = None, faults: StepFaults | None = None
    ) -> None:
        self.trainer, self.settings, self.faults = trainer, settings or GuardSettings(), faults
        on = set(self.settings.detectors)
        self.tallies = {name: CheckTally() for name in ("abft", "recompute", "routing")}
        self._handles: list[Any] = []
        self._probes = moe_probes(trainer.model, self.settings, self.tallies)
        for moe, probe in self._probes:
            add_probe(moe, probe)
        if "validators" in on:
            routing = RoutingValidator(self.tallies["routing"])
            self._handles += [r.register_forward_hook(routing) for r in find_routers(trainer.model)]
        spike = (self.settings.spike_factor, self.settings.window, self.settings.min_history)
        self.loss_check, self.grad_check = SpikeValidator(*spike), SpikeValidator(*spike)
        self.grad_digests: list[str] = []
        self.changed_ranks: list[int] = []
        if "grad_digest" in on:
            trainer.stepper.gradient_hooks.append(self._gradient_digest)
        self.snapshot = Snapshot()
        self.snapshot.take(trainer)
        self.steps = self.clean_steps = 0
        self.events: list[dict[str, Any]] = []
        self.seconds = {"guard": 0.0, "replay": 0.0}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        for moe, probe in self._probes:
            remove_probe(moe, probe)
        if self._gradient_digest in self.trainer.stepper.gradient_hooks:
            self.trainer.stepper.gradient_hooks.remove(self._gradient_digest)

    # -- one step --------------------------------------------------------------------------------
    def _gradient_digest(self) -> None:
        """Cross-check the reduced dense gradients' digest over the ranks (they must agree)."""
        world = self.trainer.world
        if world.distributed:
            odd = disagreeing_ranks(world, self.trainer.stepper.dense)
            self.grad_digests.extend(f"rank {r}" for r in odd)

    def execute(self, device: int, *, digest: bool = True) -> tuple[Outcome, dict[str, Any]]:
        """Execute the step on simulated ``device`` from the current state: the faults of the
        step planted, the state checked against the snapshot, then the step; returns its
        outcome (with the state's digest unless ``digest`` is false) and the alarms it raised
        (detector -> what it saw)."""
        before, self.grad_digests = self._counts(), []
        if self.faults is not None:
            self.faults.begin_step(self.trainer.step, device)
        at_rest = (
            self.snapshot.changed(self.trainer) if "at_rest" in self.settings.detectors else []
        )
        try:
            outcome = Outcome(self.trainer.train_step(), None)
        except Exception as exc:  # a corrupted step may fail anywhere; the failure is its result
            if self.trainer.world.distributed:
                raise  # its peers may wait in a collective: the run stops (launch's one line)
            outcome = Outcome(None, f"{type(exc).__name__}: {exc}", exception=exc)
        if digest:
            outcome.digest = state_digest(self.trainer, outcome.record, outcome.error)
        return outcome, self._alarms(outcome, before, at_rest)

    def _counts(self) -> dict[str, int]:
        return {name: tally.alarms for name, tally in self.tallies.items()}

    def _alarms(self, outcome: Outcome, before: dict[str, int], at_rest: list[str]) -> dict:
        """Detector -> what it saw, for this step."""
        after = self._counts()
        alarms: dict[str, Any] = {}
        for name in ("abft", "recompute"):
            if after[name] > before[name]:
                alarms[name] = self.tallies[name].where[-1]
        checks = []
        if after["routing"] > before["routing"]:
            checks.append("routing")
        if outcome.record is None:
            checks.append(f"step failed: {outcome.error}")
        elif "validators" in self.settings.detectors:
            if self.loss_check.suspicious(float(outcome.record["loss"])):
                checks.append(f"loss {outcome.record['loss']:.6g}")
            if self.grad_check.suspicious(float(outcome.record["grad_norm"])):
                checks.append(f"grad_norm {outcome.record['grad_norm']:.6g}")
        if checks:
            alarms["validators"] = "; ".join(checks)
        if at_rest:
            alarms["at_rest"] = ", ".join(at_rest[:3]) + (" ..." if len(at_rest) > 3 else "")
        if self.grad_digests:
            alarms["grad_digest"] = "disagreeing: " + ", ".join(sorted(set(self.grad_digests)))
        return alarms

    def _agreed(self, flag: bool) -> bool:
        """Whether any rank raised ``flag`` (every rank must take the same branch)."""
        world = self.trainer.world
        if not world.distributed:
            return flag
        return bool(world.gather_rows(torch.tensor([int(flag)])).any())

    def step(self) -> dict[str, Any]:
        """One guarded training step; returns its metrics record (with ``sdc_events`` when an
        alarm was raised)."""
        start = time.perf_counter()
        step = self.trainer.step
        self.steps += 1
        outcome, alarms = self.execute(self.settings.device, digest=False)
        if not self._agreed(bool(alarms)):
            assert outcome.record is not None
            self.accept(outcome.record)
            self.clean_steps += 1
            self.seconds["guard"] += time.perf_counter() - start
            return outcome.record
        outcome.digest = state_digest(self.trainer, outcome.record, outcome.error)
        return self._handle(step, outcome, alarms)

    # -- after an alarm --------------------------------------------------------------------------
    def accept(self, record: dict[str, Any]) -> None:
        """A clean step: its loss and gradient norm join the validators' history and its
        state becomes the snapshot the next step is checked against and replayed from."""
        self.loss_check.observe(float(record["loss"]))
        self.grad_check.observe(float(record["grad_norm"]))
        self.snapshot.take(self.trainer)

    def adopt(self) -> None:
        """The current state, however it was reached, as the clean reference: the snapshot
        and the weights' checksums taken from it."""
        encode_checksums(self.trainer.model)
        self.snapshot.take(self.trainer)

    def restore(self) -> None:
        """Back to the snapshot, the weights' checksums with them (buffers it holds)."""
        self.snapshot.restore(self.trainer)

    def _replay(self, device: int) -> tuple[Outcome, bool]:
        self.restore()
        outcome, alarms = self.execute(device)
        return outcome, self._agreed(bool(alarms))

    def _differ(self, a: Outcome, b: Outcome) -> bool:
        """Whether the outcomes differ on any rank (the ranks where they do: ``changed_ranks``)."""
        world = self.trainer.world
        flag = int(a.digest != b.digest)
        flags = world.gather_rows(torch.tensor([flag])).view(-1).tolist()
        self.changed_ranks = [r for r, f in enumerate(flags) if f]
        return bool(self.changed_ranks)

    def attribute(self, original: Outcome) -> tuple[str, Outcome]:
        """Replay the step from the snapshot on the same device, then on the other one; the
        outcome kept is the first that differs from the original and raises no alarm (a replay
        that still alarms, under two faults at once, goes on to the other device)."""
        start = time.perf_counter()
        settings = self.settings
        try:
            same, same_alarms = self._replay(settings.device)
            if self._differ(same, original):
                if not same_alarms:
                    return TRANSIENT, same
                other, other_alarms = self._replay(settings.other_device)
                if not other_alarms and self._differ(other, same):
                    return PERSISTENT, other
                same, _ = self._replay(settings.device)
                return TRANSIENT, same
            other, _ = self._replay(settings.other_device)
            if self._differ(other, original):
                return PERSISTENT, other
            return GENUINE, other
        finally:
            self.seconds["replay"] += time.perf_counter() - start

    def _every_rank(self, alarms: dict[str, Any]) -> dict[str, Any]:
        """The alarms of every rank (a rank's own prefixed ``rank N``, when several)."""
        world = self.trainer.world
        if not world.distributed:
            return alarms
        merged: dict[str, Any] = {}
        for rank, theirs in enumerate(world.gather_objects(alarms)):
            for detector, seen in theirs.items():  # type: ignore[union-attr]
                merged.setdefault(detector, []).append(f"rank {rank}: {seen}")
        return {d: "; ".join(v) for d, v in merged.items()}

    def _handle(self, step: int, outcome: Outcome, alarms: dict[str, Any]) -> dict[str, Any]:
        alarms = self._every_rank(alarms)
        attribution, clean = self.attribute(outcome)
        policy = self.settings.policy
        event = {
            "step": step,
            "detectors": sorted(alarms),
            "alarms": alarms,
            "attribution": attribution,
            "action": policy,
            "ranks": list(self.changed_ranks) if attribution != GENUINE else [],
            "original_digest": outcome.digest[:16],
            "replay_digest": clean.digest[:16],
        }
        self.events.append(event)
        if clean.record is None:  # the clean execution fails too: a genuine failure
            assert clean.exception is not None
            raise clean.exception
        record = dict(clean.record)
        record["sdc_events"] = [event]
        if policy == "continue":
            self.snapshot.take(self.trainer)
        else:
            self.restore()
            if policy == "skip":
                self.trainer.step = step + 1
                self.snapshot.step = step + 1
                record["sdc_skipped"] = True
            else:
                record["sdc_stop"] = (
                    f"SDC guard stopped the run at step {step}: {attribution} event "
                    f"({', '.join(sorted(alarms))}); the state before the step is kept"
                )
        return record

    def summary(self) -> dict[str, Any]:
        """What the guard checked and found over the run (the train results' ``sdc_guard``)."""
        by = {a: sum(e["attribution"] == a for e in self.events) for a in ATTRIBUTIONS}
        unfired = getattr(self.faults, "unfired", lambda: [])()
        return {
            "planted_unfired": [dataclasses.asdict(f) for f in unfired],
            "policy": self.settings.policy,
            "steps": self.steps,
            "clean_steps": self.clean_steps,
            "alarmed_steps": len(self.events),
            "attribution": by,
            "abft_checks": self.tallies["abft"].checks,
            "abft_alarms": self.tallies["abft"].alarms,
            "abft_worst_ratio": self.tallies["abft"].worst_ratio,
            "recompute_checks": self.tallies["recompute"].checks,
            "routing_checks": self.tallies["routing"].checks,
            "guard_seconds": self.seconds["guard"],
            "replay_seconds": self.seconds["replay"],
        }


def guarded(trainer: Any, settings: GuardSettings, faults: StepFaults | None = None) -> Callable:
    """Attach a guard to ``trainer`` (its loop then calls the guard's step). Rank r runs on
    simulated device r and replays on device r + world size, which no rank runs on."""
    world = trainer.world
    settings = dataclasses.replace(
        settings, device=world.rank, other_device=world.rank + world.size
    )
    guard = SdcGuard(trainer, settings, faults)
    trainer.guard = guard
    return guard.step
