"""The cheapest deployment that serves a traffic within its SLOs (``longcat-sim plan``).

Screening prices every candidate in closed form at steady state, from a few distinct step
pricings shared between candidates (a decode pool's step does not depend on its prefill pool):

- co-located (hardware, GPUs per instance = its EP group, batch cap b, prompt tokens per GPU
  per step c, schedule): at batch b a step must take c* = b x q x P / O prompt tokens per GPU
  to admit requests as fast as they finish (q tokens per request-step with MTP, P computed
  prompt and O output tokens per request). With c >= c* the instance is decode-bound and its
  step is priced as ``serve`` prices it: the mixed step at (b, c*) plus the work outside the
  routed experts that the rank holding a chunk of min(c, P) tokens does beyond c*
  (dense(min(c, P)) - dense(c*)); otherwise prefill-bound at (b c / c*, c). TPOT = step / q;
  TTFT ~ ceil(P / c) steps.
- disaggregated (decode pool as above without prompts; prefill pool: hardware, GPUs per
  instance, prompt tokens per GPU per forward): prefill instances are added until their
  utilisation rho <= 0.9 and the TTFT estimate forward x (1.5 + rho / (1 - rho)) (a forward
  in progress, the own forward and an M/D/1-like queue at twice its mean) plus the exposed KV
  transfer meets the target.

Instances are added until the utilisation is at most ``UTILISATION``; a candidate whose TPOT
at its batch cap, TTFT estimate, KV cache (b requests of P + O tokens reserved) or prefill
HBM fails is screened out with its reason. The cheapest survivors ($ per million output
tokens at the offered rate) are verified by ``serve`` (Poisson arrivals, warm-up left out,
drained to the end), in batches of ``verify`` until one meets the SLO (at most
``VERIFY_ROUNDS`` batches), then every candidate as cheap as the best found; a candidate
``serve`` refuses is kept as lost. Those meeting both targets at the SLO percentile serve the offered traffic, so they are
ranked by their cost at the offered rate (GPU-hours over offered output tokens); the verified
cost per output token of the requests that met both targets is reported beside it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from longcat_sim.cluster import closedform
from longcat_sim.config.plan import PlanChoices
from longcat_sim.config.serving import DisaggDeployment, ServeDeployment
from longcat_sim.errors import UserError
from longcat_sim.scenarios.decode import decode_workload
from longcat_sim.scenarios.disagg import (
    DisaggSetup,
    colocated_workload,
    exposed_transfer,
    resolve_disagg,
)
from longcat_sim.scenarios.executors import map_items
from longcat_sim.scenarios.prefill import prefill_memory
from longcat_sim.scenarios.serve import (
    ServeSetup,
    kv_capacity_tokens,
    load_requests,
    resolve_serve,
    run_serve,
    serve_results,
)
from longcat_sim.scenarios.serve_steps import (
    colocated_prefill,
    dense_prefill_s,
    prefill_pool_step_times,
)

UTILISATION = 0.9
VERIFY_ROUNDS = 3  # batches of --verify candidates served before giving up on a winner
PREFILL_RHO_MAX = 0.9


@dataclass(frozen=True)
class PlanProblem:
    """The traffic, targets and fixed choices every candidate shares."""

    model: str
    rate: float
    prompt_len: float
    output_len: float
    slo_ttft_ms: float
    slo_tpot_ms: float
    slo_percentile: float
    assumptions: str = "default"
    assume: tuple[str, ...] = ()
    mtp_draft_tokens: int | None = None
    mtp_accept: float | None = None
    attention_dtype: str = "bf16"
    prefix_hit: float = 0.0
    trace: str | None = None
    seed: int = 0


@dataclass(frozen=True)
class Candidate:
    """One deployment shape (instance counts come from screening)."""

    layout: str
    hardware: str
    gpus: int
    batch_per_device: int
    tokens_per_device: int
    schedule: str | None
    prefill_gpus: int = 0


@functools.lru_cache(maxsize=512)
def pools(problem: PlanProblem, hardware: str, gpus: int, schedule: str | None, pg: int) -> Any:
    """The resolved pools of a shape (the prefill pool of ``pg`` GPUs, its own EP group)."""
    dep = DisaggDeployment(
        model=problem.model, hardware=hardware, gpus=gpus, schedule=schedule,
        batch_per_device=1, assumptions=problem.assumptions, seed=problem.seed,
        mtp_draft_tokens=problem.mtp_draft_tokens, mtp_accept=problem.mtp_accept,
        attention_dtype=problem.attention_dtype, prompt_len=problem.prompt_len,
        output_len=problem.output_len, prefix_hit=problem.prefix_hit,
        prefill_gpus=max(pg, 1), prefill_schedule=schedule,
    )  # fmt: skip
    return resolve_disagg(dep, problem.assume)


def _balanced_chunk(setup: DisaggSetup, batch: float) -> float:
    d = setup.decode
    q = 1.0 + d.mtp_accept * d.mtp_draft_tokens
    return batch * q * setup.prefill.new_tokens_per_prompt / setup.output_len


def price_task(task: tuple) -> float:
    """Seconds of one distinct step a screening needs: ("decode", problem, hw, gpus, b, 0,
    schedule), ("mixed", ..., b, c, schedule), ("dense", ..., 0, c, schedule: the non-expert
    compute of c prompt tokens on one co-located GPU) or ("prefill", problem, hw, pg, tokens)."""
    kind, problem = task[0], task[1]
    if kind == "prefill":
        _, _, hw, pg, tokens = task
        setup = pools(problem, hw, pg, None, pg)
        setup = dataclasses.replace(
            setup, prefill=dataclasses.replace(setup.prefill, tokens_per_device=tokens)
        )
        return prefill_pool_step_times(setup).price(0, 0.0, tokens)
    _, _, hw, gpus, batch, chunk, schedule = task
    setup = pools(problem, hw, gpus, schedule, gpus)
    d = setup.decode
    context = setup.prefill.prompt_len + setup.output_len / 2
    if kind == "dense":
        return dense_prefill_s(colocated_prefill(setup), chunk)
    if kind == "decode":
        w = decode_workload(dataclasses.replace(d, batch_per_device=batch, context=context))
    else:
        w = colocated_workload(setup, batch, context, chunk)
    return closedform.step_time(w, d.schedule)


def _mixed_point(setup: DisaggSetup, c: Candidate) -> tuple[int, int, int]:
    """(batch, prompt tokens, largest chunk) per GPU of a co-located step in steady state.
    The batch is the cap when the chunks admit requests as fast as they finish, else the batch
    they keep in flight. A prompt is computed on the rank that holds it, a chunk of up to
    ``tokens_per_device`` (or a whole shorter prompt) a step, and that rank's work outside the
    routed experts sets the step (as ``serve`` prices it)."""
    need = _balanced_chunk(setup, c.batch_per_device)
    chunk = max(1, min(c.tokens_per_device, round(setup.prefill.new_tokens_per_prompt)))
    if c.tokens_per_device >= need:
        spread = max(1, round(need))
        return c.batch_per_device, spread, max(chunk, spread)
    scale = c.tokens_per_device / need
    return max(1, math.floor(c.batch_per_device * scale)), c.tokens_per_device, chunk


def tasks_for(problem: PlanProblem, c: Candidate) -> list[tuple]:
    """The distinct steps screening ``c`` needs priced (see :func:`price_task`)."""
    setup = pools(problem, c.hardware, c.gpus, c.schedule, c.gpus)
    if c.layout == "colocated":
        b, p, chunk = _mixed_point(setup, c)
        mixed = [("mixed", problem, c.hardware, c.gpus, b, p, c.schedule)]
        if chunk <= p:
            return mixed
        return mixed + [
            ("dense", problem, c.hardware, c.gpus, 0, tokens, c.schedule) for tokens in (chunk, p)
        ]
    return [
        ("decode", problem, c.hardware, c.gpus, c.batch_per_device, 0, c.schedule),
        ("prefill", problem, c.hardware, c.prefill_gpus, c.tokens_per_device),
    ]


def candidates(space: PlanChoices) -> list[Candidate]:
    """Every combination of ``space``'s values (a disaggregated one per prefill size)."""
    out = []
    for hw, g, b, s, t in itertools.product(
        space.hardware, space.gpus, space.batch_per_device, space.schedule or (None,),
        space.tokens_per_device,
    ):  # fmt: skip
        if "colocated" in space.layout:
            out.append(Candidate("colocated", hw, g, b, t, s))
        if "disagg" in space.layout:
            out.extend(Candidate("disagg", hw, g, b, t, s, pg) for pg in space.prefill_gpus)
    return out


