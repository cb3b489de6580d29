"""Shared test setup: Hypothesis profiles (derandomized in CI) and one torch thread.

One intra-op thread keeps results independent of the machine's core count and keeps timings
from fighting over the cores; tests that compare thread counts set them explicitly.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_configure(config) -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a runtime dependency
        return
    torch.set_num_threads(1)
