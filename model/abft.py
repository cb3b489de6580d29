"""Online checks of a MoE layer's forward: ABFT checksums and sampled recomputation.

A model built with ``expert_checksums=True`` encodes each expert weight ``W [out, in]`` of every
layer by its column checksum ``s = sum_y W[y, :]`` and its error scale ``sum_y ||W[y]||_2``,
held as buffers of its :class:`GroupedExperts` (``model/experts.py``). The encoding is taken from
the weights right after they were written (at build, load and cast time, and after every optimizer
step through :func:`keep_checksums`), so a weight corrupted while at rest is caught too when
its expert runs before the next optimizer step folds the corruption into a new encoding.

:class:`AbftProbe` checks, per MoE call (``model/probes.py``):

- every expert GEMM ``C = A W_e^T``: row ``r``'s sum must equal ``A[r] . s_e``;
- the combine: ``sum_h out[t, h]`` must equal ``zero_gate[t] sum_h x[t, h] + sum over t's slots
  of gate * sum_h y``.

The tolerance is a probabilistic rounding-error bound (Higham & Mary 2019): a length-n float
dot product is within ``lambda sqrt(n) u sum |a||b|`` of the exact value (u the unit roundoff)
except with probability ``2 n exp(-lambda^2 / 2)``; lambda is chosen for a false-alarm
probability of :data:`ABFT_ALARM_PROBABILITY` per checked row (a union bound over the row's
roundings). For a GEMM row that gives ``tol = lambda u 2 (sqrt(in + 1) + sqrt(out)) ||A[r]||_2
sum_y ||W_e[y]||_2``, which bounds ``sum_x |A[r, x]| sum_y |W_e[y, x]|`` by Cauchy-Schwarz. A flip
smaller than that (low mantissa bits) is the blind spot; sign and exponent flips are caught.

:class:`RecomputeProbe` recomputes the whole FFN of sampled expert blocks right after they ran,
from the same inputs, and compares bit for bit: it sees a fault in the computation, never one
in its own inputs (a weight corrupted at rest is read the same twice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from longcat_sim.model.experts import Checksum, GroupedExperts, expert_forward
from longcat_sim.model.probes import GEMMS, CombineCall, ExpertCall, MoEProbe

ABFT_ALARM_PROBABILITY = 1e-7


def abft_lambda(roundings: int, alarm_probability: float = ABFT_ALARM_PROBABILITY) -> float:
    """The lambda with ``2 roundings exp(-lambda^2/2) = alarm_probability``."""
    return math.sqrt(2.0 * math.log(2.0 * max(1, roundings) / alarm_probability))


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


class HasChecksums(Protocol):
    """Experts whose stacked weights carry their encodings (:class:`GroupedExperts` built with
    ``expert_checksums=True``)."""

    def checksum(self, gemm: str) -> Checksum: ...


def keep_checksums(model: nn.Module, optimizer: torch.optim.Optimizer) -> RemovableHandle:
    """Re-encode ``model``'s expert checksums after every step of ``optimizer``."""
    encoded = [m for m in model.modules() if isinstance(m, GroupedExperts) and m.expert_checksums]
    if not encoded:
        raise ValueError("the model's experts carry no checksums: build it with expert_checksums")

    def encode(*_: object) -> None:
        for experts in encoded:
            experts.encode_checksums()

    return optimizer.register_step_post_hook(encode)


@dataclass
class CheckTally:
    """Checks run and alarms raised, with the worst ``|difference| / tolerance`` seen."""

    checks: int = 0
    alarms: int = 0
    worst_ratio: float = 0.0
    where: list[str] = field(default_factory=list)

    def verify(self, name: str, diff: torch.Tensor, tol: torch.Tensor) -> None:
        self.checks += diff.numel()
        if not diff.numel():
            return
        bad = ~(diff <= tol)  # NaN counts as an alarm
        ratio = torch.where(tol > 0, diff / tol, 0.0).nan_to_num(nan=0.0, posinf=0.0)
        self.worst_ratio = max(self.worst_ratio, float(ratio.max()))
        count = int(bad.sum())
        if count:
            self.alarms += count
            self.where.append(name)


