"""Shared Hypothesis strategies: small model configs, batch sizes, seeds and router biases.

Torch-free on purpose (cluster tests may import it): strategies return ``ModelConfig``s,
ints and plain lists of floats; tests turn them into tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hypothesis import strategies as st

from longcat_sim.model.config import ModelConfig

# A bias this large beats any softmax probability (all lie in [0, 1]); see ``forced_bias``.
FORCE = 2.0

seeds = st.integers(min_value=0, max_value=2**32 - 1)


def token_counts(max_tokens: int = 24) -> st.SearchStrategy[int]:
    """Batch sizes, with the single-token batch drawn often."""
    return st.one_of(st.just(1), st.integers(min_value=1, max_value=max_tokens))


@st.composite
def placements(
    draw: st.DrawFn, max_t: int, max_batch: int, max_pad: int
) -> tuple[int, int, int, int]:
    """``(t, batch, pos, pad)``: a sequence of ``t`` tokens at row ``pos`` of a batch of
    ``batch`` rows of ``t + pad`` tokens."""
    t = draw(st.integers(1, max_t))
    batch = draw(st.integers(1, max_batch))
    pad = draw(st.integers(0, max_pad))
    return t, batch, draw(st.integers(0, batch - 1)), pad


@st.composite
def moe_configs(
    draw: st.DrawFn,
    *,
    max_experts: int = 6,
    max_zero: int = 4,
    max_topk: int = 4,
    min_zero: int = 0,
    min_topk: int = 1,
) -> ModelConfig:
    """Tiny runnable configs exercising the MoE: N FFN + Z zero experts, top-K over both.

    ``initializer_range`` is chosen so that router logits and expert outputs are O(1) for
    unit-variance inputs, which keeps comparisons against oracles meaningful.
    """
    n = draw(st.integers(1, max_experts))
    z = draw(st.integers(min_zero, max_zero))
    k = draw(st.integers(min(min_topk, n + z), min(max_topk, n + z)))
    hidden = draw(st.sampled_from([4, 8, 16]))
    inter = draw(st.sampled_from([4, 8, 16]))
    return ModelConfig(
        name="hypothesis-moe",
        hidden_size=hidden,
        expert_ffn_hidden_size=inter,
        n_routed_experts=n,
        zero_expert_num=z,
        moe_topk=k,
        target_ffn_experts=float(max(0, k - z)),
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5, 4.0, 6.0])),
        scale_zero_expert_gates=draw(st.booleans()),
        initializer_range=1.0 / hidden**0.5,
    )


def forced_bias(
    num_experts: int, chosen: Sequence[int], excluded: Sequence[int] = ()
) -> list[float]:
    """Bias that makes every token select all of ``chosen`` and none of ``excluded``.

    Softmax scores lie in [0, 1], so +FORCE wins against any unbiased expert and -FORCE
    loses against all of them.
    """
    bias = [0.0] * num_experts
    for e in chosen:
        bias[e] = FORCE
    for e in excluded:
        bias[e] = -FORCE
    return bias


@dataclass(frozen=True)
class RoutingCase:
    """A named router bias: ``kind`` says what it forces, ``bias`` has N+Z entries."""

    kind: str
    bias: list[float]


ROUTING_KINDS = ("none", "noise", "hot_expert", "same_set", "all_zero", "all_ffn")


@st.composite
def routing_cases(draw: st.DrawFn, cfg: ModelConfig) -> RoutingCase:
    """Biases covering natural routing, small perturbations and heavy skew:

    - ``none``: zero bias; ``noise``: small random bias (changes some selections);
    - ``hot_expert``: one FFN expert is picked by every token;
    - ``same_set``: every token picks the same K experts (all load on K experts);
    - ``all_zero``: every slot goes to a zero expert (needs Z >= K);
    - ``all_ffn``: no slot goes to a zero expert (needs N >= K).
    """
    n, z, k = cfg.n_routed_experts, cfg.zero_expert_num, cfg.moe_topk
    e_total = n + z
    kinds = ["none", "noise", "hot_expert", "same_set"]
    if z >= k:
        kinds.append("all_zero")
    if n >= k and z:
        kinds.append("all_ffn")
    kind = draw(st.sampled_from(kinds))
    if kind == "none":
        bias = [0.0] * e_total
    elif kind == "noise":
        scale = 1.0 / e_total
        bias = draw(st.lists(st.floats(-scale, scale), min_size=e_total, max_size=e_total))
    elif kind == "hot_expert":
        bias = forced_bias(e_total, [draw(st.integers(0, n - 1))])
    elif kind == "same_set":
        chosen = draw(st.permutations(range(e_total)))[:k]
        bias = forced_bias(e_total, chosen)
    elif kind == "all_zero":
        chosen = draw(st.permutations(range(n, e_total)))[:k]
        bias = forced_bias(e_total, chosen)
    else:  # all_ffn
        bias = forced_bias(e_total, [], excluded=list(range(n, e_total)))
    return RoutingCase(kind, bias)
