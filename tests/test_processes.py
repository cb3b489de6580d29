"""Long commands stop when asked and leave no process behind: the stop signals, the death
signal children carry, the pools and subprocess groups that use them, and ``sweep`` stopped by
SIGINT or killed outright."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future

import pytest

from longcat_sim import processes
from longcat_sim.processes import (
    Children,
    ChildrenClosed,
    Stopped,
    process_pool,
    signals_held,
    stop_signals,
)
from tests.proctree import descendants, kill_all, survivors, wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# a parent that starts one sleeping child, bare or through the death-signal wrapper
PARENT = """
import subprocess, sys, time
from longcat_sim.processes import child_command
command = [sys.executable, "-c", "import time; time.sleep(60)"]
subprocess.Popen(child_command(command) if sys.argv[1] == "wrapped" else command)
time.sleep(60)
"""
# a grid of 2,800 points: about half a minute on two workers, far longer than any test waits
SWEEP = [
    "sweep", "--seed", ",".join(map(str, range(100))), "--context", "1000,5000",
    "--workers", "2", "--no-progress", "--json",
]  # fmt: skip


def test_stopped_names_its_signal_and_exit_code() -> None:
    assert Stopped(signal.SIGINT).exit_code == 130
    assert Stopped(signal.SIGTERM).exit_code == 143
    assert str(Stopped(signal.SIGTERM)) == "stopped by SIGTERM; no results were written"
    assert isinstance(Stopped(signal.SIGINT), KeyboardInterrupt)


def test_stop_signals_raise_stopped_inside_the_block_only() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped) as caught, stop_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts the sleep
    assert caught.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def _orphans(mode: str) -> tuple[dict[int, int], list[int]]:
    """Start PARENT in ``mode``, SIGKILL it once its child runs; the child and whether it
    survives 1.5 s later."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode])
    try:
        child = wait_for(lambda: descendants(parent.pid), 30, "child process", parent)
        time.sleep(0.5)  # the wrapped child has exec'd its command
    finally:
        parent.kill()
        parent.wait()
    return child, survivors(child, within_s=1.5)


def test_an_orphan_check_finds_a_child_without_the_death_signal() -> None:
    """Negative control: a bare child outlives its killed parent, and the check sees it."""
    child, left = _orphans("bare")
    try:
        assert left == list(child)
    finally:
        kill_all(child)


def test_a_wrapped_child_dies_with_its_parent() -> None:
    child, left = _orphans("wrapped")
    kill_all(child)
    assert child and left == []


def test_the_wrapper_refuses_a_parent_that_is_gone() -> None:
    """A child whose parent died before it asked for the death signal exits at once."""
    stale = [sys.executable, "-m", "longcat_sim.processes", "1", "sleep", "30"]
    started = time.monotonic()
    assert subprocess.run(stale, timeout=30, check=False).returncode == 1
    assert time.monotonic() - started < 20


def test_children_close_kills_a_running_command_and_refuses_new_ones() -> None:
    children = Children()
    assert children.run([sys.executable, "-c", "print('hi')"]).stdout == "hi\n"
    outcome: Future = Future()

    def run_long() -> None:
        outcome.set_result(children.run([sys.executable, "-c", "import time; time.sleep(60)"]))

    thread = threading.Thread(target=run_long)
    thread.start()
    wait_for(lambda: children._live, 30, "running command")
    started = time.monotonic()
    children.close()
    thread.join(timeout=30)
    assert outcome.result(timeout=1).returncode == -signal.SIGKILL
    assert time.monotonic() - started < 20
    with pytest.raises(ChildrenClosed):
        children.run([sys.executable, "-c", "pass"])


def test_a_pool_left_by_an_exception_kills_its_workers() -> None:
    started = time.monotonic()
    others = descendants(os.getpid())  # what earlier tests of this process left running

    def pool_workers() -> dict[int, int]:
        return {p: t for p, t in descendants(os.getpid()).items() if others.get(p) != t}

    with pytest.raises(RuntimeError, match="a failed item"), process_pool(2) as pool:
        futures = [pool.submit(time.sleep, 60) for _ in range(4)]
        workers = wait_for(pool_workers, 30, "pool workers")
        raise RuntimeError("a failed item")
    assert survivors(workers) == []
    assert time.monotonic() - started < 30  # not the minute the items would take
    assert all(f.cancelled() or f.done() for f in futures)


def _start_sweep(tmp_path) -> tuple[subprocess.Popen, dict[int, int]]:
    """A long sweep (stderr to a file) and its two pool workers, once both run."""
    err = (tmp_path / "stderr").open("w")
    argv = [sys.executable, "-m", "longcat_sim", *SWEEP, "--run-dir", str(tmp_path / "run")]
    sweep = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    err.close()
    workers = wait_for(
        lambda: (found := descendants(sweep.pid)) and len(found) >= 2 and found,
        60, "two sweep workers", sweep,
    )  # fmt: skip
    return sweep, workers


