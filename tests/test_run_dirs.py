"""A run directory has one writer (a second is refused naming the first, every command), its
manifest and results are committed together (a crash between them, or another run's file, is
refused by every reader), an interrupted write leaves no temporary file behind, and a training
run killed at random write boundaries resumes to the uninterrupted run's parameters."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from longcat_sim import runs
from longcat_sim.cli import COMMANDS, main
from longcat_sim.errors import UserError
from longcat_sim.model.config import get_preset
from longcat_sim.runs import COMMIT_NAME, LOCK_NAME, claim_run_dir, read_run, write_run
from longcat_sim.train.data import build_corpus_data

BYTE_BUDGET = 2**18
HOLD = textwrap.dedent(
    """
    import sys, time
    from longcat_sim.runs import claim_run_dir
    claim_run_dir(sys.argv[1], "sweep")
    print("held", flush=True)
    time.sleep(120)
    """
)


@pytest.fixture
def held(tmp_path):
    """A run directory that another process owns while the test runs."""
    run_dir = tmp_path / "owned"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    yield run_dir, holder
    holder.kill()
    holder.wait()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("longcat-sim: error:"), err
    return err[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_second_writer_is_refused_naming_the_first(held, command, capsys) -> None:
    run_dir, holder = held
    before = sorted(p.name for p in run_dir.iterdir())
    assert main([command, "--run-dir", str(run_dir)]) == 2
    line = _one_error_line(capsys)
    assert f"pid {holder.pid} on host {socket.gethostname()}" in line and "sweep" in line
    assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing written


def test_the_lock_dies_with_its_owner(held, capsys) -> None:
    run_dir, holder = held
    with pytest.raises(UserError, match="in use"):
        claim_run_dir(run_dir, "params")
    holder.kill()  # SIGKILL: no cleanup ran, the kernel drops the lock
    holder.wait()
    assert main(["params", "--model", "tiny", "--run-dir", str(run_dir), "--json"]) == 0
    assert read_run(run_dir)[0]["command"] == "params"


def test_refused_input_leaves_no_directory_behind(tmp_path, capsys) -> None:
    run_dir = tmp_path / "fresh"
    assert main(["params", "--model", "no-such-model", "--run-dir", str(run_dir)]) == 2
    _one_error_line(capsys)
    assert not run_dir.exists()


def test_an_unused_claim_removes_only_a_directory_it_created(tmp_path) -> None:
    fresh, existing = tmp_path / "runs" / "fresh", tmp_path / "existing"
    existing.mkdir()
    for run_dir in (fresh, existing):
        claim_run_dir(run_dir, "calibrate")
        runs.release_run_dir(run_dir, unused=True)
    assert not fresh.exists() and existing.is_dir() and not (existing / LOCK_NAME).exists()
    claim_run_dir(fresh, "calibrate")
    (fresh / "host.toml").write_text("x")
    runs.release_run_dir(fresh, unused=True)  # negative control: it holds a file
    assert (fresh / "host.toml").exists()


def test_stale_temporaries_are_removed_and_other_files_kept(tmp_path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    stale = [run_dir / ".results.json.k2j_9xq1.tmp", run_dir / "checkpoints" / ".m.abcdefgh.tmp"]
    kept = [run_dir / "notes.tmp", run_dir / ".results.json.tmp", run_dir / "results.json"]
    for path in stale + kept:
        path.write_text("x")
    claim_run_dir(run_dir, "train")
    runs.release_run_dir(run_dir)
    assert [p.exists() for p in stale] == [False, False]
    assert all(p.exists() for p in kept)


def test_temporaries_of_a_nested_run_are_left_to_it(tmp_path) -> None:
    nested = tmp_path / "outer" / "other-run" / ".results.json.abcdefgh.tmp"
    nested.parent.mkdir(parents=True)
    nested.write_text("a live writer's file")
    claim_run_dir(tmp_path / "outer", "params")
    runs.release_run_dir(tmp_path / "outer")
    assert nested.exists()


def test_a_lock_file_removed_under_a_claimer_is_not_trusted(tmp_path, monkeypatch) -> None:
    """The owner removes an unused lock while a claimer has it open: the claimer's flock then
    holds a file no longer on disk, so it reopens the new one instead of writing unlocked."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    real_flock, calls = runs.fcntl.flock, []

    def flock_after_removal(fd, operation):
        calls.append(fd)
        if len(calls) == 1:
            (run_dir / LOCK_NAME).unlink()  # the owner's release, between open and flock
        return real_flock(fd, operation)

    monkeypatch.setattr(runs.fcntl, "flock", flock_after_removal)
    claim_run_dir(run_dir, "params")
    assert len(calls) == 2  # the first lock was on the removed file
    assert (
        os.fstat(runs._claimed[run_dir.resolve()].fd).st_ino == os.stat(run_dir / LOCK_NAME).st_ino
    )
    runs.release_run_dir(run_dir)


