"""Bad input on every command ends in one ``longcat-sim: error:`` line and exit code 2, before
any long work: non-finite numbers, files that are not UTF-8, unwritable outputs, wrongly typed
grid files, sizes past the stated limits, settings a worker would refuse only later, empty
paths and out-of-range counts."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import time
from pathlib import Path

import pytest
import torch

from longcat_sim.cli import build_parser, main
from longcat_sim.config import paths
from longcat_sim.config.deployment import (
    MAX_BATCH_PER_DEVICE,
    MAX_GPUS,
    MAX_GROUP_REQUESTS,
    DecodeDeployment,
)
from longcat_sim.config.threads import MAX_WORKERS, WORKERS_RULE, check_workers
from longcat_sim.errors import UserError
from longcat_sim.model.checkpoint import load_pretrained, save_pretrained
from longcat_sim.model.config import get_preset
from longcat_sim.model.transformer import LongcatFlashForCausalLM
from tests.cli_checks import refused

LATIN1 = b"caf\xe9"  # a Latin-1 e-acute: not UTF-8
TINY = ["--model", "tiny", "--gpus", "8"]
SWEEP = ["--workers", "1", "--no-progress"]


def _toml(path: Path, body: str | bytes) -> None:
    path.write_bytes(body if isinstance(body, bytes) else body.encode())


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """Bad input files under ``tmp_path/in``."""
    d = tmp_path / "in"
    d.mkdir()
    _toml(d / "nan.toml", '[model]\npreset = "tiny"\nrope_theta = nan\n')
    _toml(d / "inf.toml", '[model]\npreset = "tiny"\ntarget_ffn_experts = inf\n')
    _toml(d / "init.toml", '[model]\npreset = "tiny"\ninitializer_range = nan\n')
    _toml(d / "latin1.toml", b'[model]\npreset = "tiny"\nname = "' + LATIN1 + b'"\n')
    _toml(d / "hw.toml", b'base = "H800"\nname = "' + LATIN1 + b'"\n')
    _toml(d / "grid.toml", b'[grid]\nmodel = "' + LATIN1 + b'"\n')
    grid = '[grid]\nmodel = "tiny"\ngpus = 8\nbatch_per_device = 4\n'
    _toml(d / "assume5.toml", grid + "assume = 5\n")
    _toml(d / "assume_ints.toml", grid + "assume = [5]\n")
    _toml(d / "assume_nested.toml", grid + "assume = {context_cv = {a = 1}}\n")
    _toml(d / "mtp_x.toml", grid + 'mtp_accept = "x"\n')
    _toml(d / "mixed.toml", '[grid]\nmodel = "tiny"\ngpus = 8\nbatch_per_device = [1, "a"]\n')
    _toml(d / "nested.toml", '[grid]\nmodel = "tiny"\nbatch_per_device = 4\ngpus = {a = 1}\n')
    run = d / "train-run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(b'{"step": 1, "note": "' + LATIN1 + b'"}\n')
    (d / "file").write_text("a regular file\n")
    return d


# (command line with {in} for the input folder, fragment of the one error line)
CASES = [
    # 1. non-finite numbers
    (["params", "--model", "{in}/nan.toml"], "'rope_theta' must be positive, got nan"),
    (["params", "--model", "{in}/inf.toml"], "got inf (not a finite number)"),
    (["simulate", "--model", "{in}/nan.toml", "--gpus", "8"], "'rope_theta' must be positive"),
    (["train", "--model", "{in}/init.toml"], "'initializer_range' must be positive, got nan"),
    (["train", "--set", "model.initializer_range=nan"], "'initializer_range' must be positive"),
    # 2. files that are not UTF-8
    (["params", "--model", "{in}/latin1.toml"], "is not UTF-8 text (byte 0xe9"),
    (["simulate", *TINY, "--hardware", "{in}/hw.toml"], "is not UTF-8 text (byte 0xe9"),
    (["sweep", "--grid", "{in}/grid.toml", *SWEEP], "is not UTF-8 text (byte 0xe9"),
    (["report", "--train-run", "{in}/train-run", "--no-png"], "metrics.jsonl is not UTF-8"),
    # 3. outputs that cannot be written
    (["train", "--data-cache", "{in}/file/cache"], "is a file, not a folder"),
    (["train", "--data-cache", "{in}/file"], "is a file, not a folder"),
    (["train", "--data-cache", "/proc/longcat-sim-cache"], "--data-cache '/proc/longcat-sim-"),
    (["determinism", "--data-cache", "{in}/file/cache"], "is a file, not a folder"),
    (["calibrate", "--data-cache", "{in}/file/cache"], "is a file, not a folder"),
    (["simulate", *TINY, "--trace", "{in}/file/trace.json"], "is a file, not a folder"),
    (["serve", *TINY, "--trace-out", "{in}/file/t.json"], "is a file, not a folder"),
    # 4. wrong types in a sweep grid file
    (["sweep", "--grid", "{in}/assume5.toml", *SWEEP], "assume must be a table of TERM = value"),
    (["sweep", "--grid", "{in}/assume_ints.toml", *SWEEP], "assume must be a table"),
    (["sweep", "--grid", "{in}/assume_nested.toml", *SWEEP], "assume must be a table"),
    (["sweep", "--grid", "{in}/mtp_x.toml", *SWEEP], "--mtp-accept must lie in [0, 1]"),
    (["sweep", "--grid", "{in}/mixed.toml", *SWEEP], "--batch-per-device must be an integer"),
    (
        ["sweep", "--grid", "{in}/nested.toml", *SWEEP],
        "--gpus must be an integer >= 1, got {'a': 1}",
    ),
    # 5. sizes past the stated limits
    (
        ["simulate", *TINY, "--batch-per-device", "1000000000"],
        "--batch-per-device must be at most 1,048,576, got 1000000000",
    ),
    (
        ["simulate", "--model", "tiny", "--gpus", "32", "--batch-per-device", "1000000"],
        "32,000,000 requests in one EP group, more than the 16,777,216",
    ),
    (
        ["simulate", "--model", "tiny", "--gpus", "1073741824"],
        "--gpus must be at most 1,048,576, got 1073741824",
    ),
    (["simulate", *TINY, "--ep", "1073741824"], "--ep must be at most 1,048,576, got 1073741824"),
    (["simulate", "--model", "tiny", "--gpus", "1073741824", "--ep", "8"], "--gpus must be"),
    (
        ["simulate", *TINY, "--redundant-experts", "1073741816"],
        "--redundant-experts must be at most 1,048,576",
    ),
    (["simulate", *TINY, "--assume", "context_cv=1e308"], "'context_cv' must lie in [0, 10]"),
    (["simulate", *TINY, "--assume", "context_cv=1e30"], "'context_cv' must lie in [0, 10]"),
    (["simulate", *TINY, "--assume", "kernel_overhead_s=1e308"], "must lie in [0, 1]"),
    (["simulate", *TINY, "--assume", "expert_popularity_sigma=1e308"], "must lie in [0, 10]"),
    (["sweep", *TINY, "--assume", "context_cv=1e308", *SWEEP], "'context_cv' must lie in"),
    (
        ["serve", "--model", "small", "--gpus", "16", "--assume", "context_cv=1e308"],
        "'context_cv' must lie in [0, 10]",
    ),
    (["sdc", "--bits", "0-9999999999"], "--bits must lie in 0..63"),
    (["sdc", "--batch-size", "1000000000"], "--batch-size x --seq-len must be at most 65,536"),
    # 6. settings a worker refused only after seconds, and models too large to train
    (["determinism", "--seed", "-1", "--runs", "2"], "'seed' must be an integer >= 0, got -1"),
    (["determinism", "--model", "longcat-flash", "--runs", "2"], "needs about"),
    (["determinism", "--batch-size", "0", "--runs", "2"], "'batch_size' must be an integer"),
    (["calibrate", "--model", "longcat-flash"], "'longcat-flash' needs about"),
    # 7. empty paths, which would mean the current folder
    (["params", "--model", ""], "--model must be a non-empty string"),
    (["train", "--model", ""], "argument --model: needs a preset name or a file"),
    (["determinism", "--model", ""], "argument --model: needs a preset name"),
    (["calibrate", "--model", ""], "argument --model: needs a preset name"),
    (["sdc", "--model", ""], "argument --model: needs a preset name"),
    (["simulate", "--model", "tiny", "--hardware", ""], "--hardware must be a non-empty"),
    (["sweep", "--grid", ""], "argument --grid: needs a path, got an empty string"),
    (["train", "--data-cache", ""], "argument --data-cache: needs a path"),
    (["train", "--grow-from", ""], "argument --grow-from: needs a path"),
    (["determinism", "--data-cache", ""], "argument --data-cache: needs a path"),
    (["calibrate", "--data-cache", ""], "argument --data-cache: needs a path"),
    (["report", "--config", ""], "argument --config: needs a path"),
    (["report", "--train-run", ""], "argument --train-run: needs a path"),
    (["report", "--sdc-run", ""], "argument --sdc-run: needs a path"),
    (["simulate", *TINY, "--trace", ""], "argument --trace: needs a path"),
    (["serve", *TINY, "--trace-out", ""], "argument --trace-out: needs a path"),
    # 8. counts beyond the model
    (["sdc", "--recompute-experts", "1000"], "exceeds the 8 routed experts of model 'tiny'"),
    # 9. worker processes past the stated limit (each a full interpreter)
    (["sweep", *TINY, "--workers", "1000000", "--no-progress"], "--workers must be at most"),
    (["determinism", "--workers", "1000", "--runs", "1000"], "--workers must be at most"),
    (["plan", "--model", "tiny", "--rate", "1", "--workers", "1000000"], "--workers must be"),
]

# Commands whose long work (worker processes, a tokenizer of the model's vocabulary, host
# measurements) comes before they could otherwise notice bad input: refused well under a second.
SLOW_BEFORE = ("determinism", "calibrate")


@pytest.mark.parametrize(("argv", "fragment"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_refused_with_one_line(argv, fragment, inputs, tmp_path, capsys) -> None:
    importlib.import_module(f"longcat_sim.commands.{argv[0]}")  # imports are not the refusal
    importlib.import_module("longcat_sim.train.training")
    argv = [arg.replace("{in}", str(inputs)) for arg in argv]
    start = time.perf_counter()
    line = refused(argv, capsys, tmp_path / "run")
    seconds = time.perf_counter() - start
    assert fragment in line, line
    if argv[0] in SLOW_BEFORE:
        assert seconds < 5.0, f"refused after {seconds:.1f} s"


def test_no_probe_file_is_left_and_a_good_cache_passes(tmp_path) -> None:
    """Negative control of the output checks: a writable folder passes, and is left as it was."""
    folder = paths.check_output_dir(tmp_path / "new" / "cache", "--data-cache")
    assert folder.is_dir() and list(folder.iterdir()) == []
    out = paths.check_output_file(tmp_path / "trace.json", "--trace")
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "new"]


def test_full_disk_is_one_line_before_training(tmp_path, monkeypatch, capsys) -> None:
    """ENOSPC on the probe write (a full disk, simulated) refuses the run before training:
    the run directory's probe comes first, and neither folder keeps a file."""
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        if fd > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    line = refused(["train", "--data-cache", str(tmp_path / "cache")], capsys, tmp_path / "run")
    assert "is not writable: No space left on device" in line
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    with pytest.raises(UserError, match=r"--data-cache .* is not writable: No space left"):
        paths.check_output_dir(tmp_path / "cache", "--data-cache")
    assert list((tmp_path / "cache").iterdir()) == []  # the probe removed itself
    with pytest.raises(UserError, match="No space left on device"):
        paths.check_output_file(tmp_path / "trace.json", "--trace")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_refused(tmp_path, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = refused(["train", "--data-cache", str(locked)], capsys, tmp_path / "run")
    finally:
        locked.chmod(0o700)
    assert "is not writable: Permission denied" in line


def test_empty_path_type() -> None:
    """The argparse type of path options, also meant for ``--run-dir``."""
    assert paths.path_arg("runs/x") == Path("runs/x")
    assert paths.path_arg(".") == Path(".")
    for empty in ("", "  "):
        with pytest.raises(argparse.ArgumentTypeError, match="needs a path"):
            paths.path_arg(empty)


def test_empty_run_dir_is_refused(tmp_path, capsys, monkeypatch) -> None:
    """``--run-dir ''`` would write into the current folder."""
    monkeypatch.chdir(tmp_path)
    code = main(["params", "--run-dir", ""])
    err = capsys.readouterr().err
    assert code == 2 and "argument --run-dir: needs a path" in err
    assert list(tmp_path.iterdir()) == []


def test_stated_limits_hold_and_existing_values_stay_valid(capsys) -> None:
    DecodeDeployment(gpus=MAX_GPUS, ep=8, batch_per_device=MAX_BATCH_PER_DEVICE // 1024)
    DecodeDeployment(gpus=256, batch_per_device=MAX_GROUP_REQUESTS // 256)
    DecodeDeployment(gpus=128, ep=128, batch_per_device=256, redundant_experts=64)
    with pytest.raises(UserError, match="--gpus must be at most 1,048,576, got 1048577"):
        DecodeDeployment(gpus=MAX_GPUS + 1, ep=8)
    with pytest.raises(UserError, match="requests in one EP group"):
        DecodeDeployment(gpus=256, batch_per_device=MAX_GROUP_REQUESTS // 256 + 1)
    with pytest.raises(SystemExit):
        build_parser("simulate").parse_args(["simulate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "at most 1,048,576" in help_text and "in [0, 10]" in help_text


@pytest.fixture
def tiny_fp16_checkpoint(tmp_path) -> Path:
    model = LongcatFlashForCausalLM(get_preset("tiny"), generator=torch.Generator().manual_seed(0))
    return save_pretrained(model.half(), tmp_path / "fp16")


def test_fp16_checkpoint_upcast_is_said_once(tiny_fp16_checkpoint, capsys) -> None:
    module = load_pretrained(tiny_fp16_checkpoint)
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning:") and "float16" in lines[0], lines


def test_fp16_checkpoint_auto_keeps_its_dtype(tiny_fp16_checkpoint, capsys) -> None:
    module = load_pretrained(tiny_fp16_checkpoint, dtype="auto")
    routers = {id(p) for layer in module.model.layers for p in layer.mlp.router.parameters()}
    dtypes = {p.dtype for p in module.parameters() if id(p) not in routers}
    assert dtypes == {torch.float16}
    assert capsys.readouterr().err == ""
    fp32 = save_pretrained(
        load_pretrained(tiny_fp16_checkpoint), tiny_fp16_checkpoint.parent / "32"
    )
    capsys.readouterr()
    load_pretrained(fp32)
    assert capsys.readouterr().err == ""  # a float32 checkpoint loads without a warning


@pytest.mark.parametrize("command", ["determinism", "plan"])
def test_worker_limit_is_stated_in_help_and_message(command, capsys) -> None:
    """The one limit on local worker processes, with this machine's core count, in each
    ``--workers`` help and in the refusal; the limit itself is accepted."""
    with pytest.raises(SystemExit):
        build_parser(command).parse_args([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert f"at most {MAX_WORKERS} ({WORKERS_RULE})" in help_text
    assert check_workers(MAX_WORKERS) == MAX_WORKERS
    with pytest.raises(UserError, match=r"must be at most \d+ worker processes \(4 per core"):
        check_workers(MAX_WORKERS + 1)
    assert max(8, 4 * (os.cpu_count() or 1)) == MAX_WORKERS
