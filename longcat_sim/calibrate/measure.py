"""Host calibration: measure operator costs on this machine, write a hardware profile, and
predict the step time of expert-parallel training from those measurements.

Measured terms (CPU, float32, one torch thread per process):

- ``matmul_gflops``, ``mem_gb_s``, ``op_overhead_us``: GEMM rate at the model's shapes, copy
  bandwidth, the fixed cost of one small op;
- per world size W (:class:`WorldTerms`): the contention ``compute_slowdown``, the model's
  own forward and backward of one sequence with W ranks computing at once over the same
  alone (:func:`contention_probe`); and, by :func:`load_probe` with every rank busy as in
  training, alpha-beta fits of what a synchronous
  ``all_to_all_single``, an overlapped one (its floor: the part that concurrent compute
  cannot hide) and an ``all_gather`` add to a step. On a host with few cores gloo's copies
  need the cores too, so these include the wait for a core, not only the transfer.

The profile these make (``HostMeasurements.to_toml``, with the model's own measured costs)
drives the step model of ``cluster.hoststep``, which ``longcat-sim simulate --mode host-ep``
and ``calibrate`` run.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from longcat_sim.cluster.hoststep import EpModelTerms, WorldTerms
from longcat_sim.model.config import ModelConfig

ASYNC_BURSTS = 4  # compute alongside an overlapped exchange in the probe, in bursts


def seconds(fn: Callable[[], Any]) -> float:
    """Wall time of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], Any], repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(seconds(fn) for _ in range(repeats))


