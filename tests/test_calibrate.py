"""Host calibration: fits, the profile TOML the simulator loads, the step-time model, the load
probe over gloo, and the shaped wire."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longcat_sim.calibrate import measure
from longcat_sim.calibrate.measure import HostMeasurements
from longcat_sim.cli import main
from longcat_sim.cluster.hardware import load_hardware_file
from longcat_sim.cluster.hoststep import (
    EpModelTerms,
    EpStep,
    WorldTerms,
    load_host_profile,
    simulate_step,
)
from longcat_sim.commands import calibrate as calibrate_command
from longcat_sim.train.distributed import launch


def _terms() -> WorldTerms:
    return WorldTerms(compute_slowdown=1.5, a2a_latency_us=1000.0, a2a_gb_s=0.05,
                      a2a_async_latency_us=300.0, a2a_async_gb_s=0.5, gather_latency_us=800.0,
                      gather_gb_s=0.02, dispatch_window_s=0.004, dispatch_compute_s=0.003,
                      combine_window_s=0.002, combine_compute_s=0.0008)  # fmt: skip


def _host() -> HostMeasurements:
    model = EpModelTerms(seq_len=64, hidden=64, layers=2, n_routed_experts=8,
                         ffn_slots_per_token=2.0, t_slice_s=0.04, t_fixed_s=0.01,
                         t_dispatch_hide_s=0.002, t_combine_hide_s=0.0005,
                         grad_bytes_per_slice=869376, expert_weight_bytes=65536)  # fmt: skip
    return HostMeasurements(
        cores=2,
        matmul_gflops={"32x64x32": 20.0, "64x64x512": 60.0},
        mem_gb_s=10.0,
        op_overhead_us=4.0,
        worlds={2: _terms(), 4: _terms()},
        model=model,
    )


def test_alpha_beta_fit_recovers_a_line():
    sizes = [1_000, 10_000, 100_000, 1_000_000]
    alpha, beta = 3e-4, 2e9
    fit_alpha, fit_beta = measure.fit_alpha_beta(sizes, [alpha + s / beta for s in sizes])
    assert math.isclose(fit_alpha, alpha, rel_tol=1e-6)
    assert math.isclose(fit_beta, beta, rel_tol=1e-6)


def test_single_process_fit_recovers_slice_and_fixed_cost():
    t_slice, t_fixed = measure.fit_single_process(
        [1, 2, 4, 8], [0.01 + b * 0.03 for b in (1, 2, 4, 8)]
    )
    assert math.isclose(t_slice, 0.03, rel_tol=1e-9)
    assert math.isclose(t_fixed, 0.01, rel_tol=1e-6)


def test_world_terms_come_from_the_probe_fits():
    sizes, gathers = [64, 32768, 262144], [4096, 1 << 20]
    probe = {"a2a_sizes": sizes, "gather_sizes": gathers, "compute_s": 0.003,
             "a2a_s": [1e-3 + n / 2e7 for n in sizes], "a2a_async_s": [4e-4 + n / 1e8 for n in sizes],
             "gather_s": [2e-3 + n / 1e7 for n in gathers], "window_s": [0.004, 0.002],
             "window_compute_s": [0.003, 0.001]}  # fmt: skip
    terms = measure.world_terms_from_probe(probe, 1.5)
    assert (terms.dispatch_window_s, terms.combine_compute_s) == (0.004, 0.001)
    assert terms.compute_slowdown == pytest.approx(1.5)
    assert terms.a2a_latency_us == pytest.approx(1000.0) and terms.a2a_gb_s == pytest.approx(0.02)
    assert terms.seconds("a2a_async", 1e6) == pytest.approx(4e-4 + 1e-2)
    assert terms.gather_gb_s == pytest.approx(0.01)
    assert terms.overlap_efficiency == pytest.approx(0.6)


def test_profile_loads_in_the_simulator_and_keeps_every_term(tmp_path):
    path = tmp_path / "host.toml"
    host = _host()
    path.write_text(host.to_toml())
    hw = load_hardware_file(path)
    assert hw.bf16_tflops == pytest.approx(0.06)
    assert hw.nvlink_latency_us == pytest.approx(1000.0)
    assert hw.gpus_per_node == 2
    profile = load_host_profile(path)
    assert profile.worlds == host.worlds and profile.model == host.model  # exact floats


def test_simulate_host_ep_predicts_from_the_profile(tmp_path, capsys):
    path = tmp_path / "host.toml"
    path.write_text(_host().to_toml())
    expected = simulate_step(load_host_profile(path), EpStep(4, 8, False))["step_s"]
    argv = ["simulate", "--mode", "host-ep", "--profile", str(path), "--nproc", "4",
            "--batch-size", "8", "--schedule", "conventional", "--json",
            "--run-dir", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step_s"] == pytest.approx(expected)
    assert out["closed_form"]["step"] == pytest.approx(expected)
    bad = ["simulate", "--mode", "host-ep", "--profile", str(path), "--model", "tiny"]
    assert main(bad) == 2
    assert "--model does not apply to --mode host-ep" in capsys.readouterr().err
    assert main(["simulate", "--nproc", "4"]) == 2  # decode mode: host-ep flags refused
    assert "--nproc applies to --mode host-ep" in capsys.readouterr().err


def test_compute_slowdown_is_the_slowest_busy_rank_over_the_median_alone():
    ranks = [{"alone_s": [0.010, 0.011], "busy_s": [0.020, 0.031]},
             {"alone_s": [0.012, 0.013], "busy_s": [0.030, 0.021]}]  # fmt: skip
    # slowest per repeat: 0.030, 0.031 -> median 0.0305; alone median 0.0115
    assert measure.compute_slowdown(ranks) == pytest.approx(0.0305 / 0.0115)


def test_contention_probe_times_the_model_alone_and_all_busy():
    from longcat_sim.model.config import get_preset

    for probe in launch(measure.contention_probe, 2, get_preset("tiny"), 16, 3):
        assert len(probe["alone_s"]) == len(probe["busy_s"]) == 3
        assert min(probe["alone_s"]) > 0 and min(probe["busy_s"]) > 0


def test_exchange_clock_accumulates_even_when_the_exchange_fails():
    from longcat_sim.model.parallel import ExchangeClock

    clock = ExchangeClock()
    assert clock.run(lambda x: x + 1, 1) == 2
    before = clock.seconds
    assert before > 0
    with pytest.raises(ZeroDivisionError):
        clock.run(lambda: sum(range(100_000)) / 0)  # a failing exchange still counts its time
    assert clock.seconds > before
    clock.reset()
    assert clock.seconds == 0.0


def _spin() -> None:
    """About 30-60 ms of one core's work (pure Python, one thread): long against the ranks'
    skew leaving a barrier and the scheduler's time slice, so all ranks overlap."""
    total = 0
    for i in range(1_200_000):
        total += i


