"""Per-step SHA-256 fingerprints of a training run, in the order the values were computed.

One :class:`StepFingerprint` per training step lists :class:`Entry` records ``(module, tensor,
digest)``:

1. activations: every submodule's output (forward hooks), in the order the modules finished;
   a module called twice in a step gets ``output#1`` for its second call;
2. the loss terms and the gradient norm of the step (float64 bytes);
3. gradients (``grad.NAME``), in reverse parameter order, roughly the order backward made them;
4. parameters after the update (``param.NAME``) and persistent buffers (``buffer.NAME``);
5. optimizer state (``state.KEY.NAME``).

Digests come from :func:`longcat_sim.model.hashing.tensor_hash`, so two entries agree only when
the tensors are bitwise equal with the same dtype and shape. :func:`fingerprint_run` trains a
fresh run step by step and returns the stream; with ``capture`` it also keeps the raw tensor of
one entry, which is how :mod:`longcat_sim.repro.compare` measures a divergence in ULPs.

``python -m longcat_sim.repro.fingerprint SPEC.json OUT.pt`` runs one :class:`RunSpec` in a
fresh process (what ``longcat-sim determinism`` launches).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import struct
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from longcat_sim.model.hashing import tensor_hash

# record fields of Trainer.train_step that are results of the step (not timings)
LOSS_FIELDS = ("loss", "lm_loss", "mtp_loss", "balance_loss", "z_loss", "grad_norm")


@dataclass(frozen=True)
class Entry:
    """One fingerprinted value: the module it belongs to, which tensor, its SHA-256."""

    module: str
    tensor: str
    digest: str

    @property
    def key(self) -> tuple[str, str]:
        return self.module, self.tensor


@dataclass(frozen=True)
class StepFingerprint:
    step: int
    entries: tuple[Entry, ...]

    @property
    def digest(self) -> str:
        """SHA-256 over the whole step (entry keys and digests, in order)."""
        h = hashlib.sha256()
        for e in self.entries:
            h.update(f"{e.module}|{e.tensor}|{e.digest}\n".encode())
        return h.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "entries": [[e.module, e.tensor, e.digest] for e in self.entries],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepFingerprint:
        return cls(int(data["step"]), tuple(Entry(*row) for row in data["entries"]))


def split_name(qualified: str) -> tuple[str, str]:
    """``"a.b.weight"`` -> ``("a.b", "weight")``; a top-level name has module ``""``."""
    module, _, leaf = qualified.rpartition(".")
    return module, leaf


def flatten_output(value: Any, label: str = "output") -> Iterator[tuple[str, torch.Tensor]]:
    """(label, tensor) for every tensor inside a module output (tuples, lists, dataclasses)."""
    if isinstance(value, torch.Tensor):
        yield label, value
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from flatten_output(item, f"{label}[{i}]")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from flatten_output(getattr(value, f.name), f"{label}.{f.name}")


def value_digest(value: float) -> str:
    return hashlib.sha256(struct.pack("<d", float(value))).hexdigest()


class ActivationRecorder:
    """Forward hooks hashing every submodule's output while active (a context manager).

    ``capture`` names ``(module, tensor)`` keys whose tensors are also kept (cloned).
    """

    def __init__(self, model: nn.Module, *, capture: Iterable[tuple[str, str]] = ()) -> None:
        self.model = model
        self.capture = set(capture)
        self.entries: list[Entry] = []
        self.captured: dict[tuple[str, str], torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._handles: list[Any] = []

    def _hook(self, name: str):
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            for label, tensor in flatten_output(output):
                tag = label if call == 0 else f"{label}#{call}"
                self.entries.append(Entry(name, tag, tensor_hash(tensor)))
                if (name, tag) in self.capture:
                    self.captured[(name, tag)] = tensor.detach().clone()

        return record

    def __enter__(self) -> ActivationRecorder:
        for name, module in self.model.named_modules():
            if name:
                self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def state_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(module, tensor label, tensor) for gradients, parameters, buffers and optimizer state."""
    params = list(model.named_parameters())
    for name, p in reversed(params):
        if p.grad is not None:
            module, leaf = split_name(name)
            yield module, f"grad.{leaf}", p.grad
    for name, p in params:
        module, leaf = split_name(name)
        yield module, f"param.{leaf}", p
    persistent = model.state_dict(keep_vars=True)
    for name, buf in model.named_buffers():
        if name in persistent:
            module, leaf = split_name(name)
            yield module, f"buffer.{leaf}", buf
    if optimizer is not None:
        for name, p in params:
            module, leaf = split_name(name)
            for key, value in sorted(optimizer.state.get(p, {}).items()):
                if isinstance(value, torch.Tensor):
                    yield module, f"state.{key}.{leaf}", value