class AbftProbe(MoEProbe):
    """Row-checksum ABFT on the expert GEMMs and the combine of layer ``layer``."""

    def __init__(self, experts: HasChecksums, layer: int, tally: CheckTally) -> None:
        self.experts, self.layer, self.tally = experts, layer, tally

    def on_experts(self, call: ExpertCall) -> None:
        own = call.expert_R.clamp_min(0)
        rows_ok = (call.expert_R >= 0).to(call.x_RD.dtype)
        # the down GEMM's input up to rounding (the tolerance covers it)
        hidden_RI = F.silu(call.pre_gate_RI) * call.pre_up_RI
        inputs = {"gate": call.x_RD, "up": call.x_RD, "down": hidden_RI}
        outputs = {"gate": call.pre_gate_RI, "up": call.pre_up_RI, "down": call.y_RD}
        norms = {"x": torch.linalg.vector_norm(call.x_RD, dim=1) * rows_ok}
        norms["hidden"] = torch.linalg.vector_norm(hidden_RI, dim=1) * rows_ok
        unit = unit_roundoff(call.x_RD.dtype)
        for name in GEMMS:
            a_RX, c_RY = inputs[name], outputs[name]
            code = self.experts.checksum(name)
            width, out_width = a_RX.shape[1], c_RY.shape[1]
            lam = abft_lambda(2 * (width + 2) * out_width)
            factor = lam * unit * 2 * (math.sqrt(width + 1) + math.sqrt(out_width))
            reference_R = (a_RX * code.sums_NX.index_select(0, own)).sum(dim=1)
            norm_R = norms["hidden" if name == "down" else "x"]
            tol_R = factor * norm_R * code.scales_N.index_select(0, own)
            diff_R = (c_RY.sum(dim=1) - reference_R).abs()
            self.tally.verify(f"layer {self.layer} expert_gemm.{name}", diff_R, tol_R)

    def on_combine(self, call: CombineCall) -> None:
        x_TD, out_TD = call.x_TD.float(), call.out_TD
        y_SD = call.y_SD.float()
        _tokens, width = out_TD.shape
        reference_T = call.zero_gate_T * x_TD.sum(dim=1)
        reference_T = reference_T.index_add(0, call.token_S, call.gate_S * y_SD.sum(dim=1))
        magnitude_T = call.zero_gate_T.abs() * x_TD.abs().sum(dim=1)
        magnitude_T = magnitude_T.index_add(
            0, call.token_S, call.gate_S.abs() * y_SD.abs().sum(dim=1)
        )
        terms = 1 + (int(torch.bincount(call.token_S).max()) if call.token_S.numel() else 0)
        lam = abft_lambda(2 * (terms + 1) * width)
        factor = lam * unit_roundoff(torch.float32) * 2 * (math.sqrt(terms + 1) + math.sqrt(width))
        diff_T = (out_TD.sum(dim=1) - reference_T).abs()
        self.tally.verify(f"layer {self.layer} combine", diff_T, factor * magnitude_T)


class RecomputeProbe(MoEProbe):
    """Bitwise recomputation of ``blocks_per_call`` sampled expert blocks of each call."""

    def __init__(self, layer: int, tally: CheckTally, seed: int = 0, blocks_per_call: int = 1):
        self.layer, self.tally, self.seed = layer, tally, seed
        self.blocks_per_call = blocks_per_call
        self.calls = 0

    @torch.no_grad()
    def on_experts(self, call: ExpertCall) -> None:
        self.calls += 1
        if not call.blocks:
            return
        gen = torch.Generator().manual_seed(
            ((self.seed * 1_000_003 + self.layer) * 7919 + self.calls) % 2**64
        )
        picks = torch.randperm(len(call.blocks), generator=gen)[: self.blocks_per_call].tolist()
        w_gate, w_up, w_down = call.weights
        for pick in sorted(picks):
            expert, rows = call.blocks[pick]
            e = expert - call.first
            a_rI = torch.empty_like(call.pre_gate_RI[rows])
            b_rI = torch.empty_like(a_rI)
            y_rD = expert_forward(
                call.x_RD[rows], w_gate[e].t(), w_up[e].t(), w_down[e].t(), a_rI, b_rI,
                deterministic=call.deterministic,
            )  # fmt: skip
            again = ((a_rI, call.pre_gate_RI[rows]), (b_rI, call.pre_up_RI[rows]))
            same = all(torch.equal(x, y) for x, y in again)
            self.tally.checks += 1
            if not (same and torch.equal(y_rD, call.y_RD[rows])):
                self.tally.alarms += 1
                self.tally.where.append(f"layer {self.layer} expert {expert}")


def moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every MoE layer of ``model`` (modules with experts and a router)."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(getattr(m, "experts", None), GroupedExperts) and hasattr(m, "router")
    ]
