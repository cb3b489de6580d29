"""Our model against transformers' ``LongcatFlashForCausalLM`` on one checkpoint, one CPU thread.

At two sizes (the ``tiny`` and ``small`` presets) our model is written with our checkpoint
writer (Hugging Face key names and ``config.json``) and the same directory is loaded by
transformers, offline. Logits must agree within 1e-4. Then the forward (no grad) and a
training step (forward + backward of a mean log-sum-exp of the logits) of both are timed in
interleaved rounds (``paired_cpu_times``: median over rounds of transformers' CPU time over
ours in the same round). The ratios ("ours faster by Nx") go to ``benchmark.extra_info``
and are printed; the assertion only guards against ours becoming clearly slower.
"""

from __future__ import annotations

import pytest
import torch

from longcat_sim.model.checkpoint import save_pretrained
from longcat_sim.model.config import get_preset
from longcat_sim.model.transformer import LongcatFlashForCausalLM
from tests.bench.test_moe_bench import paired_cpu_times

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

SIZES = {"tiny": (4, 64), "small": (2, 128)}  # preset: (batch, sequence)
ROUNDS = 7
MIN_RATIO = 0.8  # ours may not be more than 25% slower than transformers


def forward(model: torch.nn.Module, ids: torch.Tensor, hf: bool):
    def run() -> torch.Tensor:
        with torch.no_grad():
            out = model(ids)
        return out.logits if hf else out

    return run


def train_step(model: torch.nn.Module, ids: torch.Tensor, hf: bool):
    def run() -> None:
        out = model(ids)
        (out.logits if hf else out).logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)

    return run


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("preset", list(SIZES))
def test_faster_than_transformers_on_the_same_checkpoint(benchmark, tmp_path, preset: str) -> None:
    cfg = get_preset(preset)
    ours = LongcatFlashForCausalLM(cfg)
    save_pretrained(ours, tmp_path)
    theirs = transformers.LongcatFlashForCausalLM.from_pretrained(
        tmp_path, local_files_only=True, dtype=torch.float32
    )
    batch, seq = SIZES[preset]
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    ours.eval(), theirs.eval()
    torch.testing.assert_close(
        forward(ours, ids, False)(), forward(theirs, ids, True)(), rtol=1e-4, atol=1e-4
    )
    ours.train(), theirs.train()
    ratios = {}
    for kind, make in (("forward", forward), ("train_step", train_step)):
        steps = {"ours": make(ours, ids, False), "transformers": make(theirs, ids, True)}
        timing = paired_cpu_times(steps, "ours", ROUNDS)
        ratios[f"{kind}_speedup"] = round(timing.ratio["transformers"], 3)
        ratios[f"{kind}_ours_ms"] = round(timing.min_s["ours"] * 1e3, 2)
        ratios[f"{kind}_transformers_ms"] = round(timing.min_s["transformers"] * 1e3, 2)
    benchmark.pedantic(train_step(ours, ids, False), rounds=3, iterations=1)
    benchmark.extra_info.update(ratios)
    print(f"\n{preset} {batch}x{seq}: {ratios}")
    assert ratios["forward_speedup"] > MIN_RATIO, ratios
    assert ratios["train_step_speedup"] > MIN_RATIO, ratios
