"""Kernel tests run Triton's interpreter on CPU when no CUDA device is present.

Triton reads TRITON_INTERPRET when a kernel is defined, and the kernel modules are imported
only when a Triton backend is first used, so setting it here (at collection) is early enough.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
