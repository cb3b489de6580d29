"""LongCat-Flash in PyTorch, plus its torch-free configuration and analytic cost model.

Importing ``longcat_sim.model`` does not import torch: its ``config`` and ``costs`` stay
usable by the simulator bridge. Torch-backed names load on first use.
"""

from __future__ import annotations

from typing import Any

from longcat_sim.model.config import (
    ConfigError,
    ModelConfig,
    get_preset,
    load_model_config,
    preset_names,
)

__all__ = [
    "ConfigError",
    "ModelConfig",
    "get_preset",
    "load_model_config",
    "load_pretrained",
    "preset_names",
]


def __getattr__(name: str) -> Any:
    if name == "load_pretrained":
        from longcat_sim.model.checkpoint import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'longcat_sim.model' has no attribute {name!r}")
