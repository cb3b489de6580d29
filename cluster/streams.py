"""GPU streams as SimPy processes, tasks on them, and an executor that runs a task DAG.

Each GPU (one per equivalence class of symmetric ranks) owns a compute stream and one stream per
link (``nvlink``, ``rdma``), each a SimPy process that runs one task at a time: a capacity-1
FIFO server whose queue is its issue order. Tasks are issued to their stream in list order, as a host thread launches kernels on a CUDA stream, and a stream runs
them in that order: a task starts at ``max(end of its dependencies, end of its stream
predecessor)``.

The executor returns flat :class:`EventRecord` rows, one per task, for metrics and traces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import simpy

from longcat_sim.cluster.errors import ClusterInputError

COMPUTE = "compute"
STREAM_NAMES = (COMPUTE, "nvlink", "rdma")


@dataclass(frozen=True, slots=True)
class Task:
    """One kernel or collective: ``duration`` seconds on ``stream`` of GPU class ``gpu``.

    ``deps`` are indices into the task list this task belongs to; ``layer``, ``microbatch``,
    ``chunk`` and ``phase`` (``fwd``, ``bwd``, ``wgrad`` or empty) only label the record.
    """

    name: str
    stream: str
    duration: float
    deps: tuple[int, ...] = ()
    layer: int = -1
    microbatch: int = 0
    chunk: int = 0
    gpu: int = 0
    phase: str = ""


@dataclass(frozen=True, slots=True)
class EventRecord:
    """When one task ran: ``start`` and ``end`` in seconds from the start of the simulation."""

    name: str
    stream: str
    start: float
    end: float
    layer: int
    microbatch: int
    chunk: int
    gpu: int
    phase: str

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def is_comm(self) -> bool:
        return self.stream != COMPUTE


def check_tasks(tasks: Sequence[Task]) -> None:
    """Reject unknown streams, negative durations and dependencies that point nowhere."""
    n = len(tasks)
    for i, task in enumerate(tasks):
        if task.stream not in STREAM_NAMES:
            raise ClusterInputError(
                f"task {i} ({task.name}) runs on unknown stream {task.stream!r}; "
                f"use one of {', '.join(STREAM_NAMES)}"
            )
        if not task.duration >= 0.0:
            raise ClusterInputError(
                f"task {i} ({task.name}) has duration {task.duration!r}; durations must be >= 0"
            )
        for dep in task.deps:
            if not 0 <= dep < n or dep == i:
                raise ClusterInputError(
                    f"task {i} ({task.name}) depends on {dep}, which is not another task of "
                    f"this list (0..{n - 1})"
                )


def run_tasks(tasks: Sequence[Task]) -> tuple[EventRecord, ...]:
    """Run ``tasks`` on their streams; return one record per task, in task-list order.

    Each stream is a SimPy process that takes its tasks in issue order: it waits for a task's
    dependencies on other streams, then is busy for the task's duration. (Only its own process
    ever uses a stream, so the process itself is the capacity-1 server; a separate
    ``simpy.Resource`` per stream would add events and no behaviour.)
    Raises ClusterInputError when issue order and dependencies deadlock (a task waits for a
    task queued behind it on its own stream, or dependencies form a cycle).
    """
    check_tasks(tasks)
    env = simpy.Environment()
    queues: dict[tuple[int, str], list[int]] = {}
    slot: list[int] = []
    for i, task in enumerate(tasks):
        queue = queues.setdefault((task.gpu, task.stream), [])
        slot.append(len(queue))
        queue.append(i)

    def implied(i: int, dep: int) -> bool:
        """The stream already orders ``dep`` before ``i``."""
        a, b = tasks[i], tasks[dep]
        return a.gpu == b.gpu and a.stream == b.stream and slot[dep] < slot[i]

    waits = [tuple(d for d in t.deps if not implied(i, d)) for i, t in enumerate(tasks)]
    done = {d: env.event() for w in waits for d in w}
    starts = [0.0] * len(tasks)
    ends = [-1.0] * len(tasks)

    def stream(order: list[int]):
        for i in order:
            for dep in waits[i]:
                if not done[dep].processed:
                    yield done[dep]
            starts[i] = env.now
            yield env.timeout(tasks[i].duration)
            ends[i] = env.now
            if i in done:
                done[i].succeed()

    for order in queues.values():
        env.process(stream(order))
    env.run()

    stuck = [i for i, end in enumerate(ends) if end < 0.0]
    if stuck:
        first = tasks[stuck[0]]
        raise ClusterInputError(
            f"the schedule deadlocks: {len(stuck)} tasks never ran, first {first.name!r} "
            f"(layer {first.layer}, micro-batch {first.microbatch}) on {first.stream}; issue "
            "each task after the tasks it depends on"
        )
    return tuple(
        EventRecord(
            name=t.name,
            stream=t.stream,
            start=starts[i],
            end=ends[i],
            layer=t.layer,
            microbatch=t.microbatch,
            chunk=t.chunk,
            gpu=t.gpu,
            phase=t.phase,
        )
        for i, t in enumerate(tasks)
    )


def earliest_start_times(tasks: Sequence[Task]) -> tuple[list[float], list[float]]:
    """The same timeline by a longest-path sweep, without SimPy: start of each task is the max of
    its dependencies' ends and its stream predecessor's end. Needs dependencies to precede their
    dependents in the list; serves as an independent check of :func:`run_tasks`."""
    check_tasks(tasks)
    starts = [0.0] * len(tasks)
    ends = [0.0] * len(tasks)
    stream_free: dict[tuple[int, str], float] = {}
    for i, task in enumerate(tasks):
        if any(d > i for d in task.deps):
            raise ClusterInputError("earliest_start_times needs dependencies listed first")
        ready = max((ends[d] for d in task.deps), default=0.0)
        start = max(ready, stream_free.get((task.gpu, task.stream), 0.0))
        starts[i] = start
        ends[i] = start + task.duration
        stream_free[(task.gpu, task.stream)] = ends[i]
    return starts, ends
