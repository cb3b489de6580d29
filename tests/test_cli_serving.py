"""``simulate --mode prefill`` and ``--mode disagg`` through the command line, and the memory
check on every mode: the published numbers, the published deployments that fit and the cases
that must not, one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from longcat_sim.cli import main
from tests.cli_checks import refused
from tests.cluster.published import (
    DEEPSEEK_PREFILL_EP,
    DEEPSEEK_PREFILL_PROMPT,
    DEEPSEEK_PREFILL_TGS,
    DEEPSEEK_PREFILL_TOKENS,
    PREFILL_TOLERANCE,
)

BF16_WEIGHTS = ("--assume", "linear_precision=bf16", "--assume", "expert_precision=bf16")


def simulate(tmp_path: Path, capsys, *argv: str) -> dict:
    code = main(["simulate", *argv, "--json", "--run-dir", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_deepseek_v3_prefill_profile(tmp_path, capsys) -> None:
    r = simulate(
        tmp_path, capsys, "--mode", "prefill", "--model", "deepseek-v3",
        "--gpus", str(DEEPSEEK_PREFILL_EP), "--tokens-per-device", str(DEEPSEEK_PREFILL_TOKENS),
        "--prompt-len", str(DEEPSEEK_PREFILL_PROMPT), "--assume", "routing=balanced",
    )  # fmt: skip
    assert r["mode"] == "prefill" and r["schedule"] == "tbo"  # the model's own overlap
    assert r["input_tgs"] == pytest.approx(DEEPSEEK_PREFILL_TGS, rel=PREFILL_TOLERANCE)
    assert r["forward_ms"] == pytest.approx(r["closed_form_forward_ms"], rel=1e-9)
    assert r["ttft_ms"] == pytest.approx(r["forward_ms"]) and r["fits"]


def test_prefill_trace(tmp_path, capsys) -> None:
    trace = tmp_path / "prefill.json"
    simulate(
        tmp_path, capsys, "--mode", "prefill", "--tokens-per-device", "2048", "--trace", str(trace)
    )
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "dispatch" for e in events)


def test_disagg_pair_and_colocated(tmp_path, capsys) -> None:
    r = simulate(tmp_path, capsys, "--mode", "disagg", "--prefill-gpus", "16", "--gpus", "64")
    assert (r["prefill_gpus"], r["decode_gpus"], r["kv_transfer"]) == (16, 64, "layerwise")
    assert r["requests_per_s"] == min(r["prefill_requests_per_s"], r["decode_requests_per_s"])
    assert r["prefill_memory"]["fits"] and r["decode_memory"]["fits"]
    assert r["colocated"]["chunk_tokens"] > 0 and r["colocated"]["tpot_ms"] > r["tpot_ms"]


# -- memory: the published deployments and the cases that must not fit -------------------------


def test_longcat_bf16_fits_two_h800_nodes_not_one(tmp_path, capsys) -> None:
    """The model card's BF16 deployment: 2 nodes of 8 H800-80G, TP16 attention and FFN, EP16."""
    two = ("--gpus", "16", "--ep", "16", "--attention-tp", "16", "--ffn-tp", "16")
    common = (*BF16_WEIGHTS, "--batch-per-device", "1", "--context", "1024")
    r = simulate(tmp_path, capsys, *two, *common)
    assert r["fits"] and r["max_batch_per_device"] >= 1 and r["hbm_gb"] == 80
    one = ("--gpus", "8", "--ep", "8", "--attention-tp", "8", "--ffn-tp", "8")
    line = refused(["simulate", *one, *common], capsys, tmp_path / "one")
    assert "longcat-flash decode on 8 x H800 does not fit" in line
    assert "largest batch that fits is 0 requests" in line


def test_longcat_fp8_fits_eight_h20_141g_not_four(tmp_path, capsys) -> None:
    eight = ("--gpus", "8", "--ep", "8", "--attention-tp", "8", "--ffn-tp", "8")
    small = ("--batch-per-device", "16", "--context", "4096")
    r = simulate(tmp_path, capsys, "--hardware", "H20-141G", *eight, *small)
    assert r["fits"] and r["hbm_gb"] == 141
    four = ("--gpus", "4", "--ep", "4", "--attention-tp", "4", "--ffn-tp", "4")
    line = refused(["simulate", "--hardware", "H20-141G", *four], capsys, tmp_path / "four")
    assert "does not fit" in line


