"""Linux process and socket facts read from /proc, for tests of child processes: a process's
descendants, which of them still live, and the addresses they listen on."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
# a live process: pid -> start time (clock ticks since boot), so a reused pid is not mistaken
Procs = dict[int, int]


def _stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, ppid, start time)`` of ``pid``, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[19])


def descendants(root: int) -> Procs:
    """Every live process below ``root`` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    starts: Procs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or (stat := _stat(int(entry))) is None or stat[0] in "ZX":
            continue
        children.setdefault(stat[1], []).append(int(entry))
        starts[int(entry)] = stat[2]
    found: Procs = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = starts[pid]
        todo.extend(children.get(pid, []))
    return found


def alive(procs: Procs) -> list[int]:
    """The processes of ``procs`` still running (not exited, not a zombie, pid not reused)."""
    live = []
    for pid, start in procs.items():
        stat = _stat(pid)
        if stat is not None and stat[0] not in "ZX" and stat[2] == start:
            live.append(pid)
    return live


def survivors(procs: Procs, within_s: float = 5.0) -> list[int]:
    """The processes of ``procs`` still running after up to ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while (live := alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return live


def kill_all(procs: Procs) -> None:
    """SIGKILL whatever of ``procs`` still runs (a test's cleanup)."""
    for pid in alive(procs):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def wait_for(
    predicate: Callable[[], T], timeout_s: float, what: str, proc: subprocess.Popen | None = None
) -> T:
    """Poll ``predicate()`` until it returns something truthy; fail if ``proc`` ends first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the command ended (exit {proc.returncode}) before {what}")
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout_s:g} s")


def listening_addresses(pids: Iterable[int]) -> list[str]:
    """The local addresses (``host:port``) of the TCP sockets ``pids`` listen on."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:  # 0A: LISTEN
                found.append(_address(parts[1], family))
    return found


def _address(hex_address: str, family: int) -> str:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    # /proc/net prints each 32-bit word in host (little-endian) order
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return f"{socket.inet_ntop(family, raw)}:{int(port, 16)}"


def is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0]
    return host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1")
