"""The thread counts a command accepts: torch starts every thread it is told to, and far
past the machine's cores that fails (an overflow error, or a crash of the interpreter)."""

from __future__ import annotations

from longcat_sim.errors import UserError

MAX_THREADS = 1024


def check_threads(count: int, flag: str = "--threads") -> int:
    """``count`` when it lies in 1..``MAX_THREADS``; one line of UserError otherwise."""
    if count < 1:
        raise UserError(f"{flag} must be positive, got {count}")
    if count > MAX_THREADS:
        raise UserError(f"{flag} must be at most {MAX_THREADS} threads, got {count}")
    return count
