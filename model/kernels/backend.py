"""The explicit choice between the pure-PyTorch and the Triton implementation of a kernel.

Every kernel entry point takes ``backend="torch" | "triton"`` as an argument; nothing is read
from globals or environment variables to decide it. Triton itself is imported only when the
Triton backend is used, so the model imports and runs where Triton is absent. Triton kernels
run on CUDA tensors, or on CPU tensors when Triton's interpreter was enabled (the
``TRITON_INTERPRET=1`` environment variable, set before Triton is first imported).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

Backend = Literal["torch", "triton"]
BACKENDS: tuple[str, ...] = ("torch", "triton")


def check_backend(backend: str) -> Backend:
    """Return ``backend`` if it names a known backend, else raise a one-line ValueError."""
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown kernel backend {backend!r}; pass backend='torch' (pure PyTorch) "
            f"or backend='triton' (Triton kernels)"
        )
    return backend  # type: ignore[return-value]


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported here."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """Whether Triton was asked to run kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_triton(*tensors: torch.Tensor) -> None:
    """Raise a clear error unless the Triton backend can run on ``tensors``."""
    if not triton_available():
        raise RuntimeError(
            "backend='triton' needs the triton package, which is not installed; "
            "install triton or pass backend='torch'"
        )
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"kernel inputs must share one device, got {sorted(map(str, devices))}")
    device = next(iter(devices), torch.device("cpu"))
    if device.type == "cuda":
        return
    if device.type == "cpu" and triton_interpreting():
        return
    raise RuntimeError(
        f"backend='triton' runs on CUDA tensors, or on CPU tensors only under Triton's "
        f"interpreter (set TRITON_INTERPRET=1 before importing triton); got {device} tensors"
    )
