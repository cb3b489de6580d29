"""The environment a fingerprint was taken in: everything that may change a bit of a result.

Two fingerprint streams are only expected to agree when their manifests agree on
:data:`RESULT_KEYS` (library versions, CPU kernel capability, BLAS, thread count unless the run
was in deterministic mode). :func:`manifest_differences` lists the keys that differ, so a
mismatch between runs on two machines can be told apart from a mismatch on one.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

import torch

from longcat_sim.model.determinism import torch_flags
from longcat_sim.runs import git_revision

# Environment variables read by torch's OpenMP/MKL runtime at start-up.
RUNTIME_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_CBWR", "KMP_AFFINITY")

# Keys whose difference can legitimately change results.
RESULT_KEYS = (
    "torch_version",
    "numpy_version",
    "cpu_capability",
    "blas",
    "machine",
    "python",
    "git_revision",
    "deterministic",
)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment_manifest(*, deterministic: bool, device: str = "cpu") -> dict[str, Any]:
    """A JSON-ready description of this process's numerical environment."""
    import numpy as np

    config = torch.__config__.show()
    blas = "mkl" if "BLAS_INFO=mkl" in config else "openblas" if "openblas" in config else "other"
    return {
        "deterministic": deterministic,
        "device": device,
        "torch_version": str(torch.__version__),
        "numpy_version": str(np.__version__),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": blas,
        "mkl_available": torch.backends.mkl.is_available(),
        "openmp": "OpenMP" in torch.__config__.parallel_info(),
        "torch_flags": torch_flags(),
        "runtime_env": {name: os.environ.get(name) for name in RUNTIME_ENV},
        "git_revision": git_revision(),
    }


def manifest_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The :data:`RESULT_KEYS` on which two manifests disagree (thread counts only outside
    deterministic mode, where they may change results)."""
    keys = list(RESULT_KEYS)
    if not (a.get("deterministic") and b.get("deterministic")):
        keys.append("num_threads")
    flat_a = {**a, "num_threads": a.get("torch_flags", {}).get("num_threads")}
    flat_b = {**b, "num_threads": b.get("torch_flags", {}).get("num_threads")}
    return [k for k in keys if flat_a.get(k) != flat_b.get(k)]
