"""Expert placement over an expert-parallel group, redundant replicas, and load imbalance.

The most loaded rank sets the pace of a MoE step, so the cost model scales per-GPU expert work
by ``imbalance_factor`` = max rank load / mean rank load (>= 1). Replicas follow the EPLB idea:
the heaviest experts get extra copies, each copy takes an equal share of its expert's tokens,
and copies are packed greedily onto the least loaded rank with a free slot.
"""

from __future__ import annotations

import heapq

import numpy as np

from cluster.errors import ClusterInputError


def slots_per_rank(n_experts: int, ep: int, redundant_experts: int = 0) -> int:
    """Expert slots each rank holds; (N + R) must split evenly over the EP ranks."""
    for name, value in (("EP size", ep), ("expert count", n_experts)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ClusterInputError(f"{name} must be a positive integer, got {value!r}")
    if (
        isinstance(redundant_experts, bool)
        or not isinstance(redundant_experts, int)
        or redundant_experts < 0
    ):
        raise ClusterInputError(
            f"redundant experts must be a non-negative integer, got {redundant_experts!r}"
        )
    slots = n_experts + redundant_experts
    if slots % ep:
        need = (-n_experts) % ep
        raise ClusterInputError(
            f"EP {ep} does not divide {n_experts} experts + {redundant_experts} redundant "
            f"= {slots}; use redundant experts R with (N + R) % EP == 0 (e.g. R = {need})"
        )
    return slots // ep


def replica_counts(loads: np.ndarray, redundant_experts: int) -> np.ndarray:
    """Copies per expert: one each, plus extras to whichever expert has most load per copy."""
    loads = np.asarray(loads, dtype=float)
    counts = np.ones(loads.shape, dtype=np.int64)
    heap = [(-float(load), i) for i, load in enumerate(loads)]
    heapq.heapify(heap)
    for _ in range(redundant_experts):
        _, i = heapq.heappop(heap)
        counts[i] += 1
        heapq.heappush(heap, (-float(loads[i]) / counts[i], i))
    return counts


def rank_loads(loads: np.ndarray, ep: int, redundant_experts: int = 0) -> np.ndarray:
    """Load on each of the ``ep`` ranks after replication and greedy packing."""
    loads = _check_loads(loads)
    per_rank = slots_per_rank(loads.size, ep, redundant_experts)
    counts = replica_counts(loads, redundant_experts)
    shares = np.repeat(loads / counts, counts)
    order = np.argsort(-shares, kind="stable")
    totals = np.zeros(ep)
    used = np.zeros(ep, dtype=np.int64)
    heap = [(0.0, rank) for rank in range(ep)]
    for item in order:
        load, rank = heapq.heappop(heap)
        totals[rank] = load + shares[item]
        used[rank] += 1
        if used[rank] < per_rank:
            heapq.heappush(heap, (totals[rank], rank))
    return totals


def imbalance_factor(loads: np.ndarray, ep: int, redundant_experts: int = 0) -> float:
    """max rank load / mean rank load; 1 when nothing is routed."""
    totals = rank_loads(loads, ep, redundant_experts)
    mean = float(totals.mean())
    if mean <= 0.0 or totals.max() == totals.min():  # equal ranks: exactly balanced
        return 1.0
    return max(1.0, float(totals.max()) / mean)


def sample_expert_loads(
    rng: np.random.Generator,
    n_experts: int,
    pairs: int,
    popularity: np.ndarray | None = None,
) -> np.ndarray:
    """Token-expert pairs per expert when ``pairs`` routing choices land independently with
    probabilities ``popularity`` (uniform when None: a perfectly balanced router, leaving only
    the statistical noise of a finite batch)."""
    if not isinstance(rng, np.random.Generator):
        raise ClusterInputError("sampled routing needs a numpy Generator passed as rng")
    if pairs < 0:
        raise ClusterInputError(f"routed pairs must be >= 0, got {pairs}")
    if popularity is None:
        p = np.full(n_experts, 1.0 / n_experts)
    else:
        p = _check_loads(popularity)
        if p.size != n_experts or p.sum() <= 0:
            raise ClusterInputError(
                f"popularity must hold {n_experts} non-negative weights with a positive sum"
            )
        p = p / p.sum()
    return rng.multinomial(int(pairs), p).astype(float)


def _check_loads(loads: np.ndarray) -> np.ndarray:
    loads = np.asarray(loads, dtype=float)
    if loads.ndim != 1 or loads.size == 0:
        raise ClusterInputError("an expert load histogram must be a non-empty 1-D array")
    if not np.all(np.isfinite(loads)) or np.any(loads < 0):
        raise ClusterInputError("expert loads must be finite and >= 0")
    return loads