@pytest.mark.skipif((os.cpu_count() or 1) > 4, reason="oversubscribes a host of at most 4 cores")
def test_contention_probe_sees_ranks_share_the_cores():
    cores = os.cpu_count() or 1
    crowded = launch(measure.contention_probe, 2 * cores, None, 0, 5, _spin)
    for probe in crowded:
        assert len(probe["alone_s"]) == len(probe["busy_s"]) == 5
    assert measure.compute_slowdown(crowded) > 1.5  # twice as many ranks as cores: ~2
    # negative control: one rank has nobody to share with
    assert measure.compute_slowdown(launch(measure.contention_probe, 1, None, 0, 5,
                                               _spin)) < 1.3  # fmt: skip


def test_load_probe_over_gloo_measures_every_term():
    probe = measure.LoadProbe((64, 32768), (4096, 65536), 20, 128, 4, 2, (40, 5), 32768)
    probes = launch(measure.load_probe, 2, probe)
    for probe in probes:
        assert probe["compute_s"] > 0
        for key in ("a2a_s", "a2a_async_s", "gather_s", "window_s", "window_compute_s"):
            assert len(probe[key]) == 2 and all(t >= 0 for t in probe[key])
        assert probe["window_compute_s"][0] > probe["window_compute_s"][1]  # 40 vs 5 GEMMs
        assert probe["a2a_s"][1] > 0 and probe["window_s"][0] > 0


WIRE_CHECK = """
import socket, sys, threading, time
from longcat_sim.calibrate.wire import enter_shaped_network
if sys.argv[1] != "none":
    enter_shaped_network(float(sys.argv[1]))
SIZE = 1 << 20
server = socket.create_server(("127.0.0.1", 0))
done = threading.Event()
def sink():
    conn, _ = server.accept()
    received = 0
    while received < SIZE:
        received += len(conn.recv(1 << 16))
    done.set()
threading.Thread(target=sink, daemon=True).start()
client = socket.create_connection(server.getsockname())
start = time.perf_counter()
client.sendall(b"x" * SIZE)
done.wait(60)
print(time.perf_counter() - start)
"""


def _wire_seconds(rate: str) -> float:
    done = subprocess.run([sys.executable, "-c", WIRE_CHECK, rate], capture_output=True,
                          text=True, check=False, timeout=120)  # fmt: skip
    if done.returncode:
        pytest.skip(f"no shaped wire on this host: {done.stderr.strip().splitlines()[-1]}")
    return float(done.stdout)


