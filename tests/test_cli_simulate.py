"""``longcat-sim simulate``: the published validation numbers through the command line (V1
Table 7, V2 Table 6 and the DeepSeek-V3 profile, V3 training overlap), its JSON, traces and
its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from longcat_sim.cli import main
from tests.cli_checks import refused, refused_in_a_process
from tests.cluster.published import (
    DEEPSEEK_PROFILE_BATCH,
    DEEPSEEK_PROFILE_CONTEXT,
    DEEPSEEK_PROFILE_TGS,
    NON_OVERLAPPED_COMM_WITH_SCMOE,
    NON_OVERLAPPED_COMM_WITHOUT_SCMOE,
    TABLE6_LONGCAT,
    TABLE6_TOLERANCE,
    TABLE7,
    TABLE7_BATCH,
    TABLE7_EP,
    TABLE7_MTP_ACCEPT,
    TRAINING_SHARE_TOLERANCE,
)

ROOT = Path(__file__).resolve().parents[1]
DECODE_KEYS = {
    "per_layer_us",
    "tpl_us",
    "tpot_ms",
    "tps_per_user",
    "tgs",
    "cost_per_m_tokens",
    "exposed_comm_share",
    "context",
    "assumptions",
    "step_ms",
    "closed_form_step_ms",
}
TRAIN_KEYS = {
    "step_ms",
    "exposed_comm_share",
    "bubble_ms",
    "bubble_share",
    "tgs",
    "forward_ms",
    "backward_ms",
}


def simulate(tmp_path: Path, capsys, *argv: str) -> dict:
    code = main(["simulate", *argv, "--json", "--run-dir", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err == ""
    return json.loads(out)


# -- V1: Table 7 ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(TABLE7))
def test_v1_table7(model: str, tmp_path, capsys) -> None:
    ref = TABLE7[model]
    r = simulate(
        tmp_path,
        capsys,
        "--model", model,
        "--assumptions", "table7",
        "--schedule", ref.schedule,
        "--attention-tp", str(ref.attention_tp),
        "--ep", str(TABLE7_EP),
        "--gpus", str(TABLE7_EP),
        "--batch-per-device", str(TABLE7_BATCH),
        # Table 7 assumes one MTP draft token for every model, Qwen3 (no MTP head) included
        "--mtp-draft-tokens", "1",
        # a theoretical estimate that checks no memory: price every row, flag what cannot fit
        "--hbm-check", "report",
    )  # fmt: skip
    # 96 requests of 5,000 tokens: Qwen3's bf16 GQA cache alone (92 GB) overflows 80 GB
    assert r["fits"] is (model != "qwen3-235b-a22b")
    layer = r["per_layer_us"]
    assert layer["dispatch"] == pytest.approx(ref.dispatch_us, rel=0.03)
    assert layer["routed_experts"] + layer["shared_experts"] == pytest.approx(ref.moe_us, rel=0.03)
    assert layer["combine"] == pytest.approx(ref.combine_us, rel=0.03)
    assert r["tpot_ms"] == pytest.approx(ref.tpot_ms, rel=0.05)
    assert r["cost_per_m_tokens"] == pytest.approx(ref.cost_per_m_tokens, rel=0.05)
    # the paper states no context for its attention row: the output says which one it assumed
    assert r["context"] == 5000 and r["assumptions"] == "table7"
    assert r["mtp_accept"] == TABLE7_MTP_ACCEPT
    assert r["step_ms"] == pytest.approx(r["closed_form_step_ms"], rel=1e-12)


def test_v1_negative_control_wrong_schedule_misses(tmp_path, capsys) -> None:
    """Qwen3 under the sequential schedule (attention exposed) misses Table 7's TPOT: the
    tolerance can be failed."""
    ref = TABLE7["qwen3-235b-a22b"]
    r = simulate(
        tmp_path, capsys, "--model", "qwen3-235b-a22b", "--assumptions", "table7",
        "--schedule", "sequential", "--attention-tp", "4", "--mtp-draft-tokens", "1",
        "--hbm-check", "report",
    )  # fmt: skip
    assert abs(r["tpot_ms"] / ref.tpot_ms - 1) > 0.05


# -- V2: Table 6 and the DeepSeek-V3 profile ----------------------------------------------------


@pytest.mark.parametrize("row", range(len(TABLE6_LONGCAT)))
def test_v2_table6_longcat(row: int, tmp_path, capsys) -> None:
    ref = TABLE6_LONGCAT[row]
    r = simulate(
        tmp_path,
        capsys,
        "--attention-dtype", ref.attention_dtype,
        "--context", str(ref.context),
        "--batch-per-device", str(ref.batch_per_device),
    )  # fmt: skip
    assert r["model"] == "longcat-flash" and r["gpus"] == 128 and r["schedule"] == "sbo"
    assert r["mtp_accept"] == 0.9
    assert r["tps_per_user"] == pytest.approx(ref.tps_per_user, rel=TABLE6_TOLERANCE)


def test_v2_deepseek_profile(tmp_path, capsys) -> None:
    r = simulate(
        tmp_path,
        capsys,
        "--model", "deepseek-v3",
        "--schedule", "tbo",
        "--batch-per-device", str(DEEPSEEK_PROFILE_BATCH),
        "--context", str(DEEPSEEK_PROFILE_CONTEXT),
        "--mtp-draft-tokens", "0",
        "--assume", "routing=balanced",
        "--assume", "context_cv=0",
    )  # fmt: skip
    assert r["assumptions"] == "default+routing=balanced,context_cv=0.0"
    assert r["tgs"] == pytest.approx(DEEPSEEK_PROFILE_TGS, rel=TABLE6_TOLERANCE)


# -- V3: training overlap -----------------------------------------------------------------------


def test_v3_training_overlap(tmp_path, capsys) -> None:
    baseline = simulate(tmp_path, capsys, "--mode", "train", "--schedule", "baseline")
    scmoe = simulate(tmp_path, capsys, "--mode", "train")
    assert set(baseline) >= TRAIN_KEYS
    assert scmoe["schedule"] == "scmoe" and scmoe["ep"] == 32 and scmoe["cp"] == 8
    assert scmoe["rdma_gb_s"] == 25.0 and scmoe["moe_chunks"] == 2
    assert baseline["exposed_comm_share"] == pytest.approx(
        NON_OVERLAPPED_COMM_WITHOUT_SCMOE, abs=TRAINING_SHARE_TOLERANCE
    )
    assert scmoe["exposed_comm_share"] == pytest.approx(
        NON_OVERLAPPED_COMM_WITH_SCMOE, abs=TRAINING_SHARE_TOLERANCE
    )
    assert scmoe["bubble_ms"] == 0.0 and scmoe["step_ms"] < baseline["step_ms"]


def test_train_conventional_schedule_between(tmp_path, capsys) -> None:
    """``--schedule conventional`` (the MoE beside FFN_1) exposes less traffic than the serial
    baseline and more than the shortcut; no published number to compare with."""
    share = {
        s: simulate(tmp_path, capsys, "--mode", "train", "--schedule", s)["exposed_comm_share"]
        for s in ("baseline", "conventional", "scmoe")
    }
    assert share["scmoe"] < share["conventional"] < share["baseline"]


def test_train_pipeline_bubbles(tmp_path, capsys) -> None:
    """1F1B over 4 stages: the bubble is (PP - 1)(F + B) (DualPipe README)."""
    r = simulate(
        tmp_path, capsys, "--mode", "train", "--pp", "4", "--pipeline", "1f1b",
        "--tokens-per-microbatch", "1024",
    )  # fmt: skip
    assert r["gpus"] == 128 and r["dp"] == 1
    assert r["bubble_ms"] == pytest.approx(3 * (r["forward_ms"] + r["backward_ms"]), rel=1e-9)


# -- output -------------------------------------------------------------------------------------


def test_default_deployment_json_and_run_directory(tmp_path, capsys) -> None:
    r = simulate(tmp_path, capsys)
    assert set(r) >= DECODE_KEYS
    assert set(r["per_layer_us"]) >= {"attention", "dispatch", "routed_experts", "combine"}
    assert (r["model"], r["hardware"], r["gpus"], r["ep"]) == ("longcat-flash", "H800", 128, 128)
    assert (r["schedule"], r["batch_per_device"], r["context"]) == ("sbo", 96, 5000)
    assert (r["attention_dtype"], r["mtp_accept"], r["assumptions"]) == ("bf16", 0.9, "default")
    assert r["tgs"] == pytest.approx(r["batch_per_device"] * r["tps_per_user"])
    assert r["cost_per_m_tokens"] == pytest.approx(2.0 / (r["tgs"] * 3600) * 1e6)
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == r
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["seeds"] == {"routing": 0} and manifest["config"]["context"] == 5000


def test_same_seed_same_numbers_other_seed_other_draw(tmp_path, capsys) -> None:
    first = simulate(tmp_path, capsys, "--seed", "3")
    again = simulate(tmp_path, capsys, "--seed", "3")
    other = simulate(tmp_path, capsys, "--seed", "4")
    assert first == again
    assert other["tpot_ms"] != first["tpot_ms"]


def test_text_states_the_assumed_context(tmp_path, capsys) -> None:
    code = main(["simulate", "--assumptions", "table7", "--run-dir", str(tmp_path / "run")])
    out, _ = capsys.readouterr()
    assert code == 0
    assert "attention context 5000 tokens per request" in out
    assert "assumptions table7" in out and "TPOT" in out


@pytest.mark.parametrize("mode", ["decode", "train"])
def test_trace_is_written_atomically(mode: str, tmp_path, capsys) -> None:
    trace = tmp_path / "out" / "trace.json"
    trace.parent.mkdir()
    extra = ["--tokens-per-microbatch", "1024", "--microbatches", "2"] if mode == "train" else []
    r = simulate(tmp_path, capsys, "--mode", mode, "--trace", str(trace), *extra)
    doc = json.loads(trace.read_text())
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert spans and {e["tid"] for e in spans} <= {0, 1, 2}
    if mode == "decode":
        assert len(spans) == r["events"]
        assert max(e["ts"] + e["dur"] for e in spans) == pytest.approx(r["step_ms"] * 1e3)
    else:
        assert {e["pid"] for e in spans} == {0, 1}  # layer timeline and pipeline stage
    assert [p.name for p in trace.parent.iterdir()] == ["trace.json"]  # no temporary left


def test_text_says_where_the_trace_went(tmp_path, capsys) -> None:
    trace = tmp_path / "trace.json"
    code = main(["simulate", "--trace", str(trace), "--run-dir", str(tmp_path / "run")])
    out, _ = capsys.readouterr()
    assert code == 0 and trace.is_file()
    assert f"trace written to {trace}" in out.splitlines()


def test_trace_in_a_missing_folder_is_refused(tmp_path, capsys) -> None:
    """No folder is created for a trace: a missing one is a one-line error, nothing is run."""
    trace = tmp_path / "missing" / "trace.json"
    run_dir = tmp_path / "run"
    code = main(["simulate", "--trace", str(trace), "--json", "--run-dir", str(run_dir)])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and "does not exist" in err
    assert not trace.parent.exists() and not run_dir.exists()


def test_exposed_attention_is_mla0_under_sbo(tmp_path, capsys) -> None:
    """Table 7's LongCat-Flash "attention per layer" (264 us) is the exposed MLA_0, not the
    layer's two MLA blocks: under SBO with the table7 set the dispatch and combine hide MLA_1,
    so the exposed attention is half the layer's (both MLA blocks have one shape); under
    ``sequential`` nothing hides it."""
    argv = ("--assumptions", "table7", "--ep", str(TABLE7_EP), "--gpus", str(TABLE7_EP))
    sbo = simulate(tmp_path, capsys, *argv)["per_layer_us"]
    sequential = simulate(tmp_path, capsys, *argv, "--schedule", "sequential")["per_layer_us"]
    # the attn0 stage also carries the norm feeding FFN_0 and the MoE (model/costs.py): +0.002 %
    assert sbo["attention_exposed"] == pytest.approx(sbo["attention"] / 2, rel=1e-3)
    assert sequential["attention_exposed"] == pytest.approx(sequential["attention"], rel=1e-9)
    assert sbo["attention"] == pytest.approx(sequential["attention"], rel=1e-9)
    paper = TABLE7["longcat-flash"].attention_us
    assert abs(sbo["attention_exposed"] - paper) < abs(sbo["attention"] - paper)


# -- errors -------------------------------------------------------------------------------------


def _bad_hardware(tmp_path: Path) -> str:
    path = tmp_path / "bad.toml"
    path.write_text('[hardware]\nbase = "H800"\nrdma_gb_s = -5.0\n')
    return str(path)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--hardware", "BAD_TOML"], "rdma_gb_s must be positive"),
        (["--ep", "96", "--gpus", "96"], "--ep 96 does not divide"),
        (["--batch-per-device", "0"], "--batch-per-device must be an integer >= 1"),
        (["--hardware", "TPU9"], "unknown hardware 'TPU9'"),
        (["--schedule", "dbo"], "unknown schedule 'dbo'"),
        (["--mode", "train", "--schedule", "sbo"], "unknown schedule 'sbo'"),
        (["--cp", "4"], "--cp applies to --mode train"),
        (["--assume", "speed=11"], "--assume takes TERM=VALUE"),
        (["--gpus", "100", "--ep", "64"], "is not a multiple of --ep 64"),
        (["--model", "deepseek-v3", "--schedule", "sbo"], "--schedule sbo needs ScMoE layers"),
        (["--model", "deepseek-v3", "--gpus", "1"], "deepseek-v3 decode on 1 x H800 does not fit"),
        (["--model", "qwen3-235b-a22b", "--schedule", "sbo"], "use tbo or sequential"),
        (["--gpu-hour-usd", "-1"], "--gpu-hour-usd must be"),
    ],
)
def test_bad_input_is_one_stderr_line_and_exit_2(argv, needle, tmp_path, capsys) -> None:
    argv = [_bad_hardware(tmp_path) if a == "BAD_TOML" else a for a in argv]
    assert needle in refused(["simulate", *argv], capsys, tmp_path / "run")


def test_bad_input_as_a_subprocess(tmp_path) -> None:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    err = refused_in_a_process(["simulate", "--batch-per-device", "0"], tmp_path, env)
    assert "--batch-per-device must be an integer >= 1" in err


# -- warnings -----------------------------------------------------------------------------------


def test_draft_tokens_at_acceptance_zero_warn_on_stderr(tmp_path, capsys) -> None:
    """Draft tokens verified at acceptance 0 cost a step and gain nothing: one warning line on
    stderr, under --json too, while the JSON on stdout stays whole."""
    argv = ["simulate", "--mtp-accept", "0", "--json", "--run-dir", str(tmp_path / "run")]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["mtp_draft_tokens"] == 1
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "acceptance 0" in lines[0]
    assert main([*argv[:-3], "--mtp-draft-tokens", "0", "--json", *argv[-2:]]) == 0
    assert capsys.readouterr().err == ""


def test_gpu_hour_price_override_flows_into_the_cost(tmp_path, capsys) -> None:
    r = simulate(tmp_path, capsys, "--gpu-hour-usd", "3.5", "--batch-per-device", "16")
    assert (r["gpu_hour_usd"], r["gpu_hour_usd_source"]) == (3.5, "--gpu-hour-usd")
    assert r["cost_per_m_tokens"] == pytest.approx(3.5 / (r["tgs"] * 3600) * 1e6)