@functools.lru_cache(maxsize=4096)
def kv_capacity_for(problem: PlanProblem, c: Candidate) -> int:
    """KV tokens one instance of the shape holds beside weights, reserve and activations (0
    when the weights alone do not fit)."""
    dep = ServeDeployment(
        model=problem.model, hardware=c.hardware, gpus=c.gpus, schedule=c.schedule,
        batch_per_device=c.batch_per_device, layout=c.layout,
        tokens_per_device=c.tokens_per_device, prompt_len=problem.prompt_len,
        output_len=problem.output_len, assumptions=problem.assumptions,
        attention_dtype=problem.attention_dtype, mtp_draft_tokens=problem.mtp_draft_tokens,
    )  # fmt: skip
    setup = pools(problem, c.hardware, c.gpus, c.schedule, c.gpus)
    return max(0, kv_capacity_tokens(ServeSetup(setup, dep, c.tokens_per_device)))


def _row(c: Candidate, **figures: Any) -> dict[str, Any]:
    return dataclasses.asdict(c) | figures


def screen(problem: PlanProblem, c: Candidate, prices: dict[tuple, float]) -> dict[str, Any]:
    """Steady-state figures of a candidate, the instances it needs, its cost, and why it is
    screened out (``reason``; empty when it passes)."""
    setup = pools(problem, c.hardware, c.gpus, c.schedule, c.gpus)
    d = setup.decode
    q = 1.0 + d.mtp_accept * d.mtp_draft_tokens
    new = setup.prefill.new_tokens_per_prompt
    rate, out_len = problem.rate, setup.output_len
    steps = [prices[t] for t in tasks_for(problem, c)]
    if c.layout == "colocated":
        b, _, _ = _mixed_point(setup, c)
        step = steps[0] + (steps[1] - steps[2] if len(steps) == 3 else 0.0)
        per_instance = b * c.gpus * q / (step * out_len)
        ttft = math.ceil(new / c.tokens_per_device) * step
        instances, pre_instances, pre_gpus = math.ceil(rate / (UTILISATION * per_instance)), 0, 0
        pre_rate = 0.0
        usd_h = instances * c.gpus * d.hw.gpu_hour_usd
    else:
        step, forward = steps
        per_instance = c.batch_per_device * c.gpus * q / (step * out_len)
        instances = math.ceil(rate / (UTILISATION * per_instance))
        pre_rate = c.tokens_per_device * c.prefill_gpus / (forward * new)
        pre_instances, ttft = _prefill_instances(problem, setup, forward, pre_rate)
        pre_gpus = c.prefill_gpus
        usd_h = (instances * c.gpus + pre_instances * pre_gpus) * d.hw.gpu_hour_usd
    tpot = step / q
    cost = usd_h / (rate * out_len * 3600.0) * 1e6
    reason = _screen_reason(problem, c, tpot, ttft)
    return _row(
        c, instances=instances, prefill_instances=pre_instances,
        total_gpus=instances * c.gpus + pre_instances * pre_gpus,
        tpot_ms=tpot * 1e3, ttft_ms=ttft * 1e3, cost_per_m_tokens=cost, reason=reason,
        instance_requests_per_s=per_instance, prefill_instance_requests_per_s=pre_rate,
    )  # fmt: skip