def measure_matmul_gflops(shapes: list[tuple[int, int, int]]) -> dict[str, float]:
    """GEMM GFLOP/s for ``[m, k] x [k, n]`` shapes (inner loop long enough to time)."""
    out = {}
    gen = torch.Generator().manual_seed(0)
    for m, k, n in shapes:
        a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
        reps = max(1, int(2e7 // (2 * m * k * n)))

        def run(a=a, b=b, reps=reps) -> None:
            for _ in range(reps):
                torch.mm(a, b)

        out[f"{m}x{k}x{n}"] = 2 * m * k * n * reps / median_seconds(run) / 1e9
    return out


def measure_memory_gb_s(n_bytes: int = 64 * 2**20) -> float:
    """Read + write bandwidth of a tensor copy, GB/s."""
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    return 2 * n_bytes / median_seconds(lambda: dst.copy_(src)) / 1e9


def measure_op_overhead_us(n_ops: int = 2000) -> float:
    """Time of one tiny elementwise op, microseconds."""
    x = torch.ones(8)

    def run() -> None:
        for _ in range(n_ops):
            torch.add(x, 1.0)

    return median_seconds(run) / n_ops * 1e6


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: the order statistics
    ``(x_(j), x_(n+1-j))`` with the largest ``j`` such that ``P(Binomial(n, 1/2) < j)`` stays
    within ``(1 - level) / 2``; the whole range when ``n`` is too small for the level."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("no values to bound the median of")
    if not 0.0 < level < 1.0:
        raise ValueError(f"the confidence level must lie between 0 and 1, got {level}")
    tail, j, below = (1.0 - level) / 2.0, 0, 0.0  # below = P(X < j + 1) once j counted
    while j < n // 2:
        below += math.comb(n, j) / 2**n  # exact big-integer division: no overflow for large n
        if below > tail:
            break
        j += 1
    j = max(j, 1)
    return ordered[j - 1], ordered[n - j]


def fit_alpha_beta(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least-squares ``t = alpha + bytes / beta``; returns (alpha s, beta B/s)."""
    slope, intercept = np.polyfit(np.asarray(sizes, float), np.asarray(seconds, float), 1)
    slope = max(float(slope), 1e-15)
    return max(float(intercept), 0.0), 1.0 / slope


def compute_burst(reps: int, hidden: int = 64) -> Callable[[], None]:
    """The compute the probes interleave with communication: ``reps`` square GEMMs of the
    model's hidden size (a few milliseconds, like the dense work between two exchanges)."""
    a = torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(0))

    def burst() -> None:
        for _ in range(reps):
            torch.mm(a, a)

    return burst


def _per_iteration(body: Callable[[], Any], rounds: int) -> float:
    dist.barrier()
    start = time.perf_counter()
    for _ in range(rounds):
        body()
    return (time.perf_counter() - start) / rounds


@dataclass(frozen=True)
class LoadProbe:
    """What :func:`load_probe` measures: collective sizes in bytes per rank, the compute burst
    (``burst_reps`` GEMMs of ``hidden``), loop ``rounds`` and ``repeats``, and the two ScMoE
    windows (``window_reps[i]`` GEMMs beside an all-to-all of ``window_bytes``)."""

    a2a_sizes: tuple[int, ...]
    gather_sizes: tuple[int, ...]
    burst_reps: int
    hidden: int = 64
    rounds: int = 20
    repeats: int = 3
    window_reps: tuple[int, ...] = ()
    window_bytes: int = 0


def _probe_loops(world: int, probe: LoadProbe) -> dict[str, Callable[[int], None]]:
    """One iteration of each measured loop, by sample key, indexed by size (or window)."""
    burst = compute_burst(probe.burst_reps, probe.hidden)
    buffers = {n: (torch.ones(n // 4), torch.empty(n // 4)) for n in probe.a2a_sizes}
    gathered = {n: (torch.ones(n // 4), [torch.empty(n // 4) for _ in range(world)])
                for n in probe.gather_sizes}  # fmt: skip
    window_bursts = [compute_burst(reps, probe.hidden) for reps in probe.window_reps]
    window_in = torch.ones(max(probe.window_bytes, 4) // 4)
    window_out = torch.empty_like(window_in)

    def sync_a2a(n: int) -> None:
        burst()
        dist.all_to_all_single(buffers[n][1], buffers[n][0])

    def async_a2a(n: int) -> None:
        work = dist.all_to_all_single(buffers[n][1], buffers[n][0], async_op=True)
        for _ in range(ASYNC_BURSTS):
            burst()
        work.wait()

    def gather(n: int) -> None:
        burst()
        dist.all_gather(gathered[n][1], gathered[n][0])

    def window(i: int, exchange: bool) -> None:
        burst()  # the compute before the window, as the ranks reach it in a step
        work = dist.all_to_all_single(window_out, window_in, async_op=True) if exchange else None
        window_bursts[i]()
        if work is not None:
            work.wait()

    return {
        "compute_s": lambda _: burst(),
        "a2a_s": sync_a2a,
        "a2a_async_s": async_a2a,
        "gather_s": gather,
        "window_s": lambda i: window(i, True),
        "window_compute_s": lambda i: window(i, False),
    }


def load_probe(rank: int, world: int, probe: LoadProbe) -> dict[str, Any]:
    """Run inside a process group of ``world`` ranks, every rank busy as in training.

    Each measurement is a loop of ``compute burst + collective``; the loop of bursts alone,
    timed in the same repeat, is subtracted, so what remains is what a collective adds to a
    step when the ranks alternate compute and communication (including the wake-up of ranks
    whose cores were computing). Returned, per iteration and as medians over ``repeats``:

    - ``compute_s``: one burst with all ranks computing at once (what the terms below are
      measured against; the contention itself comes from :func:`contention_probe`);
    - ``a2a_s[i]``: a synchronous ``all_to_all_single`` of ``a2a_sizes[i]`` bytes per rank;
    - ``a2a_async_s[i]``: the same exchange started before ``ASYNC_BURSTS`` bursts and waited
      for after them (what an exchange costs when compute longer than it runs alongside: the
      part overlap cannot hide);
    - ``gather_s[i]``: an ``all_gather`` of ``gather_sizes[i]`` bytes per rank;
    - ``window_s[i]``: an all-to-all of ``window_bytes`` started, a burst of
      ``window_reps[i]`` GEMMs computed, the exchange waited for (an overlap window at the
      model's own sizes), and ``window_compute_s[i]`` the same burst without the exchange.
    """
    loops = _probe_loops(world, probe)
    windows = tuple(range(len(probe.window_reps)))
    # key -> (indices, bursts of the loop alone to subtract)
    plan = {"a2a_s": (probe.a2a_sizes, 1), "a2a_async_s": (probe.a2a_sizes, ASYNC_BURSTS),
            "gather_s": (probe.gather_sizes, 1), "window_s": (windows, 1),
            "window_compute_s": (windows, 1)}  # fmt: skip
    samples: dict[str, list[list[float]]] = {"compute_s": [], **{key: [] for key in plan}}
    loops["compute_s"](0)  # warm-up
    for _ in range(probe.repeats):
        alone = _per_iteration(lambda: loops["compute_s"](0), probe.rounds)
        samples["compute_s"].append([alone])
        for key, (indices, bursts) in plan.items():
            fn = loops[key]
            row = [_per_iteration(lambda i=i, f=fn: f(i), probe.rounds) for i in indices]
            samples[key].append([t - bursts * alone for t in row])
    out: dict[str, Any] = {"a2a_sizes": list(probe.a2a_sizes),
                           "gather_sizes": list(probe.gather_sizes)}  # fmt: skip
    for key, rows in samples.items():
        medians = [statistics.median(column) for column in zip(*rows, strict=True)]
        out[key] = medians[0] if key == "compute_s" else [max(m, 0.0) for m in medians]
    return out


def contention_probe(
    rank: int,
    world: int,
    cfg: ModelConfig,
    seq_len: int,
    repeats: int = 9,
    step: Callable[[], Any] | None = None,
) -> dict[str, list[float]]:
    """The contention for the cores, measured on the model's own compute: ``step`` (by
    default forward and backward of one sequence through the single-process model, an LM loss
    on its logits) timed with this rank alone (the others waiting at a barrier) and with every
    rank computing at once. The two are alternated repeat by repeat, so a drift in the host's
    speed (other tenants, clocks) hits both alike. Returns the times per repeat, ``alone_s``
    and ``busy_s``."""
    if step is None:
        from longcat_sim.model.transformer import LongcatFlashForCausalLM

        model = LongcatFlashForCausalLM(cfg, generator=torch.Generator().manual_seed(0))
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (1, seq_len), generator=gen)

        def step() -> None:
            model.zero_grad(set_to_none=True)
            logits = model(ids)
            torch.nn.functional.cross_entropy(logits[0].float(), ids[0]).backward()

    step()  # warm-up
    alone, busy = [], []
    for _ in range(repeats):
        for turn in range(world):
            dist.barrier()
            if turn == rank:
                alone.append(seconds(step))
        dist.barrier()
        busy.append(seconds(step))
    return {"alone_s": alone, "busy_s": busy}


def compute_slowdown(contention: list[dict[str, list[float]]]) -> float:
    """Every rank computing at once against one alone, from :func:`contention_probe`'s ranks:
    per repeat the slowest rank's busy time (the others wait for it), its median over the
    repeats, over the median time of a rank alone."""
    slowest = [max(times) for times in zip(*(c["busy_s"] for c in contention), strict=True)]
    alone = [t for c in contention for t in c["alone_s"]]
    return statistics.median(slowest) / statistics.median(alone)


def world_terms_from_probe(probe: dict[str, Any], slowdown: float) -> WorldTerms:
    """Alpha-beta fits of a :func:`load_probe` result, with the measured ``slowdown``."""
    fits = {}
    for key, sizes in (("a2a", "a2a_sizes"), ("a2a_async", "a2a_sizes"),
                       ("gather", "gather_sizes")):  # fmt: skip
        alpha, beta = fit_alpha_beta(probe[sizes], probe[f"{key}_s"])
        fits[f"{key}_latency_us"], fits[f"{key}_gb_s"] = alpha * 1e6, beta / 1e9
    windows = probe.get("window_s", [])
    if len(windows) != 2:
        raise ValueError("the probe must measure two windows: the dispatch's and the combine's")
    computes = probe["window_compute_s"]
    return WorldTerms(
        compute_slowdown=slowdown,
        **fits,
        dispatch_window_s=windows[0],
        dispatch_compute_s=computes[0],
        combine_window_s=windows[1],
        combine_compute_s=computes[1],
    )


def fit_single_process(batch_sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """``step = t_fixed + B * t_slice`` fitted to single-process steps: (t_slice, t_fixed)."""
    if len(set(batch_sizes)) < 2:
        return seconds[0] / batch_sizes[0], 0.0
    slope, intercept = np.polyfit(np.asarray(batch_sizes, float), np.asarray(seconds, float), 1)
    return float(slope), max(float(intercept), 0.0)


@dataclass
class HostMeasurements:
    """What ``longcat-sim calibrate`` measured; ``to_toml`` writes the host profile."""

    cores: int
    matmul_gflops: dict[str, float]
    mem_gb_s: float
    op_overhead_us: float
    worlds: dict[int, WorldTerms] = field(default_factory=dict)
    model: EpModelTerms | None = None

    def to_toml(self, name: str = "this-host") -> str:
        """The profile: a ``[hardware]`` table ``cluster.hardware.load_hardware_file`` accepts
        (CPU rates in the accelerator fields, the loaded all-to-all of the largest world as the
        links), and the tables ``cluster.hoststep.load_host_profile`` reads: ``[host]`` with
        ``[host.worlds."W"]`` per world size, and ``[ep_model]``."""
        peak = max(self.matmul_gflops.values()) / 1e3
        link = self.worlds[max(self.worlds)] if self.worlds else None
        gb_s = link.a2a_gb_s if link else 1.0
        latency = link.a2a_latency_us if link else 100.0
        lines = [
            "[hardware]",
            f'name = "{name}"',
            f"bf16_tflops = {peak:.6g}",
            f"fp8_tflops = {peak:.6g}",  # no low-precision units: every precision at one rate
            f"hbm_tb_s = {self.mem_gb_s / 1e3:.6g}",
            "hbm_gb = 1.0",
            f"nvlink_gb_s = {gb_s:.6g}",
            f"rdma_gb_s = {gb_s:.6g}",
            f"nvlink_latency_us = {latency:.6g}",
            f"rdma_latency_us = {latency:.6g}",
            f"gpus_per_node = {self.cores}",
            'source = "measured by longcat-sim calibrate (CPU float32, gloo under load)"',
            "",
            "[host]",
            f"cores = {self.cores}",
            f"mem_gb_s = {self.mem_gb_s:.6g}",
            f"op_overhead_us = {self.op_overhead_us:.6g}",
            "matmul_gflops = { "
            + ", ".join(f'"{k}" = {v:.6g}' for k, v in self.matmul_gflops.items())
            + " }",
        ]
        for world, terms in sorted(self.worlds.items()):
            lines += ["", f'[host.worlds."{world}"]']
            lines += [f"{k} = {v!r}" for k, v in asdict(terms).items()]
        if self.model is not None:
            lines += ["", "[ep_model]"]
            lines += [f"{k} = {v!r}" for k, v in asdict(self.model).items()]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
