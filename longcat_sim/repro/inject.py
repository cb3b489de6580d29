"""Bit-flip fault injection: flip bit ``b`` of element ``i`` of a tensor at a named site.

Sites (:data:`SITES`):

==================  ======================================================================
``weight``          a parameter at rest, flipped before the step reads it
``activation``      a module output (in the MoE step: the SwiGLU hidden between expert GEMMs)
``expert_gemm``     an expert GEMM output (``target`` ``gate_up``, fused gate and up, or ``down``)
``combine``         the MoE combine output
``gradient``        a parameter gradient after backward, before the optimizer reads it
``optimizer_state`` an AdamW moment after the update
``routing_indices`` the router's top-k expert ids (int64)
``routing_counts``  the router's tokens-per-expert counts (int64)
==================  ======================================================================

A :class:`Fault` is *transient* (fires once, at ``step``) or *persistent* (fires at every step
run on simulated device ``device``: a faulty chip). Bits count from the least significant:
for float32, 0-22 are the mantissa, 23-30 the exponent and 31 the sign.

:class:`ModelFaultInjector` places a fault in a full ``LongcatFlashForCausalLM`` through hooks
(used by the determinism harness for its negative control); the SDC campaign's MoE-layer step
calls :meth:`StepInjector.at` at each site itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

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
            if f.site == site
            and f not in self.fired
            and not (f.target and target and f.target != target)
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


class FaultPlan:
    """Faults over time: a transient fault fires in the first execution that reaches it and
    never again (a rerun of the same step is clean); a persistent one fires in every execution
    on its device."""

    def __init__(self, faults: list[Fault] | tuple[Fault, ...]) -> None:
        self.faults = list(faults)
        self._consumed: set[int] = set()

    def injector(self, step: int, device: int) -> StepInjector:
        live = [f for i, f in enumerate(self.faults) if f.persistent or i not in self._consumed]
        return StepInjector(live, step, device, on_fire=self._consume)

    def _consume(self, fault: Fault) -> None:
        if not fault.persistent:
            for i, f in enumerate(self.faults):
                if f is fault:
                    self._consumed.add(i)


class ModelFaultInjector:
    """One fault placed in a full model through hooks, on simulated device ``device``.

    Call :meth:`begin_step` before and :meth:`end_step` after each training step, and
    :meth:`close` at the end. ``target`` names a parameter (weight, gradient, optimizer_state),
    a module (activation: its first tensor output; combine: an MoE module) or a router module
    (routing sites). The ``expert_gemm`` site lives inside the fused MoE kernel and is only
    reachable in the SDC campaign's MoE step.
    """

    def __init__(self, model: nn.Module, fault: Fault, *, device: int = 0) -> None:
        if fault.site == "expert_gemm":
            raise ValueError(
                "site 'expert_gemm' is inside the fused MoE kernel; inject it with the SDC "
                "campaign's MoE-layer step instead"
            )
        self.model, self.fault, self.device = model, fault, device
        self.step = -1
        self._fired_this_step = False
        self._handles: list[Any] = []
        target = fault.target or _default_target(fault.site)
        self.target = target
        if fault.site in ("activation", "combine", "routing_indices", "routing_counts"):
            module = dict(model.named_modules()).get(target)
            if module is None:
                raise ValueError(f"fault target module {target!r} does not exist in the model")
            self._handles.append(module.register_forward_hook(self._output_hook))
        elif fault.site in ("weight", "gradient", "optimizer_state"):
            params = dict(model.named_parameters())
            if target not in params:
                raise ValueError(f"fault target parameter {target!r} does not exist in the model")
            self.param = params[target]
            if fault.site == "gradient":
                self._handles.append(self.param.register_post_accumulate_grad_hook(self._grad_hook))

    def _due(self) -> bool:
        return not self._fired_this_step and self.fault.fires(self.step, self.device)

    def _output_hook(self, _module: nn.Module, _inputs: Any, output: Any) -> Any:
        if not self._due():
            return None
        self._fired_this_step = True
        f = self.fault
        if f.site in ("routing_indices", "routing_counts"):
            name = "topk_idx_TK" if f.site == "routing_indices" else "counts_E"
            value = getattr(output, name)
            return dataclasses.replace(output, **{name: flipped(value, f.index, f.bit)})
        if isinstance(output, tuple):
            return (flipped(output[0], f.index, f.bit), *output[1:])
        return flipped(output, f.index, f.bit)

    def _grad_hook(self, param: torch.Tensor) -> None:
        if self._due() and param.grad is not None:
            self._fired_this_step = True
            flip_bit_(param.grad, self.fault.index, self.fault.bit)

    def begin_step(self, step: int) -> None:
        self.step, self._fired_this_step = step, False
        if self.fault.site == "weight" and self._due():
            self._fired_this_step = True
            flip_bit_(self.param.data, self.fault.index, self.fault.bit)

    def end_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.fault.site == "optimizer_state" and self._due():
            state = optimizer.state.get(self.param, {})
            if "exp_avg" in state:
                self._fired_this_step = True
                flip_bit_(state["exp_avg"], self.fault.index, self.fault.bit)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _default_target(site: str) -> str:
    return {
        "weight": "model.layers.0.mlp.experts.down_proj",
        "activation": "model.layers.0.mlps.0",
        "combine": "model.layers.0.mlp",
        "gradient": "model.layers.0.mlp.experts.down_proj",
        "optimizer_state": "model.layers.0.mlp.experts.down_proj",
        "routing_indices": "model.layers.0.mlp.router",
        "routing_counts": "model.layers.0.mlp.router",
    }[site]
