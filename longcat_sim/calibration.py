"""Host calibration: measure operator costs on this machine, write a hardware profile, and
predict the step time of expert-parallel training from those measurements.

Measured terms (CPU, float32, one torch thread per process):

- ``matmul_gflops``, ``mem_gb_s``, ``op_overhead_us``: GEMM rate at the model's shapes, copy
  bandwidth, the fixed cost of one small op;
- per world size W, by :func:`load_probe` with every rank busy as in training
  (:class:`WorldTerms`): the contention ``compute_slowdown`` (a compute burst with W ranks
  computing at once over the same burst alone), and alpha-beta fits of what a synchronous
  ``all_to_all_single``, an overlapped one (its floor: the part that concurrent compute
  cannot hide) and an ``all_gather`` add to a step. On a host with few cores gloo's copies
  need the cores too, so these include the wait for a core, not only the transfer.

The step-time model of ``train --nproc W`` (``longcat_sim.distributed.ep_train``) over a
batch of B sequences, S = B / W slices per rank, L MoE layers:

    step = slowdown(W) * (S * t_slice + t_fixed)
         + S * L * (a2a(counts) + 2 a2a(rows) + forward exchanges)
         + gather(S * dense gradient) + 3 L gather(expert shard) + gather(losses, counts)

with ``t_slice`` and ``t_fixed`` a straight-line fit of one-process step times over the batch
size (``fit_single_process``). The forward exchanges are the dispatch and the combine: two
synchronous ``a2a(rows)`` without ScMoE; with ScMoE the dispatch runs behind FFN_0 + MLA_1 and
the combine behind FFN_1 (measured forward times, stretched by the contention), each costing
``max(floor, a2a(rows) - hideable compute)``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

ASYNC_BURSTS = 4  # compute alongside an overlapped exchange in the probe, in bursts


def _median_time(fn: Callable[[], Any], repeats: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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

        out[f"{m}x{k}x{n}"] = 2 * m * k * n * reps / _median_time(run) / 1e9
    return out


def measure_memory_gb_s(n_bytes: int = 64 * 2**20) -> float:
    """Read + write bandwidth of a tensor copy, GB/s."""
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    return 2 * n_bytes / _median_time(lambda: dst.copy_(src)) / 1e9


def measure_op_overhead_us(n_ops: int = 2000) -> float:
    """Time of one tiny elementwise op, microseconds."""
    x = torch.ones(8)

    def run() -> None:
        for _ in range(n_ops):
            torch.add(x, 1.0)

    return _median_time(run) / n_ops * 1e6


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


def load_probe(
    rank: int,
    world: int,
    a2a_sizes: tuple[int, ...],
    gather_sizes: tuple[int, ...],
    burst_reps: int,
    hidden: int = 64,
    rounds: int = 20,
    repeats: int = 3,
) -> dict[str, Any]:
    """Run inside a process group of ``world`` ranks, every rank busy as in training.

    Each measurement is a loop of ``compute burst + collective``; the loop of bursts alone,
    timed in the same repeat, is subtracted, so what remains is what a collective adds to a
    step when the ranks alternate compute and communication (including the wake-up of ranks
    whose cores were computing). Returned, per iteration and as medians over ``repeats``:

    - ``compute_s``: one burst with all ranks computing at once (the contention);
    - ``a2a_s[i]``: a synchronous ``all_to_all_single`` of ``a2a_sizes[i]`` bytes per rank;
    - ``a2a_async_s[i]``: the same exchange started before ``ASYNC_BURSTS`` bursts and waited
      for after them (what an exchange costs when compute longer than it runs alongside: the
      part overlap cannot hide);
    - ``gather_s[i]``: an ``all_gather`` of ``gather_sizes[i]`` bytes per rank.
    """
    burst = compute_burst(burst_reps, hidden)
    buffers = {n: (torch.ones(n // 4), torch.empty(n // 4)) for n in a2a_sizes}
    gathered = {n: (torch.ones(n // 4), [torch.empty(n // 4) for _ in range(world)])
                for n in gather_sizes}  # fmt: skip

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

    samples: dict[str, list[list[float]]] = {"compute_s": [], "a2a_s": [], "a2a_async_s": [],
                                             "gather_s": []}  # fmt: skip
    burst()  # warm-up
    for _ in range(repeats):
        alone = _per_iteration(burst, rounds)
        samples["compute_s"].append([alone])
        for key, fn, sizes, bursts in (
            ("a2a_s", sync_a2a, a2a_sizes, 1),
            ("a2a_async_s", async_a2a, a2a_sizes, ASYNC_BURSTS),
            ("gather_s", gather, gather_sizes, 1),
        ):
            row = [_per_iteration(lambda n=n, f=fn: f(n), rounds) - bursts * alone for n in sizes]
            samples[key].append(row)
    out: dict[str, Any] = {"a2a_sizes": list(a2a_sizes), "gather_sizes": list(gather_sizes)}
    for key, rows in samples.items():
        medians = [statistics.median(column) for column in zip(*rows, strict=True)]
        out[key] = medians[0] if key == "compute_s" else [max(m, 0.0) for m in medians]
    return out


@dataclass
class WorldTerms:
    """What :func:`load_probe` measured at one world size, as alpha-beta fits."""

    compute_slowdown: float  # a burst with every rank computing / the same burst alone
    a2a_latency_us: float
    a2a_gb_s: float
    a2a_async_latency_us: float
    a2a_async_gb_s: float
    gather_latency_us: float
    gather_gb_s: float

    @classmethod
    def from_probe(cls, probe: dict[str, Any], alone_s: float) -> WorldTerms:
        fits = {}
        for key, sizes in (("a2a", "a2a_sizes"), ("a2a_async", "a2a_sizes"),
                           ("gather", "gather_sizes")):  # fmt: skip
            alpha, beta = fit_alpha_beta(probe[sizes], probe[f"{key}_s"])
            fits[f"{key}_latency_us"], fits[f"{key}_gb_s"] = alpha * 1e6, beta / 1e9
        return cls(compute_slowdown=probe["compute_s"] / alone_s, **fits)

    def seconds(self, kind: str, n_bytes: float) -> float:
        """Predicted cost of one ``kind`` (a2a, a2a_async, gather) of ``n_bytes`` per rank."""
        alpha = getattr(self, f"{kind}_latency_us") * 1e-6
        return alpha + n_bytes / (getattr(self, f"{kind}_gb_s") * 1e9)

    @property
    def overlap_efficiency(self) -> float:
        """Share of a small synchronous exchange's cost that overlapping it with compute saves."""
        return 1.0 - self.a2a_async_latency_us / max(self.a2a_latency_us, 1e-9)


