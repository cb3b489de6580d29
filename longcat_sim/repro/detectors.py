"""Silent-data-corruption detectors for the MoE-layer step, and rerun attribution.

(a) :func:`replay_detects`: bitwise replay. The step is executed again from the snapshot of its
    inputs (taken when they were last written) on another, healthy simulated device and every
    compared value is checked bit for bit. Deterministic kernels make a clean replay equal, so
    any difference is corruption, whatever the site or bit; a replay on the same device would
    miss a persistent fault, hence the other device.

(b) :class:`RecomputeMonitor`: in-place recompute of a sampled operator. The paper recomputes
    FlashAttention's backward, the operator it found most exposed. Ours is the **expert FFN of
    one sampled expert** (gate and up GEMMs, SwiGLU, down GEMM), recomputed right after it ran
    from the same inputs and compared bitwise. Why this operator: the expert GEMMs carry most of
    an MoE layer's FLOPs (the largest silicon area and time exposed to a fault), it mixes GEMMs
    with vector math like FAG does, and a corrupted expert output is invisible to everything
    downstream (routing and loss stay plausible). Sampling one of the step's active experts
    costs about 1/(active experts) of the expert compute; ``experts_per_step`` trades coverage
    for cost, like the paper's adjustable interval. It cannot see a fault in its own inputs
    (a weight corrupted at rest is read identically twice).

(c) :class:`AbftMonitor`: algorithm-based fault tolerance. For each expert GEMM ``C = A W^T``
    the row checksum ``sum_y C[r, y]`` must equal ``A[r] . s_e`` with ``s_e = sum_y W_e[y, :]``:
    the weights are stored with ``s_e`` as an extra row, encoded when they were written (so
    weights at rest are covered too), and the GEMM computes ``A[r] . s_e`` as one more output
    column. The zero rows that pad the encoded weights to 8 extra rows are covered as well:
    their output columns, computed by the same GEMM, must be exactly zero. The combine must
    satisfy ``sum_h out[t, h] = sum_k g[t, k] sum_h y[t, k, h]``. The check runs in the GEMM's
    own dtype (a row-norm and a row-sum pass), so the tolerance covers the rounding of the GEMM
    and of the check. By the probabilistic rounding-error bound (Higham & Mary 2019) a
    length-n dot product is within ``lambda sqrt(n) u sum |a||b|`` (u = unit roundoff of the
    dtype) except with probability ``2 n exp(-lambda^2 / 2)``. Summed over a row of C, plus the
    checksum's own roundings, that gives
    ``tol = lambda u 2 (sqrt(X + 1) + sqrt(Y)) ||A[r]||_2 sum_y ||W_e[y]||_2``, which bounds
    ``sum_x |A[r, x]| sum_y |W_e[y, x]|`` by Cauchy-Schwarz; lambda is chosen for a false-alarm
    probability of :data:`ABFT_ALARM_PROBABILITY` per checked row (a union bound over the
    row's roundings). This is the ``c K eps sum|a||b|`` bound with the worst-case K replaced by
    the probabilistic sqrt(K), which is what makes sign and exponent flips of small values
    visible. A flip smaller than that (the low
    mantissa bits) is the blind spot.

(d) :class:`RerunStateMachine`: attribution of a suspicious step in the manner of Megatron-LM's
    rerun state machine: rerun on the same device; a different result means a transient fault.
    An equal result is rerun on another device; a different result there means the first
    device is persistently faulty, an equal one that the result is genuine (data-driven).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from longcat_sim.repro.moe_step import (
    CombineOutputs,
    ExpertFfn,
    ExpertGemms,
    ExpertRows,
    grouped_gemm,
)

ABFT_ALARM_PROBABILITY = 1e-7

TRANSIENT, PERSISTENT, GENUINE = "transient", "persistent", "genuine"
ATTRIBUTIONS = (TRANSIENT, PERSISTENT, GENUINE)


def abft_lambda(roundings: int, alarm_probability: float = ABFT_ALARM_PROBABILITY) -> float:
    """The lambda with ``2 roundings exp(-lambda^2/2) = alarm_probability``: every one of the
    ``roundings`` rounding errors behind a checked row then stays within its bound except with
    that probability (a union bound)."""
    return math.sqrt(2.0 * math.log(2.0 * roundings / alarm_probability))


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


@dataclass
class AbftMonitor:
    """Row-checksum ABFT on the expert GEMMs and the combine (see the module docstring).

    The reference checksums come out of the GEMMs themselves (checksum-encoded weights); the
    check adds a row-norm pass over each GEMM input (once for GEMMs sharing it), a row-sum
    pass over each output, in the GEMMs' dtype, and a test that the padding columns are all
    zero. The tolerance covers the rounding of the GEMM and of the check itself.
    """

    alarm_probability: float = ABFT_ALARM_PROBABILITY
    alarms: int = 0
    checks: int = 0
    worst_ratio: float = 0.0  # largest |checksum difference| / tolerance seen
    alarm_sites: list[str] = field(default_factory=list)
    _down: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def _verify(self, name: str, diff: torch.Tensor, tol: torch.Tensor) -> None:
        self.checks += diff.numel()
        if not diff.numel():
            return
        bad = ~(diff <= tol)  # NaN counts as an alarm
        ratio = torch.where(tol > 0, diff / tol, 0.0).nan_to_num(nan=0.0, posinf=0.0)
        self.worst_ratio = max(self.worst_ratio, float(ratio.max()))
        count = int(bad.sum())
        if count:
            self.alarms += count
            self.alarm_sites.append(name)

    def on_expert_gemm(self, gemms: ExpertGemms) -> None:
        """Check GEMMs that share their input (its row norms taken once, or given); the
        padding columns, if given, must be exactly zero."""
        g = gemms
        width = g.a_SX.shape[1]
        owner = g.rows.expert_of_row
        # rows of no expert (possible only under corrupted counts) are zero in C and reference
        mask_S = (owner >= 0).to(g.a_SX.dtype)
        own = owner.clamp_min(0)
        a_norms_S = g.a_norms_S
        if a_norms_S is None:
            a_norms_S = torch.linalg.vector_norm(g.a_SX, dim=1)
        norms_S = a_norms_S * mask_S
        unit = unit_roundoff(g.a_SX.dtype)
        for name, c_SY, ref_S, scale_N in zip(
            g.names, g.outputs, g.references, g.scales, strict=True
        ):
            out_width = c_SY.shape[1]
            # rounding of C (dot length X + 1), of C's row sum (Y), of a . s (X + 1) and of s (Y)
            lam = abft_lambda(2 * (width + 2) * out_width, self.alarm_probability)
            factor = lam * unit * 2 * (math.sqrt(width + 1) + math.sqrt(out_width))
            sums_S = c_SY.sum(dim=1)
            magnitude_S = norms_S * scale_N.index_select(0, own)  # >= sum_y |C[r, y]|
            self._verify(f"expert_gemm.{name}", (sums_S - ref_S).abs(), factor * magnitude_S)
            if name == "down":  # the combine's check reuses the expert outputs' row sums
                self._down = (sums_S, magnitude_S)
        if g.paddings is None:
            return
        for name, pad_SP in zip(g.names, g.paddings, strict=True):
            # a zero weight row gives an exactly zero column (unless A holds inf or NaN,
            # which the row checksum flags anyway): one reduction, no tolerance
            if bool(pad_SP.any()):
                self.alarms += int(pad_SP.ne(0).any(dim=1).sum())
                self.alarm_sites.append(f"expert_gemm.{name}.padding")

    def on_expert_ffn(self, ffn: ExpertFfn) -> None:
        return None

    def on_combine(self, combine: CombineOutputs) -> None:
        """Check ``sum_h out[t] = sum_k g[t, k] sum_h y[t, k]``. With ``dispatch`` =
        ``(slot_S, x_TD)`` the per-slot row sums and magnitude bounds come from the down GEMM's
        check (FFN slots) and from x (zero-expert slots) instead of another pass over y."""
        out_TD, gate_TK, y_TKD, dispatch = (
            combine.out_TD,
            combine.gate_TK,
            combine.y_TKD,
            combine.dispatch,
        )
        tokens, k = gate_TK.shape
        width = out_TD.shape[1]
        if dispatch is not None and self._down is not None:
            slot_S, x_TD = dispatch
            down_sums_S, down_mag_S = self._down
            ysum_TK = x_TD.sum(dim=1).repeat_interleave(k).index_copy(0, slot_S, down_sums_S)
            x_mag_T = torch.linalg.vector_norm(x_TD, dim=1) * math.sqrt(width)
            ymag_TK = x_mag_T.repeat_interleave(k).index_copy(0, slot_S, down_mag_S)
            ysum_TK, ymag_TK = ysum_TK.view(tokens, k), ymag_TK.view(tokens, k)
        else:
            ysum_TK = y_TKD.sum(dim=2)
            # sum_h |y| <= sqrt(H) ||y||_2 (Cauchy-Schwarz; an L2 norm is the faster reduction)
            ymag_TK = torch.linalg.vector_norm(y_TKD, dim=2) * math.sqrt(width)
        reference = (gate_TK * ysum_TK).sum(dim=1)
        magnitude = (gate_TK.abs() * ymag_TK).sum(dim=1)
        # rounding of the K products and sums per element, of both row sums (H) and of the
        # K-term reference sum
        lam = abft_lambda(2 * (k + 1) * width, self.alarm_probability)
        factor = lam * unit_roundoff(out_TD.dtype) * (2 * math.sqrt(k + 1) + 2 * math.sqrt(width))
        diff = (out_TD.sum(dim=1) - reference).abs()
        self._verify("combine", diff, factor * magnitude)


@dataclass
class RecomputeMonitor:
    """Bitwise in-place recompute of the expert FFN of sampled experts (module docstring)."""

    seed: int = 0
    experts_per_step: int = 1
    alarms: int = 0
    checks: int = 0
    sampled: list[int] = field(default_factory=list)

    def on_expert_gemm(self, gemms: ExpertGemms) -> None:
        return None

    def on_combine(self, combine: CombineOutputs) -> None:
        return None

    @torch.no_grad()
    def on_expert_ffn(self, ffn: ExpertFfn) -> None:
        x_SD, weights, stages, rows = ffn.x_SD, ffn.weights, ffn.stages, ffn.rows
        step = ffn.step
        active = [e for e, (s, t) in enumerate(zip(rows.starts, rows.ends, strict=True)) if t > s]
        if not active:
            return
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        picks = torch.randperm(len(active), generator=gen)[: self.experts_per_step].tolist()
        for pick in sorted(picks):
            e = active[pick]
            self.sampled.append(e)
            s, t = rows.starts[e], rows.ends[e]
            one = ExpertRows([0], [t - s], torch.zeros(t - s, dtype=torch.int64))
            w = {name: weights[name].detach()[e : e + 1] for name in ("gate_up", "down")}
            gate_up, _, _ = grouped_gemm(x_SD[s:t], w["gate_up"], one)
            inter = gate_up.shape[1] // 2
            hidden = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
            down, _, _ = grouped_gemm(hidden, w["down"], one)
            self.checks += 1
            again = {"gate_up": gate_up, "hidden": hidden, "down": down}
            if any(not torch.equal(again[k], stages[k].detach()[s:t]) for k in again):
                self.alarms += 1


def replay_detects(original_digest: str, replay: Callable[[], str]) -> bool:
    """Bitwise replay: True when the replayed step's digest differs from the original's."""
    return replay() != original_digest


@dataclass
class RerunStateMachine:
    """Attribute a suspicious step: transient fault, persistent (device) fault or genuine.

    ``run_on(device)`` re-executes the step from its snapshot on a simulated device and returns
    the result digest; the original ran on ``device`` and produced ``original``.
    """

    run_on: Callable[[int], str]
    reruns: int = 0

    def attribute(self, original: str, device: int, other_device: int) -> str:
        if other_device == device:
            raise ValueError("the second rerun needs a different device")
        self.reruns += 1
        if self.run_on(device) != original:
            return TRANSIENT
        self.reruns += 1
        if self.run_on(other_device) != original:
            return PERSISTENT
        return GENUINE


@dataclass
class SpikeValidator:
    """The trigger: a loss that is not finite or exceeds ``factor`` times the median of the
    recent clean losses is suspicious (what sends a step to :class:`RerunStateMachine`)."""

    factor: float = 10.0
    history: list[float] = field(default_factory=list)
    window: int = 32

    def suspicious(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return True
        if not self.history:
            return False
        recent = sorted(abs(v) for v in self.history[-self.window :])
        median = recent[len(recent) // 2]
        return abs(loss) > self.factor * max(median, 1e-30)

    def observe(self, loss: float) -> None:
        self.history.append(loss)
