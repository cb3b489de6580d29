"""The stages of a LongCat-Flash layer and the ScMoE dataflow between them, as data.

One definition serves the PyTorch model (``model/block.py`` runs its blocks and MoE phases in
``LAYER_ORDER``), the host calibration (it times the dense blocks each exchange is in flight
over, :func:`in_flight_over`) and the cluster simulator (``cluster/schedules.py`` builds its
task graphs from ``LAYER_FLOW``).

Two granularities:

- model steps (``LAYER_ORDER``): the blocks of ``LongcatDecoderLayer`` (attention 0, dense FFN
  0, attention 1, dense FFN 1) and the three MoE phases. ``DISPATCH`` is the MoE's ``start``
  (route, issue the dispatch), ``ROUTED_EXPERTS`` its ``compute`` (wait for the dispatch, run
  the experts, issue the combine), ``COMBINE`` its ``finish`` (wait for the combine). An
  exchange is in flight over the dense steps between the phase that issues it and the phase
  that waits for it.
- cluster stages (``LAYER_FLOW``): the same layer as the simulator prices it, attention 1 split
  into its projections (``ATTENTION_1_QKV``) and its core (``ATTENTION_1_CORE``), each dense
  FFN followed by its tensor-parallel communication, and the router apart from the dispatch;
  plus the standard MoE layer (shared experts) and the dense layer. ``PARTS`` maps a model step
  to its cluster stages.

Nothing here imports the rest of the project.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

# -- stage names ------------------------------------------------------------------------------
ATTENTION_0 = "attn0"
ATTENTION_1 = "attn1"
ATTENTION_1_QKV = "attn1_qkv"
ATTENTION_1_CORE = "attn1_core"
DENSE_FFN_0 = "ffn0"
DENSE_FFN_1 = "ffn1"
DENSE_FFN_0_TP = "ffn0_tp"
DENSE_FFN_1_TP = "ffn1_tp"
ROUTER = "router"
DISPATCH = "dispatch"
ROUTED_EXPERTS = "moe"
COMBINE = "combine"
# standard layers: one attention split into projections and core
ATTENTION_QKV = "attn_qkv"
ATTENTION_CORE = "attn_core"
SHARED_EXPERTS = "shared"
DENSE_FFN = "ffn"
DENSE_FFN_TP = "ffn_tp"

IN = "IN"  # the layer input
OUT = "OUT"  # the layer output

# -- model steps ------------------------------------------------------------------------------
ATTENTIONS = (ATTENTION_0, ATTENTION_1)  # self_attn[i], each followed by its norm
DENSE_FFNS = (DENSE_FFN_0, DENSE_FFN_1)  # mlps[i], reading the norm after attention i
MOE_PHASES = {DISPATCH: "start", ROUTED_EXPERTS: "compute", COMBINE: "finish"}

TOPOLOGIES = ("shortcut", "conventional", "serial")

# Issue order of one layer's steps. ``shortcut`` (LongCat-Flash): the MoE reads the norm of
# attention 0; its dispatch is in flight over FFN_0 and attention 1, its combine over FFN_1.
# ``conventional``: the MoE reads the norm of attention 1 (the input of FFN_1); only FFN_1 is
# left for its dispatch to be in flight over. ``serial``: the shortcut's input, no overlap.
LAYER_ORDER: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "shortcut": (
            ATTENTION_0,
            DISPATCH,
            DENSE_FFN_0,
            ATTENTION_1,
            ROUTED_EXPERTS,
            DENSE_FFN_1,
            COMBINE,
        ),
        "conventional": (
            ATTENTION_0,
            DENSE_FFN_0,
            ATTENTION_1,
            DISPATCH,
            DENSE_FFN_1,
            ROUTED_EXPERTS,
            COMBINE,
        ),
        "serial": (
            ATTENTION_0,
            DISPATCH,
            ROUTED_EXPERTS,
            COMBINE,
            DENSE_FFN_0,
            ATTENTION_1,
            DENSE_FFN_1,
        ),
    }
)

# The cluster stages of each model step.
PARTS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        ATTENTION_0: (ATTENTION_0,),
        DENSE_FFN_0: (DENSE_FFN_0, DENSE_FFN_0_TP),
        ATTENTION_1: (ATTENTION_1_QKV, ATTENTION_1_CORE),
        DENSE_FFN_1: (DENSE_FFN_1, DENSE_FFN_1_TP),
        DISPATCH: (ROUTER, DISPATCH),
        ROUTED_EXPERTS: (ROUTED_EXPERTS,),
        COMBINE: (COMBINE,),
    }
)


def layer_order(topology: str, overlap: bool = True) -> tuple[str, ...]:
    """Model steps of one layer; without ``overlap`` the MoE phases run back to back."""
    if topology not in LAYER_ORDER:
        raise ValueError(f"unknown topology {topology!r}; choose one of {', '.join(TOPOLOGIES)}")
    order = LAYER_ORDER[topology]
    if overlap:
        return order
    start = order.index(DISPATCH)
    rest = [s for s in order[start:] if s not in MOE_PHASES]
    return (*order[:start], DISPATCH, ROUTED_EXPERTS, COMBINE, *rest)


def moe_input(order: Sequence[str]) -> str:
    """The attention whose norm the MoE reads: the last one before the dispatch."""
    return [s for s in order[: order.index(DISPATCH)] if s in ATTENTIONS][-1]


def in_flight_over(order: Sequence[str], exchange: str) -> tuple[str, ...]:
    """The dense steps an exchange (``DISPATCH`` or ``COMBINE``) is in flight over."""
    issued_by = {DISPATCH: DISPATCH, COMBINE: ROUTED_EXPERTS}[exchange]
    waited_by = {DISPATCH: ROUTED_EXPERTS, COMBINE: COMBINE}[exchange]
    return tuple(order[order.index(issued_by) + 1 : order.index(waited_by)])


# -- cluster stages ---------------------------------------------------------------------------
COMM_STAGES = frozenset({DISPATCH, COMBINE, DENSE_FFN_0_TP, DENSE_FFN_1_TP, DENSE_FFN_TP})
MOE_PATH = (ROUTER, DISPATCH, ROUTED_EXPERTS, COMBINE)  # split into token chunks in training
ATTENTION_STAGES = frozenset(
    {ATTENTION_0, ATTENTION_1_QKV, ATTENTION_1_CORE, ATTENTION_QKV, ATTENTION_CORE}
)


def stream_of(stage: str) -> str:
    """``"comm"`` for a communication stage, ``"compute"`` otherwise."""
    return "comm" if stage in COMM_STAGES else "compute"


def _scmoe_flow(topology: str) -> dict[str, tuple[str, ...]]:
    """Stage -> stages it reads, of a ScMoE layer in ``topology``, in forward order."""
    order = LAYER_ORDER[topology]
    router_reads = PARTS[moe_input(order)][-1]
    first_dense = DENSE_FFN_0 if topology != "serial" else None
    return {
        ATTENTION_0: (IN,),  # a = x + MLA_0(x)
        ROUTER: (router_reads,),  # routes the MoE input
        DISPATCH: (ROUTER,),
        ROUTED_EXPERTS: (DISPATCH,),
        COMBINE: (ROUTED_EXPERTS,),
        # b = a + FFN_0(u); without overlap FFN_0 also waits for the combine
        DENSE_FFN_0: (ATTENTION_0,) if first_dense else (ATTENTION_0, COMBINE),
        DENSE_FFN_0_TP: (DENSE_FFN_0,),
        ATTENTION_1_QKV: (DENSE_FFN_0_TP,),  # c = b + MLA_1(b)
        ATTENTION_1_CORE: (ATTENTION_1_QKV,),
        DENSE_FFN_1: (ATTENTION_1_CORE,),  # y = c + FFN_1(n) + m, n = norm(c)
        DENSE_FFN_1_TP: (DENSE_FFN_1,),
        OUT: (DENSE_FFN_1_TP, COMBINE),
    }


# Stage -> stages it reads, per layer kind (``scmoe`` in the shortcut topology).
LAYER_FLOW: Mapping[str, Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "scmoe": MappingProxyType(_scmoe_flow("shortcut")),
        "moe": MappingProxyType(
            {
                ATTENTION_QKV: (IN,),
                ATTENTION_CORE: (ATTENTION_QKV,),
                SHARED_EXPERTS: (ATTENTION_CORE,),
                ROUTER: (ATTENTION_CORE,),
                DISPATCH: (ROUTER,),
                ROUTED_EXPERTS: (DISPATCH,),
                COMBINE: (ROUTED_EXPERTS,),
                OUT: (SHARED_EXPERTS, COMBINE),
            }
        ),
        "dense": MappingProxyType(
            {
                ATTENTION_QKV: (IN,),
                ATTENTION_CORE: (ATTENTION_QKV,),
                DENSE_FFN: (ATTENTION_CORE,),
                DENSE_FFN_TP: (DENSE_FFN,),
                OUT: (DENSE_FFN_TP,),
            }
        ),
    }
)
CONVENTIONAL_FLOW: Mapping[str, tuple[str, ...]] = MappingProxyType(_scmoe_flow("conventional"))
SERIAL_FLOW: Mapping[str, tuple[str, ...]] = MappingProxyType(_scmoe_flow("serial"))

# The dense stages beside the routed experts (what does not read the MoE output), per kind.
BESIDE_EXPERTS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "scmoe": (*PARTS[DENSE_FFN_0], *PARTS[ATTENTION_1], *PARTS[DENSE_FFN_1]),
        "moe": (SHARED_EXPERTS,),
        "dense": (DENSE_FFN, DENSE_FFN_TP),
    }
)
# The attention issued before the router, per kind.
BEFORE_ROUTER: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "scmoe": (ATTENTION_0,),
        "moe": (ATTENTION_QKV, ATTENTION_CORE),
        "dense": (ATTENTION_QKV, ATTENTION_CORE),
    }
)


def follows_flow(order: Sequence[str], flow: Mapping[str, Sequence[str]]) -> bool:
    """Whether ``order`` lists every stage of ``flow`` once, each after every stage it reads."""
    stages = [s for s in flow if s != OUT]
    if sorted(order) != sorted(stages):
        return False
    seen: set[str] = {IN}
    for stage in order:
        if any(src not in seen for src in flow[stage]):
            return False
        seen.add(stage)
    return True


def cluster_order(order: Sequence[str]) -> tuple[str, ...]:
    """Model steps expanded to their cluster stages."""
    return tuple(part for step in order for part in PARTS[step])
