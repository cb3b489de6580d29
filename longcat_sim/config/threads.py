"""The thread and worker-process counts a command accepts: torch starts every thread it is
told to, and far past the machine's cores that fails (an overflow error, or a crash of the
interpreter); a pool starts every process it is told to, each a full interpreter."""

from __future__ import annotations

import os

from longcat_sim.errors import UserError

MAX_THREADS = 1024
CORES = os.cpu_count() or 1
# local worker processes: a few per core overlap their start-up; more only cost memory
MAX_WORKERS = max(8, 4 * CORES)
WORKERS_RULE = f"4 per core, at least 8; this machine has {CORES} cores"
WORKERS_LIMIT = f"at most {MAX_WORKERS} ({WORKERS_RULE})"


def check_threads(count: int, flag: str = "--threads") -> int:
    """``count`` when it lies in 1..``MAX_THREADS``; one line of UserError otherwise."""
    if count < 1:
        raise UserError(f"{flag} must be positive, got {count}")
    if count > MAX_THREADS:
        raise UserError(f"{flag} must be at most {MAX_THREADS} threads, got {count}")
    return count


def check_workers(count: int, flag: str = "--workers") -> int:
    """``count`` when it lies in 1..:data:`MAX_WORKERS` (local worker processes); one line of
    UserError otherwise."""
    if count < 1:
        raise UserError(f"{flag} must be >= 1, got {count}")
    if count > MAX_WORKERS:
        raise UserError(
            f"{flag} must be at most {MAX_WORKERS} worker processes ({WORKERS_RULE}), got {count}"
        )
    return count
