"""Process launch for multi-process runs, and the entry points their ranks run.

:func:`launch` spawns ``world`` processes (``torch.multiprocessing`` spawn context), each joining
one process group (gloo by default: the trainer's tensors are on the CPU; NCCL when asked)
through a TCP store the parent hosts; the store and gloo's pairs listen on 127.0.0.1 only. The
ranks die with the parent (even a SIGKILL-ed one) and are killed when it stops for any reason
(a failing rank, a stop signal); the function each rank runs returns a picklable result,
collected in rank order. A rank refusing its input (:class:`UserError` and the like) is one
line of UserError in the parent; any other failure re-raises the rank's traceback there.

A rank runs :func:`train_rank` (the ranks of ``train --nproc N``: the whole run, checkpoints
and evaluation included) or :func:`ep_train` (a timing probe: steps only, in a temporary run
directory); both drive the one :class:`~longcat_sim.train.training.Trainer`.
"""

from __future__ import annotations

import io
import os
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tqdm import tqdm

from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.errors import UserError, os_error_line
from longcat_sim.model.config import ConfigError, ModelConfig
from longcat_sim.model.determinism import DeterministicMode
from longcat_sim.model.hashing import parameter_hash
from longcat_sim.processes import init_worker, sigint_ignored
from longcat_sim.train.config import TrainConfig
from longcat_sim.train.guard import GuardSettings, StepFaults, guarded
from longcat_sim.train.metrics import TrainSummary
from longcat_sim.train.training import Trainer
from longcat_sim.train.world import TRAIN_BACKEND, World

LAUNCH_TIMEOUT_S = 600.0


def _to_bytes(obj: Any) -> bytes:
    """Pickled by value: tensors sent through a torch queue as shared memory would need the
    sending process alive until they are received."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _from_bytes(blob: bytes) -> Any:
    return torch.load(io.BytesIO(blob), weights_only=False)


def loopback_interface() -> str | None:
    """The loopback network interface's name (``lo`` on Linux), or None if none is found."""
    names = {name for _, name in socket.if_nameindex()}
    return next((name for name in ("lo", "lo0") if name in names), None)


def loopback_store(timeout_s: float) -> dist.TCPStore:
    """A TCP store served by this process on 127.0.0.1 only (a store given no socket listens
    on every interface)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        port = int(listener.getsockname()[1])
    except OSError:
        listener.close()
        raise
    fd = listener.detach()  # the store owns the socket from here on
    try:
        return dist.TCPStore(
            "127.0.0.1", port, None, True, timedelta(seconds=timeout_s),
            wait_for_workers=False, master_listen_fd=fd,
        )  # fmt: skip
    except BaseException:
        os.close(fd)
        raise


def _worker(
    rank: int,
    world: int,
    parent: tuple[int, int],
    backend: str,
    threads: int,
    fn: Callable[..., Any],
    args: tuple,
    queue: Any,
) -> None:
    """Rank ``rank``: dies with the parent (``parent``: its pid and store port), joins the
    group on loopback, runs ``fn`` and reports its result, refusal or traceback on ``queue``."""
    parent_pid, port = parent
    init_worker(parent_pid)
    # tqdm's default lock is a named semaphore here (a spawned process): a rank killed when the
    # parent stops would leave it for the resource tracker to reclaim, with a warning
    tqdm.set_lock(threading.RLock())
    try:
        torch.set_num_threads(threads)
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        interface = loopback_interface()
        if interface is not None:  # gloo's pairs listen on the loopback, not the host's address
            os.environ["GLOO_SOCKET_IFNAME"] = interface
        timeout = timedelta(seconds=LAUNCH_TIMEOUT_S)
        store = dist.TCPStore("127.0.0.1", port, world, False, timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    except BaseException:
        _report(queue, (rank, "error", traceback.format_exc()))
        return
    try:
        # reported before the group is torn down: a peer's failure that the teardown causes
        # (a closed connection) reaches the parent after this rank's own outcome
        _report(queue, _run_rank(rank, world, fn, args))
    finally:
        dist.destroy_process_group()


def _run_rank(rank: int, world: int, fn: Callable[..., Any], args: tuple) -> tuple[int, str, Any]:
    """This rank's outcome: ``fn``'s result, the one line of bad input, or a bug's traceback."""
    try:
        result = fn(rank, world, *args)
        dist.barrier()  # no rank tears down while a peer's collective is in flight
        return rank, "ok", _to_bytes(result)
    except (UserError, ConfigError, ClusterInputError) as exc:
        return rank, "refused", str(exc)
    except OSError as exc:  # a full disk or a removed folder: one line, as in one process
        return rank, "refused", os_error_line(exc)
    except BaseException:
        return rank, "error", traceback.format_exc()


def _report(queue: Any, outcome: tuple[int, str, Any]) -> None:
    """Put ``outcome`` on ``queue`` and wait until it is in the pipe to the parent."""
    queue.put(outcome)
    queue.close()
    queue.join_thread()


