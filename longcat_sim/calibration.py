"""Host calibration: measure operator costs on this machine, write a hardware profile, and
predict the step time of expert-parallel training from those measurements.

Measured terms (all on CPU, float32, one torch thread per process):

- ``matmul_gflops``: GEMM rate at several shapes (the expert and dense shapes of the model);
- ``mem_gb_s``: copy bandwidth of a large tensor;
- ``op_overhead_us``: the fixed cost of one small torch op (dispatch, allocation);
- ``a2a_latency_us`` / ``a2a_gb_s``: a least-squares alpha-beta fit of gloo
  ``all_to_all_single`` times between processes, per world size;
- ``overlap_efficiency``: how much of an async all-to-all hides behind concurrent compute,
  ``(t_compute + t_comm - t_both) / min(t_compute, t_comm)``, per world size. On a host with
  few cores gloo's copy threads take cores from the compute, so this is well below one (and
  can be negative when the processes outnumber the cores).

The step-time model of ``train --nproc W`` over a batch of B sequences:

    step = (B / W) * (t_slice * contention(W) + layers * exchanges * t_a2a(W, bytes))
           - scmoe * overlap_efficiency(W) * min(hideable comm, hideable compute)

where ``t_slice`` and ``t_fixed`` come from a straight-line fit of measured single-process
(W = 1) step times over the batch size (``fit_single_process``), the gradient gather moves each
slice's dense gradient to every rank, ``contention(W) = max(1, W / cores)`` and the shortcut topology
(ScMoE) may hide the forward dispatch behind FFN_0 + MLA_1 and the combine behind FFN_1.
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

A2A_BYTES = (4096, 65536, 262144, 1048576)


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


def comm_probe(rank: int, world: int, sizes: tuple[int, ...] = A2A_BYTES) -> dict[str, Any]:
    """Run inside a process group: all-to-all times per size, and the overlap efficiency."""
    times = []
    for n_bytes in sizes:
        x = torch.ones(n_bytes // 4)
        out = torch.empty_like(x)

        def a2a(x=x, out=out) -> None:
            dist.all_to_all_single(out, x)

        dist.barrier()
        times.append(_median_time(a2a, repeats=9))
    x = torch.ones(A2A_BYTES[-1] // 4)
    out = torch.empty_like(x)
    a = torch.randn(64, 64)

    def compute() -> None:
        for _ in range(300):
            torch.mm(a, a)

    def both() -> None:
        work = dist.all_to_all_single(out, x, async_op=True)
        compute()
        work.wait()

    dist.barrier()
    t_compute = _median_time(compute)
    dist.barrier()
    t_comm = _median_time(lambda: dist.all_to_all_single(out, x))
    dist.barrier()
    t_both = _median_time(both)
    efficiency = (t_compute + t_comm - t_both) / min(t_compute, t_comm)
    efficiency = min(1.0, max(-1.0, efficiency))  # timing noise can push it past the bounds
    return {"sizes": list(sizes), "seconds": times, "overlap_efficiency": efficiency}


@dataclass
class HostProfile:
    """What :func:`calibrate_host` measured; ``to_toml`` writes a simulator hardware file."""

    cores: int
    matmul_gflops: dict[str, float]
    mem_gb_s: float
    op_overhead_us: float
    a2a_latency_us: dict[int, float] = field(default_factory=dict)
    a2a_gb_s: dict[int, float] = field(default_factory=dict)
    overlap_efficiency: dict[int, float] = field(default_factory=dict)

    def to_toml(self, name: str = "this-host") -> str:
        """A ``[hardware]`` table ``cluster.hardware.load_hardware_file`` accepts (CPU rates in
        the accelerator fields, the gloo all-to-all as the scale-up link) and a ``[host]`` table
        with the terms the hardware format has no field for."""
        peak = max(self.matmul_gflops.values()) / 1e3
        world = max(self.a2a_gb_s) if self.a2a_gb_s else 2
        lines = [
            "[hardware]",
            f'name = "{name}"',
            f"bf16_tflops = {peak:.6g}",
            f"fp8_tflops = {peak:.6g}",  # no low-precision units: every precision at one rate
            f"hbm_tb_s = {self.mem_gb_s / 1e3:.6g}",
            "hbm_gb = 1.0",
            f"nvlink_gb_s = {self.a2a_gb_s.get(world, 1.0):.6g}",
            f"rdma_gb_s = {self.a2a_gb_s.get(world, 1.0):.6g}",
            f"nvlink_latency_us = {self.a2a_latency_us.get(world, 100.0):.6g}",
            f"rdma_latency_us = {self.a2a_latency_us.get(world, 100.0):.6g}",
            f"gpus_per_node = {self.cores}",
            'source = "measured by longcat-sim calibrate (CPU float32, gloo all_to_all)"',
            "",
            "[host]",
            f"cores = {self.cores}",
            f"mem_gb_s = {self.mem_gb_s:.6g}",
            f"op_overhead_us = {self.op_overhead_us:.6g}",
            "matmul_gflops = { "
            + ", ".join(f'"{k}" = {v:.6g}' for k, v in self.matmul_gflops.items())
            + " }",
        ]
        for label, table in (
            ("a2a_latency_us", self.a2a_latency_us),
            ("a2a_gb_s", self.a2a_gb_s),
            ("overlap_efficiency", self.overlap_efficiency),
        ):
            entries = ", ".join(f'"{w}" = {v:.6g}' for w, v in sorted(table.items()))
            lines.append(f"{label} = {{ {entries} }}")
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
    ffn_slots_per_token: float
    scmoe: bool
    t_slice_s: float  # measured fwd+bwd of one sequence, one process
    t_hideable_s: float  # measured FFN_0 + MLA_1 + FFN_1 forward per sequence (ScMoE overlap)
    t_fixed_s: float = 0.0  # measured once per step: gradient sums, clipping, optimizer
    grad_bytes_per_slice: int = 0  # dense gradient of one slice, gathered from every rank


def fit_single_process(batch_sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """``step = t_fixed + B * t_slice`` fitted to single-process steps: (t_slice, t_fixed)."""
    if len(set(batch_sizes)) < 2:
        return seconds[0] / batch_sizes[0], 0.0
    slope, intercept = np.polyfit(np.asarray(batch_sizes, float), np.asarray(seconds, float), 1)
    return float(slope), max(float(intercept), 0.0)


def predict_step_seconds(w: StepWorkload, host: HostProfile) -> dict[str, float]:
    """The step-time model of the module docstring, with its terms."""
    slices = w.batch_size // w.world
    contention = max(1.0, w.world / host.cores)
    compute = (slices * w.t_slice_s + w.t_fixed_s) * contention
    if w.world == 1:
        return {"compute": compute, "comm": 0.0, "hidden": 0.0, "step": compute}
    row_bytes = 4 * w.hidden
    remote = w.seq_len * w.ffn_slots_per_token * (w.world - 1) / w.world
    bytes_per_peer = remote * row_bytes / (w.world - 1)
    alpha = host.a2a_latency_us[w.world] * 1e-6
    beta = host.a2a_gb_s[w.world] * 1e9
    one = alpha + bytes_per_peer * (w.world - 1) / beta
    # per layer: counts + dispatch + combine forward, their two reverses in backward
    comm = slices * w.layers * (5 * one)
    # per-slice dense gradients gathered from every rank (all_gather of W blocks)
    comm += alpha + slices * w.grad_bytes_per_slice * (w.world - 1) / beta
    hidden = 0.0
    if w.scmoe:
        fwd_comm = slices * w.layers * 2 * one
        hideable = slices * w.t_hideable_s * contention
        hidden = host.overlap_efficiency[w.world] * min(fwd_comm, hideable)
    return {"compute": compute, "comm": comm, "hidden": hidden, "step": compute + comm - hidden}
