"""Bitwise comparison of fingerprint streams and the size of a difference in ULPs.

:func:`first_divergence` walks two streams step by step and, inside the first step whose
digests differ, entry by entry in computation order; the first entry that differs is where the
runs parted (everything after it may differ only as a consequence). :func:`ulp_difference`
measures two captured tensors: the largest absolute difference and the largest distance in
units in the last place (the number of representable values between them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from longcat_sim.repro.fingerprint import StepFingerprint

_ORDERED_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


@dataclass(frozen=True)
class Divergence:
    """Where two streams first differ; ``max_abs``/``max_ulp`` once the tensors were measured."""

    step: int
    module: str
    tensor: str
    position: int
    max_abs: float | None = None
    max_ulp: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        where = f"step {self.step}, module {self.module or '<root>'!r}, tensor {self.tensor!r}"
        if self.max_ulp is None:
            return where
        return f"{where}: max |diff| {self.max_abs:.3g}, max {self.max_ulp} ULP"


def first_divergence(
    a: Sequence[StepFingerprint], b: Sequence[StepFingerprint]
) -> Divergence | None:
    """The first (step, module, tensor) at which the streams differ, or None if identical."""
    for fa, fb in zip(a, b, strict=False):
        if fa.step != fb.step:
            raise ValueError(f"streams are out of step: {fa.step} against {fb.step}")
        if fa.digest == fb.digest:
            continue
        for i, (ea, eb) in enumerate(zip(fa.entries, fb.entries, strict=False)):
            if ea.key != eb.key:
                return Divergence(
                    fa.step, ea.module, f"{ea.tensor} (other run: {eb.module}/{eb.tensor})", i
                )
            if ea.digest != eb.digest:
                return Divergence(fa.step, ea.module, ea.tensor, i)
        shorter = min(len(fa.entries), len(fb.entries))
        longer = fa.entries if len(fa.entries) > shorter else fb.entries
        extra = longer[shorter]
        return Divergence(fa.step, extra.module, f"{extra.tensor} (missing in one run)", shorter)
    if len(a) != len(b):
        step = min(len(a), len(b))
        return Divergence(step, "<stream>", "length", 0)
    return None


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """Sign-magnitude float bits as integers that increase with the value (+0 and -0 meet)."""
    bits = t.contiguous().view(_ORDERED_VIEW[t.dtype]).to(torch.int64)
    width = torch.finfo(t.dtype).bits
    magnitude = bits & ((1 << (width - 1)) - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def ulp_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """(max |a - b|, max ULP distance) of two tensors of one dtype and shape.

    Integer tensors report their largest absolute difference for both. NaNs with equal bits
    count as equal; a NaN against a number reports ``inf``/the bit distance.
    """
    if a.dtype != b.dtype or a.shape != b.shape:
        raise ValueError(f"cannot compare {a.dtype}{tuple(a.shape)} with {b.dtype}{tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0, 0
    a, b = a.detach().cpu(), b.detach().cpu()
    if not a.is_floating_point():
        diff = (a.to(torch.int64) - b.to(torch.int64)).abs().max().item()
        return float(diff), int(diff)
    if a.dtype == torch.float64:
        bits_a = a.contiguous().view(torch.int64)
        bits_b = b.contiguous().view(torch.int64)
        mask = (1 << 63) - 1
        oa = [(-(x & mask) if x < 0 else x) for x in bits_a.reshape(-1).tolist()]
        ob = [(-(x & mask) if x < 0 else x) for x in bits_b.reshape(-1).tolist()]
        ulp = max(abs(x - y) for x, y in zip(oa, ob, strict=True))
    else:
        ulp = int((_ordered(a) - _ordered(b)).abs().max().item())
    same = a.view(-1).eq(b.view(-1)) | (a.view(-1).isnan() & b.view(-1).isnan())
    delta = (a.double() - b.double()).abs().view(-1)
    delta = torch.where(same, torch.zeros_like(delta), delta)
    max_abs = float(delta.nan_to_num(nan=float("inf")).max().item())
    return max_abs, ulp


def measured(divergence: Divergence, a: torch.Tensor | None, b: torch.Tensor | None) -> Divergence:
    """``divergence`` with max |diff| and ULPs filled in from the two captured tensors."""
    if a is None or b is None or a.dtype != b.dtype or a.shape != b.shape:
        return divergence
    max_abs, max_ulp = ulp_difference(a, b)
    return Divergence(
        divergence.step,
        divergence.module,
        divergence.tensor,
        divergence.position,
        max_abs,
        max_ulp,
    )
