"""Every ``--json`` key of every command is in docs/glossary.md: each command runs here on its
smallest input and the keys of its real output, nested ones included, are looked up."""

from __future__ import annotations

import json
import re
from pathlib import Path
from shlex import split
from typing import Any

import pytest

from longcat_sim.cli import main

ROOT = Path(__file__).resolve().parents[2]
GLOSSARY = ROOT / "docs" / "glossary.md"
DATA_KEY = re.compile(r"^\d+(x\d+)*$")  # process counts and MxKxN shapes are data, not names


def glossary_names(text: str) -> list[str]:
    """The names in the first cell of every table row (one or more in backticks)."""
    names = []
    for line in text.splitlines():
        if line.startswith("| `"):
            names += re.findall(r"`([^`]+)`", line.split(" | ")[0])
    return names


def json_keys(obj: Any) -> set[str]:
    """Every key of every object inside ``obj``."""
    if isinstance(obj, dict):
        return set(obj).union(*(json_keys(v) for v in obj.values()))
    if isinstance(obj, list):
        return set().union(*(json_keys(v) for v in obj))
    return set()


def unexplained(keys: set[str], names: list[str]) -> list[str]:
    return sorted(k for k in keys if k not in set(names) and not DATA_KEY.match(k))


def _host_profile(folder: Path) -> str:
    from tests.test_calibrate import _host

    path = folder / "host.toml"
    path.write_text(_host().to_toml())
    return str(path)


def _calibrate(folder: Path, cache: str) -> list[str]:
    """The smallest calibration."""
    return [
        "calibrate",
        "--nproc",
        *split("2 --batch-sizes 2 --seq-len 16 --steps 4"),
        CACHE,
        cache,
    ]


CACHE = "--data-cache"
BUDGET = str(2**18)  # a quarter MiB of the corpus keeps the tokenizer quick to build
COMMANDS: dict[str, Any] = {
    "params": lambda d, c: split("params --model tiny"),
    "simulate-decode": lambda d, c: split("simulate --batch-per-device 8"),
    "simulate-train": lambda d, c: split("simulate --mode train --microbatches 2"),
    "simulate-host-ep": lambda d, c: [
        *split("simulate --mode host-ep --profile"),
        _host_profile(d),
    ],
    "sweep": lambda d, c: split("sweep --batch-per-device 8 --workers 1 --no-progress"),
    "serve-colocated": lambda d, c: split("serve --duration-s 5 --rate 5"),
    "serve-disagg": lambda d, c: split("serve --layout disagg --duration-s 5 --rate 5"),
    "plan": lambda d, c: split(
        "plan --rate 20 --prompt-len 1024 --output-len 64 --gpus 32 --batch-per-device 16 "
        "--tokens-per-device 512 --prefill-gpus 16 --verify 1 --verify-duration-s 10 "
        "--workers 1"
    ),
    "report": lambda d, c: split("report --no-png --batch-per-device 8,16"),
    "sdc": lambda d, c: split(
        "sdc --sites combine --bits 31 --trials 1 --clean-runs 2 --attribution-events 1"
    ),
    "train": lambda d, c: [
        *split(f"train --model tiny --steps 1 --set warmup_steps=1 --set byte_budget={BUDGET}"),
        CACHE,
        c,
    ],
    "determinism": lambda d, c: [
        *split(f"determinism --model tiny --steps 1 --runs 2 --threads 1 --byte-budget {BUDGET}"),
        *split("--batch-size 2 --seq-len 16 --workers 1"),
        CACHE,
        c,
    ],
    "calibrate": _calibrate,
}
SLOW = ("train", "determinism", "calibrate")


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("data-cache"))


@pytest.fixture(scope="module")
def names() -> list[str]:
    return glossary_names(GLOSSARY.read_text())


@pytest.mark.parametrize(
    "command",
    [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in COMMANDS],
)
def test_every_json_key_is_in_the_glossary(
    command: str, names: list[str], data_cache: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    if command == "calibrate":  # its one-process fit is noise-bound at these sizes
        from longcat_sim.commands import calibrate
        from tests.test_calibrate import steady_single_process

        monkeypatch.setattr(calibrate, "_single_process", steady_single_process)
    argv = COMMANDS[command](tmp_path, data_cache)
    code = main([*argv, "--json", "--run-dir", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert code == 0, err
    keys = json_keys(json.loads(out))
    assert len(keys) > 5
    assert unexplained(keys, names) == [], f"add them to {GLOSSARY.name}"


def test_each_name_is_explained_once(names: list[str]) -> None:
    assert len(names) > 100
    assert sorted(n for n in set(names) if names.count(n) > 1) == []


def test_a_key_missing_from_the_glossary_is_reported() -> None:
    """Negative control: a nested key the glossary lacks is found; data keys are not."""
    text = "| name | unit | meaning |\n|---|---|---|\n| `tpot_ms`, `tgs` | ms | x |\n"
    names = glossary_names(text)
    assert names == ["tpot_ms", "tgs"]
    keys = json_keys({"tpot_ms": 1, "points": [{"tgs": 2, "warp": {"2": 0, "8x8x8": 1}}]})
    assert keys == {"tpot_ms", "points", "tgs", "warp", "2", "8x8x8"}
    assert unexplained(keys, names) == ["points", "warp"]
