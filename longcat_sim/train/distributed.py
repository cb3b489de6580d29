"""Process launch for multi-process runs, and expert-parallel training over those processes.

:func:`launch` spawns ``world`` processes (``torch.multiprocessing`` spawn context), each joining
one process group (gloo on CPU, NCCL on GPU) through a TCP rendezvous on a port picked by
binding a socket to port 0; the function each rank runs returns a picklable result, collected
in rank order. A failing rank's traceback is re-raised in the parent.

:func:`ep_train` is the ``train --nproc N`` loop: data parallel for dense parameters, experts
sharded (``model/parallel.py``). Every reduction is independent of the world size:

- the global batch is cut into one slice per sequence; rank r runs slices
  ``[r*B/W, (r+1)*B/W)``, one at a time (micro-step j on every rank at once), each slice's
  forward/backward on that slice alone, so its gradient is computed the same on any rank;
- dense gradients are gathered per slice and summed in global slice order on every rank;
- expert weight gradients are kept per (slice, expert) block by the owner and summed in global
  slice order, then gathered, so every rank holds the full gradient;
- the bias controller's counts are integers (an exact all-reduce).

With deterministic mode (row-invariant kernels), world sizes 1, 2 and 4 then end with bitwise
equal parameters. The losses are per slice (the balance loss reads one sequence's routing) and
scaled by 1/B, so their sum is the batch mean of the per-sequence losses.
"""

from __future__ import annotations

import io
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from longcat_sim.errors import UserError

LAUNCH_TIMEOUT_S = 600.0


def free_port() -> int:
    """A TCP port that was free a moment ago (bound to port 0 by this process, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _to_bytes(obj: Any) -> bytes:
    """Pickled by value: tensors sent through a torch queue as shared memory would need the
    sending process alive until they are received."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _from_bytes(blob: bytes) -> Any:
    return torch.load(io.BytesIO(blob), weights_only=False)


def _worker(
    rank: int,
    world: int,
    port: int,
    backend: str,
    threads: int,
    fn: Callable[..., Any],
    args: tuple,
    queue: Any,
) -> None:
    try:
        torch.set_num_threads(threads)
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=LAUNCH_TIMEOUT_S),
        )
        try:
            result = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        queue.put((rank, "ok", _to_bytes(result)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))


def launch(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    backend: str | None = None,
    threads: int = 1,
    timeout_s: float = LAUNCH_TIMEOUT_S,
) -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes; results in rank order.

    ``fn`` must be importable (a module-level function) and its result picklable.
    """
    if not isinstance(world, int) or world < 1:
        raise UserError(f"the number of processes must be a positive integer, got {world!r}")
    backend = backend or default_backend()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world, port, backend, threads, fn, args, queue),
            daemon=True,
        )
        for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"{world} processes did not finish within {timeout_s:.0f} s")
            try:
                rank, status, payload = queue.get(timeout=min(remaining, 5.0))
            except Exception:  # queue.Empty: check for ranks that died without reporting
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"a worker process exited with code {dead[0].exitcode} before reporting"
                    ) from None
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} of {world} failed:\n{payload}")
            results[rank] = _from_bytes(payload)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [results[r] for r in range(world)]


# -- expert-parallel training ----------------------------------------------------------------------


def _slice_loss(trainer: Any, ep_model: Any, ids, targets, scale: float):
    """One slice's loss (LM + MTP + balance + z), scaled by ``scale``, and its model output."""
    from longcat_sim.model.balance import hidden_z_loss, total_balance_loss

    cfg, tc = trainer.model_cfg, trainer.tc
    out = ep_model.forward_detailed(ids, compute_mtp=tc.mtp_weight > 0)
    total = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())
    lm = total.detach()
    if out.mtp_logits is not None:
        mtp = F.cross_entropy(
            out.mtp_logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten()
        )
        total = total + tc.mtp_weight * mtp
    if tc.balance_alpha > 0:
        total = total + total_balance_loss(out.router, cfg, tc.balance_groups, tc.balance_alpha)
    if tc.z_loss > 0:
        total = total + hidden_z_loss(out.hidden_pre_norm, tc.z_loss)
    return total * scale, lm, out


def _gather_rows(local: torch.Tensor, world: int) -> torch.Tensor:
    """All ranks' ``local`` tensors stacked along a new leading rank dimension."""
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    return torch.stack(parts)


