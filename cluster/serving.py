"""Request-level serving: instances running continuous batching, on the SimPy clock.

Each instance is one SimPy process that runs steps back to back while it holds requests. At a
step boundary it admits queued requests (first come, first served) up to a batch cap and a
KV-token capacity (an admitted request reserves its cached + prompt + output tokens, so the
cache it holds never exceeds the capacity). In a step, requests still prefilling compute, in
admission order, a chunk of at most ``chunk_tokens`` of their prompt each until the step's
``prefill_budget_tokens`` are spent (co-located chunked prefill; a first token comes at the
end of a request's last prefill step), and every other request emits one token, or 1 + the
accepted draft tokens when drafting. The step lasts
``step_time_s(decoding, prefill_tokens, context_tokens, largest_chunk)`` seconds
(``context_tokens``: the cache the decoding requests attend to, summed; ``largest_chunk``: the
most prompt tokens one request computes in the step), a function the caller gives (and
memoises). A router sends each arrival to the instance with the fewest requests in the system,
ties to the lowest index. Requests are bookkept in numpy arrays, never one process each.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np
import simpy

from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.cluster.traffic import Requests, seed_streams

StepTimeFn = Callable[[int, int, int, int], float]
_Process = Generator[simpy.Event, object, None]


@dataclass(frozen=True)
class ServingConfig:
    """The deployment: instances, their batching limits, drafting, horizon and SLO limits."""

    instances: int = 1
    batch_cap: int = 256
    kv_capacity_tokens: int | None = None
    chunk_tokens: int = 8192
    prefill_budget_tokens: int | None = None
    draft_tokens: int = 0
    acceptance: float = 0.0
    horizon_s: float | None = None
    slo_ttft_s: float = math.inf
    slo_tpot_s: float = math.inf

    def __post_init__(self) -> None:
        positive = {
            "instances": self.instances,
            "batch_cap": self.batch_cap,
            "chunk_tokens": self.chunk_tokens,
        }
        for name, value in positive.items():
            if not (isinstance(value, int) and value >= 1):
                raise ClusterInputError(f"serving: {name} {value!r} must be an integer >= 1")
        if self.prefill_budget_tokens is not None and not self.prefill_budget_tokens >= 1:
            raise ClusterInputError(
                f"serving: prefill_budget_tokens {self.prefill_budget_tokens!r} must be >= 1 or "
                "None"
            )
        if self.kv_capacity_tokens is not None and not self.kv_capacity_tokens >= 1:
            raise ClusterInputError(
                f"serving: kv_capacity_tokens {self.kv_capacity_tokens!r} must be >= 1 or None"
            )
        if not (isinstance(self.draft_tokens, int) and self.draft_tokens >= 0):
            raise ClusterInputError(f"serving: draft_tokens {self.draft_tokens!r} must be >= 0")
        if not 0.0 <= self.acceptance <= 1.0:
            raise ClusterInputError(f"serving: acceptance {self.acceptance!r} must be in [0, 1]")
        if self.horizon_s is not None and not (
            self.horizon_s > 0 and math.isfinite(self.horizon_s)
        ):
            raise ClusterInputError(f"serving: horizon_s {self.horizon_s!r} must be > 0 or None")
        if not (self.slo_ttft_s > 0 and self.slo_tpot_s > 0):
            raise ClusterInputError("serving: SLO limits slo_ttft_s and slo_tpot_s must be > 0")


@dataclass(frozen=True)
class ServingResult:
    """Per-request times (NaN where not reached), per-step samples and a summary.

    ``tpot_s`` is (finish - first token) / (output - 1), NaN for one-token outputs. The step
    samples (``step_*``) are taken at each step's start, after admission.
    """

    arrival_s: np.ndarray
    start_s: np.ndarray
    first_token_s: np.ndarray
    finish_s: np.ndarray
    ttft_s: np.ndarray
    tpot_s: np.ndarray
    e2e_s: np.ndarray
    instance: np.ndarray
    step_instance: np.ndarray
    step_start_s: np.ndarray
    step_s: np.ndarray
    step_queue: np.ndarray
    step_batch: np.ndarray
    step_decoding: np.ndarray
    step_prefill_tokens: np.ndarray
    step_kv_tokens: np.ndarray
    in_system_at_end: np.ndarray
    end_s: float
    time_avg_in_system: float
    busy_share: np.ndarray
    summary: dict = field(default_factory=dict)


def _ints() -> np.ndarray:
    return np.empty(0, dtype=np.int64)


@dataclass
class _Instance:
    """One instance's queue and running batch; the batch arrays are aligned with ``idx``."""

    queue: deque = field(default_factory=deque)
    idx: np.ndarray = field(default_factory=_ints)
    left: np.ndarray = field(default_factory=_ints)  # prompt tokens still to prefill
    gen: np.ndarray = field(default_factory=_ints)  # output tokens generated
    out: np.ndarray = field(default_factory=_ints)  # output tokens wanted
    base: np.ndarray = field(default_factory=_ints)  # cached + prompt tokens
    fresh: int = 0  # admitted with no prompt and no token yet
    kv_used: int = 0
    idle: bool = False
    wake: simpy.Event | None = None


