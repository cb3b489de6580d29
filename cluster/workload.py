"""What the simulator consumes: timed stages per layer, already priced on a piece of hardware.

The cost model (``cluster.costmodel``) turns hardware-independent op counts into these times;
the schedules (``cluster.schedules``) arrange them on streams; the simulator runs them.

Stage names are those of ``longcat_sim.stages.LAYER_FLOW`` (a contract with ``model.costs``):
per layer kind (``scmoe``, ``moe``, ``dense``) the compute stages and the communication stages
(``stages.COMM_STAGES``: dispatch and combine of expert parallelism, the tensor-parallel
collectives of the dense FFNs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from longcat_sim.cluster.errors import ClusterInputError

Link = Literal["nvlink", "rdma"]
LayerKind = Literal["scmoe", "moe", "dense"]


@dataclass(frozen=True)
class StageTimes:
    """Seconds each stage of one layer takes for one micro-batch on the pace-setting GPU."""

    kind: LayerKind
    compute: dict[str, float]
    comm: dict[str, float] = field(default_factory=dict)
    comm_link: dict[str, Link] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for table in (self.compute, self.comm):
            for stage, seconds in table.items():
                if not seconds >= 0.0:
                    raise ClusterInputError(
                        f"stage {stage!r} has time {seconds!r}; stage times must be >= 0"
                    )
        missing = set(self.comm) - set(self.comm_link)
        if missing:
            raise ClusterInputError(
                f"communication stages {sorted(missing)} have no link; give comm_link for each"
            )

    def get(self, stage: str) -> float:
        """Seconds of ``stage`` on whichever stream runs it; 0 when the layer has no such stage."""
        return self.compute.get(stage, self.comm.get(stage, 0.0))

    @property
    def compute_total(self) -> float:
        return sum(self.compute.values())

    @property
    def comm_total(self) -> float:
        return sum(self.comm.values())


@dataclass(frozen=True)
class DecodeWorkload:
    """One decode step on one GPU: per-layer stage times for the whole per-device batch
    (``layers``, used by ``sequential`` and ``sbo``) and for each of the two micro-batches that
    two-batch overlap splits it into (``layers_half``, used by ``tbo``). Either may be empty
    when no schedule that needs it will run, not both."""

    layers: tuple[StageTimes, ...]
    layers_half: tuple[StageTimes, ...]
    batch_per_device: int
    tokens_per_step: int  # batch x (1 + MTP draft tokens)
    mtp_draft_tokens: int
    mtp_accept: float
    gpu_hour_usd: float
    overhead_s: float = 0.0  # per-step time outside the layers (embedding, LM head, sampling)

    def __post_init__(self) -> None:
        if not (self.layers or self.layers_half) or (
            self.layers and self.layers_half and len(self.layers) != len(self.layers_half)
        ):
            raise ClusterInputError(
                "a decode workload needs layers of the whole batch, of a micro-batch, or both "
                "with the same number of layers"
            )
        if self.batch_per_device <= 0:
            raise ClusterInputError(
                f"batch per device must be positive, got {self.batch_per_device}"
            )
        if not 0.0 <= self.mtp_accept <= 1.0:
            raise ClusterInputError(f"MTP acceptance must lie in [0, 1], got {self.mtp_accept}")
        if self.gpu_hour_usd < 0:
            raise ClusterInputError(f"GPU price must be >= 0 $/hour, got {self.gpu_hour_usd}")


@dataclass(frozen=True)
class TrainLayerTimes:
    """Forward and backward stage times of one layer for one token chunk (the MoE of a training
    layer is split into chunks along the token dimension).

    ``weight_grad`` (optional) gives, per backward compute stage, the seconds of its weight
    gradient (W) on top of ``backward``, which then holds the input gradient only; zero-bubble
    pipelines defer W. Without it the whole backward counts as input gradient."""

    forward: StageTimes
    backward: StageTimes
    weight_grad: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for stage, seconds in self.weight_grad.items():
            if stage not in self.backward.compute:
                raise ClusterInputError(
                    f"weight gradient of {stage!r} has no backward compute stage; "
                    f"use one of {sorted(self.backward.compute)}"
                )
            if not seconds >= 0.0:
                raise ClusterInputError(
                    f"weight gradient of {stage!r} has time {seconds!r}; it must be >= 0"
                )


@dataclass(frozen=True)
class TrainWorkload:
    """One training step of one pipeline stage: layers per stage, chunks per MoE, micro-batches."""

    layers: tuple[TrainLayerTimes, ...]
    moe_chunks: int
    microbatches: int
    pipeline_stages: int
    tokens_per_step: int  # global tokens per optimizer step
    gpus: int
    gpu_hour_usd: float

    def __post_init__(self) -> None:
        for name in ("moe_chunks", "microbatches", "pipeline_stages", "tokens_per_step", "gpus"):
            if getattr(self, name) <= 0:
                raise ClusterInputError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.layers:
            raise ClusterInputError("a training workload needs at least one layer")
