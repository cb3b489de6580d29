"""Expert-load control for MoE layers with zero-computation experts (spec §2, §3.1).

- ``BiasController``: the expert-bias update of Eq. 2, which steers the average number of FFN
  experts per token towards ``K_e`` by moving each FFN expert's selection bias towards its
  share ``K_e/(K·N)`` of routing slots. Zero-expert biases never move.
- ``device_balance_loss``: the device-level load-balance loss of Eqs. 3-5.
- ``hidden_z_loss``: Eq. 10 on the last hidden state before the final norm.
- Router metrics: FFN experts per token, router-weight similarity, gradient-norm ratio (Eq. 9).

Inputs are ``RouterOutput`` objects (``model/router.py``); only their fields ``topk_idx_TK``,
``scores_TE`` and ``counts_E`` are read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from longcat_sim.model.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from longcat_sim.model.router import RouterOutput

RateKind = Literal["constant", "cosine", "exponential"]
BIAS_BUFFER = "e_score_correction_bias"


# -- bias controller (Eq. 2) ---------------------------------------------------------------------


@dataclass(frozen=True)
class BiasRateSchedule:
    """The bias adaptation rate μ as a function of the step (the paper publishes no values).

    - ``constant``: μ(s) = initial.
    - ``cosine``: μ(s) = final + (initial - final)·(1 + cos(π·min(s, total_steps)/total_steps))/2,
      then ``final`` from ``total_steps`` on.
    - ``exponential``: μ(s) = max(final, initial·decay^s), ``decay`` in (0, 1].
    """

    initial: float
    kind: RateKind = "constant"
    final: float = 0.0
    total_steps: int = 0
    decay: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "cosine", "exponential"):
            raise ConfigError(
                f"bias rate schedule must be constant, cosine or exponential; got {self.kind!r}"
            )
        if self.initial < 0 or self.final < 0:
            raise ConfigError(f"bias rates must be >= 0, got {self.initial} and {self.final}")
        if self.kind == "cosine" and self.total_steps <= 0:
            raise ConfigError(f"a cosine bias rate needs total_steps > 0, got {self.total_steps}")
        if self.kind == "exponential" and not 0.0 < self.decay <= 1.0:
            raise ConfigError(f"exponential bias-rate decay must lie in (0, 1], got {self.decay}")

    def rate_at(self, step: int) -> float:
        if step < 0:
            raise ConfigError(f"step must be >= 0, got {step}")
        if self.kind == "constant":
            return self.initial
        if self.kind == "cosine":
            progress = min(step, self.total_steps) / self.total_steps
            return self.final + (self.initial - self.final) * 0.5 * (
                1 + math.cos(math.pi * progress)
            )
        return max(self.final, self.initial * self.decay**step)


def _check_routing(cfg: ModelConfig) -> None:
    if cfg.target_ffn_experts <= 0:
        raise ConfigError(
            f"target_ffn_experts must be > 0 for expert balancing, got {cfg.target_ffn_experts}"
        )


def slot_share_error(counts_E: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """e_i = (K_e/K)(1/N) − T_i/(K·T_all) for FFN experts, 0 for zero experts (float64 [N+Z]).

    ``K·T_all`` is the number of routing slots, ``counts_E.sum()``: every token fills K slots.
    """
    _check_routing(cfg)
    n_ffn, total = cfg.n_routed_experts, cfg.num_experts_total
    if counts_E.shape != (total,):
        raise ConfigError(
            f"counts must have shape [{total}] (N+Z experts), got {list(counts_E.shape)}"
        )
    counts = counts_E.detach().to(torch.float64)
    slots = counts.sum()
    if slots <= 0:
        raise ConfigError("cannot update expert biases from a batch with no routed tokens")
    error = torch.zeros(total, dtype=torch.float64, device=counts.device)
    target = cfg.target_ffn_experts / (cfg.moe_topk * n_ffn)
    error[:n_ffn] = target - counts[:n_ffn] / slots
    return error


def expert_bias_delta(counts_E: torch.Tensor, cfg: ModelConfig, rate: float) -> torch.Tensor:
    """Eq. 2: Δb = μ·e with e from :func:`slot_share_error` (float64 [N+Z])."""
    return rate * slot_share_error(counts_E, cfg)


def all_reduce_counts(counts: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Counts summed over every rank of ``group`` when torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        counts = counts.clone()
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    return counts


def find_routers(model: nn.Module) -> list[nn.Module]:
    """Modules owning an ``e_score_correction_bias`` buffer, in registration (layer) order."""
    return [m for m in model.modules() if BIAS_BUFFER in dict(m.named_buffers(recurse=False))]


def stack_counts(outputs: Sequence[RouterOutput]) -> torch.Tensor:
    """Per-layer expert counts ``[L, N+Z]`` from one forward pass."""
    return torch.stack([out.counts_E.detach().to(torch.long) for out in outputs])


class BiasController:
    """Closed-loop expert-bias updates (Eq. 2), optionally with integral and derivative terms.

    The control signal for layer ℓ at step s is
    ``u = e + k_i·Σ_{s'≤s} e + k_d·(e − e_prev)`` and ``Δb = μ(s)·u``. The paper calls its
    controller a PID but publishes only the proportional term; ``k_i = k_d = 0`` (the default)
    is exactly Eq. 2. Counts are summed over ``process_group`` first, so every rank applies the
    same update from the global batch.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        rate: float | BiasRateSchedule,
        *,
        integral_gain: float = 0.0,
        derivative_gain: float = 0.0,
        process_group: Any = None,
    ) -> None:
        _check_routing(cfg)
        self.cfg = cfg
        self.schedule = rate if isinstance(rate, BiasRateSchedule) else BiasRateSchedule(rate)
        self.integral_gain = float(integral_gain)
        self.derivative_gain = float(derivative_gain)
        self.process_group = process_group
        self._integral: torch.Tensor | None = None
        self._previous: torch.Tensor | None = None

    def deltas(self, counts_LE: torch.Tensor, step: int) -> torch.Tensor:
        """Bias changes ``[L, N+Z]`` (float64) for global counts; advances the I/D state."""
        error = torch.stack([slot_share_error(c, self.cfg) for c in counts_LE])
        integral = error if self._integral is None else self._integral + error
        previous = error if self._previous is None else self._previous
        signal = error
        if self.integral_gain:
            signal = signal + self.integral_gain * integral
        if self.derivative_gain:
            signal = signal + self.derivative_gain * (error - previous)
        self._integral, self._previous = integral, error
        return self.schedule.rate_at(step) * signal

    def update(
        self,
        routers: Sequence[nn.Module],
        counts: Sequence[torch.Tensor] | torch.Tensor,
        step: int,
    ) -> torch.Tensor:
        """All-reduce the counts, compute Δb and add it in place to each router's FFN biases."""
        counts_LE = torch.stack(list(counts)) if not isinstance(counts, torch.Tensor) else counts
        if len(routers) != counts_LE.shape[0]:
            raise ConfigError(f"{len(routers)} routers but counts for {counts_LE.shape[0]} layers")
        counts_LE = all_reduce_counts(counts_LE.to(torch.long), self.process_group)
        delta_LE = self.deltas(counts_LE, step)
        n_ffn = self.cfg.n_routed_experts
        with torch.no_grad():
            for router, delta_E in zip(routers, delta_LE, strict=True):
                bias = getattr(router, BIAS_BUFFER)
                bias[:n_ffn] += delta_E[:n_ffn].to(device=bias.device, dtype=bias.dtype)
        return delta_LE

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        return {"integral": self._integral, "previous": self._previous}

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        self._integral = state.get("integral")
        self._previous = state.get("previous")


