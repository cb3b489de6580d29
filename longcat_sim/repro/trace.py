"""Every module's outputs during one call, and the first module at which two calls differ.

:func:`trace_outputs` hooks every module (the root as ``<root>``) and keeps each output tensor
in the order the modules finished; a module called twice gets ``output#1`` for its second
call. :func:`first_module_divergence` walks two traces in that order and returns the first
module whose (aligned) outputs are not bitwise equal, measured in ULPs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from longcat_sim.repro.compare import ulp_difference
from longcat_sim.repro.fingerprint import flatten_output

ROOT = "<root>"
Traced = list[tuple[str, str, torch.Tensor]]
# (tensor of run a, tensor of run b) -> the parts that must agree, or None: not comparable
Align = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]


@dataclass(frozen=True)
class ModuleDivergence:
    """The first module whose output differs between two executions, and by how much."""

    module: str
    tensor: str
    max_abs: float | None
    max_ulp: int | None

    def describe(self) -> str:
        size = (
            "" if self.max_ulp is None else f": max |diff| {self.max_abs:.3g}, {self.max_ulp} ULP"
        )
        return f"module {self.module!r}, tensor {self.tensor!r}{size}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tensors(value: Any) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, Mapping) and not isinstance(value, torch.Tensor):
        for key, item in value.items():
            yield from flatten_output(item, f"output.{key}")
    else:
        yield from flatten_output(value)


def trace_outputs(model: nn.Module, call: Callable[[], Any]) -> tuple[Any, Traced]:
    """``call()``'s result and every module's output tensors (detached clones), in order."""
    traced: Traced = []
    calls: dict[str, int] = {}

    def hook(name: str):
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            n = calls.get(name, 0)
            calls[name] = n + 1
            for label, tensor in _tensors(output):
                tag = label if n == 0 else f"{label}#{n}"
                traced.append((name, tag, tensor.detach().clone()))

        return record

    handles = [
        module.register_forward_hook(hook(name or ROOT)) for name, module in model.named_modules()
    ]
    try:
        result = call()
    finally:
        for handle in handles:
            handle.remove()
    return result, traced


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (-0.0 differs from 0.0, equal NaN bits agree)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    flat_a = a.detach().cpu().contiguous().reshape(-1)
    flat_b = b.detach().cpu().contiguous().reshape(-1)
    return torch.equal(flat_a.view(torch.uint8), flat_b.view(torch.uint8))


def measure(module: str, tensor: str, a: torch.Tensor, b: torch.Tensor) -> ModuleDivergence:
    if a.dtype != b.dtype or a.shape != b.shape:
        return ModuleDivergence(
            module, f"{tensor} ({a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)})", None, None
        )
    if a.dtype == torch.bool:
        a, b = a.to(torch.uint8), b.to(torch.uint8)
    max_abs, max_ulp = ulp_difference(a.contiguous(), b.contiguous())
    return ModuleDivergence(module, tensor, max_abs, max_ulp)


def with_output(traced: Traced, result: Any) -> Traced:
    """``traced`` with the root's hooked outputs replaced by ``result``'s tensors (what the
    call returned: the model's own output), which come last, as the root finishes last."""
    kept = [entry for entry in traced if entry[0] != ROOT]
    return kept + [(ROOT, label, t.detach().clone()) for label, t in _tensors(result)]


@dataclass(frozen=True)
class TraceComparison:
    """The first divergent module (or None), the tensor pairs compared, those skipped."""

    divergence: ModuleDivergence | None
    compared: int
    skipped: int


def compare_traces(
    a: Traced, b: Traced, align: Align | None = None, root_align: Align | None = None
) -> TraceComparison:
    """Walk ``a`` in execution order against ``b`` (matched by module and label); ``align``
    selects the parts that must agree, ``root_align`` (when given) those of the root's
    outputs, which must line up: a root output missing from ``b`` is a ValueError."""
    others = {(module, label): t for module, label, t in b}
    compared = skipped = 0
    for module, label, ta in a:
        tb = others.get((module, label))
        strict = module == ROOT and root_align is not None
        if tb is None and strict:
            raise ValueError(f"the model's output {label!r} is missing from the second call")
        chosen = root_align if strict else align
        pair = None if tb is None else (ta, tb) if chosen is None else chosen(ta, tb)
        if pair is None:
            skipped += 1
            continue
        compared += 1
        if not bitwise_equal(*pair):
            return TraceComparison(measure(module, label, *pair), compared, skipped)
    return TraceComparison(None, compared, skipped)


def first_module_divergence(
    a: Traced, b: Traced, align: Align | None = None
) -> tuple[ModuleDivergence | None, int]:
    """(first divergent module in ``a``'s execution order or None, tensors compared).
    Outputs are matched by (module, label); ``align`` selects the parts that must agree."""
    found = compare_traces(a, b, align)
    return found.divergence, found.compared
