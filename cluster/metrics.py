"""Flat event records -> the numbers a deployment is judged by.

Names match the rest of the project: ``tpl_us`` (time per layer), ``tpot_ms`` (time per output
token), ``tps_per_user``, ``tgs`` (tokens per GPU per second), ``cost_per_m_tokens`` (US dollars
per million tokens), ``exposed_comm_share`` and ``per_layer_us``.

Communication is *exposed* while some communication stream of a GPU is busy and its compute
stream is idle, *hidden* while both are busy; both are measured as wall time, so two links
busy at once count once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from longcat_sim import stages as S
from longcat_sim.cluster.streams import EventRecord

# ``per_layer_us`` keys: what each group of stages computes or carries.
STAGE_GROUPS: dict[str, str] = {
    **{stage: "attention" for stage in sorted(S.ATTENTION_STAGES)},
    **{stage: "dense_ffn" for stage in (S.DENSE_FFN_0, S.DENSE_FFN_1, S.DENSE_FFN)},
    S.SHARED_EXPERTS: "shared_experts",
    S.ROUTER: "router",
    S.ROUTED_EXPERTS: "routed_experts",
    S.DISPATCH: "dispatch",
    S.COMBINE: "combine",
    **{stage: "tp_comm" for stage in (S.DENSE_FFN_0_TP, S.DENSE_FFN_1_TP, S.DENSE_FFN_TP)},
}
GROUPS = (
    "attention",
    "dense_ffn",
    "shared_experts",
    "router",
    "dispatch",
    "routed_experts",
    "combine",
    "tp_comm",
)

Interval = tuple[float, float]


@dataclass(frozen=True)
class CommOverlap:
    """Seconds of communication on one GPU: busy (any link), exposed and hidden."""

    comm_s: float
    exposed_s: float
    hidden_s: float


def makespan(records: Iterable[EventRecord]) -> float:
    return max((r.end for r in records), default=0.0)


def stream_busy(records: Iterable[EventRecord]) -> dict[tuple[int, str], float]:
    """Total task seconds per (GPU class, stream)."""
    busy: dict[tuple[int, str], float] = {}
    for r in records:
        busy[(r.gpu, r.stream)] = busy.get((r.gpu, r.stream), 0.0) + r.duration
    return busy


def per_layer_us(records: Iterable[EventRecord]) -> dict[str, float]:
    """Busy microseconds per layer of each stage group (all micro-batches of a layer), averaged
    over the layers that run the group: DeepSeek-V3's dispatch is per MoE layer, not diluted by
    its dense layers. 0 for a group no layer runs."""
    totals = dict.fromkeys(GROUPS, 0.0)
    layers: dict[str, set[int]] = {group: set() for group in GROUPS}
    for r in records:
        group = STAGE_GROUPS.get(r.name)
        if group is not None:
            totals[group] += r.duration
            layers[group].add(r.layer)
    return {
        group: seconds / len(layers[group]) * 1e6 if layers[group] else 0.0
        for group, seconds in totals.items()
    }


def union(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, disjoint intervals covering the same points; empty intervals drop out."""
    merged: list[list[float]] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def measure(intervals: Sequence[Interval]) -> float:
    return sum(e - s for s, e in intervals)


def intersection_measure(a: Sequence[Interval], b: Sequence[Interval]) -> float:
    """Length of the overlap of two sorted disjoint interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo = max(a[i][0], b[j][0])
        hi = min(a[i][1], b[j][1])
        if hi > lo:
            total += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def comm_overlap(records: Iterable[EventRecord], gpu: int = 0) -> CommOverlap:
    """Busy, exposed and hidden communication seconds of GPU class ``gpu``."""
    rows = [r for r in records if r.gpu == gpu]
    comm = union((r.start, r.end) for r in rows if r.is_comm)
    compute = union((r.start, r.end) for r in rows if not r.is_comm)
    busy = measure(comm)
    hidden = intersection_measure(comm, compute)
    return CommOverlap(comm_s=busy, exposed_s=busy - hidden, hidden_s=hidden)


def tpot_ms(step_s: float, draft_tokens: int, accept: float) -> float:
    """Time per output token: a step yields 1 + draft_tokens x accept tokens per request."""
    return step_s * 1e3 / (1.0 + draft_tokens * accept)


def tps_per_user(tpot_ms_value: float) -> float:
    return 1000.0 / tpot_ms_value


def tgs(tokens: float, seconds: float) -> float:
    """Tokens per GPU per second, e.g. tgs(batch per device, TPOT in seconds)."""
    return tokens / seconds


def cost_per_m_tokens(gpu_hour_usd: float, tgs_value: float) -> float:
    """US dollars per million tokens of a GPU rented at ``gpu_hour_usd`` making ``tgs_value``."""
    return gpu_hour_usd / (tgs_value * 3600.0) * 1e6


def exposed_comm_share(exposed_s: float, step_s: float) -> float:
    """Share of the step that communication does not hide behind compute."""
    return exposed_s / step_s if step_s > 0 else 0.0
