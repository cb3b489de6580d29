"""Helpers the cluster tests share: decode workloads built from a few stage times."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from longcat_sim.cluster.workload import DecodeWorkload, StageTimes


def halve(layer: StageTimes, factor: float = 0.5) -> StageTimes:
    """``layer`` with every compute and communication time scaled by ``factor``."""
    return StageTimes(
        layer.kind,
        {k: v * factor for k, v in layer.compute.items()},
        {k: v * factor for k, v in layer.comm.items()},
        layer.comm_link,
    )


def make_decode_workload(
    layers: Iterable[StageTimes], half_factor: float = 0.5, **overrides: Any
) -> DecodeWorkload:
    """A decode step of ``layers`` (its half-batch layers scaled by ``half_factor``) at 96
    requests per GPU with one MTP draft token accepted 80 % of the time; ``overrides`` replace
    any field."""
    layers = tuple(layers)
    fields: dict[str, Any] = dict(
        layers=layers,
        layers_half=tuple(halve(layer, half_factor) for layer in layers),
        batch_per_device=96,
        tokens_per_step=192,
        mtp_draft_tokens=1,
        mtp_accept=0.8,
        gpu_hour_usd=2.0,
    )
    return DecodeWorkload(**(fields | overrides))
