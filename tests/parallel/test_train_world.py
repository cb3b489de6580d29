"""``longcat-sim train`` in one process, in ``--nproc 2`` processes it spawns and under torchrun:
one trainer, bitwise equal parameters in deterministic mode, checkpoints that move between
world sizes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from longcat_sim.cli import main
from longcat_sim.errors import UserError
from longcat_sim.model.config import get_preset
from longcat_sim.train.data import build_corpus_data
from longcat_sim.train.world import World, check_nproc, env_world
from tests.proctree import listening_addresses

BYTE_BUDGET = 2**18
SHAPE = ["--steps", "3", "--batch-size", "4", "--seq-len", "32", "--eval-every", "2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("data-cache")
    build_corpus_data(get_preset("tiny").vocab_size, 32, byte_budget=BYTE_BUDGET, cache_dir=folder)
    return str(folder)


def train_args(cache: str, run_dir, *extra: str) -> list[str]:
    return [
        "train", "--model", "tiny", "--run-dir", str(run_dir), "--data-cache", cache,
        "--set", f"byte_budget={BYTE_BUDGET}", "--set", "warmup_steps=1", "--deterministic",
        "--json", *SHAPE, *extra,
    ]  # fmt: skip


def in_process(argv: list[str], capsys) -> dict:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def records(run_dir) -> list[dict]:
    """metrics.jsonl without its timings."""
    timings = {"step_seconds", "tokens_per_s", "slices_seconds", "exchange_seconds"}
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in timings} for line in lines]


@pytest.fixture(scope="module")
def one_process(cache, tmp_path_factory) -> tuple[dict, object]:
    run_dir = tmp_path_factory.mktemp("one") / "run"
    code = subprocess.run(
        [sys.executable, "-m", "longcat_sim", *train_args(cache, run_dir)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert code.returncode == 0, code.stderr
    return json.loads(code.stdout), run_dir


def test_nproc_2_ends_where_one_process_does(one_process, cache, tmp_path, capsys) -> None:
    single, single_dir = one_process
    results = in_process(train_args(cache, tmp_path / "two", "--nproc", "2"), capsys)
    assert results["nproc"] == 2 and single["nproc"] == 1
    assert results["param_hash"] == single["param_hash"]
    assert results["val_loss"] == single["val_loss"]
    assert records(tmp_path / "two") == records(single_dir)


def test_torchrun_ends_where_one_process_does(one_process, cache, tmp_path) -> None:
    single, _ = one_process
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    argv = [*torchrun, "--nproc-per-node", "2", "-m", "longcat_sim"]
    done = subprocess.run(
        [*argv, *train_args(cache, tmp_path / "torchrun")],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)  # rank 0 alone prints
    assert results["nproc"] == 2 and results["param_hash"] == single["param_hash"]
    assert json.loads((tmp_path / "torchrun" / "results.json").read_text()) == results


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _hosts(agent: subprocess.Popen, endpoint: str) -> bool:
    """Whether ``agent`` listens on ``endpoint``'s port (elsewhere than Linux: whether
    anything answers there)."""
    host, port = endpoint.rsplit(":", 1)
    if sys.platform.startswith("linux"):
        return any(a.rpartition(":")[2] == port for a in listening_addresses([agent.pid]))
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    return True


def _host_agent(start, tries: int = 3) -> tuple[subprocess.Popen, str]:
    """Agent 0, hosting the rendezvous store on a port picked free, once it listens there; a
    port taken between the pick and the bind (agent 0 exits) is retried with another."""
    for _ in range(tries):
        endpoint = f"127.0.0.1:{_free_port()}"
        agent = start(0, endpoint)
        deadline = time.monotonic() + 120
        while agent.poll() is None and time.monotonic() < deadline:
            if _hosts(agent, endpoint):
                return agent, endpoint
            time.sleep(0.2)
        agent.kill()
        agent.communicate()
    pytest.fail(f"torchrun agent 0 could not host the rendezvous in {tries} tries")


def test_two_nodes_under_torchrun_end_where_one_process_does(one_process, cache, tmp_path) -> None:
    """Two torchrun agents, one per "host" (``--nnodes 2``, c10d rendezvous on loopback, a
    shared run directory): the same parameters as one process. Agent 0 alone hosts the
    rendezvous store (``is_host``), and agent 1 starts once it listens."""
    single, _ = one_process
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    run_dir = tmp_path / "two-nodes"

    def start(node: int, endpoint: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
             "--node-rank", str(node), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
             "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes",
             "--rdzv-conf", f"is_host={int(node == 0)},join_timeout=120", "-m", "longcat_sim",
             *train_args(cache, run_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip

    host, endpoint = _host_agent(start)
    agents = [host, start(1, endpoint)]
    try:
        outputs = [agent.communicate(timeout=300) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    for agent, (_, err) in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, err
    # the rendezvous, not --node-rank, decides which agent holds global rank 0: it alone prints
    printed = [out for out, _ in outputs if out.strip()]
    assert len(printed) == 1, outputs
    results = json.loads(printed[0])
    assert results["nproc"] == 2 and results["param_hash"] == single["param_hash"]


def test_a_world_2_checkpoint_resumes_at_world_1_bitwise(
    one_process, cache, tmp_path, capsys
) -> None:
    single, single_dir = one_process
    run_dir = tmp_path / "split"
    half = in_process(train_args(cache, run_dir, "--nproc", "2", "--stop-after", "2"), capsys)
    assert half["steps"] == 2 and half["param_hash"] != single["param_hash"]  # control
    resumed = in_process(
        ["train", "--run-dir", str(run_dir), "--resume", "--data-cache", cache, "--json"], capsys
    )
    assert resumed["start_step"] == 2 and resumed["nproc"] == 1
    assert resumed["param_hash"] == single["param_hash"]
    assert resumed["val_loss"] == single["val_loss"]
    assert records(run_dir) == records(single_dir)


def test_grow_from_gives_the_same_model_in_one_and_two_processes(cache, tmp_path, capsys) -> None:
    """A half-depth run stacked into full depth, then trained on: one process and
    ``--nproc 2`` end at the same parameters."""
    half = tmp_path / "half"
    in_process(train_args(cache, half, "--set", "model.num_layers=1"), capsys)
    grown = {}
    for nproc in (1, 2):
        extra = ("--grow-from", str(half), "--nproc", str(nproc), "--steps", "5")
        grown[nproc] = in_process(train_args(cache, tmp_path / f"grown-{nproc}", *extra), capsys)
    assert grown[1]["start_step"] == grown[2]["start_step"] == 3
    assert len(grown[2]["avg_ffn_experts_per_token"]) == 2  # full depth
    assert grown[2]["param_hash"] == grown[1]["param_hash"]


def test_world_sizes_that_cannot_shard_are_refused(monkeypatch, tmp_path, capsys) -> None:
    with pytest.raises(UserError, match="must divide the 2 slices"):
        check_nproc(4, get_preset("tiny"), 8, slice_size=4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert env_world() == World(1, 2, 1)
    code = main(["train", "--nproc", "4", "--run-dir", str(tmp_path / "run")])
    assert code == 2 and "differs from torchrun's WORLD_SIZE=2" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(UserError, match="RANK=2 is not in a world of WORLD_SIZE=2"):
        env_world()
    monkeypatch.delenv("RANK")
    assert env_world() is None
