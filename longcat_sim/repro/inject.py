"""Bit-flip fault injection: flip bit ``b`` of element ``i`` of a tensor at a named site.

Sites (:data:`SITES`):

==================  ======================================================================
``weight``          a parameter at rest, flipped before the step reads it
``activation``      a module output (e.g. a dense FFN's or an attention's)
``expert_gemm``     an expert GEMM output (``target`` ``MOE:gate``, ``MOE:up`` or ``MOE:down``)
``combine``         the MoE combine output
``gradient``        a parameter gradient after backward, before the optimizer reads it
``optimizer_state`` an AdamW moment (at rest before a step, or right after the update)
``routing_indices`` the router's top-k expert ids (int64)
``routing_counts``  the router's tokens-per-expert counts (int64)
==================  ======================================================================

A :class:`Fault` is *transient* (fires once, at ``step``) or *persistent* (fires at every step
run on simulated device ``device``: a faulty chip). Bits count from the least significant:
for float32, 0-22 are the mantissa, 23-30 the exponent and 31 the sign.

:class:`ModelFaultInjector` places faults in a model's real training step through forward hooks,
gradient hooks and the MoE's probe points (``model/probes.py``): the determinism harness's
negative control, ``train --sdc-inject`` and the SDC campaign all use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from longcat_sim.errors import UserError
from longcat_sim.model.probes import GEMMS, CombineCall, MoEProbe, add_probe, remove_probe

SITES = (
    "weight",
    "activation",
    "expert_gemm",
    "combine",
    "gradient",
    "optimizer_state",
    "routing_indices",
    "routing_counts",
)
INT_SITES = ("routing_indices", "routing_counts")

_INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.int64: torch.int64,
    torch.int32: torch.int32,
    torch.int16: torch.int16,
}


def bit_width(dtype: torch.dtype) -> int:
    if dtype not in _INT_VIEW:
        raise ValueError(f"cannot flip bits of {dtype}; supported: {sorted(map(str, _INT_VIEW))}")
    return torch.iinfo(_INT_VIEW[dtype]).bits


def site_bits(site: str) -> int:
    """How many bits an element at ``site`` has (64 for routing ids and counts, else 32)."""
    return 64 if site in INT_SITES else 32


@torch.no_grad()
def flip_bit_(tensor: torch.Tensor, index: int, bit: int) -> torch.Tensor:
    """Flip bit ``bit`` of flat element ``index % numel`` of ``tensor`` in place; returns it."""
    width = bit_width(tensor.dtype)
    if not 0 <= bit < width:
        raise ValueError(f"bit {bit} is out of range for {tensor.dtype} ({width} bits)")
    if tensor.numel() == 0:
        raise ValueError("cannot flip a bit of an empty tensor")
    if not tensor.is_contiguous():
        raise ValueError("flip_bit_ needs a contiguous tensor")
    flat = tensor.view(-1).view(_INT_VIEW[tensor.dtype])
    mask = -(1 << (width - 1)) if bit == width - 1 else 1 << bit
    i = index % tensor.numel()
    flat[i] = flat[i] ^ mask
    return tensor


def flipped(tensor: torch.Tensor, index: int, bit: int) -> torch.Tensor:
    """A copy of ``tensor`` with one bit flipped (differentiable: gradients pass unchanged)."""
    out = tensor.clone().contiguous()
    if out.requires_grad:
        with torch.no_grad():
            flip_bit_(out.data, index, bit)
        return out
    return flip_bit_(out, index, bit)


@dataclass(frozen=True)
class Fault:
    """Flip ``bit`` of element ``index`` at ``site`` (``target`` narrows it: a parameter or
    module name, or for ``expert_gemm`` gate_up or down)."""

    site: str
    bit: int
    index: int = 0
    target: str = ""
    step: int = 0
    persistent: bool = False
    device: int = 0

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise ValueError(f"unknown fault site {self.site!r}; choose from {', '.join(SITES)}")
        if not 0 <= self.bit < site_bits(self.site):
            raise ValueError(
                f"bit {self.bit} is out of range for site {self.site!r} "
                f"(0..{site_bits(self.site) - 1})"
            )
        if self.index < 0 or self.step < 0 or self.device < 0:
            raise ValueError("fault index, step and device must be >= 0")

    def fires(self, step: int, device: int) -> bool:
        return device == self.device and (self.persistent or step == self.step)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fault:
        return cls(**data)


class StepInjector:
    """Applies the faults due in one step on one simulated device at the sites a step visits.

    ``at(site, tensor, target)`` returns the tensor, or a copy with the bit flipped when a
    fault for that site (and target, if the fault names one) is due. Each fault fires at most
    once per step. Built directly, a transient fault fires in every execution of its step; use
    :class:`FaultPlan` for faults that happen once in time.
    """

    def __init__(
        self,
        faults: list[Fault] | tuple[Fault, ...],
        step: int,
        device: int,
        on_fire: Callable[[Fault], None] | None = None,
    ) -> None:
        self.due = [f for f in faults if f.fires(step, device)]
        self.fired: list[Fault] = []
        self._on_fire = on_fire

    def _fire(self, fault: Fault) -> None:
        self.fired.append(fault)
        if self._on_fire is not None:
            self._on_fire(fault)

    def wants(self, site: str) -> bool:
        return any(f.site == site and f not in self.fired for f in self.due)

    def _firing(self, site: str, target: str) -> list[Fault]:
        """The due faults of ``site`` (and ``target``, where both name one) not yet fired;
        each is marked fired."""
        firing = [
            f
            for f in self.due
            if f.site == site and f not in self.fired and _target_matches(f.target, target)
        ]
        for fault in firing:
            self._fire(fault)
        return firing

    def at(self, site: str, tensor: torch.Tensor, target: str = "") -> torch.Tensor:
        for fault in self._firing(site, target):
            tensor = flipped(tensor, fault.index, fault.bit)
        return tensor

    def at_(self, site: str, tensor: torch.Tensor, target: str = "") -> None:
        """In-place variant for state at rest (weights, gradients, optimizer moments)."""
        for fault in self._firing(site, target):
            flip_bit_(tensor, fault.index, fault.bit)


def _target_matches(wanted: str, target: str) -> bool:
    """A fault's target names the site's target, or a part of it before a ``:`` (a MoE layer
    for one of its GEMMs); an empty one on either side matches anything."""
    return not wanted or not target or target == wanted or target.startswith(wanted + ":")


class FaultPlan:
    """Faults over time: a transient fault fires in the first execution that reaches it and
    never again (a rerun of the same step is clean); a persistent one fires in every execution
    on its device."""

    def __init__(self, faults: list[Fault] | tuple[Fault, ...]) -> None:
        self.faults = list(faults)
        self._consumed: set[int] = set()
        self.fired: set[int] = set()  # ids of the faults that fired at least once

    def injector(self, step: int, device: int) -> StepInjector:
        live = [f for i, f in enumerate(self.faults) if f.persistent or i not in self._consumed]
        return StepInjector(live, step, device, on_fire=self._consume)

    def _consume(self, fault: Fault) -> None:
        self.fired.add(id(fault))
        if not fault.persistent:
            for i, f in enumerate(self.faults):
                if f is fault:
                    self._consumed.add(i)


class ModelFaultInjector:
    """Faults placed in a model's real training step, on simulated device ``device``.

    ``faults`` is one :class:`Fault`, a list of them or a :class:`FaultPlan` (whose transient
    faults fire once in time, so a replay of their step is clean). Call :meth:`begin_step`
    before each step (it plants the faults at rest: ``weight``, and ``optimizer_state`` when the
    optimizer is known), :meth:`end_step` after it, :meth:`close` at the end. Targets:

    - ``weight``, ``gradient``, ``optimizer_state``: a parameter name (``NAME:exp_avg_sq`` picks
      AdamW's second moment; the first by default);
    - ``activation``: a module (its first tensor output); ``routing_indices`` and
      ``routing_counts``: a router module;
    - ``combine``: a MoE module (``model/probes.py``; any other module: its first output);
    - ``expert_gemm``: a MoE module, optionally ``MODULE:gate``, ``:up`` or ``:down``.

    With :meth:`attach_trainer` gradients are corrupted after the trainer reduced them (before
    clipping); otherwise when autograd has accumulated them.
    """

    def __init__(
        self,
        model: nn.Module,
        faults: Fault | list[Fault] | tuple[Fault, ...] | FaultPlan,
        *,
        device: int = 0,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        if isinstance(faults, Fault):
            faults = [faults]
        self.plan = faults if isinstance(faults, FaultPlan) else FaultPlan(list(faults))
        self.model, self.device, self.optimizer = model, device, optimizer
        self.step = -1
        self.current = StepInjector([], 0, 0)
        self._handles: list[Any] = []
        self._probes: list[tuple[nn.Module, Any]] = []
        self._trainer: Any = None
        self.targets = [self._resolve(f) for f in self.plan.faults]
        self._hook_sites()

    # -- where each fault lands ------------------------------------------------------------------
    def _resolve(self, fault: Fault) -> str:
        target = fault.target or _default_target(fault.site)
        name = target.split(":")[0]
        if fault.site in ("weight", "gradient", "optimizer_state"):
            if name not in dict(self.model.named_parameters()):
                raise ValueError(f"fault target parameter {name!r} does not exist in the model")
        elif name not in dict(self.model.named_modules()):
            raise ValueError(f"fault target module {name!r} does not exist in the model")
        if fault.site == "expert_gemm" and not hasattr(self._module(name), "probe"):
            raise ValueError(f"fault target {name!r} of site 'expert_gemm' is not a MoE layer")
        _, _, part = target.partition(":")
        if fault.site == "expert_gemm" and part not in ("", *GEMMS):
            raise ValueError(
                f"expert_gemm target {target!r} names no GEMM; use {name}:gate, :up or :down"
            )
        if fault.site == "optimizer_state" and part not in ("", "exp_avg", "exp_avg_sq"):
            raise ValueError(
                f"optimizer_state target {target!r}: the moment is exp_avg or exp_avg_sq"
            )
        if fault.site not in ("expert_gemm", "optimizer_state") and part:
            raise ValueError(f"fault target {target!r} of site {fault.site!r} takes no ':' part")
        return target

    def _module(self, name: str) -> nn.Module:
        return dict(self.model.named_modules())[name]

    def _hook_sites(self) -> None:
        hooked: set[tuple[str, str]] = set()
        for fault, target in zip(self.plan.faults, self.targets, strict=True):
            name = target.split(":")[0]
            if (fault.site, name) in hooked:
                continue
            hooked.add((fault.site, name))
            if fault.site in ("expert_gemm", "combine") and hasattr(self._module(name), "probe"):
                module = self._module(name)
                probe = _FaultProbe(self, name)
                add_probe(module, probe, first=True)
                self._probes.append((module, probe))
            elif fault.site in ("activation", "combine", *INT_SITES):
                hook = self._output_hook(fault.site, name)
                module = self._module(name)
                self._handles.append(module.register_forward_hook(hook, prepend=True))
            elif fault.site == "gradient":
                param = dict(self.model.named_parameters())[name]
                hook = self._grad_hook(name)
                self._handles.append(param.register_post_accumulate_grad_hook(hook))

    def attach_trainer(self, trainer: Any) -> None:
        """Corrupt gradients where ``trainer`` has reduced them (its gradient hooks); read the
        optimizer state at rest from its optimizer."""
        self._trainer = trainer
        self.optimizer = trainer.optimizer
        trainer.stepper.gradient_hooks.insert(0, self.on_gradients)

    # -- the hooks ---------------------------------------------------------------------------------
    def _output_hook(self, site: str, name: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            if not self.current.wants(site):
                return None
            if site in INT_SITES:
                field_name = "topk_idx_TK" if site == "routing_indices" else "counts_E"
                value = getattr(output, field_name)
                changed = self.current.at(site, value, name)
                return dataclasses.replace(output, **{field_name: changed})
            if isinstance(output, tuple):
                return (self.current.at(site, output[0], name), *output[1:])
            return self.current.at(site, output, name)

        return hook

    def _grad_hook(self, name: str):
        def hook(param: torch.Tensor) -> None:
            if self._trainer is None and param.grad is not None:
                self.current.at_("gradient", param.grad, name)

        return hook

    def on_gradients(self) -> None:
        """Plant due gradient faults into the reduced gradients (a trainer's gradient hook)."""
        if not self.current.wants("gradient"):
            return
        params = dict(self.model.named_parameters())
        for fault, target in zip(self.plan.faults, self.targets, strict=True):
            grad = params[target].grad if fault.site == "gradient" else None
            if grad is not None:
                self.current.at_("gradient", grad, target)

    def begin_step(self, step: int, device: int | None = None) -> None:
        """Start step ``step`` on ``device`` (default: the injector's): faults at rest now."""
        self.step = step
        self.current = self.plan.injector(step, self.device if device is None else device)
        self._at_rest()

    def _at_rest(self) -> None:
        params = dict(self.model.named_parameters())
        for fault, target in zip(self.plan.faults, self.targets, strict=True):
            if fault.site == "weight":
                with torch.no_grad():
                    self.current.at_("weight", params[target].data, target)
            elif fault.site == "optimizer_state" and self.optimizer is not None:
                self._flip_moment(params, target)

    def _flip_moment(self, params: dict[str, nn.Parameter], target: str) -> None:
        name, _, moment = target.partition(":")
        state = self.optimizer.state.get(params[name], {}) if self.optimizer else {}
        key = moment or "exp_avg"
        if key in state:
            self.current.at_("optimizer_state", state[key], target)

    def end_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """After the step: an ``optimizer_state`` fault of an injector that did not know the
        optimizer at the step's start lands in the updated moments."""
        if self.optimizer is None and optimizer is not None:
            params = dict(self.model.named_parameters())
            self.optimizer = optimizer
            try:
                for fault, target in zip(self.plan.faults, self.targets, strict=True):
                    if fault.site == "optimizer_state":
                        self._flip_moment(params, target)
            finally:
                self.optimizer = None

    def unfired(self) -> list[Fault]:
        """The planted faults that never fired (their step never ran, or nothing was there to
        corrupt, e.g. optimizer moments before the first update)."""
        return [f for f in self.plan.faults if id(f) not in self.plan.fired]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, probe in self._probes:
            remove_probe(module, probe)
        self._probes.clear()
        if self._trainer is not None and self.on_gradients in self._trainer.stepper.gradient_hooks:
            self._trainer.stepper.gradient_hooks.remove(self.on_gradients)


class _FaultProbe(MoEProbe):
    """Plants ``expert_gemm`` and ``combine`` faults of one MoE layer (``model/probes.py``)."""

    def __init__(self, injector: ModelFaultInjector, name: str) -> None:
        self.injector, self.name = injector, name

    def gemm_hook(self, expert: int):
        current = self.injector.current
        if not current.wants("expert_gemm"):
            return None

        def hook(gemm: str, output: torch.Tensor) -> None:
            current.at_("expert_gemm", output, f"{self.name}:{gemm}")

        return hook

    def on_combine(self, call: CombineCall) -> None:
        if self.injector.current.wants("combine"):
            self.injector.current.at_("combine", call.out_TD, self.name)


def _default_target(site: str) -> str:
    return {
        "weight": "model.layers.0.mlp.experts.down_proj",
        "activation": "model.layers.0.mlps.0",
        "expert_gemm": "model.layers.0.mlp",
        "combine": "model.layers.0.mlp",
        "gradient": "model.layers.0.mlp.experts.down_proj",
        "optimizer_state": "model.layers.0.mlp.experts.down_proj",
        "routing_indices": "model.layers.0.mlp.router",
        "routing_counts": "model.layers.0.mlp.router",
    }[site]


def parse_fault(text: str, flag: str = "--inject") -> Fault:
    """``SITE:BIT[:STEP[:TARGET[:persistent]]]`` as a :class:`Fault` (a one-line UserError
    otherwise). TARGET may hold a ``:`` itself (``model.layers.0.mlp:down``)."""
    parts = text.split(":")
    persistent = len(parts) > 3 and parts[-1] == "persistent"
    if persistent:
        parts = parts[:-1]
    if len(parts) < 2:
        raise UserError(f"{flag} expects SITE:BIT[:STEP[:TARGET[:persistent]]], got {text!r}")
    try:
        bit = int(parts[1])
        step = int(parts[2]) if len(parts) > 2 and parts[2] else 0
    except ValueError:
        raise UserError(f"{flag} {text!r}: BIT and STEP must be integers") from None
    try:
        return Fault(
            site=parts[0], bit=bit, step=step, target=":".join(parts[3:]), persistent=persistent
        )
    except ValueError as exc:
        raise UserError(f"{flag} {text!r}: {exc}") from None


def check_fault_targets(cfg: Any, faults: list[Fault], flag: str = "--sdc-inject") -> None:
    """Resolve ``faults``' targets on ``cfg``'s model built on the meta device (no memory, no
    time): a target the model lacks is a one-line error before any work."""
    from longcat_sim.model.transformer import LongcatFlashForCausalLM, require_runnable
    from longcat_sim.train.config import check_fits_in_memory

    try:
        require_runnable(cfg)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    check_fits_in_memory(cfg)  # a model too large to train is refused before it is built
    model = LongcatFlashForCausalLM(cfg, device="meta")
    try:
        ModelFaultInjector(model, FaultPlan(faults)).close()
    except ValueError as exc:
        raise UserError(f"{flag}: {exc}") from None


def trainer_faults(trainer: Any, faults: list[Fault]) -> ModelFaultInjector:
    """An injector of ``faults`` attached to a trainer (what ``train --sdc-inject`` plants);
    a target the model lacks is a one-line error."""
    try:
        injector = ModelFaultInjector(trainer.model, FaultPlan(faults))
    except ValueError as exc:
        raise UserError(f"--sdc-inject: {exc}") from None
    injector.attach_trainer(trainer)
    return injector
