"""Fused router top-k with expert bias, with an explicit ``backend`` argument.

From float32 logits over the N FFN + Z zero experts: scores = softmax(logits); the K experts
with the largest ``scores + bias`` are selected (in descending order of biased score); their
gates are the unbiased scores times ``routed_scaling_factor`` (zero-expert gates stay
unscaled unless ``scale_zero_expert_gates``); ``counts_E`` counts picks per expert.

The torch backend is ``TopkRouter``'s own arithmetic (``torch.topk``, whose order among
exactly equal biased scores is unspecified). The Triton backend breaks exact ties towards
the lower expert id; its scores may differ from ``torch.softmax`` in the last bits, so a
selection can differ only where two biased scores are that close. Gradients flow to the
logits through ``scores_TE`` and ``topk_gate_TK`` (backward in torch ops for either backend).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from longcat_sim.model.kernels import torch_ref
from longcat_sim.model.kernels.backend import Backend, check_backend, require_triton

if TYPE_CHECKING:
    from longcat_sim.model.router import TopkRouter


@dataclass
class RouterOutput:
    """Routing of T tokens to K of the N + Z experts; indices >= N are zero experts."""

    topk_idx_TK: torch.Tensor
    topk_gate_TK: torch.Tensor
    scores_TE: torch.Tensor
    counts_E: torch.Tensor


class _TritonRouterTopk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, bias_E, opts: torch_ref.TopkOptions):  # type: ignore[override]
        from longcat_sim.model.kernels import triton_router_topk

        idx, gate, scores, counts = triton_router_topk.router_topk(logits_TE, bias_E, opts)
        factor_TK = torch.full_like(gate, opts.routed_scaling_factor)
        if not opts.scale_zero_expert_gates:
            factor_TK = torch.where(idx >= opts.n_routed, 1.0, factor_TK)
        ctx.save_for_backward(scores, idx, factor_TK)
        ctx.mark_non_differentiable(idx, counts)
        return idx, gate, scores, counts

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, _grad_idx, grad_gate_TK, grad_scores_TE, _grad_counts):  # type: ignore[override]
        scores, idx, factor_TK = ctx.saved_tensors
        grad_s = torch.zeros_like(scores) if grad_scores_TE is None else grad_scores_TE.float()
        if grad_gate_TK is not None:  # picks within a token are distinct: no index repeats
            grad_s = grad_s + torch.zeros_like(scores).scatter(1, idx, grad_gate_TK * factor_TK)
        dot_T = (grad_s * scores).sum(dim=-1, keepdim=True)
        return scores * (grad_s - dot_T), None, None


def router_topk(
    logits_TE: torch.Tensor,
    bias_E: torch.Tensor,
    *,
    topk: int,
    n_routed: int,
    routed_scaling_factor: float,
    scale_zero_expert_gates: bool,
    backend: Backend = "torch",
) -> RouterOutput:
    """Routing of T tokens from their [T, N + Z] logits (see the module docstring)."""
    check_backend(backend)
    if logits_TE.dim() != 2 or bias_E.shape != (logits_TE.shape[1],):
        raise ValueError(
            f"logits_TE must be [T, E] and bias_E [E], got {tuple(logits_TE.shape)} and "
            f"{tuple(bias_E.shape)}"
        )
    num_experts = logits_TE.shape[1]
    if not 1 <= topk <= num_experts or not 1 <= n_routed <= num_experts:
        raise ValueError(
            f"need 1 <= topk <= {num_experts} experts and 1 <= n_routed <= {num_experts}, "
            f"got topk={topk}, n_routed={n_routed}"
        )
    opts = torch_ref.TopkOptions(
        topk, n_routed, float(routed_scaling_factor), bool(scale_zero_expert_gates)
    )
    if backend == "triton":
        require_triton(logits_TE, bias_E)
        idx, gate, scores, counts = _TritonRouterTopk.apply(logits_TE.float(), bias_E, opts)
    else:
        idx, gate, scores, counts = torch_ref.router_topk_ref(logits_TE, bias_E, opts)
    return RouterOutput(topk_idx_TK=idx, topk_gate_TK=gate, scores_TE=scores, counts_E=counts)


def route(router: TopkRouter, x_TD: torch.Tensor, *, backend: Backend = "torch") -> RouterOutput:
    """``router(x_TD)`` with the top-k stage on ``backend`` (the classifier stays a torch GEMM)."""
    if x_TD.dim() != 2:
        raise ValueError(
            f"router expects tokens flattened to [T, D], got shape {tuple(x_TD.shape)}"
        )
    logits_TE = F.linear(x_TD.float(), router.classifier.weight.float())
    return router_topk(
        logits_TE,
        router.e_score_correction_bias,
        topk=router.topk,
        n_routed=router.n_routed_experts,
        routed_scaling_factor=router.routed_scaling_factor,
        scale_zero_expert_gates=router.scale_zero_expert_gates,
        backend=backend,
    )