def fingerprint_step(
    trainer: Any,
    *,
    capture: Iterable[tuple[str, str]] = (),
    after_step: Callable[[], None] | None = None,
) -> tuple[StepFingerprint, dict[tuple[str, str], torch.Tensor], dict[str, Any] | None]:
    """Run ``trainer.train_step()``, then ``after_step()`` (e.g. a fault landing in the updated
    state) before the state is fingerprinted; returns (fingerprint, captured, record).

    A step that raises (e.g. a diverged loss) ends its fingerprint with an ``error`` entry
    after the activations recorded so far, and the record is None.
    """
    step = trainer.step
    wanted = set(capture)
    with ActivationRecorder(trainer.model, capture=wanted) as recorder:
        try:
            record = trainer.train_step()
        except Exception as exc:  # the failure itself is the fingerprint
            record = None
            failure = f"{type(exc).__name__}: {exc}"
    entries = list(recorder.entries)
    captured = dict(recorder.captured)
    if record is None:
        digest = hashlib.sha256(failure.encode()).hexdigest()
        entries.append(Entry("<step>", "error", digest))
        return StepFingerprint(step, tuple(entries)), captured, None
    if after_step is not None:
        after_step()
    losses = {name: record[name] for name in LOSS_FIELDS if name in record}
    add_losses_and_state(entries, captured, wanted, losses, trainer.model, trainer.optimizer)
    return StepFingerprint(step, tuple(entries)), captured, record


def add_losses_and_state(
    entries: list[Entry],
    captured: dict[tuple[str, str], torch.Tensor],
    wanted: set[tuple[str, str]],
    losses: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
) -> None:
    """Append a step's loss values and then its state (:func:`state_tensors`) to ``entries``,
    keeping a copy of the ``wanted`` ones in ``captured``."""
    for name, value in losses.items():
        entries.append(Entry("loss", name, value_digest(value)))
        if ("loss", name) in wanted:
            captured[("loss", name)] = torch.tensor(float(value), dtype=torch.float64)
    for module, label, tensor in state_tensors(model, optimizer):
        entries.append(Entry(module, label, tensor_hash(tensor)))
        if (module, label) in wanted:
            captured[(module, label)] = tensor.detach().clone()


# -- one run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One fingerprinted training run.

    ``train`` holds TrainConfig overrides (e.g. ``{"batch_size": 4}``); ``fault`` is an
    :class:`~longcat_sim.repro.inject.Fault` as a dict (a deliberate difference, for negative
    controls); ``capture`` is ``(step, module, tensor)`` of one entry to keep.
    """

    model: str = "tiny"
    steps: int = 10
    threads: int = 1
    deterministic: bool = True
    seed: int = 0
    train: dict[str, Any] = field(default_factory=dict)
    byte_budget: int = 2**19
    data_cache: str | None = None
    fault: dict[str, Any] | None = None
    capture: tuple[int, str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        return cls(**with_capture_tuple(data))


def with_capture_tuple(data: dict[str, Any]) -> dict[str, Any]:
    """A spec's fields read back from JSON: its ``capture`` (a list there) as the
    ``(step, module, tensor)`` tuple the spec holds."""
    data = dict(data)
    if data.get("capture") is not None:
        step, module, tensor = data["capture"]
        data["capture"] = (int(step), str(module), str(tensor))
    return data


@dataclass(frozen=True)
class RunRecord:
    fingerprints: list[StepFingerprint]
    manifest: dict[str, Any]
    losses: list[float]
    captured: torch.Tensor | None = None

    def to_payload(self) -> dict[str, Any]:
        return {
            "fingerprints": [f.to_dict() for f in self.fingerprints],
            "manifest": self.manifest,
            "losses": self.losses,
            "captured": self.captured,
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> RunRecord:
        return cls(
            [StepFingerprint.from_dict(f) for f in payload["fingerprints"]],
            payload["manifest"],
            list(payload["losses"]),
            payload.get("captured"),
        )


def spec_configs(spec: RunSpec) -> tuple[Any, Any]:
    """The (model config, train config) a spec's run trains with: deterministic model and
    settings when asked, no evaluation or checkpoint inside the run. The one definition both
    the run and ``longcat-sim determinism``'s up-front check use."""
    from longcat_sim.model.config import load_model_config
    from longcat_sim.model.determinism import deterministic_config
    from longcat_sim.train.config import default_train_config

    cfg = load_model_config(spec.model)
    if spec.deterministic:
        cfg = deterministic_config(cfg)
    overrides = {"steps": max(spec.steps, 1), "seed": spec.seed, **spec.train}
    overrides.setdefault("warmup_steps", min(overrides["steps"], 2))
    if spec.deterministic:
        overrides["deterministic"] = True
    overrides.update(eval_every=10**9, checkpoint_every=10**9, byte_budget=spec.byte_budget)
    return cfg, default_train_config(cfg).replace(**overrides)