def test_commit_is_read_back(tmp_path) -> None:
    write_run(tmp_path, {"command": "x", "n": 1}, {"n": 1})
    assert read_run(tmp_path) == ({"command": "x", "n": 1}, {"n": 1})


def test_a_crash_between_the_two_writes_is_refused(tmp_path, monkeypatch) -> None:
    write_run(tmp_path, {"n": 1}, {"n": 1})
    real = runs.write_text_atomic

    def crash_on_results(path, text):
        if Path(path).name == "results.json":
            raise KeyboardInterrupt  # the process stops here
        return real(path, text)

    monkeypatch.setattr(runs, "write_text_atomic", crash_on_results)
    with pytest.raises(KeyboardInterrupt):
        write_run(tmp_path, {"n": 2}, {"n": 2})
    # negative control: read naively, the directory mixes two runs
    naive = [json.loads((tmp_path / n).read_text())["n"] for n in ("manifest.json", "results.json")]
    assert naive == [2, 1]
    with pytest.raises(UserError, match=r"commit\.json is missing"):
        read_run(tmp_path)


@pytest.mark.parametrize("victim", ["manifest.json", "results.json"])
def test_another_runs_file_is_refused_naming_it(tmp_path, victim) -> None:
    write_run(tmp_path / "a", {"n": 1}, {"n": 1})
    write_run(tmp_path / "b", {"n": 2}, {"n": 2})
    (tmp_path / "a" / victim).write_bytes((tmp_path / "b" / victim).read_bytes())
    with pytest.raises(UserError, match=f"{victim} is not the one committed"):
        read_run(tmp_path / "a")


def test_report_refuses_an_uncommitted_run(tmp_path, capsys) -> None:
    det = tmp_path / "det"
    write_run(det, {"command": "determinism"}, {"identical": True, "runs": 2})
    (det / COMMIT_NAME).unlink()
    argv = ["report", "--run-dir", str(tmp_path / "r"), "--no-png", "--determinism-run", str(det)]
    assert main(argv) == 2
    assert "not completed" in _one_error_line(capsys)


# --- kills at random write boundaries of a training run ---------------------------------------

