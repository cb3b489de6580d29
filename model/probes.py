"""Observation points inside a MoE layer's forward: where faults are planted and checks run.

A :class:`MoEProbe` set on a :class:`~longcat_sim.model.moe.MoE` (``moe.probe``) is called by
both ways the layer runs (the MoE's own modules and the expert-parallel path of
``model/parallel.py``):

- ``gemm_hook(expert)`` before an expert's GEMMs: a callable ``(name, output)`` run after each
  of its forward GEMMs (``gate``, ``up``, ``down``) that may change the output in place, or None
  (the usual case: no call per expert at all);
- ``on_experts(call)`` once the experts of the call are done: every row's expert, input,
  pre-activations and output (:class:`ExpertCall`);
- ``on_combine(call)`` on the combined float32 output before it is cast back
  (:class:`CombineCall`); it may change the output in place.

With no probe set (the default) the layer runs exactly as it does without this module. A probe
only reads the tensors (or flips bits of them, to plant a fault); it never changes the layer's
arithmetic, so a probed step with nothing planted is bitwise the unprobed one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

GemmHook = Callable[[str, torch.Tensor], None]
GEMMS = ("gate", "up", "down")


@dataclass(frozen=True)
class ExpertCall:
    """The expert rows of one MoE call: row r went to global expert ``expert_R[r]``.

    ``blocks`` lists ``(expert, rows)`` in the order the GEMMs ran (one block per expert, or one
    per (source rank, expert) when expert-parallel); ``weights`` are the stacked (gate, up, down)
    weights ``[N, I, H]``, ``[N, I, H]``, ``[N, H, I]`` of every expert of the layer; ``first``
    the global id of ``weights``' expert 0 on this rank.
    """

    expert_R: torch.Tensor
    blocks: Sequence[tuple[int, slice]]
    x_RD: torch.Tensor
    pre_gate_RI: torch.Tensor
    pre_up_RI: torch.Tensor
    y_RD: torch.Tensor
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    deterministic: bool
    first: int = 0


@dataclass(frozen=True)
class CombineCall:
    """``out_TD = x_TD * zero_gate_T + sum over slot rows s of gate_S[s] * y_SD[s]`` added into
    row ``token_S[s]``: the combine of one MoE call, in float32."""

    out_TD: torch.Tensor
    x_TD: torch.Tensor
    zero_gate_T: torch.Tensor
    gate_S: torch.Tensor
    token_S: torch.Tensor
    y_SD: torch.Tensor


class MoEProbe:
    """Does nothing; subclasses override what they observe."""

    def gemm_hook(self, expert: int) -> GemmHook | None:
        return None

    def on_experts(self, call: ExpertCall) -> None:
        return None

    def on_combine(self, call: CombineCall) -> None:
        return None


class ProbeChain(MoEProbe):
    """Several probes called in order (faults first, then checks)."""

    def __init__(self, probes: Sequence[MoEProbe]) -> None:
        self.probes = list(probes)

    def gemm_hook(self, expert: int) -> GemmHook | None:
        hooks = [h for p in self.probes if (h := p.gemm_hook(expert)) is not None]
        if not hooks:
            return None

        def run(name: str, output: torch.Tensor) -> None:
            for hook in hooks:
                hook(name, output)

        return run

    def on_experts(self, call: ExpertCall) -> None:
        for probe in self.probes:
            probe.on_experts(call)

    def on_combine(self, call: CombineCall) -> None:
        for probe in self.probes:
            probe.on_combine(call)


def add_probe(moe: torch.nn.Module, probe: MoEProbe, *, first: bool = False) -> None:
    """Attach ``probe`` to ``moe`` after any probe already there (``first``: before them, as
    a planted fault must come before the checks that should see it)."""
    current = getattr(moe, "probe", None)
    if current is None:
        moe.probe = probe
        return
    probes = current.probes if isinstance(current, ProbeChain) else [current]
    moe.probe = ProbeChain([probe, *probes] if first else [*probes, probe])


def remove_probe(moe: torch.nn.Module, probe: MoEProbe) -> None:
    """Detach ``probe`` from ``moe`` (the others stay)."""
    current = getattr(moe, "probe", None)
    if current is probe:
        moe.probe = None
    elif isinstance(current, ProbeChain) and probe in current.probes:
        rest = [p for p in current.probes if p is not probe]
        moe.probe = rest[0] if len(rest) == 1 else ProbeChain(rest)


def rows_of_blocks(blocks: Sequence[tuple[int, slice]], rows: int) -> torch.Tensor:
    """The expert of each of ``rows`` rows from ``(expert, rows)`` blocks (-1: no block)."""
    expert_R = torch.full((rows,), -1, dtype=torch.int64)
    for expert, block in blocks:
        expert_R[block] = expert
    return expert_R
