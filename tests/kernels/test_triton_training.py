"""A tiny model trains the same on ``kernels="triton"`` as on ``kernels="torch"``.

Three AdamW steps on the tiny preset at batch 2 x 16 tokens (Triton's interpreter on CPU is
slow). Per-step losses agree within 1e-4 relative: the Triton softmax, GEMM tiling and combine
round differently in the last bits, so bitwise equality is asked only between two Triton runs.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from longcat_sim.cli import main
from longcat_sim.model import moe
from longcat_sim.model.config import get_preset
from longcat_sim.model.transformer import LongcatFlashForCausalLM
from longcat_sim.train.data import build_corpus_data
from tests.kernels import DEVICE, requires_triton

STEPS = 3


def train(kernels: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Per-step losses and the final parameters after ``STEPS`` AdamW steps."""
    cfg = get_preset("tiny").replace(kernels=kernels)
    model = LongcatFlashForCausalLM(cfg).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    ids = ids.to(DEVICE)
    losses = []
    for _ in range(STEPS):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


@requires_triton
def test_triton_training_matches_torch_and_repeats_bitwise(monkeypatch) -> None:
    calls = []
    kernel_forward = moe.moe_forward_triton
    monkeypatch.setattr(moe, "moe_forward_triton", lambda *a: calls.append(1) or kernel_forward(*a))
    torch_losses, _ = train("torch")
    assert not calls
    triton_losses, params = train("triton")
    assert len(calls) == STEPS * get_preset("tiny").num_layers  # the kernels did run
    assert triton_losses == pytest.approx(torch_losses, rel=1e-4)
    assert triton_losses[-1] < triton_losses[0]
    again_losses, again = train("triton")
    assert again_losses == triton_losses
    assert all(torch.equal(params[k], again[k]) for k in params)


def _cli_train(kernels: str, cache, run_dir, capsys) -> tuple[list[float], str]:
    """``longcat-sim train --kernels KERNELS`` on the tiny preset, 3 steps: per-step losses
    (metrics.jsonl) and the final parameter hash."""
    argv = [
        "train", "--model", "tiny", "--kernels", kernels, "--steps", str(STEPS),
        "--batch-size", "2", "--seq-len", "16", "--run-dir", str(run_dir),
        "--data-cache", str(cache), "--set", "byte_budget=262144", "--set", "warmup_steps=1",
        "--json",
    ]  # fmt: skip
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["lm_loss"] for line in lines], json.loads(out)["param_hash"]


@requires_triton
def test_the_train_command_runs_the_triton_kernels(monkeypatch, tmp_path, capsys) -> None:
    """The trainer behind ``train --kernels triton`` calls the Triton MoE, matches the torch
    path within 1e-4 relative per step, and repeats bitwise."""
    cache = tmp_path / "cache"
    build_corpus_data(get_preset("tiny").vocab_size, 16, byte_budget=2**18, cache_dir=cache)
    calls = []
    kernel_forward = moe.moe_forward_triton
    monkeypatch.setattr(moe, "moe_forward_triton", lambda *a: calls.append(1) or kernel_forward(*a))
    torch_losses, _ = _cli_train("torch", cache, tmp_path / "torch", capsys)
    assert not calls
    triton_losses, triton_hash = _cli_train("triton", cache, tmp_path / "triton", capsys)
    assert calls  # the kernels did run
    assert len(triton_losses) == STEPS
    assert triton_losses == pytest.approx(torch_losses, rel=1e-4)
    again_losses, again_hash = _cli_train("triton", cache, tmp_path / "again", capsys)
    assert again_losses == triton_losses and again_hash == triton_hash


def test_triton_with_more_than_one_process_is_refused(tmp_path, capsys) -> None:
    argv = ["train", "--model", "tiny", "--kernels", "triton", "--nproc", "2"]
    assert main([*argv, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--kernels triton runs in one process" in err and err.count("\n") == 1