# SIGKILL at the Nth fsync or rename (argv[1]; 0: never), then the script's own lines
KILL_AT_BOUNDARY = textwrap.dedent(
    """
    import os, signal, sys
    kill_at, calls = int(sys.argv[1]), [0]
    def counted(real):
        def call(*args, **kwargs):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return call
    os.fsync, os.replace = counted(os.fsync), counted(os.replace)
    """
)
KILLER = KILL_AT_BOUNDARY + textwrap.dedent(
    """
    from longcat_sim.cli import main
    code = main(sys.argv[2:])
    print(f"boundaries={calls[0]}", file=sys.stderr)
    sys.exit(code)
    """
)
COMMITTER = KILL_AT_BOUNDARY + textwrap.dedent(
    """
    from longcat_sim import runs
    runs.write_run(sys.argv[2], {"n": 2}, {"n": 2})
    print(calls[0])
    """
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data-cache")
    build_corpus_data(get_preset("tiny").vocab_size, 32, byte_budget=BYTE_BUDGET, cache_dir=folder)
    return folder


def _train_argv(cache: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", "tiny", "--run-dir", str(run_dir), "--data-cache", str(cache),
        "--set", f"byte_budget={BYTE_BUDGET}", "--set", "warmup_steps=1",
        "--set", "checkpoint_every=1", "--steps", "4", "--batch-size", "4", "--seq-len", "32",
        "--json", *extra,
    ]  # fmt: skip


def _killed_at(boundary: int, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", KILLER, str(boundary), *argv],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_kills_at_ten_random_write_boundaries_resume_to_the_whole_run(
    cache, tmp_path, capsys
) -> None:
    whole = _killed_at(0, _train_argv(cache, tmp_path / "whole"))  # 0: never killed
    assert whole.returncode == 0, whole.stderr
    expected = json.loads(whole.stdout)["param_hash"]
    boundaries = int(whole.stderr.strip().splitlines()[-1].split("=")[1])
    points = sorted(random.Random(16).sample(range(1, boundaries + 1), 10))
    left_temporaries = 0
    for point in points:
        run_dir = tmp_path / f"killed-at-{point}"
        killed = _killed_at(point, _train_argv(cache, run_dir))
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr)
        left_temporaries += len(_temporaries(run_dir))
        claim_run_dir(run_dir, "train")  # the run directory's own temporaries go at once
        runs.release_run_dir(run_dir)
        assert not [p for p in _temporaries(run_dir) if ".tmp-step-" not in str(p)]
        resume = ["--resume", "latest-valid"] if (run_dir / "checkpoints").is_dir() else []
        code = main(_train_argv(cache, run_dir, *resume))
        out = capsys.readouterr()
        if code == 2 and "no checkpoint" in out.err:  # killed before the first checkpoint
            code = main(_train_argv(cache, _fresh(run_dir)))
            out = capsys.readouterr()
        assert code == 0, (point, out.err)
        assert json.loads(out.out)["param_hash"] == expected, point
        assert read_run(run_dir)[1]["param_hash"] == expected
        assert not _temporaries(run_dir) and not list(run_dir.glob("checkpoints/.tmp-step-*"))
    assert left_temporaries > 0  # some kills fell inside a write, and their files were removed


def _temporaries(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob(".*.tmp") if p.is_file()]


def _fresh(run_dir: Path) -> Path:
    """The run directory without the files of the killed attempt (no checkpoint to resume)."""
    for path in sorted(run_dir.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    return run_dir


def test_the_kill_counter_is_not_vacuous(cache, tmp_path) -> None:
    """Negative control: a kill at the first boundary really stops the run before any result."""
    run_dir = tmp_path / "first"
    killed = _killed_at(1, _train_argv(cache, run_dir))
    assert killed.returncode == -signal.SIGKILL
    assert not (run_dir / "results.json").exists()
    with pytest.raises(UserError):
        read_run(run_dir)
    assert os.path.exists(run_dir / LOCK_NAME)


def test_two_trainings_into_one_directory_the_second_is_refused(cache, tmp_path, capsys) -> None:
    run_dir = tmp_path / "shared"
    first = subprocess.Popen(
        [sys.executable, "-m", "longcat_sim", *_train_argv(cache, run_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / LOCK_NAME).exists() or _owner(run_dir) != first.pid:
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.05)
        assert main(_train_argv(cache, run_dir)) == 2
        assert f"pid {first.pid}" in _one_error_line(capsys)
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err
    assert read_run(run_dir)[1] == json.loads(out)  # the first run's files, whole


def _owner(run_dir: Path) -> int | None:
    try:
        return json.loads((run_dir / LOCK_NAME).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def test_a_commit_killed_at_every_boundary_is_whole_or_refused(tmp_path) -> None:
    """SIGKILL at each fsync and rename of a commit over an older one: a reader gets the new
    pair or a refusal, never one file of each."""
    probe = subprocess.run(
        [sys.executable, "-c", COMMITTER, "0", str(tmp_path / "probe")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    boundaries = int(probe.stdout)
    assert boundaries == 6  # three files, each an fsync and a rename
    outcomes = []
    for point in range(1, boundaries + 1):
        run_dir = tmp_path / f"at-{point}"
        write_run(run_dir, {"n": 1}, {"n": 1})
        killed = subprocess.run(
            [sys.executable, "-c", COMMITTER, str(point), str(run_dir)], check=False
        )
        assert killed.returncode == -signal.SIGKILL
        try:
            manifest, results = read_run(run_dir)
            outcomes.append((manifest["n"], results["n"]))
        except UserError:
            outcomes.append("refused")
    # each kill lands before its call, so even the last leaves commit.json unrenamed
    assert outcomes == ["refused"] * boundaries
    assert read_run(tmp_path / "probe") == ({"n": 2}, {"n": 2})  # the same commit, not killed
