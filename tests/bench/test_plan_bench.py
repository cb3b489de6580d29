"""Planning speed: ``plan`` screens at least 3,000 configurations and verifies the best 10 with
``serve`` within 60 s on two cores.

The problem is the README's: LongCat-Flash at 1,000 requests/s, 4K-token prompts, 1K-token
outputs, TTFT P90 <= 2 s, TPOT P90 <= 50 ms, over two hardware kinds (H800, H200) and the
default choices (3,520 configurations). The wall clock of the whole plan is asserted (two
worker processes); the screening share is recorded beside it.
"""

from __future__ import annotations

import time

import pytest

from longcat_sim.config.plan import PlanChoices
from longcat_sim.scenarios.plan import PlanProblem, candidates, run_plan

BUDGET_S = 60.0
MIN_CONFIGURATIONS = 3000
PROBLEM = PlanProblem(
    model="longcat-flash", rate=1000.0, prompt_len=4096.0, output_len=1024.0,
    slo_ttft_ms=2000.0, slo_tpot_ms=50.0, slo_percentile=90.0,
)  # fmt: skip
SPACE = PlanChoices(hardware=("H800", "H200"))

pytestmark = pytest.mark.slow


def test_plan_screens_3000_and_verifies_10_within_a_minute(benchmark):
    assert len(candidates(SPACE)) >= MIN_CONFIGURATIONS
    start = time.perf_counter()
    res = benchmark.pedantic(
        lambda: run_plan(PROBLEM, SPACE, verify=10, workers=2), rounds=1, iterations=1
    )
    wall = time.perf_counter() - start
    benchmark.extra_info.update(
        configurations=len(res.screened), distinct_steps=res.distinct_steps,
        screen_s=res.screen_s, verify_s=res.verify_s, wall_s=wall,
    )  # fmt: skip
    assert len(res.screened) >= MIN_CONFIGURATIONS
    assert len(res.verified) == 10
    assert res.winner is not None
    assert wall <= BUDGET_S, f"plan took {wall:.1f} s (screen {res.screen_s:.1f} s)"
