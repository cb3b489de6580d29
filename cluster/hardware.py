"""GPU and interconnect catalogue: peak rates, memory, links, price; plus user hardware files.

Figures are vendor peak values (dense tensor-core FLOPs, no sparsity). What a real kernel reaches
is not a property of the chip; the efficiency terms live in ``cluster.assumptions``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.config.fields import Check, integer, name, number, optional, validate
from longcat_sim.config.toml import read_toml

Precision = Literal["bf16", "fp8"]

_LATENCY_NOTE = (
    "link latencies are typical small-message one-way figures (order of magnitude), "
    "not datasheet values"
)


def _si(field_name: str, scale: float) -> property:
    """A read-only view of ``field_name`` in SI units: its value times ``scale``."""
    return property(lambda self: getattr(self, field_name) * scale)


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
    gpu_hour_usd: float = 2.0  # price of one GPU for one hour, USD
    source: str = ""
    price_source: str = ""  # where gpu_hour_usd comes from, and when

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

    hbm_bytes_per_s = _si("hbm_tb_s", 1e12)
    hbm_bytes = _si("hbm_gb", 1e9)
    nvlink_bytes_per_s = _si("nvlink_gb_s", 1e9)
    rdma_bytes_per_s = _si("rdma_gb_s", 1e9)
    nvlink_latency_s = _si("nvlink_latency_us", 1e-6)
    rdma_latency_s = _si("rdma_latency_us", 1e-6)

    def replace(self, **changes: Any) -> Hardware:
        return hardware_from_dict({**dataclasses.asdict(self), **changes})


# far beyond any device either way, yet keeping the cost model's products and quotients finite
MIN_POSITIVE, MAX_VALUE = 1e-9, 1e9
_POSITIVE = dataclasses.replace(
    number(MIN_POSITIVE, MAX_VALUE), rule=f"must be positive ({MIN_POSITIVE:g} to {MAX_VALUE:g})"
)
_NON_NEGATIVE = dataclasses.replace(
    number(0.0, MAX_VALUE), rule=f"must be a number >= 0 and at most {MAX_VALUE:g}"
)
_CHECKS: dict[str, Check] = {
    "name": name(),
    "bf16_tflops": _POSITIVE,
    "fp8_tflops": optional(_POSITIVE),
    "hbm_tb_s": _POSITIVE,
    "hbm_gb": _POSITIVE,
    "nvlink_gb_s": _POSITIVE,
    "rdma_gb_s": _POSITIVE,
    "nvlink_latency_us": _NON_NEGATIVE,
    "rdma_latency_us": _NON_NEGATIVE,
    "gpus_per_node": integer(1, 2**20),
    "gpu_hour_usd": _NON_NEGATIVE,
    "source": Check("must be a string", lambda v: isinstance(v, str)),
    "price_source": Check("must be a string", lambda v: isinstance(v, str)),
}


def _validate(hw: Hardware) -> None:
    validate(hw, lambda n: f"hardware {hw.name!r}: {n}", ClusterInputError, _CHECKS)


# -- catalogue -------------------------------------------------------------------------------
# NVLink per direction = half the vendor's bidirectional figure. RDMA per GPU = one NIC per GPU
# (400 Gb/s NDR or ConnectX-7 -> 50 GB/s; 200 Gb/s HDR -> 25 GB/s).
# Prices are per GPU-hour, on demand, from public price surveys of specialised GPU clouds
# (hyperscalers charge more, reservations and spot less); each entry names its source and date.

_H800 = Hardware(
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
    gpu_hour_usd=2.0,
    price_source="LongCat-Flash paper (arXiv 2509.01322) sec. 6.3: $2 per H800 GPU-hour",
    source=(
        "NVIDIA H800 SXM5 datasheet: 989 TFLOPS BF16 / 1979 FP8 dense, 80 GB HBM3 "
        "3.35 TB/s, NVLink 400 GB/s bidirectional; 8 x 400 Gb/s InfiniBand per node "
        "(DeepSeek-V3 report, sec. 3.1); " + _LATENCY_NOTE
    ),
)

# The other Hopper parts: the H800's compute and links, with their own NVLink and memory.
_H100 = dataclasses.replace(
    _H800,
    name="H100",
    nvlink_gb_s=450.0,
    gpu_hour_usd=3.0,
    price_source=(
        "Mercatus GPU index, May 2026 (mercatus-ai.com/blog/cloud-gpu-pricing): H100 SXM5 "
        "on demand $2.50-3.50 at specialised clouds; midpoint"
    ),
    source=(
        "NVIDIA H100 SXM5 datasheet: 989 TFLOPS BF16 / 1979 FP8 dense, 80 GB HBM3 "
        "3.35 TB/s, NVLink 900 GB/s bidirectional; ConnectX-7 400 Gb/s per GPU "
        "(DGX H100); " + _LATENCY_NOTE
    ),
)
_H200 = dataclasses.replace(
    _H100,
    name="H200",
    hbm_tb_s=4.8,
    hbm_gb=141.0,
    gpu_hour_usd=4.0,
    price_source=(
        "Mercatus GPU index, May 2026 (mercatus-ai.com/blog/cloud-gpu-pricing): H200 SXM5 "
        "on demand $3.50-4.50 at specialised clouds; midpoint"
    ),
    source=(
        "NVIDIA H200 SXM datasheet: 989 TFLOPS BF16 / 1979 FP8 dense, 141 GB HBM3e "
        "4.8 TB/s, NVLink 900 GB/s bidirectional; 400 Gb/s per GPU; " + _LATENCY_NOTE
    ),
)
_H20 = dataclasses.replace(
    _H100,
    name="H20",
    bf16_tflops=148.0,
    fp8_tflops=296.0,
    hbm_tb_s=4.0,
    hbm_gb=96.0,
    gpu_hour_usd=2.0,
    price_source=(
        "no public on-demand price found (a China-market part not listed by Western GPU clouds, "
        "willitrunai.com/gpus/h20-96gb, checked 2026-12): the H800's $2 as a placeholder; "
        "state yours with --gpu-hour-usd"
    ),
    source=(
        "NVIDIA H20 (HGX) public specification: 148 TFLOPS BF16 / 296 FP8 dense, 96 GB "
        "HBM3 4.0 TB/s, NVLink 900 GB/s bidirectional; 400 Gb/s per GPU; " + _LATENCY_NOTE
    ),
)

# The H20 with 141 GB of HBM3e (the later H20 board): the H20's compute and links.
_H20_141G = dataclasses.replace(
    _H20,
    name="H20-141G",
    hbm_tb_s=4.8,
    hbm_gb=141.0,
    source=(
        "NVIDIA H20 141 GB variant: the H20's 148 TFLOPS BF16 / 296 FP8 dense and links, "
        "141 GB HBM3e 4.8 TB/s; 400 Gb/s per GPU; " + _LATENCY_NOTE
    ),
)

_CATALOGUE: dict[str, Hardware] = {
    hw.name: hw
    for hw in (
        _H800,
        _H100,
        _H200,
        _H20,
        _H20_141G,
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
            gpu_hour_usd=1.3,
            price_source=(
                "Mercatus GPU index, May 2026 (mercatus-ai.com/blog/cloud-gpu-pricing): A100 "
                "80GB on demand $1.10-1.50 at specialised clouds; midpoint"
            ),
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
            gpu_hour_usd=5.25,
            price_source=(
                "Lyceum, NVIDIA B200 GPU Cloud Pricing 2026 (March 2026, lyceum.technology): "
                "on demand $4.50-6.00 at specialised clouds; midpoint"
            ),
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
            gpu_hour_usd=1.99,
            price_source=(
                "Cliff Center research note, 2026-05-18 (cliffcenter.com/research/"
                "amd-inference-economics): median MI300X on-demand rate over providers"
            ),
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
        if "gpu_hour_usd" in data:
            values["price_source"] = "user hardware file"
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
    if "gpu_hour_usd" not in values:
        values.setdefault("price_source", "no gpu_hour_usd given: the $2 default")
    return Hardware(**values)


def load_hardware_file(path: str | Path) -> Hardware:
    """Read a TOML file: a ``[hardware]`` table (or top-level keys) with the fields above."""
    path = Path(path)
    table = read_toml(
        path, what=f"hardware file {str(path)!r}", table="hardware", error=ClusterInputError
    )
    table = dict(table)
    table.setdefault("name", path.stem)
    table.setdefault("source", f"user hardware file {path.name}")
    if "gpu_hour_usd" in table:
        table.setdefault("price_source", f"user hardware file {path.name}")
    return hardware_from_dict(table)
