"""Slow, obviously-correct oracles for the MoE layer (spec §1.3, Eq. 1).

They loop over tokens and slots in Python and share nothing with ``model/moe.py`` except the
weights they are handed: routing is recomputed per token (softmax, bias-corrected ranking by a
plain sort), and every FFN slot runs its own matrix-vector products. Computation defaults to
float64 so the oracle's own rounding is far below the tolerances the tests state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from longcat_sim.model.config import ModelConfig


class ReferenceRouting(NamedTuple):
    """Per-token routing. ``margin_T``: biased score of the K-th pick minus the (K+1)-th
    (``inf`` when all experts are picked); a tiny margin means a near-tie, where float
    rounding may legitimately pick either expert."""

    topk_idx_TK: torch.Tensor
    topk_gate_TK: torch.Tensor
    margin_T: torch.Tensor


def reference_route(
    x_TD: torch.Tensor,
    cfg: ModelConfig,
    *,
    classifier_weight: torch.Tensor,
    e_score_correction_bias: torch.Tensor,
    compute_dtype: torch.dtype = torch.float64,
) -> ReferenceRouting:
    """Softmax over all N+Z logits, rank by score + bias, gate = unbiased prob (x scale)."""
    n_ffn, k = cfg.n_routed_experts, cfg.moe_topk
    weight = classifier_weight.to(compute_dtype)
    bias = e_score_correction_bias.double().tolist()
    idx_rows, gate_rows, margins = [], [], []
    for x_D in x_TD.to(compute_dtype):
        logits = weight @ x_D
        exps = torch.exp(logits - logits.max())
        probs = exps / exps.sum()
        biased = [p + b for p, b in zip(probs.tolist(), bias, strict=True)]
        ranked = sorted(range(len(biased)), key=lambda e: (-biased[e], e))
        chosen = ranked[:k]
        margins.append(
            biased[ranked[k - 1]] - biased[ranked[k]] if len(ranked) > k else float("inf")
        )
        gates = []
        for e in chosen:
            scale = cfg.routed_scaling_factor if (e < n_ffn or cfg.scale_zero_expert_gates) else 1.0
            gates.append(probs[e] * scale)
        idx_rows.append(chosen)
        gate_rows.append(torch.stack(gates))
    return ReferenceRouting(
        torch.tensor(idx_rows, dtype=torch.long).reshape(len(idx_rows), k),
        torch.stack(gate_rows) if gate_rows else x_TD.new_zeros(0, k, dtype=compute_dtype),
        torch.tensor(margins, dtype=torch.float64),
    )


def moe_naive_reference(
    x_TD: torch.Tensor,
    cfg: ModelConfig,
    *,
    classifier_weight: torch.Tensor,
    e_score_correction_bias: torch.Tensor,
    gate_proj: torch.Tensor,
    up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    routing: ReferenceRouting | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``out_t = sum_k gate_tk * E_{idx_tk}(x_t)``, one token and one slot at a time.

    ``E_e`` is the SwiGLU expert e for e < N and the identity for N <= e < N+Z. ``routing``
    overrides the recomputed routing (tests use it to build deliberately wrong variants).
    Differentiable in every tensor argument; returns ``compute_dtype``.
    """
    if routing is None:
        routing = reference_route(
            x_TD,
            cfg,
            classifier_weight=classifier_weight,
            e_score_correction_bias=e_score_correction_bias,
            compute_dtype=compute_dtype,
        )
    n_ffn = cfg.n_routed_experts
    # unbind once: indexing a stacked weight per slot would make every slot's backward
    # allocate a gradient the size of all experts
    gate_N = gate_proj.to(compute_dtype).unbind(0)
    up_N = up_proj.to(compute_dtype).unbind(0)
    down_N = down_proj.to(compute_dtype).unbind(0)
    rows = []
    for t, x_D in enumerate(x_TD.to(compute_dtype)):
        acc = torch.zeros_like(x_D)
        for k, e in enumerate(routing.topk_idx_TK[t].tolist()):
            gate = routing.topk_gate_TK[t, k].to(compute_dtype)
            if e >= n_ffn:
                acc = acc + gate * x_D
                continue
            pre_gate = gate_N[e] @ x_D
            pre_up = up_N[e] @ x_D
            hidden = pre_gate * torch.sigmoid(pre_gate) * pre_up
            acc = acc + gate * (down_N[e] @ hidden)
        rows.append(acc)
    if not rows:
        return x_TD.new_zeros(0, x_TD.shape[-1], dtype=compute_dtype)
    return torch.stack(rows)


def moe_reference_from_module(
    x_TD: torch.Tensor, cfg: ModelConfig, moe: torch.nn.Module, **kw: Any
) -> torch.Tensor:
    """``moe_naive_reference`` with the weights read off an ``MoE`` module by attribute name."""
    return moe_naive_reference(
        x_TD,
        cfg,
        classifier_weight=moe.router.classifier.weight,
        e_score_correction_bias=moe.router.e_score_correction_bias,
        gate_proj=moe.experts.gate_proj,
        up_proj=moe.experts.up_proj,
        down_proj=moe.experts.down_proj,
        **kw,
    )
