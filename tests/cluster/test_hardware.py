"""The hardware catalogue carries the published peak figures, and user files are strict."""

from __future__ import annotations

from pathlib import Path

import pytest

from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.cluster.hardware import Hardware, get_hardware, hardware_from_dict, hardware_names


def test_catalogue_has_the_required_accelerators_with_sources() -> None:
    names = set(hardware_names())
    assert {"H800", "H100", "H200", "H20", "H20-141G", "A100"} <= names
    for name in names:
        hw = get_hardware(name)
        assert isinstance(hw, Hardware)
        assert hw.source, f"{name} has no source"
        assert hw.gpu_hour_usd > 0 and hw.price_source, f"{name} has no sourced price"


def test_prices_per_gpu_hour() -> None:
    """The paper's $2 per H800-hour stays H800's; the others carry their own sourced prices."""
    h800 = get_hardware("H800")
    assert h800.gpu_hour_usd == 2.0 and "2509.01322" in h800.price_source
    prices = {n: get_hardware(n).gpu_hour_usd for n in ("A100", "H100", "H200", "B200")}
    assert prices["A100"] < prices["H100"] < prices["H200"] < prices["B200"]
    for name in ("H100", "H200", "A100", "B200", "MI300X"):
        assert "2026" in get_hardware(name).price_source


def test_h20_141g_is_the_h20_with_more_hbm() -> None:
    h20, big = get_hardware("H20"), get_hardware("H20-141G")
    assert (big.hbm_gb, big.hbm_tb_s) == (141.0, 4.8)
    assert (big.bf16_tflops, big.fp8_tflops, big.nvlink_gb_s) == (
        h20.bf16_tflops,
        h20.fp8_tflops,
        h20.nvlink_gb_s,
    )


@pytest.mark.parametrize(
    ("name", "bf16", "fp8", "hbm"),
    [
        # validation.md V6 (vendor datasheets): H800/H100 989 / 1979 TFLOPS dense, 3.35 TB/s
        ("H800", 989.0, 1979.0, 3.35),
        ("H100", 989.0, 1979.0, 3.35),
        # H20 148 / 296 TFLOPS, 4.0 TB/s; H200 4.8 TB/s
        ("H20", 148.0, 296.0, 4.0),
        ("H200", 989.0, 1979.0, 4.8),
    ],
)
def test_published_peak_figures(name: str, bf16: float, fp8: float, hbm: float) -> None:
    hw = get_hardware(name)
    assert hw.bf16_tflops == bf16
    assert hw.fp8_tflops == fp8
    assert hw.hbm_tb_s == hbm
    assert hw.peak_flops("fp8") == fp8 * 1e12
    assert hw.hbm_bytes_per_s == hbm * 1e12


def test_h800_links() -> None:
    hw = get_hardware("h800")  # names are case-insensitive
    assert hw.nvlink_gb_s == 200.0  # 400 GB/s bidirectional (V6: ~160 achievable per direction)
    assert hw.rdma_gb_s == 50.0  # 400 Gb/s InfiniBand per GPU (V6)
    assert hw.gpus_per_node == 8


def test_fp8_falls_back_to_bf16_without_fp8_units() -> None:
    a100 = get_hardware("A100")
    assert a100.fp8_tflops is None
    assert a100.peak_flops("fp8") == a100.peak_flops("bf16") == 312e12


def _one_line_error(excinfo: pytest.ExceptionInfo[ClusterInputError]) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def test_unknown_hardware_name() -> None:
    with pytest.raises(ClusterInputError) as excinfo:
        get_hardware("H9000")
    message = _one_line_error(excinfo)
    assert "H9000" in message and "H800" in message


def test_user_file_with_base(tmp_path: Path) -> None:
    path = tmp_path / "fast.toml"
    path.write_text('[hardware]\nbase = "H800"\nhbm_tb_s = 4.0\ngpu_hour_usd = 3\n')
    hw = get_hardware(str(path))
    assert hw.name == "fast"
    assert hw.hbm_tb_s == 4.0 and hw.gpu_hour_usd == 3
    assert hw.bf16_tflops == 989.0
    assert "fast.toml" in hw.source


def test_user_file_without_base_needs_every_field(tmp_path: Path) -> None:
    path = tmp_path / "bare.toml"
    path.write_text("bf16_tflops = 100\n")
    with pytest.raises(ClusterInputError) as excinfo:
        get_hardware(str(path))
    assert "missing" in _one_line_error(excinfo)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('base = "H800"\nhbm_bandwith = 3\n', "unknown hardware field 'hbm_bandwith'"),
        ('base = "H800"\nrdma_gb_s = -50\n', "rdma_gb_s must be positive"),
        ('base = "H800"\nnvlink_gb_s = 0\n', "nvlink_gb_s must be positive"),
        ('base = "H800"\nhbm_tb_s = "fast"\n', "hbm_tb_s must be positive"),
        ('base = "H800"\ngpus_per_node = 0\n', "gpus_per_node must be an integer >= 1"),
        ('base = "H800"\nrdma_latency_us = -1\n', "rdma_latency_us must be a number >= 0"),
        ('base = "B9000"\n', "unknown hardware 'B9000'"),
        ("base = [\n", "not valid TOML"),
    ],
)
def test_bad_user_files(tmp_path: Path, body: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ClusterInputError) as excinfo:
        get_hardware(str(path))
    assert needle in _one_line_error(excinfo)


def test_missing_file() -> None:
    with pytest.raises(ClusterInputError, match="does not exist"):
        get_hardware("/nonexistent/gpu.toml")


def test_replace_validates() -> None:
    with pytest.raises(ClusterInputError, match="hbm_tb_s must be positive"):
        get_hardware("H100").replace(hbm_tb_s=-1.0)
    assert hardware_from_dict({"base": "H100", "name": "x"}).nvlink_gb_s == 450.0