# -- device-level load-balance loss (Eqs. 3-5) ---------------------------------------------------


def expert_groups(cfg: ModelConfig, n_groups: int) -> torch.Tensor:
    """Group of every expert ``[N+Z]``: FFN expert i in group i // (N/D), zero experts in D."""
    n_ffn = cfg.n_routed_experts
    if n_groups <= 0 or n_ffn % n_groups:
        raise ConfigError(
            f"n_groups={n_groups} must be a positive divisor of n_routed_experts={n_ffn}"
        )
    ffn = torch.arange(n_ffn) // (n_ffn // n_groups)
    return torch.cat([ffn, torch.full((cfg.zero_expert_num,), n_groups)])


def device_balance_loss(
    out: RouterOutput, cfg: ModelConfig, n_groups: int, alpha: float = 1.0
) -> torch.Tensor:
    """L_LB = α Σ_{j=1}^{D+1} f_j P_j for one layer and micro-batch (T tokens).

    P_j = (1/T) Σ_{i∈Group_j} Σ_t R(x_t)_i (differentiable);
    f_j = D/(K_e·T) · s_j for the D FFN groups and f_{D+1} = s_{D+1}/((K−K_e)·T) for the zero
    experts, where s_j counts the routing slots (token, choice) that land in group j, so a token
    that picks two experts of one group counts twice. With this reading every f_j equals 1 when
    each group receives its target share, and the loss is then exactly α (its minimum when P
    matches the slot shares). f is a constant of the backward pass.
    """
    _check_routing(cfg)
    n_zero, k, k_e = cfg.zero_expert_num, cfg.moe_topk, cfg.target_ffn_experts
    if n_zero and k_e >= k:
        raise ConfigError(
            f"the load-balance loss needs target_ffn_experts < moe_topk when zero experts "
            f"exist (got {k_e} and {k})"
        )
    scores_TE = out.scores_TE.to(torch.promote_types(out.scores_TE.dtype, torch.float32))
    n_tokens = scores_TE.shape[0]
    groups_E = expert_groups(cfg, n_groups).to(scores_TE.device)
    n_bins = n_groups + (1 if n_zero else 0)
    prob_mass_E = scores_TE.sum(dim=0) / n_tokens
    p_J = torch.zeros(n_bins, dtype=prob_mass_E.dtype, device=prob_mass_E.device)
    p_J = p_J.index_add(0, groups_E, prob_mass_E)
    slots_J = torch.bincount(groups_E[out.topk_idx_TK.reshape(-1)], minlength=n_bins)
    f_J = slots_J.to(torch.float64) * (n_groups / (k_e * n_tokens))
    if n_zero:
        f_J[n_groups] = slots_J[n_groups].to(torch.float64) / ((k - k_e) * n_tokens)
    return alpha * (f_J.to(p_J.dtype) * p_J).sum()


