"""World-size invariance: one process against a gloo data-parallel world on the same step.

Both worlds compute step ``step`` of an entry point's experiment from the same seed, on one
intra-op thread per process. Each rank takes its contiguous share of ``batch(step)`` (split
along dimension 0 by ``torch.tensor_split``), runs ``loss(model, share)`` and backward, then
averages gradients with ``all_reduce(SUM) / world_size``; the world of one runs the whole batch.
The property compares every module's outputs (each rank's rows against the same rows of the
world of one, in execution order) and then the averaged gradients, bitwise. With unequal shares
or any reduction that sums in another order (a GEMM over the batch, the all-reduce itself) it
is expected to FAIL; it holds only where every sum is exact or ordered alike.

``python -m longcat_sim.repro.entry_worker rank SPEC.json OUT.pt`` is one rank.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from longcat_sim.errors import UserError
from longcat_sim.repro.entry import build_experiment
from longcat_sim.repro.properties import PropertyResult, result, slice_align, tokens_per_row
from longcat_sim.repro.trace import bitwise_equal, first_module_divergence, measure, trace_outputs


def _share(batch: Any, rank: int, world: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return torch.tensor_split(batch, world)[rank]
    return type(batch)(_share(item, rank, world) for item in batch)


def _first(batch: Any) -> torch.Tensor:
    return batch if isinstance(batch, torch.Tensor) else _first(batch[0])


def run_rank(spec: dict[str, Any], out: str | Path) -> None:
    """Save one rank's module outputs, rows and averaged gradients to ``out`` (``spec``:
    entry, seed, step, rank, world, port). The file is written after a barrier, before the
    process group is torn down, so a crash in gloo's teardown loses no result."""
    import torch.distributed as dist

    rank, world = int(spec["rank"]), int(spec["world"])
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{spec['port']}", rank=rank, world_size=world
    )
    try:
        exp = build_experiment(spec["entry"], int(spec["seed"]), threads=1)
        if exp.batch is None or exp.loss is None:
            raise UserError("world-size invariance needs an Experiment with batch and loss")
        batch = exp.batch(int(spec["step"]))
        share = _share(batch, rank, world)
        exp.model.zero_grad(set_to_none=True)
        loss, traced = trace_outputs(exp.model, lambda: exp.loss(exp.model, share))
        loss.backward()
        grads = {}
        for name, p in exp.model.named_parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                grads[name] = p.grad / world
        rows = [len(_share(_first(batch), r, world)) for r in range(world)]
        payload = {
            "traced": traced,
            "grads": grads,
            "rows": rows,
            "per_row": tokens_per_row(_first(batch)),
            "total": len(_first(batch)),
        }
        dist.barrier()
        partial = Path(f"{out}.partial")
        torch.save(payload, partial)
        partial.replace(out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _world(entry: str, seed: int, step: int, world: int, timeout: float) -> list[dict[str, Any]]:
    """Every rank of a world of ``world`` processes, each a fresh interpreter."""
    from longcat_sim.repro.library import WORKER, WORKER_ENV, _pythonpath

    port = _free_port()
    env = {**os.environ, **WORKER_ENV, "PYTHONPATH": _pythonpath(), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="repro-world-") as tmp:
        procs, outs = [], []
        for rank in range(world):
            spec = {
                "entry": entry,
                "seed": seed,
                "step": step,
                "rank": rank,
                "world": world,
                "port": port,
            }
            spec_path, out = Path(tmp) / f"spec{rank}.json", Path(tmp) / f"out{rank}.pt"
            spec_path.write_text(json.dumps(spec))
            argv = [sys.executable, "-m", WORKER, "rank", str(spec_path), str(out)]
            procs.append(subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True))
            outs.append(out)
        try:
            errors = [p.communicate(timeout=timeout)[1] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for p, err, out in zip(procs, errors, outs, strict=True):
            if not out.exists():  # a rank that saved its result and then crashed in teardown counts
                tail = " | ".join((err or "").strip().splitlines()[-3:])
                raise RuntimeError(f"world-size worker failed (exit {p.returncode}): {tail}")
        return [torch.load(out, weights_only=True) for out in outs]


def world_size_invariance(
    entry: str, *, seed: int = 0, step: int = 0, world_size: int = 2, timeout: float = 300.0
) -> PropertyResult:
    """A gloo world of ``world_size`` processes against a world of one on step ``step``:
    module outputs row by row, then the averaged gradients, bitwise."""
    with ThreadPoolExecutor(max_workers=2) as pool:  # both worlds at once
        one = pool.submit(_world, entry, seed, step, 1, timeout)
        many = pool.submit(_world, entry, seed, step, world_size, timeout)
        (single,), ranks = one.result(), many.result()
    total, compared, start = single["total"], 0, 0
    for r, rank in enumerate(ranks):
        n = rank["rows"][r]
        align = slice_align(start, start + n, total, single["per_row"])
        div, count = first_module_divergence(rank["traced"], single["traced"], align)
        compared += count
        start += n
        if div is not None:
            return result(f"world-size invariance 1 vs {world_size}", div, compared)
    for name in reversed(list(single["grads"])):
        a, b = ranks[0]["grads"].get(name), single["grads"][name]
        compared += 1
        if a is None or not bitwise_equal(a, b):
            module, _, leaf = name.rpartition(".")
            div = measure(module, f"grad.{leaf}", b, b if a is None else a)
            return result(f"world-size invariance 1 vs {world_size}", div, compared)
    return result(f"world-size invariance 1 vs {world_size}", None, compared)