class _Engine:
    """The state of one run: request arrays, instances, router and the in-system integral."""

    def __init__(self, requests: Requests, step_time_s: StepTimeFn, cfg: ServingConfig, seed: int):
        n = len(requests)
        self.env = simpy.Environment()
        self.cfg, self.step_time_s = cfg, step_time_s
        self.arrival = np.asarray(requests.arrival_s, dtype=np.float64)
        self.prompt = np.asarray(requests.prompt_tokens, dtype=np.int64)
        self.output = np.asarray(requests.output_tokens, dtype=np.int64)
        self.cached = requests.cached
        self.base = self.cached + self.prompt
        self.need = (self.base + self.output).tolist()  # KV tokens reserved at admission
        self.no_prompt = (self.prompt == 0).tolist()
        self.prefilled = np.zeros(n, dtype=np.int64)
        self.generated = np.zeros(n, dtype=np.int64)
        self.start = np.full(n, np.nan)
        self.first = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        self.where = np.full(n, -1, dtype=np.int64)
        self.rng = seed_streams(seed)["acceptance"]
        self.instances = [_Instance() for _ in range(cfg.instances)]
        self.in_system = [0] * cfg.instances
        self.next = 0
        self.idle_count = 0
        self.idle_signal: simpy.Event | None = None
        self.area, self.last_t = 0.0, 0.0  # integral of the number in system, and up to when
        self.steps: list[tuple] = []

    def advance(self) -> None:
        """Integrate the requests the instances hold (queued + running) up to now."""
        now = self.env.now
        held = sum(len(inst.queue) + len(inst.idx) for inst in self.instances)
        self.area += held * (now - self.last_t)
        self.last_t = now

    def route_until(self, t: float) -> None:
        """Route every arrival at or before ``t`` to the least-loaded instance, in order."""
        arrival, load = self.arrival, self.in_system
        self.advance()
        while self.next < len(arrival) and arrival[self.next] <= t:
            i = self.next
            k = load.index(min(load))
            inst = self.instances[k]
            inst.queue.append(i)
            load[k] += 1
            self.where[i] = k
            self.area += self.last_t - arrival[i]  # in the system before it was routed
            if inst.idle:
                inst.idle = False
                self.idle_count -= 1
                inst.wake.succeed()
            self.next += 1

    def arrivals(self) -> _Process:
        """Wake at arrivals while some instance is idle; busy instances route at step ends."""
        env = self.env
        while self.next < len(self.arrival):
            if self.idle_count:
                a = float(self.arrival[self.next])
                yield env.timeout(max(a - env.now, 0.0))
                self.route_until(a)
            else:
                self.idle_signal = env.event()
                yield self.idle_signal

    def _go_idle(self, inst: _Instance) -> simpy.Event:
        inst.idle = True
        inst.wake = self.env.event()
        self.idle_count += 1
        if self.idle_signal is not None and not self.idle_signal.triggered:
            self.idle_signal.succeed()
        return inst.wake

    def _admit(self, inst: _Instance) -> None:
        """Move queued requests into the batch, in order, while the cap and KV capacity allow."""
        kv_cap = self.cfg.kv_capacity_tokens
        room = self.cfg.batch_cap - len(inst.idx)
        taken: list[int] = []
        while inst.queue and len(taken) < room:
            i = inst.queue[0]
            need = self.need[i]
            if kv_cap is not None and inst.kv_used + need > kv_cap:
                break
            inst.queue.popleft()
            inst.kv_used += need
            taken.append(i)
        if taken:
            new = np.array(taken, dtype=np.int64)
            # an arrival woken by a timeout of (arrival - now) may land an ulp early
            self.start[new] = np.maximum(self.env.now, self.arrival[new])
            inst.fresh += sum(self.no_prompt[i] for i in taken)
            inst.idx = np.concatenate([inst.idx, new])
            inst.left = np.concatenate([inst.left, self.prompt[new]])
            inst.gen = np.concatenate([inst.gen, np.zeros(len(new), dtype=np.int64)])
            inst.out = np.concatenate([inst.out, self.output[new]])
            inst.base = np.concatenate([inst.base, self.base[new]])

    def instance(self, k: int) -> _Process:
        """One instance: admit at each boundary, run a step, apply its tokens; idle when empty."""
        inst, env, chunk_cap = self.instances[k], self.env, self.cfg.chunk_tokens
        budget = self.cfg.prefill_budget_tokens
        while True:
            self._admit(inst)
            if not len(inst.idx):
                yield self._go_idle(inst)
                continue
            chunk = np.minimum(inst.left, chunk_cap)
            if budget is not None:
                spent = np.cumsum(chunk) - chunk  # tokens the earlier requests take
                chunk = np.clip(budget - spent, 0, chunk)
            decoding = inst.left == 0
            n_dec, n_pre = int(np.count_nonzero(decoding)), int(chunk.sum())
            ctx = int(inst.base[decoding].sum() + inst.gen[decoding].sum()) if n_dec else 0
            largest = int(chunk.max()) if n_pre else 0
            dt = float(self.step_time_s(n_dec, n_pre, ctx, largest))
            if not (dt > 0 and math.isfinite(dt)):
                raise ClusterInputError(
                    f"serving: step_time_s({n_dec}, {n_pre}, {ctx}, {largest}) gave {dt!r}; it "
                    "must be > 0 and finite"
                )
            row = (
                k, env.now, dt, len(inst.queue), len(inst.idx), n_dec, n_pre,
                n_dec - inst.fresh, inst.kv_used,
            )  # fmt: skip
            self.steps.append(row)
            yield env.timeout(dt)
            self.route_until(env.now)
            self._apply_step(k, chunk, decoding)

    def _accepted(self, n: int) -> np.ndarray:
        """Accepted drafts for ``n`` requests: leading successes of Bernoulli(p) per draft."""
        draws = self.rng.random((n, self.cfg.draft_tokens)) < self.cfg.acceptance
        return np.cumprod(draws, axis=1).sum(axis=1)

    def _apply_step(self, k: int, chunk: np.ndarray, decoding: np.ndarray) -> None:
        """Tokens of the step just ended: prefill chunks, first tokens, decode tokens, finishes."""
        t, inst = self.env.now, self.instances[k]
        inst.left = inst.left - chunk
        emits = inst.left == 0  # decoding, or prefill finished in this step
        gen = inst.gen + emits
        if self.cfg.draft_tokens and decoding.any():
            gen[decoding] += self._accepted(int(np.count_nonzero(decoding)))
            np.minimum(gen, inst.out, out=gen)
        first = emits & (inst.gen == 0)
        self.first[inst.idx[first]] = t
        inst.gen, inst.fresh = gen, 0
        done = gen >= inst.out
        if done.any():
            self.advance()
            gone = inst.idx[done]
            self.finish[gone] = t
            self.generated[gone] = gen[done]
            self.prefilled[gone] = self.prompt[gone]
            inst.kv_used -= int(inst.base[done].sum() + inst.out[done].sum())
            keep = ~done
            inst.idx, inst.left, inst.gen, inst.out, inst.base = (
                inst.idx[keep],
                inst.left[keep],
                gen[keep],
                inst.out[keep],
                inst.base[keep],
            )
            self.in_system[k] -= len(gone)

    def write_back(self) -> None:
        """Copy the tokens of requests still running into the per-request arrays."""
        for inst in self.instances:
            self.generated[inst.idx] = inst.gen
            self.prefilled[inst.idx] = self.prompt[inst.idx] - inst.left