def _prefill_instances(
    problem: PlanProblem, setup: DisaggSetup, forward: float, per_instance: float
) -> tuple[int, float]:
    """(prefill instances, TTFT estimate in s): the fewest instances whose utilisation is at
    most ``PREFILL_RHO_MAX`` and whose TTFT estimate meets the target (up to 4x more)."""
    exposed = float(exposed_transfer_1(setup))
    n = max(1, math.ceil(problem.rate / (PREFILL_RHO_MAX * per_instance)))
    for extra in range(4 * n):
        rho = problem.rate / ((n + extra) * per_instance)
        ttft = forward * (1.5 + rho / (1.0 - rho)) + exposed
        if ttft * 1e3 <= problem.slo_ttft_ms:
            return n + extra, ttft
    return n, forward * (1.5 + (problem.rate / (n * per_instance)) / 0.1) + exposed


def exposed_transfer_1(setup: DisaggSetup) -> float:
    """Exposed KV transfer of one mean-length prompt, in seconds."""
    return float(exposed_transfer(setup, setup.prefill.prompt_len))


def _screen_reason(problem: PlanProblem, c: Candidate, tpot: float, ttft: float) -> str:
    if tpot * 1e3 > problem.slo_tpot_ms:
        return f"TPOT {tpot * 1e3:.1f} ms at batch cap > {problem.slo_tpot_ms:g}"
    if ttft * 1e3 > problem.slo_ttft_ms:
        return f"TTFT estimate {ttft * 1e3:.0f} ms > {problem.slo_ttft_ms:g}"
    capacity = kv_capacity_for(problem, c)
    need = c.batch_per_device * c.gpus * (problem.prompt_len + problem.output_len)
    if capacity < need:
        return f"KV cache holds {capacity} tokens per instance, a full batch needs {need:.0f}"
    if c.layout == "disagg" and not prefill_fits(problem, c.hardware, c.prefill_gpus,
                                                 c.tokens_per_device):  # fmt: skip
        return f"HBM: a prefill forward of {c.tokens_per_device} tokens per GPU does not fit"
    return ""


