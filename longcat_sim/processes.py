"""Child processes that stop when asked and never outlive their parent.

* :func:`stop_signals` turns SIGINT and SIGTERM into :class:`Stopped` in the main thread, so a
  long command unwinds (stopping its workers on the way) and exits 130 or 143 with one line.
* :func:`die_with_parent` asks Linux to SIGKILL the calling process when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``), then checks the parent is still the one that started it; a
  no-op where ``prctl`` is unavailable. Linux delivers the signal when the *thread* that started
  the child ends, so children are started from a thread that outlives them.
* :func:`process_pool` is a ``ProcessPoolExecutor`` whose workers die with their parent, leave
  SIGINT to it, and are killed when the block exits by an exception; processes started inside
  :func:`sigint_ignored` ignore SIGINT from birth.
* :func:`child_command` wraps a command so the started program dies with its parent and
  ignores SIGINT; :class:`Children` runs such commands from any thread (SIGINT blocked while
  one starts, so none ever holds a SIGINT handler) and kills those running on :meth:`close`.

No torch here: the simulator's packages use it too. ``python -m longcat_sim.processes PID
COMMAND...`` is the wrapper :func:`child_command` builds.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from types import FrameType

PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
JOIN_TIMEOUT_S = 5.0


class Stopped(KeyboardInterrupt):
    """The command was asked to stop by ``signum``; the CLI exits ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}; no results were written"


@contextmanager
def stop_signals() -> Iterator[None]:
    """Inside the block, the first SIGINT or SIGTERM raises :class:`Stopped` in the main thread;
    later ones are ignored while it unwinds. Outside the main thread, the block changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping: list[int] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        if not stopping and not _held:
            stopping.append(signum)
            raise Stopped(signum)

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextmanager
def sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in the calling thread (any thread) inside the block: a process started
    in it is born with SIGINT blocked, and one arriving meanwhile is delivered afterwards."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


_held: list[bool] = []  # non-empty inside signals_held: stop_signals' handler does not raise


@contextmanager
def signals_held() -> Iterator[None]:
    """Inside the block a stop signal does not interrupt :func:`stop_signals`' block, so what
    it does (a commit, its report) finishes; the signal is dropped, since the work it would
    have stopped is done. (Python runs signal handlers in the main thread, so this holds
    whichever thread the kernel delivers the signal to.)"""
    _held.append(True)
    try:
        yield
    finally:
        _held.pop()


@contextmanager
def sigint_ignored() -> Iterator[None]:
    """SIGINT ignored inside the block (in the main thread), so the processes started in it
    ignore it from birth: a terminal's Ctrl-C reaches the whole process group, and stopping
    the children is the parent's task. A SIGINT arriving inside the block is lost."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies; exit now if ``parent_pid`` already died (this
    process was re-parented before the request took effect)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return
    if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() != parent_pid:
        os._exit(1)


def init_worker(parent_pid: int) -> None:
    """A worker's first act: die with ``parent_pid``, leave SIGINT (a terminal's Ctrl-C reaches
    the whole process group) to the parent, and let SIGTERM end it as usual."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _Pool(ProcessPoolExecutor):
    """A pool whose workers are started inside :func:`sigint_ignored`: a submit that may start
    one (all of them at the first submit under ``fork``, one at a time under other start
    methods) runs inside it, so no worker holds this process's SIGINT handler before
    :func:`init_worker` runs."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        if len(getattr(self, "_processes", None) or {}) >= self._max_workers:
            return super().submit(fn, *args, **kwargs)
        with sigint_ignored():
            return super().submit(fn, *args, **kwargs)


@contextmanager
def process_pool(max_workers: int) -> Iterator[ProcessPoolExecutor]:
    """A process pool whose workers die with this process and ignore SIGINT from birth;
    leaving the block by an exception (a failed item, :class:`Stopped`) kills the workers
    instead of waiting for their items."""
    pool = _Pool(max_workers=max_workers, initializer=init_worker, initargs=(os.getpid(),))
    try:
        yield pool
    except BaseException:
        kill_pool(pool)
        raise
    pool.shutdown(wait=True)


def kill_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel ``pool``'s pending items and kill its workers, without waiting for their items."""
    kill_workers = getattr(pool, "kill_workers", None)  # Python 3.14+
    if callable(kill_workers):
        kill_workers()
        return
    workers = list((getattr(pool, "_processes", None) or {}).values())
    call_queue = getattr(pool, "_call_queue", None)
    if call_queue is not None:  # no reader is left to drain it: do not wait on its feeder
        call_queue.cancel_join_thread()
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        worker.kill()
    for worker in workers:
        worker.join(timeout=JOIN_TIMEOUT_S)


def child_command(command: Sequence[str]) -> list[str]:
    """``command`` run through this module, so the program dies with the calling process."""
    return [sys.executable, "-m", "longcat_sim.processes", str(os.getpid()), *command]


class ChildrenClosed(RuntimeError):
    """A command was to start after :meth:`Children.close`."""


class Children:
    """Commands run from any thread (each dying with this process); :meth:`close` kills those
    running and refuses new ones, so a stopped caller never waits for a whole command."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: set[subprocess.Popen[str]] = set()
        self._closed = False

    def run(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``subprocess.run(command, capture_output=True, text=True)``, killable by close."""
        with self._lock:
            if self._closed:
                raise ChildrenClosed("no command starts after close()")
            with sigint_blocked():  # the wrapper ignores SIGINT before it unblocks it
                proc = subprocess.Popen(
                    child_command(command),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=None if env is None else dict(env),
                )
            self._live.add(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            with self._lock:
                self._live.discard(proc)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def close(self) -> None:
        """Kill the running commands; no command starts afterwards."""
        with self._lock:
            self._closed = True
            live = list(self._live)
        for proc in live:
            proc.kill()


def _wrapper(argv: Sequence[str]) -> None:
    """``PID COMMAND...``: die with process PID, then become COMMAND."""
    if len(argv) < 2 or not argv[0].isdigit():
        sys.exit("usage: python -m longcat_sim.processes PARENT_PID COMMAND [ARG...]")
    die_with_parent(int(argv[0]))
    # SIGINT is the parent's (a terminal's Ctrl-C reaches the whole process group): COMMAND
    # starts with it ignored; one held since birth is discarded here
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    os.execvp(argv[1], list(argv[1:]))


if __name__ == "__main__":
    _wrapper(sys.argv[1:])
