"""GPU and interconnect catalogue: peak rates, memory, links, price; plus user hardware files.

Figures are vendor peak values (dense tensor-core FLOPs, no sparsity). What a real kernel reaches
is not a property of the chip; the efficiency terms live in ``cluster.assumptions``.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from longcat_sim.cluster.errors import ClusterInputError

Precision = Literal["bf16", "fp8"]

_LATENCY_NOTE = (
    "link latencies are typical small-message one-way figures (order of magnitude), "
    "not datasheet values"
)


@dataclass(frozen=True)
class Hardware:
    """One accelerator type and the links around it. Units are in the field names."""

    name: str
    bf16_tflops: float  # dense BF16 tensor-core peak
    fp8_tflops: float | None  # dense FP8 peak; None: no FP8 tensor cores (FP8 runs at BF16 rate)
    hbm_tb_s: float  # HBM bandwidth, TB/s (1e12 B/s)
    hbm_gb: float  # HBM capacity, GB (1e9 B)
    nvlink_gb_s: float  # NVLink (scale-up) bandwidth per GPU, per direction, GB/s
    rdma_gb_s: float  # scale-out RDMA bandwidth per GPU, per direction, GB/s
    nvlink_latency_us: float
    rdma_latency_us: float
    gpus_per_node: int
    gpu_hour_usd: float = 2.0
    source: str = ""

    def __post_init__(self) -> None:
        _validate(self)

    # -- SI views used by the cost model ---------------------------------------------------
    def peak_flops(self, precision: Precision) -> float:
        """Dense peak FLOP/s at ``precision``; FP8 falls back to BF16 without FP8 units."""
        if precision == "fp8" and self.fp8_tflops is not None:
            return self.fp8_tflops * 1e12
        if precision in ("bf16", "fp8"):
            return self.bf16_tflops * 1e12
        raise ClusterInputError(f"unknown precision {precision!r}; use 'bf16' or 'fp8'")

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_tb_s * 1e12

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_gb * 1e9

    @property
    def nvlink_bytes_per_s(self) -> float:
        return self.nvlink_gb_s * 1e9

    @property
    def rdma_bytes_per_s(self) -> float:
        return self.rdma_gb_s * 1e9

    @property
    def nvlink_latency_s(self) -> float:
        return self.nvlink_latency_us * 1e-6

    @property
    def rdma_latency_s(self) -> float:
        return self.rdma_latency_us * 1e-6

    def replace(self, **changes: Any) -> Hardware:
        return hardware_from_dict({**dataclasses.asdict(self), **changes})


_POSITIVE = ("bf16_tflops", "hbm_tb_s", "hbm_gb", "nvlink_gb_s", "rdma_gb_s")
_NON_NEGATIVE = ("nvlink_latency_us", "rdma_latency_us", "gpu_hour_usd")


def _validate(hw: Hardware) -> None:
    if not isinstance(hw.name, str) or not hw.name:
        raise ClusterInputError("hardware needs a non-empty name")
    for name in (*_POSITIVE, *_NON_NEGATIVE, "fp8_tflops"):
        value = getattr(hw, name)
        if value is None and name == "fp8_tflops":
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ClusterInputError(f"hardware {hw.name!r}: {name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ClusterInputError(f"hardware {hw.name!r}: {name} must be finite, got {value!r}")
    for name in (*_POSITIVE, "fp8_tflops"):
        value = getattr(hw, name)
        if value is not None and value <= 0:
            raise ClusterInputError(f"hardware {hw.name!r}: {name} must be positive, got {value!r}")
    for name in _NON_NEGATIVE:
        if getattr(hw, name) < 0:
            raise ClusterInputError(
                f"hardware {hw.name!r}: {name} must be >= 0, got {getattr(hw, name)!r}"
            )
    if isinstance(hw.gpus_per_node, bool) or not isinstance(hw.gpus_per_node, int):
        raise ClusterInputError(
            f"hardware {hw.name!r}: gpus_per_node must be an integer, got {hw.gpus_per_node!r}"
        )
    if hw.gpus_per_node <= 0:
        raise ClusterInputError(
            f"hardware {hw.name!r}: gpus_per_node must be positive, got {hw.gpus_per_node}"
        )
    if not isinstance(hw.source, str):
        raise ClusterInputError(f"hardware {hw.name!r}: source must be a string")


# -- catalogue -------------------------------------------------------------------------------
# NVLink per direction = half the vendor's bidirectional figure. RDMA per GPU = one NIC per GPU
# (400 Gb/s NDR or ConnectX-7 -> 50 GB/s; 200 Gb/s HDR -> 25 GB/s).

_CATALOGUE: dict[str, Hardware] = {
    hw.name: hw
    for hw in (
        Hardware(
            name="H800",
            bf16_tflops=989.0,
            fp8_tflops=1979.0,
            hbm_tb_s=3.35,
            hbm_gb=80.0,
            nvlink_gb_s=200.0,
            rdma_gb_s=50.0,
            nvlink_latency_us=1.0,
            rdma_latency_us=3.0,
            gpus_per_node=8,
            source=(
                "NVIDIA H800 SXM5 datasheet: 989 TFLOPS BF16 / 1979 FP8 dense, 80 GB HBM3 "
                "3.35 TB/s, NVLink 400 GB/s bidirectional; 8 x 400 Gb/s InfiniBand per node "
                "(DeepSeek-V3 report, sec. 3.1); " + _LATENCY_NOTE
            ),
        ),
        Hardware(
            name="H100",
            bf16_tflops=989.0,
            fp8_tflops=1979.0,
            hbm_tb_s=3.35,
            hbm_gb=80.0,
            nvlink_gb_s=450.0,
            rdma_gb_s=50.0,
            nvlink_latency_us=1.0,
            rdma_latency_us=3.0,
            gpus_per_node=8,
            source=(
                "NVIDIA H100 SXM5 datasheet: 989 TFLOPS BF16 / 1979 FP8 dense, 80 GB HBM3 "
                "3.35 TB/s, NVLink 900 GB/s bidirectional; ConnectX-7 400 Gb/s per GPU "
                "(DGX H100); " + _LATENCY_NOTE
            ),
        ),
        Hardware(
            name="H200",
            bf16_tflops=989.0,
            fp8_tflops=1979.0,
            hbm_tb_s=4.8,
            hbm_gb=141.0,
            nvlink_gb_s=450.0,
            rdma_gb_s=50.0,
            nvlink_latency_us=1.0,
            rdma_latency_us=3.0,
            gpus_per_node=8,
            source=(
                "NVIDIA H200 SXM datasheet: 989 TFLOPS BF16 / 1979 FP8 dense, 141 GB HBM3e "
                "4.8 TB/s, NVLink 900 GB/s bidirectional; 400 Gb/s per GPU; " + _LATENCY_NOTE
            ),
        ),
        Hardware(
            name="H20",
            bf16_tflops=148.0,
            fp8_tflops=296.0,
            hbm_tb_s=4.0,
            hbm_gb=96.0,
            nvlink_gb_s=450.0,
            rdma_gb_s=50.0,
            nvlink_latency_us=1.0,
            rdma_latency_us=3.0,
            gpus_per_node=8,
            source=(
                "NVIDIA H20 (HGX) public specification: 148 TFLOPS BF16 / 296 FP8 dense, 96 GB "
                "HBM3 4.0 TB/s, NVLink 900 GB/s bidirectional; 400 Gb/s per GPU; " + _LATENCY_NOTE
            ),
        ),
        Hardware(
            name="A100",
            bf16_tflops=312.0,
            fp8_tflops=None,
            hbm_tb_s=2.039,
            hbm_gb=80.0,
            nvlink_gb_s=300.0,
            rdma_gb_s=25.0,
            nvlink_latency_us=1.5,
            rdma_latency_us=3.0,
            gpus_per_node=8,
            source=(
                "NVIDIA A100 SXM4 80GB datasheet: 312 TFLOPS BF16 dense, no FP8, 80 GB HBM2e "
                "2.039 TB/s, NVLink 600 GB/s bidirectional; 200 Gb/s HDR per GPU (DGX A100); "
                + _LATENCY_NOTE
            ),
        ),
        Hardware(
            name="B200",
            bf16_tflops=2250.0,
            fp8_tflops=4500.0,
            hbm_tb_s=8.0,
            hbm_gb=180.0,
            nvlink_gb_s=900.0,
            rdma_gb_s=50.0,
            nvlink_latency_us=1.0,
            rdma_latency_us=3.0,
            gpus_per_node=8,
            source=(
                "NVIDIA DGX B200 datasheet divided by 8 GPUs: 2.25 PFLOPS BF16 / 4.5 FP8 dense, "
                "180 GB HBM3e 8 TB/s, NVLink 5 1.8 TB/s bidirectional; ConnectX-7 400 Gb/s per "
                "GPU; " + _LATENCY_NOTE
            ),
        ),
        Hardware(
            name="MI300X",
            bf16_tflops=1307.4,
            fp8_tflops=2614.9,
            hbm_tb_s=5.3,
            hbm_gb=192.0,
            nvlink_gb_s=448.0,
            rdma_gb_s=50.0,
            nvlink_latency_us=1.5,
            rdma_latency_us=3.0,
            gpus_per_node=8,
            source=(
                "AMD Instinct MI300X datasheet: 1307.4 TFLOPS BF16 / 2614.9 FP8 dense, 192 GB "
                "HBM3 5.3 TB/s, Infinity Fabric 896 GB/s aggregate bidirectional (the "
                "scale-up field); 400 Gb/s per GPU; " + _LATENCY_NOTE
            ),
        ),
    )
}


def hardware_names() -> list[str]:
    return sorted(_CATALOGUE)


def get_hardware(name: str) -> Hardware:
    """A catalogue entry by name (case-insensitive) or a ``.toml`` hardware file."""
    by_lower = {key.lower(): hw for key, hw in _CATALOGUE.items()}
    if isinstance(name, str) and name.lower() in by_lower:
        return by_lower[name.lower()]
    if isinstance(name, str) and name.endswith(".toml"):
        return load_hardware_file(name)
    raise ClusterInputError(
        f"unknown hardware {name!r}; choose one of {', '.join(hardware_names())} "
        f"or give a .toml hardware file"
    )


_FIELDS = {f.name: f for f in fields(Hardware)}


def hardware_from_dict(data: dict[str, Any]) -> Hardware:
    """Build from a mapping; ``base`` names a catalogue entry whose values the others override."""
    data = dict(data)
    values: dict[str, Any] = {}
    if "base" in data:
        base = get_hardware(str(data.pop("base")))
        values = dataclasses.asdict(base)
        values["source"] = f"{base.name} with user overrides"
    for key, value in data.items():
        if key not in _FIELDS:
            raise ClusterInputError(
                f"unknown hardware field {key!r}; valid fields: base, {', '.join(_FIELDS)}"
            )
        values[key] = value
    missing = [
        name
        for name, f in _FIELDS.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ClusterInputError(
            f"hardware is missing {', '.join(missing)}; give them or name a catalogue 'base'"
        )
    return Hardware(**values)


def load_hardware_file(path: str | Path) -> Hardware:
    """Read a TOML file: a ``[hardware]`` table (or top-level keys) with the fields above."""
    path = Path(path)
    if not path.is_file():
        raise ClusterInputError(f"hardware file {str(path)!r} does not exist")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ClusterInputError(f"hardware file {str(path)!r} is not valid TOML: {exc}") from None
    table = doc.get("hardware", doc)
    if not isinstance(table, dict):
        raise ClusterInputError(f"hardware file {str(path)!r}: [hardware] must be a table")
    table = dict(table)
    table.setdefault("name", path.stem)
    table.setdefault("source", f"user hardware file {path.name}")
    return hardware_from_dict(table)
