"""MoE forward+backward cost on the ``small`` preset, one CPU thread.

1. Zero experts are free: forcing 0, 1/3 and 2/3 of every token's K slots onto zero experts
   (through the router bias) must scale the time like the share of FFN slots,
   time(share) / time(0) within 15% of (1 - share). The step has a part that routing cannot
   shrink while every expert gets some tokens: all 32 experts' weights are streamed from memory
   in the forward and the backward and their gradients written (~72 MB in float32), ~15-20 ms
   on this 2-core CPU. With the weights cache-resident the forward alone scales to 1.02 at
   share 2/3, streamed from memory 1.12. At 2048 tokens that fixed part puts the full
   forward+backward at 1.13-1.24 at share 2/3 and 4096 tokens still reached 1.18 in one CI
   run, so this test uses 8192 tokens, where that part weighs a quarter as much (0.98-0.99).
2. Grouping pays: the grouped layer is at least 5x faster than the per-token, per-slot oracle
   loop on the same input and weights.

Variants are timed in interleaved rounds in one run, in CPU time (``time.process_time``: the
machine is shared, and CPU time ignores time spent descheduled). Asserted are medians over
rounds of each variant's time over the baseline's time in the same round, which cancels
slow drifts in machine load: in repeated runs on this 2-core machine shared with other jobs,
the paired median at share 2/3 stayed within 1.01-1.13 while the ratio of per-variant
minimum times ranged over 1.04-1.19. Ratios and minimum times are reported
through ``benchmark.extra_info`` and printed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from longcat_sim.model.config import get_preset
from longcat_sim.model.kernels.reference import moe_reference_from_module
from longcat_sim.model.moe import MoE
from tests.strategies import forced_bias

pytestmark = pytest.mark.slow

SHARE_TOKENS = 8192
ZERO_SLOTS = (0, 2, 4)  # of K = 6 slots: zero-expert shares 0, 1/3, 2/3
SHARE_ROUNDS = 16
SHARE_TOLERANCE = 0.15
NAIVE_TOKENS = 512
NAIVE_ROUNDS = 3
MIN_SPEEDUP = 5.0


def zero_share_bias(cfg, zero_slots: int) -> torch.Tensor:
    """Every token puts exactly ``zero_slots`` of its K slots on zero experts."""
    n, e_total = cfg.n_routed_experts, cfg.num_experts_total
    chosen = list(range(n, n + zero_slots))
    excluded = list(range(n + zero_slots, e_total))
    return torch.tensor(forced_bias(e_total, chosen, excluded))


def train_step(moe: MoE, x: torch.Tensor, grad_out: torch.Tensor) -> Callable[[], None]:
    """Forward + backward of the MoE layer, gradients dropped afterwards as an optimizer would."""

    def step() -> None:
        x_leaf = x.detach().requires_grad_()
        out, _ = moe(x_leaf)
        out.backward(grad_out)
        moe.zero_grad(set_to_none=True)

    return step


def naive_step(moe: MoE, cfg, x: torch.Tensor, grad_out: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        x_leaf = x.detach().requires_grad_()
        out = moe_reference_from_module(x_leaf, cfg, moe, compute_dtype=torch.float32)
        out.backward(grad_out)
        moe.zero_grad(set_to_none=True)

    return step


@dataclass(frozen=True)
class Timing:
    """Per variant: the median over rounds of its time / the baseline's time in that round
    (rounds are adjacent in time, so slow drifts in machine load cancel), and its minimum CPU
    seconds over all rounds."""

    ratio: dict
    min_s: dict


def paired_cpu_times(steps: dict, baseline, rounds: int) -> Timing:
    """Interleaved rounds of every step (order rotated each round, one warm-up call each),
    timed in CPU time of this process: ``time.process_time`` ignores time spent descheduled."""
    for step in steps.values():
        step()
    names = list(steps)
    per_round = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.process_time()
            steps[name]()
            per_round[name].append(time.process_time() - start)
    base = per_round[baseline]
    return Timing(
        ratio={
            n: statistics.median(t / b for t, b in zip(ts, base, strict=True))
            for n, ts in per_round.items()
        },
        min_s={n: min(ts) for n, ts in per_round.items()},
    )


def test_time_follows_ffn_slot_share(benchmark, one_thread):
    cfg = get_preset("small")
    k, n = cfg.moe_topk, cfg.n_routed_experts
    moe = MoE(cfg, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(SHARE_TOKENS, cfg.hidden_size, generator=gen)
    grad_out = torch.randn(SHARE_TOKENS, cfg.hidden_size, generator=gen)

    # one module per share (same weights, different bias) so the variants interleave freely
    variants, realised = {}, {}
    for zero_slots in ZERO_SLOTS:
        variant = MoE(cfg)
        variant.load_state_dict(moe.state_dict())
        variant.router.e_score_correction_bias.copy_(zero_share_bias(cfg, zero_slots))
        with torch.no_grad():
            idx = variant(x)[1].topk_idx_TK
        per_token = (idx >= n).sum(dim=-1)
        assert bool((per_token == zero_slots).all()), "the bias did not force the zero share"
        realised[zero_slots] = float((idx >= n).float().mean())
        variants[zero_slots] = variant

    steps = {zs: train_step(variants[zs], x, grad_out) for zs in ZERO_SLOTS}
    timing = paired_cpu_times(steps, 0, SHARE_ROUNDS)
    benchmark.pedantic(steps[0], rounds=3, iterations=1)

    report = {}
    for zs in ZERO_SLOTS:
        ffn_share = 1.0 - zs / k
        ratio = timing.ratio[zs]
        report[f"zero_share_{zs}/{k}"] = {
            "min_ms": round(timing.min_s[zs] * 1e3, 2),
            "min_time_ratio": round(timing.min_s[zs] / timing.min_s[0], 4),
            "realised_zero_share": round(realised[zs], 4),
            "time_ratio": round(ratio, 4),
            "ffn_share": round(ffn_share, 4),
            "ratio_over_share": round(ratio / ffn_share, 4),
        }
    benchmark.extra_info.update(report)
    print("\nMoE fwd+bwd vs zero-expert share:", report)
    for zs in ZERO_SLOTS[1:]:
        rel = report[f"zero_share_{zs}/{k}"]["ratio_over_share"]
        assert abs(rel - 1.0) <= SHARE_TOLERANCE, (
            f"time at zero share {zs}/{k} is {rel:.3f}x the FFN-slot share (allowed 1 +- {SHARE_TOLERANCE})"
        )


def test_grouped_is_faster_than_naive_loop(benchmark, one_thread):
    cfg = get_preset("small")
    moe = MoE(cfg, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(NAIVE_TOKENS, cfg.hidden_size, generator=gen)
    grad_out = torch.randn(NAIVE_TOKENS, cfg.hidden_size, generator=gen)
    with torch.no_grad():  # same input, same answer: the comparison is like for like
        fast_out, _ = moe(x)
        naive_out = moe_reference_from_module(x, cfg, moe, compute_dtype=torch.float32)
    torch.testing.assert_close(fast_out, naive_out, rtol=1e-4, atol=1e-5)

    steps = {"grouped": train_step(moe, x, grad_out), "naive": naive_step(moe, cfg, x, grad_out)}
    timing = paired_cpu_times(steps, "grouped", NAIVE_ROUNDS)
    benchmark.pedantic(steps["grouped"], rounds=3, iterations=1)
    speedup = timing.ratio["naive"]
    benchmark.extra_info.update(
        grouped_min_ms=round(timing.min_s["grouped"] * 1e3, 2),
        naive_min_ms=round(timing.min_s["naive"] * 1e3, 2),
        speedup=round(speedup, 2),
    )
    print(f"\ngrouped vs naive MoE fwd+bwd ({NAIVE_TOKENS} tokens): {speedup:.1f}x faster")
    assert speedup >= MIN_SPEEDUP
