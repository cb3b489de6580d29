"""``longcat-sim params``: published parameter counts through the command line, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from longcat_sim.cli import main
from longcat_sim.model import costs
from longcat_sim.model.config import get_preset
from tests.cli_checks import refused, refused_in_a_process

ROOT = Path(__file__).resolve().parents[1]
B = 1e9
KEYS = {
    "total_params",
    "activated_params_min",
    "activated_params_max",
    "activated_params_expected",
    "kv_cache_bytes_per_token",
}


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_longcat_v5(results: dict) -> None:
    # spec/validation.md V5 (LongCat-Flash paper, arXiv 2509.01322; released config.json)
    assert results["total_params"] == pytest.approx(560.67 * B, abs=0.01 * B)
    assert results["activated_params_min"] == pytest.approx(18.69 * B, abs=0.01 * B)
    assert results["activated_params_max"] == pytest.approx(31.38 * B, abs=0.01 * B)
    assert results["activated_params_expected"] == pytest.approx(27.15 * B, abs=0.01 * B)
    assert results["kv_cache_bytes_per_token"] == 64_512
    assert results["mtp_params"] == pytest.approx(1.20 * B, abs=0.01 * B)


def test_json_carries_the_published_longcat_numbers(tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    code, out, err = _run(
        ["params", "--model", "longcat-flash", "--json", "--run-dir", str(run_dir)], capsys
    )
    assert code == 0 and err == ""
    results = json.loads(out)
    assert results.keys() >= KEYS
    _assert_longcat_v5(results)
    assert results["model"] == "longcat-flash" and results["target_ffn_experts"] == 8.0
    assert json.loads((run_dir / "results.json").read_text()) == results
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config_hash"] == get_preset("longcat-flash").config_hash()


def test_text_output_is_for_people(tmp_path, capsys) -> None:
    code, out, _ = _run(["params", "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 0
    assert "model longcat-flash" in out
    assert "64,512 B/token" in out
    assert f"run directory: {tmp_path / 'run'}" in out


def test_other_presets_report_their_own_counts(tmp_path, capsys) -> None:
    code, out, _ = _run(
        ["params", "--model", "deepseek-v3", "--json", "--run-dir", str(tmp_path / "r")], capsys
    )
    results = json.loads(out)
    # DeepSeek-V3 report (arXiv 2412.19437): 671 B total; 37 B activated; 61 x 576 x 2 B KV
    assert code == 0
    assert results["total_params"] == pytest.approx(671 * B, rel=0.01)
    assert round(results["activated_params_expected"] / B) == 37
    assert results["activated_params_min"] == results["activated_params_max"]  # no zero experts
    assert results["kv_cache_bytes_per_token"] == 70_272


def test_toml_model_file(tmp_path, capsys) -> None:
    path = tmp_path / "wide.toml"
    path.write_text(
        '[model]\npreset = "tiny"\nnum_layers = 3\nzero_expert_num = 0\ntarget_ffn_experts = 3\n'
    )
    code, out, err = _run(
        ["params", "--model", str(path), "--json", "--run-dir", str(tmp_path / "run")], capsys
    )
    assert code == 0 and err == ""
    results = json.loads(out)
    cfg = get_preset("tiny").replace(num_layers=3, zero_expert_num=0, target_ffn_experts=3.0)
    assert results["model"] == "wide"
    assert results["total_params"] == costs.total_params(cfg)
    # no zero experts: every one of the 3 picks is an FFN expert, min == max
    assert results["activated_params_min"] == results["activated_params_max"]
    assert results["activated_params_max"] == costs.activated_params(cfg, 3)
    assert results["activated_params_expected"] == results["activated_params_max"]
    # tiny: 3 layers x 2 MLA blocks x (kv_lora 16 + rope 8) x 2 B
    assert results["kv_cache_bytes_per_token"] == 3 * 2 * (16 + 8) * 2


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ("huge", "unknown model 'huge'"),
        ("BAD_TOML", "unknown model field 'colour'"),
        ("MISSING_TOML", "does not exist"),
    ],
)
def test_bad_model_is_one_stderr_line_and_exit_2(tmp_path, capsys, model, needle) -> None:
    if model == "BAD_TOML":
        model = str(tmp_path / "bad.toml")
        Path(model).write_text('[model]\npreset = "tiny"\ncolour = "blue"\n')
    elif model == "MISSING_TOML":
        model = str(tmp_path / "missing.toml")
    assert needle in refused(["params", "--model", model], capsys, tmp_path / "run")


def test_module_entry_point_prints_pure_json(tmp_path) -> None:
    cmd = [sys.executable, "-m", "longcat_sim", "params", "--model", "longcat-flash", "--json"]
    proc = subprocess.run(
        [*cmd, "--run-dir", str(tmp_path / "run")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    _assert_longcat_v5(json.loads(proc.stdout))  # the whole stdout parses as JSON


def test_module_entry_point_error_has_no_traceback(tmp_path) -> None:
    assert "unknown model 'huge'" in refused_in_a_process(["params", "--model", "huge"], tmp_path)


def test_given_options_are_the_ones_the_command_line_sets() -> None:
    from longcat_sim.cli import build_parser
    from longcat_sim.config.flags import given_options

    def options(argv: list[str]) -> set[str]:
        return set(given_options(lambda: build_parser(argv[0]), argv)) - {"command", "_module"}

    assert options(["train", "--steps", "5", "--sdc-guard", "--set", "lr=0.1"]) == {
        "steps", "sdc_guard", "overrides"
    }  # fmt: skip
    # a default repeated on the command line is given too; an option left out is not
    assert options(["sdc", "--model", "tiny"]) == {"model"}
    assert options(["sdc"]) == set()
    assert build_parser("sdc").parse_args(["sdc"]).model == "tiny"  # the defaults stay