def launch(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    backend: str | None = None,
    threads: int = 1,
    timeout_s: float = LAUNCH_TIMEOUT_S,
) -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes; results in rank order.

    ``fn`` must be importable (a module-level function) and its result picklable. Leaving by
    an exception (a failed rank, a stop signal in this process) kills every rank.
    """
    if not isinstance(world, int) or world < 1:
        raise UserError(f"the number of processes must be a positive integer, got {world!r}")
    backend = backend or TRAIN_BACKEND  # the trainer's tensors live on the CPU
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store = loopback_store(timeout_s)
    parent = (os.getpid(), store.port)
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world, parent, backend, threads, fn, args, queue),
            daemon=True,
        )
        for rank in range(world)
    ]
    finished = False
    try:
        with sigint_ignored():  # Ctrl-C is the parent's: it stops the ranks
            for proc in procs:
                proc.start()
        results = _collect(queue, procs, world, timeout_s)
        finished = True
    finally:
        for proc in procs:
            if proc.pid is None:
                continue
            proc.join(timeout=10 if finished else 0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        del store
    return [results[r] for r in range(world)]


def _collect(queue: Any, procs: list[Any], world: int, timeout_s: float) -> dict[int, Any]:
    """Each rank's result from ``queue``; raises for a failed rank, a rank that died without
    reporting, or ``timeout_s`` passing."""
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
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
        if status == "refused":
            raise UserError(f"rank {rank}: {payload}")
        if status == "error":
            raise RuntimeError(f"rank {rank} of {world} failed:\n{payload}")
        results[rank] = _from_bytes(payload)
    return results


# -- what a rank runs --------------------------------------------------------------------------


@dataclass(frozen=True)
class RankRun:
    """What every rank of a ``train`` run needs: configs, run directory and where to start."""

    model_cfg: ModelConfig
    train_cfg: TrainConfig
    run_dir: str
    data_cache: str | None = None
    resume_from: str | None = None
    grow_from: str | None = None
    stop_after: int | None = None
    progress: bool | None = False
    guard: GuardSettings | None = None  # train/guard.py: the SDC guard's settings, when on
    faults: Callable[[Any], StepFaults] | None = None  # planted faults (negative controls)


def run_training(run: RankRun, world: World | None = None) -> TrainSummary:
    """This process's part of a training run (deterministic mode entered if asked)."""
    threads = torch.get_num_threads()
    mode = DeterministicMode(threads=threads) if run.train_cfg.deterministic else nullcontext()
    with mode:
        trainer = Trainer(
            run.model_cfg, run.train_cfg, run.run_dir, data_cache=run.data_cache,
            progress=run.progress, world=world,
        )  # fmt: skip
        if run.resume_from is not None:
            trainer.load_checkpoint(run.resume_from)
        elif run.grow_from is not None:
            trainer.grow_from(run.grow_from)
        if run.guard is not None:
            faults = run.faults(trainer) if run.faults is not None else None
            guarded(trainer, run.guard, faults)
        summary = trainer.train(stop_after=run.stop_after)
        if not trainer.world.agree(summary.param_hash):
            raise RuntimeError("the ranks ended with different parameters")
        return summary


def train_rank(rank: int, world: int, run: RankRun) -> TrainSummary | None:
    """Rank ``rank`` of a :func:`launch`-ed run; rank 0 returns the summary."""
    summary = run_training(run, World(rank, world, rank))
    return summary if rank == 0 else None


def ep_train(
    rank: int,
    world: int,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data_cache: str | None,
    overlap: bool | tuple[bool, ...] = True,
) -> dict[str, Any]:
    """A timing probe: ``train_cfg.steps`` steps on rank ``rank`` of ``world``, nothing saved.

    Returns per-step losses and timings (``step_seconds``; ``slices_seconds`` of the
    micro-steps; ``exchange_seconds`` of which in MoE exchanges), the overlap of each step
    (``overlap`` may be a pattern cycled over the steps) and the final hashes.
    """
    tc = train_cfg
    mode = DeterministicMode(threads=torch.get_num_threads()) if tc.deterministic else nullcontext()
    with mode, tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            model_cfg, tc, Path(tmp), data_cache=data_cache, world=World(rank, world, rank),
            overlap=overlap,
        )  # fmt: skip
        records = [trainer.train_step() for _ in range(tc.steps)]
        return {
            "rank": rank,
            "world": world,
            "param_hash": parameter_hash(trainer.model),
            "state_hash": parameter_hash(trainer.model, include_buffers=True),
            "losses": [r["lm_loss"] for r in records],
            "step_seconds": [r["step_seconds"] for r in records],
            "slices_seconds": [r["slices_seconds"] for r in records],
            "exchange_seconds": [r["exchange_seconds"] for r in records],
            "step_overlap": [r["overlap"] for r in records],
            "pid": os.getpid(),
        }