def checked_spec_configs(spec: RunSpec) -> tuple[Any, Any]:
    """:func:`spec_configs`, checked with the trainer's own checks (and the data cache for
    writing), so a bad setting is one line before any run starts rather than a failure in
    every worker."""
    from longcat_sim.config.paths import check_output_dir
    from longcat_sim.errors import UserError
    from longcat_sim.train.training import check_compatible

    cfg, tc = spec_configs(spec)
    if tc.seq_len > cfg.max_position_embeddings:
        raise UserError(
            f"--seq-len {tc.seq_len} exceeds the model's max_position_embeddings "
            f"{cfg.max_position_embeddings}"
        )
    check_compatible(cfg, tc)
    if spec.data_cache is not None:
        check_output_dir(spec.data_cache, "--data-cache")
    return cfg, tc


def build_trainer(spec: RunSpec, run_dir: str | Path) -> Any:
    """The Trainer a spec describes (:func:`spec_configs`), in a world of one with the model's
    own modules running the MoE, so every module's output is hooked."""
    from longcat_sim.train import training

    cfg, tc = spec_configs(spec)
    data = training.load_data(cfg, tc, spec.data_cache)
    return training.Trainer(cfg, tc, run_dir, data=data, expert_parallel=False)


def fingerprint_run(spec: RunSpec) -> RunRecord:
    """Train ``spec.steps`` steps in this process and fingerprint each (threads set here)."""
    from longcat_sim.model.determinism import DeterministicMode
    from longcat_sim.repro.inject import Fault, ModelFaultInjector
    from longcat_sim.repro.manifest import environment_manifest

    previous = torch.get_num_threads()
    mode = DeterministicMode(threads=spec.threads) if spec.deterministic else None
    torch.set_num_threads(spec.threads)
    try:
        if mode is not None:
            mode.__enter__()
        with tempfile.TemporaryDirectory(prefix="fingerprint-") as run_dir:
            trainer = build_trainer(spec, run_dir)
            fault = Fault.from_dict(spec.fault) if spec.fault else None
            injector = ModelFaultInjector(trainer.model, fault) if fault else None
            fingerprints, losses, captured = [], [], None
            for _ in range(spec.steps):
                step = trainer.step
                keys = [spec.capture[1:]] if spec.capture and spec.capture[0] == step else []
                after = None
                if injector is not None:
                    injector.begin_step(step)
                    after = functools.partial(injector.end_step, trainer.optimizer)
                fp, got, record = fingerprint_step(trainer, capture=keys, after_step=after)
                fingerprints.append(fp)
                if keys and tuple(keys[0]) in got:
                    captured = got[tuple(keys[0])]
                if record is None:
                    losses.append(math.nan)
                    break
                losses.append(float(record["loss"]))
            if injector is not None:
                injector.close()
            manifest = environment_manifest(deterministic=spec.deterministic)
    finally:
        if mode is not None:
            mode.__exit__(None, None, None)
        torch.set_num_threads(previous)
    return RunRecord(fingerprints, manifest, losses, captured)


def main(argv: list[str] | None = None) -> int:
    """Worker entry: ``python -m longcat_sim.repro.fingerprint SPEC.json OUT.pt``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m longcat_sim.repro.fingerprint SPEC.json OUT.pt", file=sys.stderr)
        return 2
    spec = RunSpec.from_dict(json.loads(Path(args[0]).read_text()))
    record = fingerprint_run(spec)
    torch.save(record.to_payload(), args[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
