"""``longcat-sim report``: the default from a fresh directory, the cache, results of other
commands, PNG export and its clean skip, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from longcat_sim.cli import main
from longcat_sim.errors import UserError
from longcat_sim.report import pngs
from longcat_sim.reports import figures, tables
from longcat_sim.runs import write_run
from tests.cli_checks import refused
from tests.reports.test_browser import CHROMIUM, assert_every_figure_drew, probe_page

ROOT = Path(__file__).resolve().parents[1]
SIM_SECTIONS = [
    "table7",
    "table6",
    "timelines",
    "pareto",
    "memory",
    "prefill",
    "training_overlap",
    "serving",
]
SECTIONS = [*SIM_SECTIONS, "determinism", "sdc"]  # the report's own quick runs, cached too
SIM_FIGURES = [
    "fig-timelines",
    "fig-pareto",
    "fig-memory",
    "fig-prefill",
    "fig-serving-latency",
    "fig-serving-load",
    "fig-training-overlap",
]
FIGURES = [*SIM_FIGURES, "fig-sdc"]  # the quick campaign's heat maps
BUILD_SECONDS = 120.0  # the default report, PNGs and quick runs included, on two shared CPU cores


def _png_expected() -> bool:
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False
    return pngs.find_browser() is not None


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> dict:
    """``longcat-sim report`` with no arguments in an empty directory, as after a fresh clone."""
    cwd = tmp_path_factory.mktemp("fresh")
    start = time.perf_counter()
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "longcat_sim", "report"],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    (run_dir,) = (cwd / "runs" / "report").iterdir()
    return {"cwd": cwd, "dir": run_dir, "seconds": seconds, "stdout": done.stdout}


def _copy(default_run: dict, tmp_path: Path) -> Path:
    """The default run directory, cache included, to run a variant against."""
    out = tmp_path / "run"
    shutil.copytree(default_run["dir"], out)
    return out


def _section(run_dir: Path, name: str) -> dict:
    """A simulated section of the report data, as the run's cache holds it."""
    (entry,) = (run_dir / "cache").glob(f"{name}-*.json")
    return json.loads(entry.read_text())["result"]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_default_report_from_a_fresh_directory(default_run: dict) -> None:
    run_dir = default_run["dir"]
    results = json.loads((run_dir / "results.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert run_dir.name == manifest["config_hash"][:12]
    assert manifest["command"] == "report" and manifest["seeds"] == {"seed": 0}
    assert manifest["config"]["settings"]["model"] == "longcat-flash"
    assert manifest["config"]["settings"]["gpus"] == 128
    assert manifest["config"]["hardware"]["name"] == "H800"
    assert results["figures"] == FIGURES
    assert results["simulated"] == SECTIONS and results["cached"] == []
    html = (run_dir / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "LongCat-Flash on 128 H800 GPUs" in html
    assert f"report runs/report/{run_dir.name}/report.html" in default_run["stdout"]
    if _png_expected():
        assert results["png"] == [f"figures/{f}.png" for f in FIGURES]
        assert results["png_skipped"] is None
        for name in results["png"]:
            data = (run_dir / name).read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    else:
        assert results["png"] == [] and results["png_skipped"]
        assert "PNG figures        skipped:" in default_run["stdout"]
    assert default_run["seconds"] < BUILD_SECONDS
    assert "Computed by this report with quick settings" in html


def test_the_default_report_runs_quick_reproducibility_checks(default_run: dict) -> None:
    """Without --determinism-run / --sdc-run the report runs both commands itself: the quick
    determinism check is bitwise identical and replay catches every flip that mattered."""
    results = json.loads((default_run["dir"] / "results.json").read_text())
    repro = results["repro"]
    assert repro["determinism"]["source"] == "report" == repro["sdc"]["source"]
    assert repro["determinism"]["verdict"] == "identical"
    assert repro["determinism"]["injected"] is None
    assert repro["sdc"]["detected_share"]["replay"] == 1.0
    assert repro["determinism"]["command"].startswith("longcat-sim determinism --model tiny")
    html = (default_run["dir"] / "report.html").read_text()
    assert 'class="verdict identical"' in html
    for full in ("longcat-sim determinism --model tiny --steps 10", "longcat-sim sdc --model tiny"):
        assert full in html


def test_the_default_reproduces_the_paper_within_its_tolerances(default_run: dict) -> None:
    """Loose sanity bounds on the headline numbers; the tight checks live with the simulator."""
    results = json.loads((default_run["dir"] / "results.json").read_text())
    for model, errors in results["table7_relative_error"].items():
        for key in ("dispatch_us", "experts_us", "combine_us"):
            assert abs(errors[key]) < 0.05, (model, key)
    for row in results["table6_relative_error"]:
        assert abs(row["tps_per_user"]) < 0.25, row
    share = results["training_exposed_comm_share"]
    assert share["scmoe"] < 0.5 * share["baseline"]
    timelines = results["timelines"]
    assert timelines["sbo"]["tpot_ms"] < timelines["sequential"]["tpot_ms"]
    assert timelines["tbo"]["tpot_ms"] < timelines["sequential"]["tpot_ms"]


def test_the_default_prefill_matches_the_profile_and_grows_with_the_prompt(
    default_run: dict,
) -> None:
    prefill = _section(default_run["dir"], "prefill")
    assert abs(tables.prefill_profile_error(prefill)) <= 0.15
    assert {m: v["schedule"] for m, v in prefill["models"].items()} == {
        "longcat-flash": "sbo",
        "deepseek-v3": "tbo",
        "qwen3-235b-a22b": "tbo",
    }
    for name, model in prefill["models"].items():
        points = model["points"]
        assert [p["prompt_len"] for p in points] == [512 * 2**k for k in range(7)]
        assert [p["tokens_per_device"] for p in points] == [16384] * 6 + [32768]
        ttft = [p["ttft_ms"] for p in points]
        assert ttft == sorted(ttft), (name, ttft)
        assert ttft[-1] > 2 * ttft[0], name
        tgs = [p["input_tgs"] for p in points]
        assert tgs[-1] < tgs[0], name  # longer prompts: more attention per token
    html = (default_run["dir"] / "report.html").read_text()
    assert "deepseek-ai/profile-data" in html and "7,839" in html


def test_the_default_memory_greys_what_does_not_fit_and_keeps_it_off_the_front(
    default_run: dict,
) -> None:
    """At 5K-token contexts on 80 GB, batch 256 overflows every compared model: the memory
    section says so, and the Pareto section's point of the same batch is never on the front."""
    memory = _section(default_run["dir"], "memory")
    pareto = _section(default_run["dir"], "pareto")
    assert memory["hbm_gb"] == 80.0
    for name, model in memory["models"].items():
        largest = model["max_batch_per_device"]
        fits = {p["batch_per_device"]: p["fits"] for p in model["points"]}
        assert fits == {b: b <= largest for b in fits}, name
        assert not fits[256] and fits[4], name
        for p in model["points"]:
            parts = p["hbm_breakdown_gb"]
            assert sum(parts.values()) == pytest.approx(p["hbm_used_gb"])
            assert p["fits"] == (p["hbm_used_gb"] <= memory["hbm_gb"])
        points = sorted(pareto["models"][name]["points"], key=lambda p: p["batch_per_device"])
        assert {p["batch_per_device"]: p["fits"] for p in points} == fits
        for p, on in zip(points, figures.pareto_mask(points), strict=True):
            assert not on or p["fits"], (name, p["batch_per_device"])
        assert any(figures.pareto_mask(points)), name


def test_the_default_serving_section_replays_the_azure_trace(default_run: dict) -> None:
    """Both layouts at the recorded and the 10x rate: CDFs of 101 non-decreasing percentiles,
    timelines of one length, and more traffic never lowers P90 TTFT."""
    serving = _section(default_run["dir"], "serving")
    assert serving["trace"] == "azure-conv" and serving["duration_s"] == 60.0
    runs = {(r["layout"], r["rate_scale"]): r for r in serving["runs"]}
    assert sorted(runs) == [
        ("colocated", 1.0),
        ("colocated", 10.0),
        ("disagg", 1.0),
        ("disagg", 10.0),
    ]
    for key, run in runs.items():
        for cdf in ("ttft_cdf_ms", "tpot_cdf_ms", "e2e_cdf_ms"):
            values = run[cdf]
            assert len(values) == 101, (key, cdf)
            assert values == sorted(values), (key, cdf)
            assert values[0] > 0, (key, cdf)
        for name, pool in run["pools"].items():
            lengths = {len(v) for v in pool["timeline"].values()}
            assert len(lengths) == 1 and lengths.pop() > 0, (key, name)
        assert sorted(run["pools"]) == (
            ["colocated"] if key[0] == "colocated" else ["decode", "prefill"]
        )
    for layout in ("colocated", "disagg"):
        recorded, scaled = runs[(layout, 1.0)], runs[(layout, 10.0)]
        assert scaled["rate"] > 5 * recorded["rate"], layout
        assert scaled["ttft_p90_ms"] >= recorded["ttft_p90_ms"], layout
        assert scaled["requests"] > 5 * recorded["requests"], layout
    html = (default_run["dir"] / "report.html").read_text()
    assert '<section id="serving">' in html and "CC-BY 4.0" in html


def test_serving_settings_recompute_the_serving_section_only(
    default_run: dict, tmp_path: Path, capsys
) -> None:
    out = _copy(default_run, tmp_path)
    argv = ["report", "--run-dir", str(out), "--no-png", "--json", "--serve-rate-scale", "4"]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    results = json.loads(stdout)
    assert results["simulated"] == ["serving"]
    assert results["cached"] == [s for s in SECTIONS if s != "serving"]
    entries = sorted((out / "cache").glob("serving-*.json"))
    assert len(entries) == 2
    scales = sorted(
        {r["rate_scale"] for e in entries for r in json.loads(e.read_text())["result"]["runs"]}
    )
    assert scales == [1.0, 4.0, 10.0]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
def test_default_report_renders_in_chromium_and_is_not_blank(
    default_run: dict, tmp_path: Path
) -> None:
    results = json.loads((default_run["dir"] / "results.json").read_text())
    probe, pixels = probe_page((default_run["dir"] / "report.html").read_text(), tmp_path)
    assert_every_figure_drew(probe, results["figures"])
    faint = {f["id"]: f["faint"] for f in probe["figures"]}
    assert faint["fig-memory"] > 0 and faint["fig-pareto"] > 0  # batches that do not fit
    assert pixels.shape == (1000, 1280, 3)
    assert pixels.std() > 20.0  # text, tables and charts on a white page


def test_the_default_deployment_matches_longcat_sim_simulate(
    default_run: dict, tmp_path: Path, capsys
) -> None:
    """The report's LongCat-Flash point at batch 96 is what ``longcat-sim simulate`` prints for
    its (identical) default deployment."""
    code, stdout, err = _run(["simulate", "--json", "--run-dir", str(tmp_path / "sim")], capsys)
    assert code == 0, err
    simulated = json.loads(stdout)
    results = json.loads((default_run["dir"] / "results.json").read_text())
    sbo = results["timelines"]["sbo"]
    (point,) = [
        p for p in results["pareto"]["longcat-flash"]["points"] if p["batch_per_device"] == 96
    ]
    for key in ("tpot_ms", "tgs"):
        assert sbo[key] == simulated[key] == point[key]
    assert sbo["tpl_us"] == simulated["tpl_us"]


def test_second_run_reads_the_cache_and_writes_the_same_bytes(
    default_run: dict, tmp_path: Path, capsys
) -> None:
    out = _copy(default_run, tmp_path)
    before = (out / "report.html").read_bytes()
    (out / "report.html").unlink()
    code, stdout, err = _run(["report", "--run-dir", str(out), "--no-png", "--json"], capsys)
    assert code == 0, err
    results = json.loads(stdout)
    assert results["cached"] == SECTIONS and results["simulated"] == []
    assert json.loads((out / "results.json").read_text()) == results
    assert (out / "report.html").read_bytes() == before


def test_a_corrupt_cache_entry_is_recomputed(default_run: dict, tmp_path: Path, capsys) -> None:
    out = _copy(default_run, tmp_path)
    (entry,) = (out / "cache").glob("table7-*.json")
    entry.write_text("{not json")
    code, stdout, _ = _run(["report", "--run-dir", str(out), "--no-png", "--json"], capsys)
    assert code == 0
    assert json.loads(stdout)["simulated"] == ["table7"]
    assert (out / "report.html").read_bytes() == (default_run["dir"] / "report.html").read_bytes()


def test_sections_are_cached_by_what_they_read(default_run: dict, tmp_path: Path, capsys) -> None:
    out = _copy(default_run, tmp_path)
    config = tmp_path / "report.toml"
    config.write_text('[report]\nbatch_per_device = [16, 8]\ncompare_models = ["longcat-flash"]\n')
    code, stdout, err = _run(
        ["report", "--config", str(config), "--run-dir", str(out), "--no-png", "--json"], capsys
    )
    assert code == 0, err
    results = json.loads(stdout)
    changed = ["pareto", "memory", "prefill"]  # prefill reads the compared models only
    assert results["simulated"] == changed
    assert results["cached"] == [s for s in SECTIONS if s not in changed]
    (points,) = [m["points"] for m in results["pareto"].values()]
    assert [p["batch_per_device"] for p in points] == [8, 16]
    default = json.loads((default_run["dir"] / "results.json").read_text())
    same_batch = [
        p for p in default["pareto"]["longcat-flash"]["points"] if p["batch_per_device"] in (8, 16)
    ]
    assert points == same_batch  # a point's numbers do not depend on the other points


def test_no_repro_leaves_the_quick_runs_out(default_run: dict, tmp_path: Path, capsys) -> None:
    out = _copy(default_run, tmp_path)
    argv = ["report", "--run-dir", str(out), "--no-png", "--json", "--no-repro"]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    results = json.loads(stdout)
    assert results["simulated"] == [] and results["cached"] == SIM_SECTIONS
    assert results["figures"] == SIM_FIGURES
    assert results["repro"]["determinism"]["source"] == "skipped"
    html = (out / "report.html").read_text()
    assert html.count("the report ran with --no-repro") == 2


def test_a_failing_quick_run_is_a_warning_and_the_report_still_builds(
    default_run: dict, tmp_path: Path, capsys, monkeypatch
) -> None:
    from longcat_sim.commands import report as report_command

    out = _copy(default_run, tmp_path)
    for entry in (out / "cache").glob("sdc-*.json"):
        entry.unlink()
    real = report_command.run_command
    calls = []

    def failing(argv):
        calls.append(argv[0])
        if argv[0] == "sdc":
            raise RuntimeError("out of memory")
        return real(argv)

    monkeypatch.setattr(report_command, "run_command", failing)
    code, stdout, err = _run(["report", "--run-dir", str(out), "--no-png", "--json"], capsys)
    assert code == 0, err
    assert "warning: the report's quick sdc run failed (RuntimeError: out of memory)" in err
    results = json.loads(stdout)
    assert results["repro"]["sdc"]["source"] == "failed" and results["figures"] == SIM_FIGURES
    assert "quick run failed: RuntimeError: out of memory" in (out / "report.html").read_text()
    assert "determinism" not in calls or "determinism" in results["simulated"]


@pytest.mark.parametrize(
    ("identical", "line", "css"),
    [
        (False, "negative control, the planted fault was found (expected)", "control"),
        (True, "negative control FAILED: the planted fault was not found", "control-failed"),
    ],
)
def test_an_injected_determinism_run_is_shown_as_a_negative_control(
    default_run: dict, tmp_path: Path, capsys, identical: bool, line: str, css: str
) -> None:
    """What ``determinism --inject`` writes, a non-finite difference included."""
    out = _copy(default_run, tmp_path)
    det = tmp_path / "det"
    det.mkdir()
    divergence = {"step": 1, "module": "m", "tensor": "out", "max_abs": float("inf"), "run": 1}
    results = {
        "identical": identical,
        "runs": 2,
        "first_divergence": None if identical else divergence,
        "injected": {"site": "weight", "bit": 30, "step": 1, "target": ""},
    }
    write_run(det, {"command": "determinism"}, results)
    argv = ["report", "--run-dir", str(out), "--no-png", "--no-repro", "--determinism-run"]
    code, stdout, err = _run([*argv, str(det)], capsys)
    assert code == 0, err
    assert f"determinism        from the run given: {line}" in stdout
    html = (out / "report.html").read_text()
    assert f'class="verdict {css}"' in html and "fault injected at weight bit 30 step 1" in html
    assert 'class="verdict diverged"' not in html


def _write_train_run(path: Path, steps: int = 6) -> None:
    """A run directory in the format ``longcat-sim train`` writes (extra keys included)."""
    path.mkdir()
    lines = []
    for step in range(steps):
        record = {
            "step": step,
            "loss": 6.0 - 0.1 * step,
            "lm_loss": 5.9 - 0.1 * step,
            "ffn_experts_mean": [2.4 - 0.05 * step, 1.7 + 0.05 * step],
            "step_seconds": 0.1 * (step + 1),  # varies run to run: must not reach the page
            "tokens": 512,
        }
        if step % 3 == 2:
            record["val_loss"] = 6.0 - 0.1 * step
        lines.append(json.dumps(record, sort_keys=True))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    write_run(path, {"command": "train"}, {"model": "tiny", "target_ffn_experts": 2.0})


def test_results_of_other_commands_get_their_sections(
    default_run: dict, tmp_path: Path, capsys
) -> None:
    out = _copy(default_run, tmp_path)
    train = tmp_path / "train-a"
    _write_train_run(train)
    determinism = tmp_path / "det"
    determinism.mkdir()
    write_run(
        determinism,
        {"command": "determinism"},
        {"verdict": "diverged", "runs": 2, "first_divergence": None},
    )
    sdc = tmp_path / "sdc.json"
    trials = [
        {"site": f"layers.{i}.moe", "bit": b, "detected": {"replay": True, "checksum": b > 10}}
        for i in range(2)
        for b in (1, 15, 31)
    ]
    sdc.write_text(json.dumps({"trials": trials}))
    argv = ["report", "--run-dir", str(out), "--no-png", "--json", "--train-run", str(train)]
    argv += ["--determinism-run", str(determinism), "--sdc-run", str(sdc)]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    assert json.loads(stdout)["figures"] == [*SIM_FIGURES, "fig-training-run-1", "fig-sdc"]
    html = (out / "report.html").read_text()
    assert "train-a: tiny" in html and 'class="verdict diverged"' in html
    assert "step_seconds" not in html
    first = html
    # the step time of a rerun differs; the page does not
    shutil.rmtree(train)
    _write_train_run(train)
    metrics = (
        (train / "metrics.jsonl").read_text().replace('"step_seconds": 0.1', '"step_seconds": 9.9')
    )
    (train / "metrics.jsonl").write_text(metrics)
    assert _run(argv, capsys)[0] == 0
    assert (out / "report.html").read_text() == first


def test_png_export_is_skipped_cleanly_without_chromium(
    default_run: dict, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr(pngs, "find_browser", lambda: None)
    out = _copy(default_run, tmp_path)
    shutil.rmtree(out / "figures", ignore_errors=True)
    code, stdout, err = _run(["report", "--run-dir", str(out)], capsys)
    assert code == 0 and err == ""
    assert "PNG figures        skipped: no Chromium on PATH" in stdout
    results = json.loads((out / "results.json").read_text())
    assert results["png"] == [] and "no Chromium" in results["png_skipped"]
    assert not (out / "figures").exists()
    assert (out / "report.html").is_file()


def test_png_export_is_skipped_cleanly_without_kaleido(
    default_run: dict, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "kaleido", None)  # import kaleido raises ImportError
    out = _copy(default_run, tmp_path)
    code, stdout, _ = _run(["report", "--run-dir", str(out), "--json"], capsys)
    assert code == 0
    assert "kaleido is not installed" in json.loads(stdout)["png_skipped"]


@pytest.mark.parametrize(
    ("setup", "args", "needle"),
    [
        (lambda d: (d / "c.toml").write_text("[report]\ngpu = 8\n"), ["--config", "c.toml"],
         "unknown report setting 'gpu'; valid:"),
        (lambda d: (d / "c.toml").write_text("[report\n"), ["--config", "c.toml"],
         "is not valid TOML"),
        (lambda d: (d / "c.toml").write_text("gpus = 8\n"), ["--config", "c.toml"],
         "put settings under [report]"),
        (lambda d: (d / "c.toml").write_text("[report]\nbatch_per_device = [0]\n"),
         ["--config", "c.toml"], "'batch_per_device' must be a non-empty list of distinct values, each an integer >= 1"),
        (lambda d: (d / "c.toml").write_text('[report]\nmodel = "nope"\n'),
         ["--config", "c.toml"], "unknown model 'nope'"),
        (lambda d: (d / "c.toml").write_text("[report]\nserve_rate_scale = 0\n"),
         ["--config", "c.toml"], "'serve_rate_scale' must lie in (0, 1000]"),
        (lambda d: None, ["--config", "missing.toml"], "does not exist"),
        (lambda d: None, ["--train-run", "missing"], "holds no metrics.jsonl"),
        (lambda d: (d / "r.json").write_text('{"verdict": "same"}'),
         ["--determinism-run", "r.json"], "verdict must be one of identical, diverged"),
        (lambda d: (d / "s.json").write_text('{"trials": []}'),
         ["--sdc-run", "s.json"], "trials must not be empty"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys, monkeypatch, setup, args: list[str], needle: str
) -> None:
    monkeypatch.chdir(tmp_path)
    setup(tmp_path)
    assert needle in refused(["report", "--no-png", *args], capsys, "out")


@pytest.mark.slow
def test_a_real_training_run_is_plotted(default_run: dict, tmp_path: Path, capsys) -> None:
    """The format ``longcat-sim train`` really writes, end to end."""
    train = tmp_path / "train"
    argv = ["train", "--steps", "4", "--set", "warmup_steps=1", "--eval-every", "2"]
    assert main([*argv, "--run-dir", str(train)]) == 0
    capsys.readouterr()
    out = _copy(default_run, tmp_path)
    code, stdout, err = _run(
        ["report", "--run-dir", str(out), "--no-png", "--json", "--train-run", str(train)], capsys
    )
    assert code == 0, err
    assert "fig-training-run-1" in json.loads(stdout)["figures"]
    html = (out / "report.html").read_text()
    assert '"name":"target 2"' in html  # the tiny preset's target of FFN experts per token


def test_a_training_run_with_a_torn_last_line_loads_without_it(tmp_path) -> None:
    from longcat_sim.report.results import load_training_run

    run = tmp_path / "train-torn"
    _write_train_run(run)
    whole = load_training_run(run)["records"]
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 99, "lm_loss": 1.')  # a write cut short
    assert load_training_run(run)["records"] == whole
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write("\n")  # negative control: with its newline the line is damage, not torn
    with pytest.raises(UserError, match=r"metrics\.jsonl line \d+ is not JSON"):
        load_training_run(run)


def test_an_uncommitted_training_run_is_refused(tmp_path) -> None:
    from longcat_sim.report.results import load_training_run

    run = tmp_path / "train-running"
    _write_train_run(run)
    (run / "commit.json").unlink()
    with pytest.raises(UserError, match="not completed"):
        load_training_run(run)
