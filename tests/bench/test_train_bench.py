"""Training-step throughput of the ``small`` preset: ScMoE (shortcut) against a conventional MoE.

Both topologies do the same arithmetic; on one CPU thread nothing can overlap the MoE, so the
ratio measures only the cost of the rewiring itself (expected close to 1). The two trainers
step alternately inside one benchmark, so machine load affects both alike.
"""

from __future__ import annotations

import statistics
import time

import pytest

TOPOLOGIES = ("shortcut", "conventional")
ROUNDS = 3


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_small_training_step_tokens_per_s_shortcut_vs_conventional(
    benchmark, small_training, small_trainers
) -> None:
    _, tc, _ = small_training
    trainers = small_trainers(**{t: ({"topology": t}, {}) for t in TOPOLOGIES})
    for trainer in trainers.values():  # warm-up step (allocator, first-touch pages)
        trainer.train_step()
    seconds: dict[str, list[float]] = {t: [] for t in TOPOLOGIES}
    rounds = iter(range(10**6))

    def one_step_each() -> None:
        order = TOPOLOGIES if next(rounds) % 2 == 0 else TOPOLOGIES[::-1]
        for topology in order:
            start = time.perf_counter()
            trainers[topology].train_step()
            seconds[topology].append(time.perf_counter() - start)

    benchmark.pedantic(one_step_each, rounds=ROUNDS, iterations=1)

    tokens = tc.batch_size * tc.seq_len
    tokens_per_s = {t: tokens / statistics.median(s) for t, s in seconds.items()}
    ratio = tokens_per_s["shortcut"] / tokens_per_s["conventional"]
    benchmark.extra_info.update(
        tokens_per_step=tokens,
        tokens_per_s_shortcut=tokens_per_s["shortcut"],
        tokens_per_s_conventional=tokens_per_s["conventional"],
        shortcut_over_conventional=ratio,
    )
    print(
        f"\nsmall training step, 1 thread: shortcut {tokens_per_s['shortcut']:,.0f} tokens/s, "
        f"conventional {tokens_per_s['conventional']:,.0f} tokens/s, ratio {ratio:.3f}"
    )
    assert all(len(s) >= 1 for s in seconds.values())
    assert 0.5 < ratio < 2.0  # same FLOPs either way; a wide band for a loaded machine