def _stats(prefix: str, values: np.ndarray) -> dict[str, float]:
    """Mean and P50/P90/P99 of the finite ``values`` (NaN when there are none)."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        return {f"{prefix}_{s}_s": math.nan for s in ("mean", "p50", "p90", "p99")}
    p50, p90, p99 = np.percentile(finite, [50, 90, 99])
    return {
        f"{prefix}_mean_s": float(finite.mean()),
        f"{prefix}_p50_s": float(p50),
        f"{prefix}_p90_s": float(p90),
        f"{prefix}_p99_s": float(p99),
    }


def _weighted_stats(prefix: str, values: np.ndarray, weights: np.ndarray) -> dict[str, float]:
    """Mean and percentiles of ``values`` each counted ``weights`` times (inverted CDF)."""
    keep = weights > 0
    values, weights = values[keep], weights[keep]
    if not len(values):
        return _stats(prefix, np.empty(0))
    order = np.argsort(values, kind="stable")
    values, cum = values[order], np.cumsum(weights[order])
    out = {f"{prefix}_mean_s": float(np.dot(values, weights[order]) / cum[-1])}
    for q in (50, 90, 99):
        idx = int(np.searchsorted(cum, q / 100 * cum[-1], side="left"))
        out[f"{prefix}_p{q}_s"] = float(values[min(idx, len(values) - 1)])
    return out


def simulate_serving(
    requests: Requests, step_time_s: StepTimeFn, config: ServingConfig, seed: int = 0
) -> ServingResult:
    """Serve ``requests`` on ``config.instances`` instances; until drained or ``horizon_s``.

    ``seed`` feeds the ``acceptance`` stream of draft tokens.
    """
    if not len(requests):
        raise ClusterInputError("serving: the workload holds no requests")
    kv_cap = config.kv_capacity_tokens
    if kv_cap is not None:
        largest = int(np.max(requests.cached + requests.prompt_tokens + requests.output_tokens))
        if largest > kv_cap:
            raise ClusterInputError(
                f"serving: a request needs {largest} KV tokens, over kv_capacity_tokens {kv_cap}"
            )
    eng = _Engine(requests, step_time_s, config, seed)
    eng.env.process(eng.arrivals())
    for k in range(config.instances):
        eng.env.process(eng.instance(k))
    if config.horizon_s is None:
        eng.env.run()
        end = float(eng.env.now)
    else:
        end = float(config.horizon_s)
        eng.env.run(until=end)
        eng.route_until(end)
    eng.advance()
    eng.write_back()
    return _result(eng, end)


def _result(eng: _Engine, end: float) -> ServingResult:
    """Per-request latencies, step samples and the summary of a finished run."""
    steps = np.array(eng.steps, dtype=np.float64).reshape(-1, 9)
    k_col = steps[:, 0].astype(np.int64)
    step_start, step_s = steps[:, 1], steps[:, 2]
    busy = np.zeros(eng.cfg.instances)
    np.add.at(busy, k_col, np.clip(np.minimum(step_start + step_s, end) - step_start, 0, None))
    first, finish, arrival = eng.first, eng.finish, eng.arrival
    ttft, e2e = first - arrival, finish - arrival
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(eng.output > 1, (finish - first) / (eng.output - 1), np.nan)
    left = np.flatnonzero((arrival <= end) & np.isnan(finish))
    time_avg = eng.area / end if end > 0 else 0.0
    summary = _summary(eng, end, steps, busy)
    summary["requests_in_system_at_end"] = len(left)
    summary["time_avg_in_system"] = time_avg
    return ServingResult(
        arrival, eng.start, first, finish, ttft, tpot, e2e, eng.where,
        k_col, step_start, step_s, steps[:, 3].astype(np.int64), steps[:, 4].astype(np.int64),
        steps[:, 5].astype(np.int64), steps[:, 6].astype(np.int64), steps[:, 8].astype(np.int64),
        left, end, time_avg, busy / end if end > 0 else busy, summary,
    )  # fmt: skip


def latency_summary(
    arrival: np.ndarray,
    first: np.ndarray,
    finish: np.ndarray,
    output: np.ndarray,
    end: float,
    slo_s: tuple[float, float] = (math.inf, math.inf),
    start: float = 0.0,
) -> dict:
    """Counts, TTFT/TPOT/end-to-end percentiles, goodput and SLO attainment of per-request
    times (NaN where not reached) for requests arriving in [start, end]; ``slo_s``: (TTFT,
    TPOT) limits in seconds. Attainment counts, beside the finished requests, the unfinished
    ones whose first token came, or is still awaited, past the TTFT limit (they have missed
    it already)."""
    ttft, e2e = first - arrival, finish - arrival
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(output > 1, (finish - first) / (output - 1), np.nan)
    span = end - start if end > start else math.nan
    done = np.isfinite(e2e)
    waited = np.where(np.isnan(first), end, first) - arrival  # so far, for the unserved
    late = ~done & (arrival <= end) & (waited > slo_s[0])
    met = done & (ttft <= slo_s[0]) & ~(tpot > slo_s[1])
    out: dict = {
        "requests": len(arrival),
        "requests_arrived": int(np.count_nonzero(arrival <= end)),
        "requests_finished": int(np.count_nonzero(done)),
        "duration_s": end,
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
        out.update(_stats(name, values))
    out["requests_met_slo"] = int(np.count_nonzero(met))
    out["goodput_requests_per_s"] = int(np.count_nonzero(met)) / span
    judged = np.count_nonzero(done) + np.count_nonzero(late)
    out["slo_attainment"] = float(np.count_nonzero(met) / max(1, judged))
    return out


def _summary(eng: _Engine, end: float, steps: np.ndarray, busy: np.ndarray) -> dict:
    """Latency percentiles, throughput, goodput and SLO attainment over [0, end]."""
    cfg, span = eng.cfg, end if end > 0 else math.nan
    out = latency_summary(
        eng.arrival, eng.first, eng.finish, eng.output, end, (cfg.slo_ttft_s, cfg.slo_tpot_s)
    )
    # a step's gap counts once for each request emitting a token after its first; steps still
    # running at the end have not emitted
    itl_weights = np.where(steps[:, 1] + steps[:, 2] <= end, steps[:, 7], 0.0)
    out.update(_weighted_stats("itl", steps[:, 2], itl_weights))
    out["throughput_input_tokens_per_s"] = float(eng.prefilled.sum()) / span
    out["throughput_output_tokens_per_s"] = float(eng.generated.sum()) / span
    out["busy_share_mean"] = float(busy.mean() / span)
    return out
