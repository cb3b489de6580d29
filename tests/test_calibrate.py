"""Host calibration: fits, the profile TOML the simulator loads, and the step-time model."""

from __future__ import annotations

import math

import pytest

from cluster.hardware import load_hardware_file
from longcat_sim import calibration
from longcat_sim.calibration import HostProfile, StepWorkload, predict_step_seconds
from longcat_sim.distributed import launch


def _host(efficiency: float = 0.5) -> HostProfile:
    return HostProfile(
        cores=2,
        matmul_gflops={"32x64x32": 20.0, "64x64x512": 60.0},
        mem_gb_s=10.0,
        op_overhead_us=4.0,
        a2a_latency_us={2: 500.0, 4: 900.0},
        a2a_gb_s={2: 1.5, 4: 0.4},
        overlap_efficiency={2: efficiency, 4: efficiency},
    )


def _workload(world: int, scmoe: bool, batch: int = 8) -> StepWorkload:
    return StepWorkload(world=world, batch_size=batch, seq_len=64, hidden=64, layers=2,
                        ffn_slots_per_token=2.0, scmoe=scmoe, t_slice_s=0.02,
                        t_hideable_s=0.004, t_fixed_s=0.01, grad_bytes_per_slice=400_000)  # fmt: skip


def test_alpha_beta_fit_recovers_a_line():
    sizes = [1_000, 10_000, 100_000, 1_000_000]
    alpha, beta = 3e-4, 2e9
    fit_alpha, fit_beta = calibration.fit_alpha_beta(sizes, [alpha + s / beta for s in sizes])
    assert math.isclose(fit_alpha, alpha, rel_tol=1e-6)
    assert math.isclose(fit_beta, beta, rel_tol=1e-6)


def test_single_process_fit_recovers_slice_and_fixed_cost():
    t_slice, t_fixed = calibration.fit_single_process([4, 8], [0.01 + 4 * 0.03, 0.01 + 8 * 0.03])
    assert math.isclose(t_slice, 0.03, rel_tol=1e-9)
    assert math.isclose(t_fixed, 0.01, rel_tol=1e-6)


def test_profile_toml_loads_in_the_simulator(tmp_path):
    path = tmp_path / "host.toml"
    path.write_text(_host().to_toml())
    hw = load_hardware_file(path)
    assert hw.bf16_tflops == pytest.approx(0.06)
    assert hw.nvlink_latency_us == pytest.approx(900.0)
    assert hw.gpus_per_node == 2


def test_step_model_terms_add_up_and_single_process_has_no_comm():
    one = predict_step_seconds(_workload(1, True), _host())
    assert one["comm"] == 0 and one["step"] == pytest.approx(8 * 0.02 + 0.01)
    four = predict_step_seconds(_workload(4, False), _host())
    assert four["hidden"] == 0
    assert four["step"] == pytest.approx(four["compute"] + four["comm"])


def test_scmoe_gain_follows_the_overlap_efficiency():
    """ScMoE hides comm when overlap helps and costs nothing extra when it does not;
    negative efficiency (oversubscribed cores) predicts a loss."""
    for efficiency, sign in ((0.5, 1), (-0.5, -1)):
        host = _host(efficiency)
        gain = (
            predict_step_seconds(_workload(2, False), host)["step"]
            - predict_step_seconds(_workload(2, True), host)["step"]
        )
        assert math.copysign(1, gain) == sign
    assert predict_step_seconds(_workload(2, True), _host(0.0))["hidden"] == 0


def test_comm_probe_over_gloo_measures_positive_times():
    (probe, _) = launch(calibration.comm_probe, 2, (4096, 65536))
    assert all(t > 0 for t in probe["seconds"])
    assert -1.0 <= probe["overlap_efficiency"] <= 1.0
