"""Helpers the model tests share."""

from __future__ import annotations

import torch

from longcat_sim.model.config import get_preset
from longcat_sim.model.transformer import LongcatFlashForCausalLM


def tiny_mtp_model(seed: int) -> LongcatFlashForCausalLM:
    """The tiny preset with one MTP layer, its parameters drawn from ``seed``."""
    cfg = get_preset("tiny").replace(mtp_layers=1)
    return LongcatFlashForCausalLM(cfg, generator=torch.Generator().manual_seed(seed))