@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0, reason="needs Linux root")
def test_shaped_wire_paces_loopback_traffic():
    """1 MiB over a 40 Mbit/s loopback takes about 0.2 s; without the wire, far less."""
    shaped = _wire_seconds("40")
    assert shaped > 0.5 * (1 << 20) * 8 / 40e6
    assert _wire_seconds("none") < 0.25 * shaped  # negative control: the loopback unshaped


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nproc", "1"], "--nproc lists multi-process counts"),
        (["--nproc", "3"], "--nproc 3 must divide"),
        (["--nproc", "2,x"], "--nproc needs comma-separated integers"),
        (["--steps", "3"], "--steps must be at least"),
        (["--wire-mbit", "-5"], "--wire-mbit must be a positive rate"),
        (["--seq-len", "0"], "--seq-len must be at least 2"),
    ],
)
def test_bad_calibrate_input_is_one_line(argv, message, capsys, tmp_path):
    assert main(["calibrate", "--run-dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@settings(max_examples=60)
@given(st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=1, max_size=80, unique=True))
def test_median_interval_holds_the_binomial_coverage(values):
    from scipy.stats import binom

    low, high = measure.median_interval(values)
    ordered, n = sorted(values), len(values)
    assert low <= statistics.median(values) <= high
    j = ordered.index(low) + 1  # the order statistic the interval starts at
    if binom.cdf(0, n, 0.5) <= 0.025:  # enough values for a 95 % interval
        assert binom.cdf(j - 1, n, 0.5) <= 0.025 < binom.cdf(j, n, 0.5)
        assert high == ordered[n - j]
    else:
        assert (low, high) == (ordered[0], ordered[-1])


def test_median_interval_excludes_zero_only_for_a_clear_gain():
    clear = [0.01 + 0.001 * i for i in range(24)]
    assert measure.median_interval(clear)[0] > 0
    coin = [(-1) ** i * 0.01 for i in range(24)]  # negative control: half gain, half lose
    low, high = measure.median_interval(coin)
    assert low < 0 < high


@pytest.mark.slow
def test_calibrate_end_to_end_writes_a_profile_and_compares(tmp_path, capsys):
    run = tmp_path / "cal"
    argv = ["calibrate", "--nproc", "2", "--batch-sizes", "2", "--seq-len", "16", "--steps",
            "6", "--run-dir", str(run), "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    profile = load_host_profile(run / "host.toml")
    assert set(profile.worlds) == {2} and profile.worlds[2].compute_slowdown > 0
    assert [(c["nproc"], c["batch_size"], c["scmoe"]) for c in out["configs"]] == [
        (2, 2, True), (2, 2, False)]  # fmt: skip
    for config in out["configs"]:
        assert 0 < config["measured_own_work_s"] < config["measured_slices_s"]
        assert config["predicted_s"] == pytest.approx(
            simulate_step(profile, EpStep(2, 2, config["scmoe"]))["step_s"]
        )
    (gain,) = out["scmoe_gain"]
    low, high = gain["measured_gain_95_s"]
    assert low <= gain["measured_gain_s"] <= high and gain["pairs"] == 2
    assert len(out["probe"]["contention"]["2"]) == 2  # one alone/busy timing per rank


@pytest.mark.slow
def steady_single_process(cfg, batches, args) -> dict:
    """Stands in for calibrate's one-process fit where only the command's outputs matter: at
    test sizes the measured slope is noise-bound and may come out negative."""
    return {"batch_sizes": [1, 2], "step_s": [0.02, 0.03], "t_slice_s": 0.01, "t_fixed_s": 0.01}


def test_a_noise_bound_one_process_fit_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(calibrate_command, "_measure_steps", lambda cfg, w, b, *a: {
        scmoe: {"step": [0.03 - 0.005 * b]} for scmoe in (True, False)})  # fmt: skip
    argv = ["calibrate", "--nproc", "2", "--batch-sizes", "2", "--seq-len", "16", "--steps", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "do not grow with the batch" in err and err.count("\n") == 1


def test_calibrate_without_run_dir_writes_one_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(calibrate_command, "_single_process", steady_single_process)
    argv = ["calibrate", "--nproc", "2", "--batch-sizes", "2", "--seq-len", "16", "--steps", "4",
            "--no-measure-runs", "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    (run_dir,) = (tmp_path / "runs" / "calibrate").iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "commit.json", "host.toml",
                                                          "manifest.json", "results.json"]  # fmt: skip
    assert Path(out["profile"]) == run_dir.relative_to(tmp_path) / "host.toml"
    assert json.loads((run_dir / "manifest.json").read_text())["config"]["nproc"] == [2]
