"""Softmax top-k router over FFN and zero-computation experts (LongCat-Flash, spec §1.3).

Scores are a float32 softmax over all N + Z logits. The expert bias
(``e_score_correction_bias``) only decides *which* experts are selected; the gates are the
unbiased probabilities of the selected experts, not renormalised, times
``routed_scaling_factor``. With ``cfg.scale_zero_expert_gates`` False the gates of zero
(identity) experts stay unscaled. With ``cfg.deterministic`` the classifier is batch-invariant
and selection is a stable sort, so exactly equal biased scores go to the lower expert id.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from longcat_sim.model.config import ModelConfig
from longcat_sim.model.kernels import batch_invariant
from torch import nn


@dataclass
class RouterOutput:
    """Routing of T tokens to K of the N + Z experts; indices >= N are zero experts."""

    topk_idx_TK: torch.Tensor
    topk_gate_TK: torch.Tensor
    scores_TE: torch.Tensor
    counts_E: torch.Tensor


def default_generator() -> torch.Generator:
    """A fresh, fixed-seed generator: initialisation never touches torch's global RNG."""
    return torch.Generator().manual_seed(0)


class TopkRouter(nn.Module):
    """Float32 linear classifier + softmax + bias-corrected top-k selection."""

    def __init__(self, cfg: ModelConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.n_routed_experts = cfg.n_routed_experts
        self.num_experts_total = cfg.num_experts_total
        self.topk = cfg.moe_topk
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.scale_zero_expert_gates = cfg.scale_zero_expert_gates
        self.deterministic = cfg.deterministic
        self.initializer_range = cfg.initializer_range
        # skip_init: nn.Linear's own init would draw from the global RNG
        self.classifier = nn.utils.skip_init(
            nn.Linear, cfg.hidden_size, cfg.num_experts_total, bias=False, dtype=torch.float32
        )
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(cfg.num_experts_total, dtype=torch.float32)
        )
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        gen = generator if generator is not None else default_generator()
        self.classifier.weight.normal_(0.0, self.initializer_range, generator=gen)
        self.e_score_correction_bias.zero_()

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        """Module-wide casts (``.to(torch.bfloat16)``, ``.half()``) leave the router float32,
        with its exact values: a cast is undone from a copy taken before it."""
        weight = self.classifier.weight.detach().clone()
        bias = self.e_score_correction_bias.clone()
        super()._apply(fn, recurse)
        if self.classifier.weight.dtype != torch.float32:
            self.classifier.weight.data = weight.to(self.classifier.weight.device)
        if self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = bias.to(self.e_score_correction_bias.device)
        return self

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        if x_TD.dim() != 2:
            raise ValueError(
                f"router expects tokens flattened to [T, D], got shape {tuple(x_TD.shape)}"
            )
        if self.deterministic:
            logits_TE = batch_invariant.linear(x_TD.float(), self.classifier.weight.float())
            scores_TE = batch_invariant.softmax(logits_TE)
        else:
            logits_TE = F.linear(x_TD.float(), self.classifier.weight.float())
            scores_TE = logits_TE.softmax(dim=-1)
        with torch.no_grad():
            biased_TE = scores_TE + self.e_score_correction_bias
            if self.deterministic:  # stable sort: exact ties go to the lower expert id
                order_TE = torch.sort(biased_TE, dim=-1, descending=True, stable=True).indices
                topk_idx_TK = order_TE[:, : self.topk]
            else:
                topk_idx_TK = torch.topk(biased_TE, self.topk, dim=-1, sorted=True).indices
        probs_TK = scores_TE.gather(1, topk_idx_TK)
        topk_gate_TK = probs_TK * self.routed_scaling_factor
        if not self.scale_zero_expert_gates:
            topk_gate_TK = torch.where(topk_idx_TK >= self.n_routed_experts, probs_TK, topk_gate_TK)
        counts_E = torch.bincount(topk_idx_TK.reshape(-1), minlength=self.num_experts_total)
        return RouterOutput(topk_idx_TK, topk_gate_TK, scores_TE, counts_E)