def ep_train(
    rank: int,
    world: int,
    model_cfg: Any,
    train_cfg: Any,
    data_cache: str | None,
    overlap: bool | tuple[bool, ...] = True,
) -> dict[str, Any]:
    """Rank ``rank``'s part of an expert-parallel training run; returns the run summary.

    ``overlap`` may be a pattern cycled over the steps (``(True, False)`` alternates ScMoE
    overlap on and off, for paired timings); it changes when exchanges wait, never a value.
    """
    from longcat_sim.model.balance import stack_counts
    from longcat_sim.model.determinism import DeterministicMode, clip_grad_norm_fixed_order
    from longcat_sim.model.hashing import parameter_hash, tensor_hash
    from longcat_sim.model.optim import lr_multiplier, set_lr_multiplier
    from longcat_sim.model.parallel import ExchangeClock, ExpertParallelModel, SliceGradLedger
    from longcat_sim.train import training

    tc = train_cfg
    mode = DeterministicMode(threads=torch.get_num_threads()) if tc.deterministic else nullcontext()
    with mode, tempfile.TemporaryDirectory() as tmp:
        trainer = training.Trainer(model_cfg, tc, Path(tmp), data_cache=data_cache)
        model, optimizer = trainer.model, trainer.optimizer
        ledgers = [SliceGradLedger() for _ in model.model.layers]
        pattern = overlap if isinstance(overlap, tuple) else (overlap,)
        clock = ExchangeClock()
        ep_model = ExpertParallelModel(model, ledgers=ledgers, overlap=pattern[0], clock=clock)
        expert_ids = {id(p) for p in ep_model.expert_parameters()}
        dense = [p for p in model.parameters() if p.requires_grad and id(p) not in expert_ids]
        per_rank = tc.batch_size // world
        losses, step_seconds, slices_seconds, exchange_seconds = [], [], [], []
        for step in range(tc.steps):
            ep_model.overlap = pattern[step % len(pattern)]
            start = time.perf_counter()
            clock.reset()
            inputs, targets = trainer.data.dataset.batch_at(
                step, tc.batch_size, trainer.seeds["data"]
            )
            ids, tgt = torch.from_numpy(inputs), torch.from_numpy(targets)
            set_lr_multiplier(
                optimizer,
                lr_multiplier(
                    step,
                    warmup_steps=tc.warmup_steps,
                    total_steps=tc.steps,
                    min_ratio=tc.min_lr_ratio,
                ),
            )
            slice_grads, slice_losses, counts = [], [], None
            for j in range(per_rank):
                row = rank * per_rank + j
                ep_model.set_slice_of_source([src * per_rank + j for src in range(world)])
                model.zero_grad(set_to_none=True)
                total, lm, out = _slice_loss(
                    trainer, ep_model, ids[row : row + 1], tgt[row : row + 1], 1.0 / tc.batch_size
                )
                total.backward()
                slice_grads.append(
                    torch.cat(
                        [
                            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                            for p in dense
                        ]
                    )
                )
                slice_losses.append(lm)
                c = stack_counts(out.router)
                counts = c if counts is None else counts + c
            slices_seconds.append(time.perf_counter() - start)
            exchange_seconds.append(clock.seconds)
            # dense: per-slice gradients gathered, summed in global slice order
            gathered = _gather_rows(torch.stack(slice_grads), world).flatten(0, 1)
            flat = gathered[0]
            for s in range(1, gathered.shape[0]):
                flat = flat + gathered[s]
            offset = 0
            for p in dense:
                p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()
            # experts: owner sums per-slice blocks in slice order, everyone gathers the shards
            for ep in ep_model.moes:
                local = ep.ledger.reduce(tuple(w.detach() for w in ep.local_weights()))
                experts = ep.moe.experts
                for param, grad in zip(
                    (experts.gate_proj, experts.up_proj, experts.down_proj), local, strict=True
                ):
                    param.grad = _gather_rows(grad, world).flatten(0, 1)
            max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
            clip = (
                clip_grad_norm_fixed_order if tc.deterministic else torch.nn.utils.clip_grad_norm_
            )
            if step == tc.steps - 1:
                first_grads = {n: tensor_hash(p.grad) for n, p in model.named_parameters()}
            clip(model.parameters(), max_norm)
            optimizer.step()
            if tc.bias_rate > 0:
                trainer.controller.update(trainer.routers, counts, step)  # all-reduces counts
            all_losses = _gather_rows(torch.stack(slice_losses), world).flatten()
            losses.append(float(all_losses.mean()))
            step_seconds.append(time.perf_counter() - start)
        return {
            "rank": rank,
            "world": world,
            "param_hash": parameter_hash(model),
            "losses": losses,
            "step_seconds": step_seconds,
            "slices_seconds": slices_seconds,  # the micro-steps (forward, backward, exchanges)
            "exchange_seconds": exchange_seconds,  # of which in MoE exchanges (issue and wait)
            "step_overlap": [pattern[i % len(pattern)] for i in range(tc.steps)],
            "pid": os.getpid(),
            "first_step_grad_hashes": first_grads,
            "state_hash": parameter_hash(model, include_buffers=True),
        }


def check_nproc(nproc: int, model_cfg: Any, batch_size: int) -> None:
    """One-line errors for a world size that cannot shard this model or batch."""
    if nproc < 1:
        raise UserError(f"--nproc must be a positive integer, got {nproc}")
    if model_cfg.n_routed_experts % nproc:
        raise UserError(
            f"--nproc {nproc} must divide the {model_cfg.n_routed_experts} FFN experts of "
            f"model {model_cfg.name!r}"
        )
    if batch_size % nproc:
        raise UserError(f"--nproc {nproc} must divide the batch size {batch_size}")
