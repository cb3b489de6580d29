"""``longcat-sim train`` through the command line, in process: JSON, run directory, errors."""

from __future__ import annotations

import json

import pytest
import torch

from longcat_sim.cli import main
from longcat_sim.model.checkpoint import load_pretrained
from longcat_sim.model.hashing import parameter_hash
from longcat_sim.train.checkpoint import latest_checkpoint

KEYS = {
    "final_loss",
    "val_loss",
    "avg_ffn_experts_per_token",
    "target_ffn_experts",
    "tokens_per_s",
    "param_hash",
}
BYTE_BUDGET = 2**18  # a quarter MiB of the corpus keeps the tokenizer quick to build


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


def train(cache, out, *extra: str, capsys) -> tuple[int, str, str]:
    argv = [
        "train",
        "--model",
        "tiny",
        "--run-dir",
        str(out),
        "--data-cache",
        str(cache),
        "--set",
        f"byte_budget={BYTE_BUDGET}",
        "--set",
        "warmup_steps=1",
        *extra,
    ]
    code = main(argv)
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def test_json_results_and_run_directory(cache, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code, stdout, _ = train(
        cache, out, "--steps", "4", "--eval-every", "2", "--target-ffn-experts", "1.5", "--json",
        "--progress", capsys=capsys,
    )  # fmt: skip
    assert code == 0
    results = json.loads(stdout)  # stdout is JSON only, even with the progress bar on
    assert results.keys() >= KEYS
    assert results["target_ffn_experts"] == 1.5 and results["steps"] == 4
    assert results["nproc"] == 1 and results["kernels"] == "torch"
    assert len(results["avg_ffn_experts_per_token"]) == 2
    assert all(0 <= x <= 3 for x in results["avg_ffn_experts_per_token"])
    assert results["tokens_per_s"] > 0 and results["val_loss"] > 0
    assert json.loads((out / "results.json").read_text()) == results
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["model"]["target_ffn_experts"] == 1.5
    assert manifest["config"]["train"]["byte_budget"] == BYTE_BUDGET
    assert set(manifest["seeds"]) == {"seed", "init", "data"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert "val_loss" in records[1] and "val_loss" not in records[2]
    assert records[-1]["val_loss"] == results["val_loss"]
    assert results["final_loss"] == records[-1]["lm_loss"]
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and checkpoint.name == "step-00000004"
    assert parameter_hash(load_pretrained(checkpoint)) == results["param_hash"]


def test_progress_bar_goes_to_stderr(cache, tmp_path, capsys) -> None:
    code, stdout, stderr = train(
        cache, tmp_path / "run", "--steps", "2", "--progress", capsys=capsys
    )
    assert code == 0
    assert "train" in stderr and "2/2" in stderr
    assert "validation loss" in stdout and "run directory" in stdout  # text mode for people


def test_stop_and_resume_match_one_run(cache, tmp_path, capsys) -> None:
    code, whole, _ = train(cache, tmp_path / "whole", "--steps", "4", "--json", capsys=capsys)
    assert code == 0
    split = tmp_path / "split"
    code, half, _ = train(
        cache, split, "--steps", "4", "--stop-after", "2", "--json", capsys=capsys
    )
    assert code == 0 and json.loads(half)["steps"] == 2
    code, rest, _ = main_resume(cache, split, capsys)
    assert code == 0
    resumed = json.loads(rest)
    assert resumed["start_step"] == 2 and resumed["steps"] == 4
    assert resumed["param_hash"] == json.loads(whole)["param_hash"]
    assert resumed["val_loss"] == json.loads(whole)["val_loss"]
    code, again, _ = main_resume(cache, split, capsys)  # a finished run resumes as a no-op
    assert code == 0
    assert (
        json.loads(again)["start_step"] == 4
        and json.loads(again)["param_hash"] == (resumed["param_hash"])
    )


def main_resume(cache, out, capsys, *extra: str) -> tuple[int, str, str]:
    code = main(
        ["train", "--run-dir", str(out), "--resume", "--data-cache", str(cache), "--json", *extra]
    )
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def test_grow_from_a_half_depth_run(cache, tmp_path, capsys) -> None:
    half = tmp_path / "half"
    code, _, _ = train(cache, half, "--steps", "2", "--set", "model.num_layers=1", capsys=capsys)
    assert code == 0
    code, stdout, _ = train(
        cache, tmp_path / "grown", "--steps", "4", "--grow-from", str(half), "--json",
        capsys=capsys,
    )  # fmt: skip
    assert code == 0
    results = json.loads(stdout)
    assert results["start_step"] == 2 and results["grown_from"].startswith(str(half))
    assert len(results["avg_ffn_experts_per_token"]) == 2


def test_threads_flag_sets_and_restores_torch_threads(cache, tmp_path, capsys) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        code, stdout, _ = train(cache, tmp_path / "run", "--steps", "1", "--json", capsys=capsys)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert code == 0 and json.loads(stdout)["threads"] == 1  # the reproducible default


def one_line_error(code: int, stdout: str, stderr: str, *fragments: str) -> None:
    assert code == 2 and stdout == ""
    assert stderr.startswith("longcat-sim: error:") and stderr.count("\n") == 1, stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--target-ffn-experts", "5"], ["--target-ffn-experts 5", "out of range", "(0, 3)"]),
        (["--target-ffn-experts", "0"], ["out of range"]),
        (["--set", "bogus=1"], ["unknown train setting 'bogus'"]),
        (["--set", "model.num_layers=0"], ["num_layers"]),
        (["--set", "balance_groups=3"], ["balance_groups=3 must divide"]),
        (["--threads", "0"], ["--threads must be positive"]),
        (["--lr", "-1"], ["lr"]),
        (["--set", "slice_size=3"], ["slice_size=3 must divide batch_size=8"]),
        (["--kernels", "triton", "--deterministic"], ["cannot be combined with kernels='triton'"]),
        (["--kernels", "cuda"], ["invalid choice: 'cuda'"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cache, tmp_path, capsys, extra, fragments) -> None:
    code, stdout, stderr = train(cache, tmp_path / "run", "--steps", "1", *extra, capsys=capsys)
    one_line_error(code, stdout, stderr, *fragments)


def test_unknown_model_is_one_line(tmp_path, capsys) -> None:
    code = main(["train", "--model", "gpt-9", "--run-dir", str(tmp_path / "run")])
    stdout, stderr = capsys.readouterr()
    one_line_error(code, stdout, stderr, "unknown model 'gpt-9'")
    code = main(["train", "--model", "longcat-flash", "--run-dir", str(tmp_path / "run")])
    one_line_error(code, *capsys.readouterr(), "GiB for weights, gradients and Adam moments")
    code = main(["train", "--model", "deepseek-v3", "--run-dir", str(tmp_path / "run")])
    one_line_error(code, *capsys.readouterr(), "analytic-only")


def test_resume_with_fewer_steps_than_the_checkpoint_is_one_line(cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(cache, out, "--steps", "3", capsys=capsys)[0] == 0
    one_line_error(*main_resume(cache, out, capsys, "--steps", "2"), "at step 3", "--steps 3")
    assert main_resume(cache, out, capsys, "--steps", "3")[0] == 0  # negative control


def test_resume_without_a_checkpoint_is_one_line(cache, tmp_path, capsys) -> None:
    one_line_error(*main_resume(cache, tmp_path / "empty", capsys), "no complete checkpoint")


def test_existing_checkpoints_need_resume_and_matching_settings(cache, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert train(cache, out, "--steps", "2", capsys=capsys)[0] == 0
    one_line_error(*train(cache, out, "--steps", "2", capsys=capsys), "--resume")
    one_line_error(*main_resume(cache, out, capsys, "--lr", "0.5"), "changed train settings (lr)")
    one_line_error(
        *main_resume(cache, out, capsys, "--target-ffn-experts", "1.5"), "different model config"
    )
    one_line_error(
        *train(cache, out, "--steps", "2", "--resume", "--grow-from", str(out), capsys=capsys),
        "either --resume or --grow-from",
    )
