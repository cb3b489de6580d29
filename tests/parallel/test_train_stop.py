"""``train --nproc 2`` stopped by SIGTERM or killed outright: no rank outlives the parent, the
complete checkpoints stay intact, and while it runs every socket listens on loopback only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from longcat_sim.model.config import get_preset
from longcat_sim.train.checkpoint import CHECKPOINTS_DIR, checkpoint_dirs, verify_checkpoint
from longcat_sim.train.data import build_corpus_data
from tests.proctree import (
    descendants,
    is_loopback,
    kill_all,
    listening_addresses,
    survivors,
    wait_for,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

BYTE_BUDGET = 2**18


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("data-cache")
    build_corpus_data(get_preset("tiny").vocab_size, 32, byte_budget=BYTE_BUDGET, cache_dir=folder)
    return str(folder)


def _start(cache: str, tmp_path) -> tuple[subprocess.Popen, dict[int, int]]:
    """A long ``train --nproc 2`` (a checkpoint every step) and its processes, once a
    checkpoint is complete."""
    run_dir = tmp_path / "run"
    argv = [
        sys.executable, "-m", "longcat_sim", "train", "--model", "tiny", "--run-dir",
        str(run_dir), "--data-cache", cache, "--set", f"byte_budget={BYTE_BUDGET}",
        "--set", "warmup_steps=1", "--set", "checkpoint_every=1", "--steps", "5000",
        "--batch-size", "4", "--seq-len", "32", "--eval-every", "5000", "--nproc", "2",
        "--no-progress", "--json",
    ]  # fmt: skip
    with (tmp_path / "stderr").open("w") as err:
        train = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    wait_for(lambda: checkpoint_dirs(run_dir), 120, "complete checkpoint", train)
    return train, descendants(train.pid)


def test_a_killed_train_leaves_no_rank(cache, tmp_path) -> None:
    train, children = _start(cache, tmp_path)
    try:
        assert len(children) >= 2  # the two ranks (and multiprocessing's resource tracker)
        train.kill()
        train.wait()
        assert survivors(children) == []
    finally:
        train.kill()
        kill_all(children)


def test_sigterm_stops_a_train_keeping_its_complete_checkpoints(cache, tmp_path) -> None:
    train, children = _start(cache, tmp_path)
    try:
        listening = listening_addresses([train.pid, *children])
        assert len(listening) >= 3  # the parent's store, a gloo listener per rank
        assert [a for a in listening if not is_loopback(a)] == []
        train.send_signal(signal.SIGTERM)
        assert train.wait(timeout=30) == 143
        lines = (tmp_path / "stderr").read_text().splitlines()
        assert lines == ["longcat-sim: stopped by SIGTERM; no results were written"]
        assert survivors(children) == []
    finally:
        train.kill()
        kill_all(children)
    run_dir = tmp_path / "run"
    assert not (run_dir / "results.json").exists() and not (run_dir / "manifest.json").exists()
    complete = checkpoint_dirs(run_dir)
    assert complete
    for checkpoint in complete:
        verify_checkpoint(checkpoint)
    assert sorted(p.name for p in (run_dir / CHECKPOINTS_DIR).iterdir()) == [
        p.name for p in complete
    ]  # no partial checkpoint left behind


def test_the_listener_check_sees_a_socket_on_every_interface() -> None:
    """Negative control: a socket bound to the wildcard address is reported as not loopback."""
    with socket.socket() as wide, socket.socket() as narrow:
        wide.bind(("0.0.0.0", 0))
        wide.listen()
        narrow.bind(("127.0.0.1", 0))
        narrow.listen()
        ports = wide.getsockname()[1], narrow.getsockname()[1]
        found = listening_addresses([os.getpid()])
    outside = [a for a in found if not is_loopback(a)]
    assert f"0.0.0.0:{ports[0]}" in outside
    assert f"127.0.0.1:{ports[1]}" in found
