"""Mutated config files through the flags that read them keep the command line's contract."""

from __future__ import annotations

import itertools
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz.conftest import FUZZ
from tests.fuzz.harness import check, run_case
from tests.fuzz.pools import SPECS
from tests.fuzz.tomls import grid_files, hardware_files, model_files, report_files

_serial = itertools.count()
TINY_DECODE = ["--gpus", "8", "--ep", "8"]  # tiny's 8 experts on one EP group of 8
# command lines that read a model file (FILE), each cheap when it accepts the file
MODEL_USES = [
    ["params", "--model", "FILE"],
    ["simulate", "--model", "FILE", *TINY_DECODE],
    ["train", *SPECS["train"].base, "--model", "FILE"],
    ["sdc", *SPECS["sdc"].base, "--model", "FILE"],
    ["determinism", *SPECS["determinism"].base, "--model", "FILE"],
    ["calibrate", *SPECS["calibrate"].base, "--model", "FILE"],
]
HARDWARE_USES = [
    ["simulate", "--hardware", "FILE"],
    ["serve", "--duration-s", "1", "--hardware", "FILE"],
    ["sweep", "--workers", "1", "--no-progress", "--hardware", "FILE"],
    ["plan", *SPECS["plan"].base, "--hardware", "FILE"],
]


def _run(command: list[str], data: bytes, sandbox: Path, data_cache: Path) -> None:
    n = next(_serial)
    file = sandbox / "tomls" / f"case-{n}.toml"
    file.parent.mkdir(exist_ok=True)
    file.write_bytes(data)
    argv = [str(file) if t == "FILE" else str(data_cache) if t == "@cache" else t for t in command]
    check(run_case([*argv, "--json", "--run-dir", str(sandbox / "runs" / f"toml-{n}")]))


@settings(FUZZ, max_examples=250)
@given(command=st.sampled_from(MODEL_USES), data=model_files())
def test_model_files(command, data, sandbox, data_cache) -> None:
    _run(command, data, sandbox, data_cache)


@settings(FUZZ, max_examples=150)
@given(command=st.sampled_from(HARDWARE_USES), data=hardware_files())
def test_hardware_files(command, data, sandbox, data_cache) -> None:
    _run(command, data, sandbox, data_cache)


@settings(FUZZ, max_examples=150)
@given(data=grid_files())
def test_sweep_grid_files(data, sandbox, data_cache) -> None:
    _run(["sweep", "--workers", "1", "--no-progress", "--grid", "FILE"], data, sandbox, data_cache)


@settings(FUZZ, max_examples=25)
@given(data=report_files())
def test_report_config_files(data, sandbox, data_cache) -> None:
    _run(["report", *SPECS["report"].base, "--config", "FILE"], data, sandbox, data_cache)