def total_balance_loss(
    outputs: Sequence[RouterOutput], cfg: ModelConfig, n_groups: int, alpha: float = 1.0
) -> torch.Tensor:
    """Sum over layers of :func:`device_balance_loss` (each layer carries its own α term)."""
    return torch.stack([device_balance_loss(o, cfg, n_groups, alpha) for o in outputs]).sum()


# -- hidden z-loss (Eq. 10) ------------------------------------------------------------------------


def hidden_z_loss(hidden_pre_norm: torch.Tensor, coefficient: float) -> torch.Tensor:
    """(λ/T) Σ_t (logsumexp_i |z_t,i|)² over all tokens of ``[..., H]``, in float32."""
    z_TH = hidden_pre_norm.reshape(-1, hidden_pre_norm.shape[-1]).float()
    lse_T = torch.logsumexp(z_TH.abs(), dim=-1)
    return coefficient * lse_T.square().mean()


# -- router metrics ------------------------------------------------------------------------------


def ffn_experts_per_token(out: RouterOutput, n_ffn: int) -> torch.Tensor:
    """How many of each token's K choices are FFN experts (long ``[T]``)."""
    return (out.topk_idx_TK < n_ffn).sum(dim=-1)


@dataclass(frozen=True)
class RouterLayerStats:
    """One layer's routing in one batch."""

    ffn_experts_mean: float  # average FFN experts per token
    ffn_experts_std: float  # population std across tokens
    zero_slot_share: float  # fraction of routing slots taken by zero experts
    max_load_ratio: float  # busiest FFN expert's count over the mean FFN-expert count


def router_stats(outputs: Sequence[RouterOutput], n_ffn: int) -> list[RouterLayerStats]:
    stats = []
    for out in outputs:
        per_token = ffn_experts_per_token(out, n_ffn).to(torch.float64)
        counts = out.counts_E.detach().to(torch.float64)
        ffn_counts = counts[:n_ffn]
        mean_load = ffn_counts.mean().item()
        stats.append(
            RouterLayerStats(
                ffn_experts_mean=per_token.mean().item(),
                ffn_experts_std=per_token.std(correction=0).item(),
                zero_slot_share=(counts[n_ffn:].sum() / counts.sum()).item(),
                max_load_ratio=ffn_counts.max().item() / mean_load if mean_load else 0.0,
            )
        )
    return stats


def router_weight_similarity(weight_EH: torch.Tensor, n_ffn: int) -> float:
    """Mean cosine similarity over all pairs i < j of the FFN experts' router vectors."""
    if n_ffn < 2:
        raise ConfigError(f"router weight similarity needs at least 2 FFN experts, got {n_ffn}")
    w = torch.nn.functional.normalize(weight_EH.detach()[:n_ffn].to(torch.float64), dim=-1)
    gram = w @ w.T
    upper = torch.triu_indices(n_ffn, n_ffn, offset=1)
    return gram[upper[0], upper[1]].mean().item()


def gradient_wrt_mean_probs(
    loss: torch.Tensor, outputs: Sequence[RouterOutput]
) -> list[torch.Tensor]:
    """∇_P loss per layer, P the batch-averaged expert-probability vector ``[N+Z]``.

    Computed as Σ_t ∂loss/∂R(x_t): the derivative along a shift Δ added to every token's
    probability vector, which moves P by exactly Δ. For a loss that depends on the scores only
    through P (the balance loss) this is its gradient w.r.t. P exactly; for the LM loss it is
    the natural extension. The graph is kept, so the losses can still be back-propagated.
    """
    scores = [o.scores_TE for o in outputs]
    grads = torch.autograd.grad(loss, scores, retain_graph=True, allow_unused=True)
    return [
        s.new_zeros(s.shape[-1]) if g is None else g.sum(dim=0)
        for s, g in zip(scores, grads, strict=True)
    ]


def gradient_norm_ratio(
    lm_loss: torch.Tensor,
    balance_loss_unscaled: torch.Tensor,
    outputs: Sequence[RouterOutput],
    alpha: float,
) -> list[float]:
    """Eq. 9 per layer: R_g = ||α ∇_P L_LB|| / ||∇_P L_LM|| (L_LB given without α).

    The guideline is R_g < 0.1; ``inf`` where the LM loss does not reach that layer's router.
    """
    g_lm = gradient_wrt_mean_probs(lm_loss, outputs)
    g_lb = gradient_wrt_mean_probs(balance_loss_unscaled, outputs)
    ratios = []
    for lm, lb in zip(g_lm, g_lb, strict=True):
        denominator = lm.norm().item()
        numerator = alpha * lb.norm().item()
        ratios.append(numerator / denominator if denominator else math.inf)
    return ratios