def test_qwen3_128_requests_of_4k_refused_on_80_gb(tmp_path, capsys) -> None:
    """bf16 GQA KV alone, 128 x 4,096 x 4 heads x 128 x 2 x 94 layers x 2 B = 101 GB."""
    argv = [
        "simulate", "--model", "qwen3-235b-a22b", "--schedule", "tbo", "--attention-tp", "4",
        "--batch-per-device", "128", "--context", "4096",
    ]  # fmt: skip
    line = refused(argv, capsys, tmp_path / "run")
    assert "qwen3-235b-a22b decode on 128 x H800 does not fit" in line
    assert "KV cache 100.9" in line
    r = simulate(tmp_path, capsys, *argv[1:], "--hbm-check", "report")
    assert not r["fits"] and r["hbm_breakdown_gb"]["kv_cache"] == pytest.approx(100.9, abs=0.1)


def test_deepseek_v3_on_one_h800_refused_and_prefill_too(tmp_path, capsys) -> None:
    one = ["--model", "deepseek-v3", "--gpus", "1"]
    assert "does not fit" in refused(["simulate", *one], capsys, tmp_path / "a")
    line = refused(["simulate", "--mode", "prefill", *one], capsys, tmp_path / "b")
    assert "deepseek-v3 prefill on 1 x H800 does not fit" in line


def test_hardware_differences_show_where_they_matter(tmp_path, capsys) -> None:
    """H800 and H100 differ in NVLink only: a one-node EP8 prefill (its dispatch on NVLink)
    tells them apart; H200's larger HBM admits a larger batch than H100's."""
    args = ("--mode", "prefill", "--model", "qwen3-235b-a22b", "--gpus", "8")
    args += ("--schedule", "sequential")
    h800 = simulate(tmp_path, capsys, *args, "--hardware", "H800")
    h100 = simulate(tmp_path, capsys, *args, "--hardware", "H100")
    assert h100["input_tgs"] > h800["input_tgs"] * 1.02
    decode = ("--batch-per-device", "16")
    h100d = simulate(tmp_path, capsys, *decode, "--hardware", "H100")
    h200d = simulate(tmp_path, capsys, *decode, "--hardware", "H200")
    assert h200d["max_batch_per_device"] > h100d["max_batch_per_device"]
    assert h200d["tgs"] > h100d["tgs"]  # more HBM bandwidth for the KV-cache reads


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--mode", "prefill", "--batch-per-device", "8"], "--batch-per-device applies to --mode"),
        (["--prompt-len", "100"], "--prompt-len applies to --mode prefill"),
        (["--mode", "prefill", "--prefix-hit", "1.5"], "--prefix-hit must lie in [0, 0.99]"),
        (["--mode", "prefill", "--model", "deepseek-v3", "--schedule", "sbo"], "sbo needs ScMoE"),
        (
            ["--mode", "disagg", "--model", "deepseek-v3", "--prefill-schedule", "sbo"],
            "--prefill-schedule sbo needs ScMoE",
        ),
        (["--mode", "disagg", "--prefill-gpus", "20", "--prefill-ep", "8"], "--prefill-gpus 20"),
        (["--mode", "disagg", "--trace", "t.json"], "--trace applies to --mode decode"),
        (["--mode", "prefill", "--hbm-check", "maybe"], "--hbm-check must be one of"),
    ],
)
def test_bad_serving_input_is_one_line(argv, needle, tmp_path, capsys) -> None:
    assert needle in refused(["simulate", *argv], capsys, tmp_path / "run")


def test_train_overlap_refused_without_a_shortcut_branch(tmp_path, capsys) -> None:
    argv = ["simulate", "--mode", "train", "--model", "deepseek-v3", "--schedule", "scmoe"]
    assert "use --schedule baseline" in refused(argv, capsys, tmp_path / "run")


def test_train_schedule_defaults_to_the_models_own(tmp_path, capsys) -> None:
    assert simulate(tmp_path, capsys, "--mode", "train", "--model", "deepseek-v3")["schedule"] == (
        "baseline"
    )
    assert simulate(tmp_path, capsys, "--mode", "train")["schedule"] == "scmoe"


def test_a_prefill_whose_prompts_hold_long_caches_is_refused(tmp_path, capsys) -> None:
    """99 % prefix hits: 400 prompts of 4,096 cached tokens per forward, 106 GB of cache."""
    line = refused(
        ["simulate", "--mode", "prefill", "--prefix-hit", "0.99"], capsys, tmp_path / "r"
    )
    assert "does not fit" in line and "KV cache 105.7" in line