@dataclass
class HostProfile:
    """What ``longcat-sim calibrate`` measured; ``to_toml`` writes a simulator hardware file."""

    cores: int
    matmul_gflops: dict[str, float]
    mem_gb_s: float
    op_overhead_us: float
    worlds: dict[int, WorldTerms] = field(default_factory=dict)

    def to_toml(self, name: str = "this-host") -> str:
        """A ``[hardware]`` table ``cluster.hardware.load_hardware_file`` accepts (CPU rates in
        the accelerator fields, the loaded gloo all-to-all of the largest world as the links)
        and a ``[host]`` table with the terms the hardware format has no field for."""
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
            lines += [f"{k} = {v:.6g}" for k, v in asdict(terms).items()]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StepWorkload:
    """What one ``train --nproc`` step does, for the step-time model."""

    world: int
    batch_size: int
    seq_len: int
    hidden: int
    layers: int
    n_routed_experts: int
    ffn_slots_per_token: float
    scmoe: bool
    t_slice_s: float  # measured fwd+bwd of one sequence, one process
    t_fixed_s: float = 0.0  # measured once per step: gradient sums, clipping, optimizer
    grad_bytes_per_slice: int = 0  # dense gradient of one slice, gathered from every rank
    expert_shard_bytes: int = 0  # one expert weight's shard on one rank, gathered per layer
    t_dispatch_hide_s: float = 0.0  # measured FFN_0 + MLA_1 forward of one slice, one layer
    t_combine_hide_s: float = 0.0  # measured FFN_1 forward of one slice, one layer


def fit_single_process(batch_sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """``step = t_fixed + B * t_slice`` fitted to single-process steps: (t_slice, t_fixed)."""
    if len(set(batch_sizes)) < 2:
        return seconds[0] / batch_sizes[0], 0.0
    slope, intercept = np.polyfit(np.asarray(batch_sizes, float), np.asarray(seconds, float), 1)
    return float(slope), max(float(intercept), 0.0)


def predict_step_seconds(w: StepWorkload, host: HostProfile) -> dict[str, float]:
    """The step-time model of the module docstring, with its terms."""
    slices = w.batch_size // w.world
    if w.world == 1:
        return {"compute_slices": slices * w.t_slice_s, "compute_fixed": w.t_fixed_s,
                "exchanges": 0.0, "collectives": 0.0, "overlap_saving": 0.0,
                "slices": slices * w.t_slice_s, "step": slices * w.t_slice_s + w.t_fixed_s}  # fmt: skip
    terms = host.worlds[w.world]
    compute_slices = terms.compute_slowdown * slices * w.t_slice_s
    compute_fixed = terms.compute_slowdown * w.t_fixed_s
    rows = 4 * w.seq_len * w.ffn_slots_per_token * w.hidden  # bytes each rank sends per exchange
    counts = 8 * w.n_routed_experts
    sync = terms.seconds("a2a", rows)
    # per layer: the counts, dispatch and combine forward, their two reverses in backward;
    # ScMoE puts the forward dispatch in flight behind FFN_0 + MLA_1 and the combine behind
    # FFN_1: each then costs what that compute cannot hide, and never less than an exchange
    # overlapped with ample compute (the probe's floor: the part of it that needs the cores)
    forward = 2 * sync
    if w.scmoe:
        floor = terms.seconds("a2a_async", rows)
        slow = terms.compute_slowdown
        forward = max(floor, sync - slow * w.t_dispatch_hide_s)
        forward += max(floor, sync - slow * w.t_combine_hide_s)
    exchanges = slices * w.layers * (terms.seconds("a2a", counts) + 2 * sync + forward)
    saving = slices * w.layers * (2 * sync - forward)
    # per step: the dense gradients of every slice, three expert-weight shards per layer, the
    # losses and the bias controller's counts
    collectives = terms.seconds("gather", slices * w.grad_bytes_per_slice)
    collectives += 3 * w.layers * terms.seconds("gather", w.expert_shard_bytes)
    collectives += terms.seconds("gather", 4 * slices)
    collectives += terms.seconds("gather", 8 * w.layers * (w.n_routed_experts + 1))
    return {
        "compute_slices": compute_slices,
        "compute_fixed": compute_fixed,
        "exchanges": exchanges,
        "collectives": collectives,
        "overlap_saving": saving,
        "slices": compute_slices + exchanges,  # the micro-steps, before the gradient exchange
        "step": compute_slices + exchanges + compute_fixed + collectives,
    }
