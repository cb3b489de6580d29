"""Softmax top-k router over FFN and zero-computation experts (LongCat-Flash, spec §1.3).

Scores are a float32 softmax over all N + Z logits. The expert bias
(``e_score_correction_bias``) only decides *which* experts are selected; the gates are the
unbiased probabilities of the selected experts, not renormalised, times
``routed_scaling_factor``. With ``cfg.scale_zero_expert_gates`` False the gates of zero
(identity) experts stay unscaled. With ``cfg.deterministic`` the classifier is batch-invariant
and selection is a stable sort, so exactly equal biased scores go to the lower expert id.
Otherwise the top-k stage runs on ``cfg.kernels`` (``model/kernels/router_topk.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from longcat_sim.model.config import ModelConfig
from longcat_sim.model.kernels import batch_invariant
from longcat_sim.model.kernels.router_topk import RouterOutput, route
from longcat_sim.model.kernels.torch_ref import gates_of_picks

__all__ = ["RouterOutput", "TopkRouter", "default_generator"]


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
        self.kernels = cfg.kernels
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
        if not self.deterministic:
            return route(self, x_TD, backend=self.kernels)
        if x_TD.dim() != 2:
            raise ValueError(
                f"router expects tokens flattened to [T, D], got shape {tuple(x_TD.shape)}"
            )
        logits_TE = batch_invariant.linear(x_TD.float(), self.classifier.weight.float())
        scores_TE = batch_invariant.softmax(logits_TE)
        with torch.no_grad():  # stable sort: exact ties go to the lower expert id
            biased_TE = scores_TE + self.e_score_correction_bias
            order_TE = torch.sort(biased_TE, dim=-1, descending=True, stable=True).indices
            topk_idx_TK = order_TE[:, : self.topk]
        topk_gate_TK, counts_E = gates_of_picks(
            scores_TE,
            topk_idx_TK,
            self.n_routed_experts,
            self.routed_scaling_factor,
            self.scale_zero_expert_gates,
        )
        return RouterOutput(topk_idx_TK, topk_gate_TK, scores_TE, counts_E)
