"""V2: measured decode throughput (LongCat-Flash Table 6, DeepSeek-V3 profile) from the
``default`` assumption set through the simulator, with one set of efficiency terms.

Only one term, the router's per-step expert-popularity spread, was fitted, on the first
LongCat-Flash row; every other row is a prediction. The simulated step equals the closed form
of its schedule, so both paths give the same numbers.
"""

from __future__ import annotations

import numpy as np
import pytest

from longcat_sim.bridge import decode_workload
from longcat_sim.cluster import closedform
from longcat_sim.cluster.assumptions import (
    DEFAULT,
    FITTED_EXPERT_POPULARITY_SIGMA,
    TABLE7,
    router_spread,
)
from longcat_sim.cluster.hardware import get_hardware
from longcat_sim.cluster.simulator import DecodeResult, simulate_decode
from longcat_sim.cluster.workload import DecodeWorkload
from longcat_sim.model.config import get_preset
from tests.cluster.published import (
    DEEPSEEK_PROFILE_BATCH,
    DEEPSEEK_PROFILE_CONTEXT,
    DEEPSEEK_PROFILE_TGS,
    LONGCAT_MTP_ACCEPT,
    TABLE6_FIT_ROW,
    TABLE6_LONGCAT,
    TABLE6_TOLERANCE,
)

H800 = get_hardware("H800")
SEEDS = (0, 1, 2)


def longcat_workload(row: int, seed: int, assumptions=DEFAULT) -> DecodeWorkload:
    r = TABLE6_LONGCAT[row]
    return decode_workload(
        get_preset("longcat-flash"),
        hardware=H800,
        assumptions=assumptions,
        ep=128,
        batch_per_device=r.batch_per_device,
        context=r.context,
        attention_dtype=r.attention_dtype,
        mtp_draft_tokens=1,
        mtp_accept=LONGCAT_MTP_ACCEPT,
        rng=np.random.default_rng(seed),
        micro_batches=(1,),
    )


def longcat_result(row: int, seed: int) -> DecodeResult:
    w = longcat_workload(row, seed)
    result = simulate_decode(w, "sbo")
    assert result.step_ms == pytest.approx(closedform.step_time(w, "sbo") * 1e3, rel=1e-12)
    return result


def deepseek_profile() -> DecodeResult:
    """The profile's synthetic run: balanced routing and one fixed context for every request.
    It names no speculative decoding, so each request gains one token per step."""
    w = decode_workload(
        get_preset("deepseek-v3"),
        hardware=H800,
        assumptions=DEFAULT.replace(routing="balanced", context_cv=0.0),
        ep=128,
        batch_per_device=DEEPSEEK_PROFILE_BATCH,
        context=DEEPSEEK_PROFILE_CONTEXT,
        micro_batches=(2,),
    )
    result = simulate_decode(w, "tbo")
    assert result.step_ms == pytest.approx(closedform.step_time(w, "tbo") * 1e3, rel=1e-12)
    return result


def test_only_one_term_was_fitted() -> None:
    """The default set leaves the router's spread to the model; only LongCat-Flash has one,
    the fitted term."""
    assert DEFAULT.expert_popularity_sigma is None
    assert router_spread("longcat-flash")[0] == FITTED_EXPERT_POPULARITY_SIGMA
    assert router_spread("deepseek-v3")[0] == 0.0


@pytest.mark.parametrize("seed", SEEDS)
def test_fitted_row(seed: int) -> None:
    measured = TABLE6_LONGCAT[TABLE6_FIT_ROW].tps_per_user
    assert longcat_result(TABLE6_FIT_ROW, seed).tps_per_user == pytest.approx(measured, rel=0.08)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("row", [i for i in range(len(TABLE6_LONGCAT)) if i != TABLE6_FIT_ROW])
def test_longcat_table6_predictions(row: int, seed: int) -> None:
    r = TABLE6_LONGCAT[row]
    result = longcat_result(row, seed)
    assert result.tps_per_user == pytest.approx(r.tps_per_user, rel=TABLE6_TOLERANCE)
    # users per GPU are the batch, so throughput per GPU follows: TGS = batch x TPS/user
    assert result.tgs == pytest.approx(r.batch_per_device * result.tps_per_user, rel=1e-12)


def test_deepseek_v3_profile() -> None:
    assert deepseek_profile().tgs == pytest.approx(DEEPSEEK_PROFILE_TGS, rel=TABLE6_TOLERANCE)


def test_negative_control_ideal_terms_miss_the_measurements() -> None:
    """Without the realistic terms (the paper's theoretical assumptions) the same simulation
    over-predicts the measured throughput well beyond the tolerance, so the check can fail."""
    w = longcat_workload(TABLE6_FIT_ROW, 0, assumptions=TABLE7)
    measured = TABLE6_LONGCAT[TABLE6_FIT_ROW].tps_per_user
    assert simulate_decode(w, "sbo").tps_per_user > measured * (1 + TABLE6_TOLERANCE)
