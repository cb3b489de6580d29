"""A shaped wire for multi-process runs on one host.

On a machine with few cores, gloo's copies compete with compute for the cores, so an
all-to-all costs CPU time that no overlap can hide. :func:`enter_shaped_network` moves the
calling process into a new network namespace whose loopback device sends through a token
bucket (``tc`` ``tbf``) of a given rate: every byte between ranks then waits on the wire, as
on a real interconnect, and processes started afterwards inherit the namespace. The loopback
is one shared device, so the rate is the aggregate of all ranks' traffic (a shared bus).

Needs Linux, root (``CAP_SYS_ADMIN`` and ``CAP_NET_ADMIN``) and the ``ip``/``tc`` tools.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

from longcat_sim.errors import UserError
from longcat_sim.processes import child_command

CLONE_NEWNET = 0x40000000
WIRE_MTU = 9000


def _run(*command: str) -> None:
    done = subprocess.run(child_command(command), capture_output=True, text=True, check=False)
    if done.returncode:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise UserError(
            f"{' '.join(command)} failed ({message[-1] if message else done.returncode}): "
            "the shaped wire needs root and the iproute2 tools; omit --wire-mbit to run without"
        )


def enter_shaped_network(rate_mbit: float) -> None:
    """Move this process into a fresh network namespace with a ``rate_mbit`` loopback."""
    if rate_mbit <= 0:
        raise UserError(f"--wire-mbit must be positive, got {rate_mbit}")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise UserError(
            f"--wire-mbit needs {' and '.join(missing)} (apt-get install iproute2), "
            "or omit --wire-mbit to run without a shaped wire"
        )
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        reason = os.strerror(ctypes.get_errno())
        raise UserError(
            f"cannot create a network namespace ({reason}): --wire-mbit needs root; "
            "omit it to run without a shaped wire"
        )
    _run("ip", "link", "set", "lo", "mtu", str(WIRE_MTU))
    _run("ip", "link", "set", "lo", "up")
    burst = 2 * WIRE_MTU  # the bucket must hold at least one packet
    _run("tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", f"{rate_mbit}mbit",
         "burst", str(burst), "latency", "5s")  # fmt: skip
