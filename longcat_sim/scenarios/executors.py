"""Run one picklable function over many items: in this process, on local worker processes,
or on a Ray cluster (``pip install 'longcat-sim[ray]'``)."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.config.threads import check_workers
from longcat_sim.errors import UserError
from longcat_sim.processes import process_pool

T = TypeVar("T")
EXECUTORS = ("local", "ray")
RAY_MAX_WORKERS = 4096  # a cluster's CPUs the items are split over, however many it reports


def _apply(fn: Callable[[Any], T], chunk: Sequence[Any]) -> list[T]:
    return [fn(item) for item in chunk]


def _chunks(items: Sequence[Any], workers: int) -> list[Sequence[Any]]:
    size = max(1, math.ceil(len(items) / (workers * 4)))
    return [items[i : i + size] for i in range(0, len(items), size)]


def map_local(fn: Callable[[Any], T], items: Sequence[Any], workers: int | None = None) -> list[T]:
    """``[fn(x) for x in items]`` on up to ``workers`` processes (default: every core; at most
    :data:`~longcat_sim.config.threads.MAX_WORKERS`)."""
    workers = (os.cpu_count() or 1) if workers is None else check_workers(workers)
    if workers <= 1 or len(items) < 2:
        return [fn(item) for item in items]
    chunks = _chunks(items, workers)
    with process_pool(min(workers, len(chunks))) as pool:  # killed on an exception
        futures = [pool.submit(_apply, fn, chunk) for chunk in chunks]
        return [x for f in futures for x in f.result()]


def map_ray(fn: Callable[[Any], T], items: Sequence[Any], address: str | None) -> list[T]:
    """``[fn(x) for x in items]`` as Ray tasks on the cluster at ``address`` (None: a local
    Ray instance on this machine's cores)."""
    try:
        import ray
    except ImportError:
        raise UserError(
            "--executor ray needs Ray: pip install 'longcat-sim[ray]' (or pip install ray)"
        ) from None
    if address is not None:
        _check_reachable(address)
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = "a local Ray instance" if address is None else f"Ray at {address!r}"
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"--executor ray: cannot start or reach {where}: {reason}") from None
    try:
        remote = ray.remote(_apply)
        workers = min(max(1, int(ray.cluster_resources().get("CPU", 1))), RAY_MAX_WORKERS)
        refs = [remote.remote(fn, chunk) for chunk in _chunks(items, workers)]
        try:
            parts = ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, UserError | ClusterInputError):
                raise UserError(str(cause)) from None
            raise
        return [x for part in parts for x in part]
    finally:
        if started:
            ray.shutdown()


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse, in a few seconds, a ``host:port`` Ray address nothing listens on (Ray itself
    retries for minutes); other forms (``auto``, ``ray://``) go to Ray as they are."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")  # an IPv6 literal
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise UserError(
            f"--executor ray: nothing answers at {address!r} ({exc.strerror or exc}); start "
            "a head with 'ray start --head' or give its address"
        ) from None


def map_items(
    fn: Callable[[Any], T],
    items: Sequence[Any],
    executor: str = "local",
    address: str | None = None,
    workers: int | None = None,
) -> list[T]:
    """``[fn(x) for x in items]`` on the named executor (``workers``: local processes only)."""
    if executor == "ray":
        return map_ray(fn, items, address)
    if executor != "local":
        raise UserError(f"--executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
    return map_local(fn, items, workers)
