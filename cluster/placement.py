"""Expert placement over an expert-parallel group, redundant replicas, and load imbalance.

The most loaded rank sets the pace of a MoE step, so the cost model scales per-GPU expert work
by ``imbalance_factor`` = max rank load / mean rank load (>= 1). Replicas follow the EPLB idea:
the heaviest experts get extra copies, each copy takes an equal share of its expert's tokens,
and copies are packed greedily onto the least loaded rank with a free slot.
"""

from __future__ import annotations

import heapq

import numpy as np

from longcat_sim.cluster.errors import ClusterInputError


def check_count(name: str, value: int, *, allow_zero: bool = False) -> None:
    """Raise unless ``value`` is a positive integer (or zero, with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        kind = "non-negative" if allow_zero else "positive"
        raise ClusterInputError(f"{name} must be a {kind} integer, got {value!r}")


def slots_per_rank(n_experts: int, ep: int, redundant_experts: int = 0) -> int:
    """Expert slots each rank holds; (N + R) must split evenly over the EP ranks."""
    check_count("EP size", ep)
    check_count("expert count", n_experts)
    check_count("redundant experts", redundant_experts, allow_zero=True)
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
    if redundant_experts == 0:
        return counts
    heap = [(-load, i) for i, load in enumerate(loads.tolist())]
    heapq.heapify(heap)
    for _ in range(redundant_experts):
        _, i = heapq.heappop(heap)
        counts[i] += 1
        heapq.heappush(heap, (-float(loads[i]) / counts[i], i))
    return counts


def rank_loads(loads: np.ndarray, ep: int, redundant_experts: int = 0) -> np.ndarray:
    """Load on each of the ``ep`` ranks after replication and greedy packing: copies in
    decreasing load, each onto the least loaded rank (lowest index on ties) with a free slot."""
    loads = _check_loads(loads)
    per_rank = slots_per_rank(loads.size, ep, redundant_experts)
    counts = replica_counts(loads, redundant_experts)
    shares = np.repeat(loads / counts, counts)
    ordered = shares[np.argsort(-shares, kind="stable")].tolist()
    totals = [0.0] * ep
    used = [0] * ep
    heap = [(0.0, rank) for rank in range(ep)]
    for share in ordered:
        load, rank = heap[0]
        total = load + share
        totals[rank] = total
        used[rank] += 1
        if used[rank] < per_rank:
            heapq.heapreplace(heap, (total, rank))
        else:
            heapq.heappop(heap)
    return np.array(totals)


def imbalance_factor(loads: np.ndarray, ep: int, redundant_experts: int = 0) -> float:
    """max rank load / mean rank load; 1 when nothing is routed."""
    totals = rank_loads(loads, ep, redundant_experts)
    mean = float(totals.mean())
    if mean <= 0.0 or totals.max() == totals.min():  # equal ranks: exactly balanced
        return 1.0
    return max(1.0, float(totals.max()) / mean)


def rank_loads_batch(loads_LE: np.ndarray, ep: int, redundant_experts: int = 0) -> np.ndarray:
    """:func:`rank_loads` of every row (one histogram per layer) at once: the same greedy
    packing, with the same ties and the same sums, stepped over all rows together."""
    loads_LE = np.asarray(loads_LE, dtype=float)
    if loads_LE.ndim != 2:
        raise ClusterInputError("a batch of expert load histograms must be a 2-D array")
    if loads_LE.size == 0 or not np.all(np.isfinite(loads_LE)) or np.any(loads_LE < 0):
        raise ClusterInputError("expert loads must be finite and >= 0, at least one per expert")
    n_layers, n_experts = loads_LE.shape
    per_rank = slots_per_rank(n_experts, ep, redundant_experts)
    shares_LS = loads_LE
    if redundant_experts:
        shares_LS = np.stack(
            [
                np.repeat(row / counts, counts)
                for row, counts in _replicas(loads_LE, redundant_experts)
            ]
        )
    order_LS = np.argsort(-shares_LS, axis=1, kind="stable")
    sorted_SL = np.take_along_axis(shares_LS, order_LS, axis=1).T.copy()
    totals = np.zeros(n_layers * ep)  # flat (layer, rank)
    used = np.zeros(n_layers * ep, dtype=np.int64)
    free = np.zeros((n_layers, ep))  # a rank's total while it has a free slot, else inf
    free_flat = free.reshape(-1)
    base_L = np.arange(n_layers) * ep
    start = 0
    if np.all(sorted_SL[ep - 1] > 0):
        # the ep heaviest copies, all positive, land one per rank in rank order: each finds
        # the lowest-index rank still empty
        first_LR = sorted_SL[:ep].T
        totals[:] = first_LR.reshape(-1)
        used[:] = 1
        free[:] = first_LR if per_rank > 1 else np.inf
        start = ep
    for share_L in sorted_SL[start:]:
        index_L = base_L + free.argmin(axis=1)
        total_L = totals[index_L] + share_L
        totals[index_L] = total_L
        used_L = used[index_L] + 1
        used[index_L] = used_L
        free_flat[index_L] = np.where(used_L < per_rank, total_L, np.inf)
    totals_LR = totals.reshape(n_layers, ep)
    return totals_LR


def _replicas(loads_LE: np.ndarray, redundant_experts: int):
    for row in loads_LE:
        yield row, replica_counts(row, redundant_experts)


def imbalance_factors(loads_LE: np.ndarray, ep: int, redundant_experts: int = 0) -> np.ndarray:
    """:func:`imbalance_factor` of every row."""
    totals_LR = rank_loads_batch(loads_LE, ep, redundant_experts)
    mean_L = totals_LR.mean(axis=1)
    top_L = totals_LR.max(axis=1)
    flat = (mean_L <= 0.0) | (top_L == totals_LR.min(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio_L = np.maximum(1.0, top_L / mean_L)
    return np.where(flat, 1.0, ratio_L)


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
