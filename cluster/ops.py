"""Hardware-independent work records that the cost model prices: the cluster's own op list.

``longcat_sim.bridge`` builds these from ``model.costs``; tests write them by hand. Counts are
for one GPU's share of a layer before expert parallelism is applied: dense and attention ops
for the tokens this GPU holds, expert ops as token-expert pairs those tokens produce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.cluster.hardware import Precision

OpKind = Literal["gemm", "attention", "vector"]
CommPattern = Literal["dispatch", "combine", "all_gather", "reduce_scatter", "all_reduce"]
LayerKind = Literal["scmoe", "moe", "dense"]

OP_KINDS: tuple[str, ...] = ("gemm", "attention", "vector")
COMM_PATTERNS: tuple[str, ...] = (
    "dispatch",
    "combine",
    "all_gather",
    "reduce_scatter",
    "all_reduce",
)
PRECISIONS: tuple[str, ...] = ("bf16", "fp8")


def _check_amounts(owner: str, record: object, *names: str) -> None:
    """Each named field of ``record`` must be a finite number >= 0."""
    for name in names:
        value = getattr(record, name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ClusterInputError(f"{owner}: {name} must be a number, got {value!r}")
        if not (math.isfinite(value) and value >= 0):
            raise ClusterInputError(f"{owner}: {name} must be finite and >= 0, got {value!r}")


def _check_choice(owner: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ClusterInputError(
            f"{owner}: {name} must be one of {', '.join(choices)}; got {value!r}"
        )


@dataclass(frozen=True)
class ComputeOp:
    """One kernel on one GPU: ``gemm`` (dense matmul), ``attention`` (the attention core, e.g.
    FlashMLA) or ``vector`` (norms, activations, RoPE: bandwidth-bound)."""

    name: str
    stage: str
    kind: OpKind
    flops: float
    weight_bytes: float = 0.0
    act_bytes: float = 0.0
    kv_bytes: float = 0.0
    precision: Precision = "bf16"

    def __post_init__(self) -> None:
        owner = f"op {self.name!r}"
        _check_choice(owner, "kind", self.kind, OP_KINDS)
        _check_choice(owner, "precision", self.precision, PRECISIONS)
        _check_amounts(owner, self, "flops", "weight_bytes", "act_bytes", "kv_bytes")

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.act_bytes + self.kv_bytes


@dataclass(frozen=True)
class ExpertOp:
    """The routed-expert grouped GEMMs of one layer, as token-expert pairs.

    ``pairs`` = tokens on this GPU x FFN experts per token (zero-computation experts excluded).
    Under expert parallelism a GPU computes, on average, as many pairs as its own tokens make;
    the cost model scales that by the load imbalance and reads each resident expert's weights
    once.
    """

    name: str
    stage: str
    pairs: float
    flops_per_pair: float
    act_bytes_per_pair: float
    expert_weight_bytes: float  # one expert's weights
    n_experts: int  # FFN experts in the layer (replicas not counted)
    precision: Precision = "fp8"

    def __post_init__(self) -> None:
        owner = f"expert op {self.name!r}"
        _check_choice(owner, "precision", self.precision, PRECISIONS)
        _check_amounts(
            owner, self, "pairs", "flops_per_pair", "act_bytes_per_pair", "expert_weight_bytes"
        )
        if isinstance(self.n_experts, bool) or not isinstance(self.n_experts, int):
            raise ClusterInputError(f"{owner}: n_experts must be an integer")
        if self.n_experts <= 0:
            raise ClusterInputError(f"{owner}: n_experts must be positive, got {self.n_experts}")


@dataclass(frozen=True)
class CommOp:
    """One collective.

    ``dispatch`` / ``combine``: ``bytes`` is what this GPU's tokens send, all expert copies
    counted (tokens x FFN experts x hidden x bytes per element); the EP group comes from the run.
    ``all_gather`` / ``reduce_scatter`` / ``all_reduce``: ``bytes`` is what each rank sends over
    the whole collective ((group - 1) x its shard for a ring all-gather) and ``group`` the number
    of ranks (tensor or context parallelism).
    ``copies_per_token`` (dispatch / combine): when > 0, the expert copies each token makes,
    sent by throughput ("normal") kernels that cross RDMA once per destination node and fan
    out over NVLink there; 0: every copy travels on its own (low-latency kernels).
    """

    name: str
    stage: str
    pattern: CommPattern
    bytes: float
    group: int = 1
    copies_per_token: float = 0.0

    def __post_init__(self) -> None:
        owner = f"comm {self.name!r}"
        _check_choice(owner, "pattern", self.pattern, COMM_PATTERNS)
        _check_amounts(owner, self, "bytes", "copies_per_token")
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group <= 0:
            raise ClusterInputError(
                f"{owner}: group must be a positive integer, got {self.group!r}"
            )


@dataclass(frozen=True)
class LayerOps:
    """Everything one layer runs on one GPU for one micro-batch."""

    index: int
    kind: LayerKind
    ops: tuple[ComputeOp | ExpertOp, ...]
    comms: tuple[CommOp, ...] = ()

    def __post_init__(self) -> None:
        _check_choice(f"layer {self.index}", "kind", self.kind, ("scmoe", "moe", "dense"))