@functools.lru_cache(maxsize=1024)
def prefill_fits(problem: PlanProblem, hardware: str, gpus: int, tokens: int) -> bool:
    """Whether a prefill instance of ``gpus`` holds its weights and a forward's prompts."""
    p = pools(problem, hardware, gpus, None, gpus).prefill
    return prefill_memory(dataclasses.replace(p, tokens_per_device=tokens)).fits


def verify_window(problem: PlanProblem, row: dict[str, Any]) -> tuple[float, float]:
    """(duration, warm-up) of a verifying run, s: a warm-up of one request's estimated time
    in the system (the batch fills in it), then a window of at least 10 s and 1,000 arrivals."""
    e2e = row["ttft_ms"] / 1e3 + problem.output_len * row["tpot_ms"] / 1e3
    warmup = e2e
    return warmup + max(10.0, 1000.0 / problem.rate), warmup


def serve_deployment(problem: PlanProblem, row: dict[str, Any], duration: float, warmup: float):
    """The ``serve`` deployment of a screened row, offered the problem's traffic."""
    disagg = row["layout"] == "disagg"
    extra = {"prefill_gpus": row["prefill_gpus"], "prefill_instances": row["prefill_instances"]}
    traffic = (
        {"trace": problem.trace}
        if problem.trace
        else {"prompt_len": problem.prompt_len, "output_len": problem.output_len}
    )
    return ServeDeployment(
        model=problem.model, hardware=row["hardware"], gpus=row["gpus"],
        schedule=row["schedule"], batch_per_device=row["batch_per_device"],
        tokens_per_device=row["tokens_per_device"], layout=row["layout"],
        instances=row["instances"], assumptions=problem.assumptions, seed=problem.seed,
        mtp_draft_tokens=problem.mtp_draft_tokens, mtp_accept=problem.mtp_accept,
        attention_dtype=problem.attention_dtype, prefix_hit=problem.prefix_hit,
        rate=problem.rate, duration_s=duration, warmup_s=warmup, drain=True,
        slo_ttft_ms=problem.slo_ttft_ms, slo_tpot_ms=problem.slo_tpot_ms,
        slo_percentile=problem.slo_percentile, **traffic, **(extra if disagg else {}),
    )  # fmt: skip


def verify_task(task: tuple) -> dict[str, Any]:
    """Serve a screened row (``task``: problem, row, duration override or None): the figures
    it is ranked by."""
    problem, row, duration = task
    window, warmup = verify_window(problem, row)
    if duration is not None:
        window, warmup = duration, min(warmup, duration / 2)
    dep = serve_deployment(problem, row, window, warmup)
    try:
        requests = load_requests(dep)
        setup = resolve_serve(dep, requests, problem.assume)
        r = serve_results(setup, run_serve(setup, requests))
    except UserError as exc:  # e.g. a trace's longest request exceeds the KV capacity
        return {"served_slo_met": False, "served_error": str(exc), "served_duration_s": window}
    keys = (
        "slo_met", "ttft_at_slo_percentile_ms", "tpot_at_slo_percentile_ms", "ttft_p50_ms",
        "tpot_p50_ms", "goodput_requests_per_s", "slo_attainment", "requests",
    )  # fmt: skip
    out = {f"served_{k}": r[k] for k in keys} | {"served_duration_s": window}
    good = r["goodput_requests_per_s"] or 0.0
    # the same GPU-hours over the output tokens of the requests that met both targets
    scale = problem.rate / good if good > 0 else math.inf
    out["served_cost_per_m_good_tokens"] = row["cost_per_m_tokens"] * scale
    return out