def test_a_killed_sweep_leaves_no_worker(tmp_path) -> None:
    sweep, workers = _start_sweep(tmp_path)
    try:
        sweep.kill()
        sweep.wait()
        assert survivors(workers) == []
    finally:
        kill_all(workers)


def test_sigint_stops_a_sweep_with_one_line_and_nothing_written(tmp_path) -> None:
    sweep, workers = _start_sweep(tmp_path)
    try:
        sweep.send_signal(signal.SIGINT)
        code = sweep.wait(timeout=20)
        assert code == 130
        lines = (tmp_path / "stderr").read_text().splitlines()
        assert lines == ["longcat-sim: stopped by SIGINT; no results were written"]
        assert not (tmp_path / "run" / "results.json").exists()
        assert not (tmp_path / "run" / "manifest.json").exists()
        assert survivors(workers) == []
    finally:
        sweep.kill()
        kill_all(workers)


def test_sigterm_stops_determinism_and_its_runs(tmp_path) -> None:
    argv = [
        sys.executable, "-m", "longcat_sim", "determinism", "--steps", "5000", "--runs", "4",
        "--workers", "2", "--byte-budget", str(2**18), "--batch-size", "4", "--seq-len", "32",
        "--data-cache", str(tmp_path / "cache"), "--run-dir", str(tmp_path / "run"),
        "--no-progress",
    ]  # fmt: skip
    with (tmp_path / "stderr").open("w") as err:
        command = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    runs = {}
    try:
        runs = wait_for(lambda: len(found := descendants(command.pid)) >= 2 and found, 60,
                        "two runs", command)  # fmt: skip
        time.sleep(1)  # the runs are training
        command.send_signal(signal.SIGTERM)
        assert command.wait(timeout=20) == 143
        lines = (tmp_path / "stderr").read_text().splitlines()
        assert lines == ["longcat-sim: stopped by SIGTERM; no results were written"]
        assert not (tmp_path / "run" / "results.json").exists()
        assert survivors(runs) == []
    finally:
        command.kill()
        kill_all(runs)


def test_the_module_needs_no_torch() -> None:
    """The simulator's packages may use it: importing it loads no torch."""
    code = f"import sys, {processes.__name__}; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


INIT_WORKER = processes.init_worker


def _interrupted_at_birth(parent_pid: int) -> None:
    """A worker's initializer that first receives SIGINT: what a terminal's Ctrl-C does to a
    worker just forked, before it could ignore the signal."""
    os.kill(os.getpid(), signal.SIGINT)
    INIT_WORKER(parent_pid)


def test_pool_workers_ignore_sigint_from_birth(monkeypatch) -> None:
    """A SIGINT between a worker's fork and its initializer leaves the worker running (it used
    to raise in the worker, which broke the pool with a traceback)."""
    monkeypatch.setattr(processes, "init_worker", _interrupted_at_birth)
    with process_pool(2) as pool:
        assert list(pool.map(abs, [-1, -2, -3])) == [1, 2, 3]


def test_children_commands_ignore_sigint() -> None:
    """A command :class:`Children` runs starts with SIGINT ignored (Ctrl-C is the parent's)."""
    code = "import signal; print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)"
    assert Children().run([sys.executable, "-c", code]).stdout == "True\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the caller's is kept


def test_sigint_to_the_process_group_stops_a_sweep_with_one_line(tmp_path) -> None:
    """A terminal's Ctrl-C (SIGINT to the whole process group): exit 130, one line, no worker
    left and no worker traceback."""
    argv = [sys.executable, "-m", "longcat_sim", *SWEEP, "--run-dir", str(tmp_path / "run")]
    with (tmp_path / "stderr").open("w") as err:
        sweep = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )
    workers: dict[int, int] = {}
    try:
        workers = wait_for(
            lambda: (found := descendants(sweep.pid)) and len(found) >= 2 and found,
            60, "two sweep workers", sweep,
        )  # fmt: skip
        os.killpg(sweep.pid, signal.SIGINT)
        assert sweep.wait(timeout=20) == 130
        lines = (tmp_path / "stderr").read_text().splitlines()
        assert lines == ["longcat-sim: stopped by SIGINT; no results were written"]
        assert survivors(workers) == []
        assert not (tmp_path / "run" / "results.json").exists()
    finally:
        sweep.kill()
        kill_all(workers)


def test_a_stop_signal_during_a_commit_waits_for_it() -> None:
    """Inside ``signals_held`` a SIGINT neither interrupts the work nor is raised after it,
    whichever thread the kernel delivers it to (another thread runs meanwhile); outside
    (negative control) the same signal stops the block."""
    done = []
    other = threading.Thread(target=time.sleep, args=(0.5,), daemon=True)
    other.start()
    with stop_signals(), signals_held():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        done.append("committed")
    assert done == ["committed"]
    with pytest.raises(Stopped), stop_signals():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
        done.append("not reached")
    assert done == ["committed"]
