"""Step times for request-level serving, from the step model, memoised on a coarse grid.

A serving instance asks for the time of a step with ``decoding`` requests, ``prefill`` prompt
tokens (at most ``largest_chunk`` of one request) and ``context`` cached tokens summed over the
decoding requests. Per GPU that is b = ceil(decoding / gpus) requests of c = context /
decoding tokens each and p = ceil(prefill / gpus) prompt tokens (the ranks evenly loaded, the
busiest priced). A request's chunk is computed on the one rank that holds it, so when the
largest chunk m exceeds p, that rank's work outside the routed experts (attention, dense
FFNs, shared experts, router), which the others wait for at the next dispatch, is added:
dense(m) - dense(p), with dense() the prefill forward's non-expert compute on one GPU; the
routed experts stay spread over the EP group. The step model prices grid nodes only: b exact up to 16, then 8 nodes per octave and
the batch cap itself; c at 4 nodes per octave from 64 tokens; p at 0, then 4 nodes per octave
from 16 tokens and the step's budget itself. A step between nodes is interpolated linearly on
each axis (trilinear), so a long run prices a few hundred nodes, each once.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from longcat_sim import stages as S
from longcat_sim.cluster import closedform
from longcat_sim.scenarios.decode import decode_workload
from longcat_sim.scenarios.disagg import (
    DisaggSetup,
    colocated_workload,
    comm_seconds,
    kv_transfer_s,
)
from longcat_sim.scenarios.prefill import PrefillSetup, prefill_workload

EXACT_BATCH = 16
BATCH_NODES_PER_OCTAVE = 8
CONTEXT_NODES_PER_OCTAVE = 4
CONTEXT_FIRST_NODE = 64.0
PREFILL_NODES_PER_OCTAVE = 4
PREFILL_FIRST_NODE = 16


def batch_nodes(cap: int) -> list[int]:
    """0..16 exact, then 8 per octave, and ``cap``: the batch nodes up to ``cap``."""
    nodes = set(range(min(cap, EXACT_BATCH) + 1))
    k = 1
    while (value := math.ceil(EXACT_BATCH * 2 ** (k / BATCH_NODES_PER_OCTAVE))) < cap:
        nodes.add(value)
        k += 1
    nodes.add(cap)
    return sorted(nodes)


def prefill_nodes(budget: int) -> list[int]:
    """0, then 4 per octave from 16 tokens, and ``budget``: the prompt-token nodes."""
    nodes = {0, budget}
    k = 0
    while (value := round(PREFILL_FIRST_NODE * 2 ** (k / PREFILL_NODES_PER_OCTAVE))) < budget:
        nodes.add(value)
        k += 1
    return sorted(nodes)


def _bracket(nodes: list[int], x: float) -> tuple[int, int, float]:
    """(lower node, upper node, weight of the upper) around ``x``, clamped to the ends."""
    if x <= nodes[0]:
        return nodes[0], nodes[0], 0.0
    if x >= nodes[-1]:
        return nodes[-1], nodes[-1], 0.0
    i = bisect.bisect_right(nodes, x)
    lo, hi = nodes[i - 1], nodes[i]
    return lo, hi, (x - lo) / (hi - lo)


def _context_bracket(c: float) -> tuple[float, float, float]:
    """The context nodes around ``c`` (64 x 2^(k/4) tokens) and the weight of the upper."""
    if c <= CONTEXT_FIRST_NODE:
        return CONTEXT_FIRST_NODE, CONTEXT_FIRST_NODE, 0.0
    k = math.floor(math.log2(c / CONTEXT_FIRST_NODE) * CONTEXT_NODES_PER_OCTAVE)
    lo = CONTEXT_FIRST_NODE * 2 ** (k / CONTEXT_NODES_PER_OCTAVE)
    hi = CONTEXT_FIRST_NODE * 2 ** ((k + 1) / CONTEXT_NODES_PER_OCTAVE)
    return lo, hi, min(1.0, max(0.0, (c - lo) / (hi - lo)))


@dataclass
class StepTimes:
    """``step_time_s(decoding, prefill, context, largest_chunk)`` of one instance of ``gpus``
    GPUs, from ``price(b, c, p)`` (seconds of a step with b requests of c tokens and p prompt
    tokens per GPU) and ``dense(p)`` (the non-expert compute of p prompt tokens on one GPU),
    each evaluated on the grid nodes only. Without ``dense`` a larger chunk prices the whole
    step at its tokens. For a prefill pool, ``price`` is paced by the NIC at the even share;
    the holding rank's extra compute is added to that (an overestimate when the NIC, not the
    compute, sets the pace)."""

    price: Callable[[int, float, int], float]
    gpus: int
    batch_cap: int
    prefill_budget: int
    dense: Callable[[int], float] | None = None  # non-expert prompt compute on one GPU, s
    nodes: dict[tuple[int, float, int], float] = field(default_factory=dict)
    dense_nodes: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._batch = batch_nodes(max(1, self.batch_cap))
        self._prefill = prefill_nodes(max(1, self.prefill_budget))
        self._prefill_only = [n for n in self._prefill if n > 0]

    def node(self, b: int, c: float, p: int) -> float:
        key = (b, c if b else 0.0, p)
        value = self.nodes.get(key)
        if value is None:
            value = self.nodes[key] = float(self.price(*key))
        return value

    def _dense_at(self, p: float) -> float:
        lo, hi, w = _bracket(self._prefill, p)
        values = []
        for node in (lo, hi):
            if node not in self.dense_nodes:
                self.dense_nodes[node] = float(self.dense(node)) if node else 0.0
            values.append(self.dense_nodes[node])
        return (1 - w) * values[0] + w * values[1]

    def __call__(self, decoding: int, prefill: int, context: int, largest_chunk: int = 0) -> float:
        g = self.gpus
        b, p = -(-decoding // g), -(-prefill // g)
        busiest = 0.0
        if largest_chunk > p:
            if self.dense is None:  # no split of the work: the whole step at that rank's tokens
                p = largest_chunk
            else:
                busiest = self._dense_at(largest_chunk) - self._dense_at(p)
        return self._grid(b, p, context, decoding) + busiest

    def _grid(self, b: int, p: int, context: int, decoding: int) -> float:
        if not b:
            p0, p1, wp = _bracket(self._prefill_only, p)
            return (1 - wp) * self.node(0, 0.0, p0) + wp * self.node(0, 0.0, p1)
        b0, b1, wb = _bracket(self._batch, b)
        c0, c1, wc = _context_bracket(context / decoding)
        p0, p1, wp = _bracket(self._prefill, p)
        total = 0.0
        for bb, fb in ((b0, 1 - wb), (b1, wb)):
            if not fb:
                continue
            for cc, fc in ((c0, 1 - wc), (c1, wc)):
                if not fc:
                    continue
                for pp, fp in ((p0, 1 - wp), (p1, wp)):
                    if fp:
                        total += fb * fc * fp * self.node(bb, cc, pp)
        return total

    @property
    def nodes_priced(self) -> int:
        return len(self.nodes)


def colocated_prefill(setup: DisaggSetup) -> PrefillSetup:
    """The prefill forward a co-located instance runs when no request is decoding: the
    decode pool's hardware, GPUs, EP and schedule with the prompts' lengths."""
    d = setup.decode
    return dataclasses.replace(
        setup.prefill,
        hw=d.hw,
        gpus=d.gpus,
        ep=d.ep,
        schedule=d.schedule,
        attention_dtype=d.attention_dtype,
        attention_tp=d.attention_tp,
        ffn_tp=d.ffn_tp,
        redundant_experts=d.redundant_experts,
    )


def dense_prefill_s(p: PrefillSetup, tokens: int) -> float:
    """Seconds of a prefill forward's compute outside the routed experts on one GPU that
    computes ``tokens`` prompt tokens (both micro-batches under TBO)."""
    w = prefill_workload(dataclasses.replace(p, tokens_per_device=tokens))
    layers, scale = (w.layers, 1) if w.layers else (w.layers_half, 2)
    return scale * sum(st.compute_total - st.get(S.ROUTED_EXPERTS) for st in layers)


def _forward_s(p: PrefillSetup, tokens: int) -> float:
    return closedform.step_time(
        prefill_workload(dataclasses.replace(p, tokens_per_device=tokens)), p.schedule
    )


def colocated_step_times(setup: DisaggSetup, budget_per_gpu: int) -> StepTimes:
    """Steps of a co-located instance: decode, mixed (chunked prefill in a decode step) or,
    with nothing decoding, a prefill forward."""
    d = setup.decode
    alone = colocated_prefill(setup)

    def price(b: int, c: float, p: int) -> float:
        if not b:
            return _forward_s(alone, p)
        if not p:
            w = decode_workload(dataclasses.replace(d, batch_per_device=b, context=c))
            return closedform.step_time(w, d.schedule)
        return closedform.step_time(colocated_workload(setup, b, c, p), d.schedule)

    dense = functools.partial(dense_prefill_s, alone)
    return StepTimes(price, d.gpus, d.batch_per_device, budget_per_gpu, dense)


def decode_pool_step_times(setup: DisaggSetup) -> StepTimes:
    """Steps of a decode-pool instance (prompts arrive with their KV cache)."""
    d = setup.decode

    def price(b: int, c: float, p: int) -> float:
        w = decode_workload(dataclasses.replace(d, batch_per_device=b, context=c))
        return closedform.step_time(w, d.schedule)

    return StepTimes(price, d.gpus, d.batch_per_device, 1)


def prefill_pool_step_times(setup: DisaggSetup) -> StepTimes:
    """Forwards of a prefill-pool instance, paced by its NIC when dispatch, combine and the
    KV transfer of the forward's prompts together need longer than its compute."""
    p = setup.prefill

    def price(b: int, c: float, tokens: int) -> float:
        pw = prefill_workload(dataclasses.replace(p, tokens_per_device=tokens))
        forward = closedform.step_time(pw, p.schedule)
        comm = comm_seconds(pw)
        sized = dataclasses.replace(setup, prefill=dataclasses.replace(p, tokens_per_device=tokens))
        return kv_transfer_s(sized, forward, comm)[1]

    return StepTimes(price, p.gpus, 1, p.tokens_per_device, functools.partial(dense_prefill_s, p))