def verified_reason(problem: PlanProblem, row: dict[str, Any]) -> str:
    """Why a verified row failed its SLO (empty when it met it)."""
    if row["served_slo_met"]:
        return ""
    if "served_error" in row:
        return f"serve refused it: {row['served_error']}"
    q = f"P{problem.slo_percentile:g}"
    ttft, tpot = row["served_ttft_at_slo_percentile_ms"], row["served_tpot_at_slo_percentile_ms"]
    if ttft is None or ttft > problem.slo_ttft_ms:
        return f"serve: TTFT {q} {_ms(ttft)} > {problem.slo_ttft_ms:g} ms"
    return f"serve: TPOT {q} {_ms(tpot)} > {problem.slo_tpot_ms:g} ms"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} ms"


def rank(problem: PlanProblem, verified: Sequence[dict[str, Any]]) -> tuple[Any, list[dict]]:
    """(winner or None, the verified rows in order: met first by cost, then missed), each
    with ``verdict``: why it lost to the winner or what it missed."""
    rows = [dict(r) for r in verified]
    for r in rows:
        r["reason"] = verified_reason(problem, r)
    met = sorted(
        (r for r in rows if not r["reason"]),
        key=lambda r: (
            round(r["cost_per_m_tokens"], 9),
            r["total_gpus"],
            r["served_ttft_at_slo_percentile_ms"],
        ),
    )  # cost, then fewer GPUs, then the lower TTFT at the SLO percentile
    missed = [r for r in rows if r["reason"]]
    winner = met[0] if met else None
    for r in met[1:]:
        extra = r["cost_per_m_tokens"] / winner["cost_per_m_tokens"] - 1.0
        if extra > 1e-9:
            r["reason"] = f"costs {extra:.1%} more per M tokens"
        elif r["total_gpus"] > winner["total_gpus"]:
            r["reason"] = "same cost on more GPUs"
        else:
            r["reason"] = (
                f"same cost, TTFT P{problem.slo_percentile:g} "
                f"{r['served_ttft_at_slo_percentile_ms']:.0f} ms against the winner's "
                f"{winner['served_ttft_at_slo_percentile_ms']:.0f}"
            )
    return winner, met + missed


@dataclass(frozen=True)
class PlanResult:
    winner: dict[str, Any] | None
    verified: list[dict[str, Any]]
    screened: list[dict[str, Any]]
    distinct_steps: int
    screen_s: float
    verify_s: float


def run_plan(
    problem: PlanProblem,
    space: PlanChoices,
    *,
    verify: int = 10,
    verify_duration_s: float | None = None,
    executor: str = "local",
    address: str | None = None,
    workers: int | None = None,
) -> PlanResult:
    """Screen every candidate of ``space``, verify the ``verify`` cheapest that pass with
    ``serve``, rank them."""
    t0 = time.perf_counter()
    shapes = candidates(space)
    tasks = sorted({t for c in shapes for t in tasks_for(problem, c)}, key=repr)
    prices = dict(zip(tasks, map_items(price_task, tasks, executor, address, workers), strict=True))
    screened = [screen(problem, c, prices) for c in shapes]
    screened.sort(key=lambda r: (bool(r["reason"]), r["cost_per_m_tokens"]))
    t1 = time.perf_counter()
    passed = [r for r in screened if not r["reason"]]
    checked: list[dict[str, Any]] = []
    for first in range(0, min(len(passed), VERIFY_ROUNDS * verify), verify):
        top = passed[first : first + verify]
        jobs = [(problem, r, verify_duration_s) for r in top]
        served = map_items(verify_task, jobs, executor, address, workers)
        checked += [r | s for r, s in zip(top, served, strict=True)]
        if any(r["served_slo_met"] for r in checked):  # the next ones cost at least as much
            best = min(r["cost_per_m_tokens"] for r in checked if r["served_slo_met"])
            ties = [r for r in passed[first + verify :] if r["cost_per_m_tokens"] <= best + 1e-12]
            jobs = [(problem, r, verify_duration_s) for r in ties[:verify]]
            served = map_items(verify_task, jobs, executor, address, workers)
            checked += [r | s for r, s in zip(ties, served, strict=False)]
            break
    winner, verified = rank(problem, checked)
    return PlanResult(winner, verified, screened, len(tasks), t1 - t0, time.perf_counter() - t1)
