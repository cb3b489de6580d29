"""A helper process that evaluates test functions at a chosen thread count.

Pytest's own process has its OpenMP runtime started with the default (spinning) wait policy;
on a shared machine every 2-thread parallel region can then stall for a scheduler time slice.
The worker is started with ``OMP_WAIT_POLICY=PASSIVE`` (which changes no result), so thread
comparisons stay fast. Protocol on stdin/stdout: 8-byte little-endian length, then a
``torch.save`` payload ``{"fn": "module:function", "threads": n, "kwargs": {...}}``; the reply
is the function's result saved the same way.
"""

from __future__ import annotations

import importlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]


def _read(stream) -> bytes | None:
    head = stream.read(8)
    if len(head) < 8:
        return None
    return stream.read(int.from_bytes(head, "little"))


def _write(stream, payload: Any) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    stream.write(len(data).to_bytes(8, "little") + data)
    stream.flush()


def main() -> int:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while (data := _read(stdin)) is not None:
        request = torch.load(io.BytesIO(data), weights_only=True)
        module_name, _, name = request["fn"].partition(":")
        fn = getattr(importlib.import_module(module_name), name)
        torch.set_num_threads(int(request["threads"]))
        _write(stdout, fn(**request["kwargs"]))
    return 0


class ThreadWorker:
    """``with ThreadWorker() as w: w.call("tests.repro.cases:fn", threads=2, x=...)``."""

    def __enter__(self) -> ThreadWorker:
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.repro.thread_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env=env,
        )
        return self

    def call(self, fn: str, *, threads: int, **kwargs: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        _write(self.proc.stdin, {"fn": fn, "threads": threads, "kwargs": kwargs})
        data = _read(self.proc.stdout)
        if data is None:
            raise RuntimeError(f"thread worker died (exit code {self.proc.poll()})")
        return torch.load(io.BytesIO(data), weights_only=True)

    def __exit__(self, *exc: object) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
