"""Command lines for every command: its real flags (read from its parser) with valid, boundary
and junk values, a cheap valid base that keeps accepted cases fast, and junk tokens.

A flag's values come from its parser action: switches take none, ``choices`` their choices,
``int``/``float``/``Path``/comma-list types the matching pools, other strings a pool of names
the project knows, junk and paths. Half the time a flag takes a plausible value instead (its
default or a small size), so one bad value often meets otherwise valid input. The flags that
decide how long an accepted run takes have their own pools in ``SPECS``: small valid values or
values that must be refused, never a huge valid size, so every accepted case stays fast.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from hypothesis import strategies as st

from longcat_sim.cli import COMMANDS, build_parser

HUGE_INTS = [str(2**31), str(2**63), str(-(2**63)), "9" * 40]
INTS = ["0", "1", "2", "8", "-1", *HUGE_INTS, "1.5", "1e3", "0x10", "٣", " 7", "1_000"]
FLOATS = ["0", "0.5", "1", "-1", "1e308", "-1e308", "1e999", "nan", "inf", "-inf", "1e-320"]
JUNK = ["", " ", "abc", "💥", "\x00", "-", "--", "x" * 300, "é/ü", "null", "[]", "true"]
NAMES = [
    "tiny", "small", "longcat-flash", "deepseek-v3", "H800", "h20", "B200", "sbo", "tbo",
    "baseline", "scmoe", "default", "train", "balanced", "bf16", "fp8", "poisson", "gamma",
    "colocated", "disagg", "local", "refuse", "flag", "layerwise", "end", "azure-conv",
    "azure-code", "constant", "cosine", "exponential",
]  # fmt: skip
JUNK_TOKENS = ["--nope", "-x", "--json=1", "--model=", "--", "stray", "--run-dir", "-h"]

# the paths a path flag may name; the fuzz folder's fixture creates them (see conftest)
PATH_KINDS = [
    "missing", "file", "dir", "empty-file", "below-file", "long-name", "unicode", "toml-file",
    "toml-dir", "csv-file", "jsonl-file",
]  # fmt: skip


@dataclass(frozen=True)
class Flag:
    option: str
    kind: str  # switch, choice, int, float, path, ints, floats, names, str, set, assume, paths
    choices: tuple[str, ...] = ()
    default: str | None = None  # the parser's default, or the one its help states


@dataclass(frozen=True)
class Spec:
    """A command's cheap valid base (every case starts with it; later flags override it) and
    the pools of the flags whose values decide the cost of an accepted run."""

    base: tuple[str, ...]
    pools: dict[str, list[str]]


CACHE = "@cache"  # replaced by the session's data cache folder
SMALL = ["0", "-1", "", "abc", "nan"]  # refused values of any size flag
TRAIN_BASE = (
    "--model", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
    "--byte-budget", "262144", "--eval-every", "1", "--eval-batches", "1",
    "--data-cache", CACHE,
)  # fmt: skip
REPORT_BASE = (
    "--no-png", "--compare-models", "longcat-flash", "--batch-per-device", "8",
    "--prompt-len", "512", "--serve-duration-s", "1", "--timeline-batch-per-device", "8",
)  # fmt: skip
PLAN_BASE = (
    "--rate", "1", "--workers", "1", "--verify", "1", "--verify-duration-s", "1",
    "--gpus", "8", "--batch-per-device", "8", "--tokens-per-device", "512",
    "--layout", "colocated", "--prefill-gpus", "8", "--hardware", "H800",
)  # fmt: skip
DETERMINISM_BASE = (
    "--runs", "2", "--steps", "1", "--batch-size", "1", "--seq-len", "8",
    "--byte-budget", "262144", "--data-cache", CACHE, "--workers", "1",
)  # fmt: skip
SDC_BASE = (
    "--batch-size", "1", "--seq-len", "8", "--trials", "1", "--clean-runs", "1",
    "--attribution-events", "1", "--overhead-rounds", "0", "--sites", "weight", "--bits", "0",
    "--byte-budget", "262144", "--data-cache", CACHE,
)  # fmt: skip
CALIBRATE_BASE = (
    "--steps", "4", "--seq-len", "8", "--batch-sizes", "2", "--nproc", "2", "--data-cache", CACHE,
)  # fmt: skip
SPECS: dict[str, Spec] = {
    "params": Spec(("--json",), {}),
    "train": Spec(
        TRAIN_BASE,
        {
            "--model": ["tiny", "longcat-flash", "nope", "x.toml", *JUNK[:4]],
            "--steps": ["1", "2", "3", *SMALL],
            "--batch-size": ["1", "2", "4", *SMALL],
            "--seq-len": ["1", "8", "16", "2048", *SMALL],
            "--byte-budget": ["262144", "1", *SMALL],
            "--eval-batches": ["1", "2", *SMALL],
            "--threads": ["1", "2", "100000", *HUGE_INTS, *SMALL],
            "--data-cache": [CACHE, "missing", "file", "below-file", ""],
        },
    ),
    "report": Spec(
        REPORT_BASE,
        {
            "--compare-models": ["longcat-flash", "tiny", "nope", "", ",", "tiny,tiny"],
            "--batch-per-device": ["8", "1", "8,16", *SMALL, ","],
            "--prompt-len": ["512", "1", "512,1024", *SMALL, ","],
            "--serve-duration-s": ["1", "0.5", *SMALL, "inf", "-inf"],
            "--serve-rate-scale": ["1", "2", *SMALL, "inf"],
            "--timeline-batch-per-device": ["8", "1", *SMALL],
        },
    ),
    "simulate": Spec(("--json",), {}),
    "sweep": Spec(
        ("--workers", "1", "--no-progress"),
        {"--workers": ["1", *SMALL]},
    ),
    "serve": Spec(
        ("--duration-s", "1"),
        {
            "--duration-s": ["1", "0.5", *SMALL, "inf", "-inf"],
            "--rate": ["1", "20", *SMALL, "inf"],
            "--warmup-s": ["0", "0.5", *SMALL, "inf"],
            "--instances": ["1", "2", *SMALL],
            "--prefill-instances": ["1", "2", *SMALL],
        },
    ),
    "plan": Spec(
        PLAN_BASE,
        {
            "--rate": ["1", "0.5", *SMALL, "inf"],
            "--workers": ["1", *SMALL],
            "--verify": ["1", "0", *SMALL],
            "--verify-duration-s": ["1", *SMALL, "inf"],
            "--gpus": ["8", "16", "8,16", *SMALL, ","],
            "--batch-per-device": ["8", "16", *SMALL, ","],
            "--tokens-per-device": ["512", "1024", *SMALL, ","],
            "--prefill-gpus": ["8", "16", *SMALL, ","],
            "--hardware": ["H800", "H20", "h800,B200", "nope", "", ",", "hw.toml"],
            "--layout": ["colocated", "disagg", "colocated,disagg", "nope", "", ","],
            "--executor": ["local", "ray", "nope", ""],
            "--address": ["127.0.0.1:1", "", "nope"],
        },
    ),
    "determinism": Spec(
        DETERMINISM_BASE,
        {
            "--byte-budget": ["262144", "1", *SMALL],
            "--model": ["tiny", "longcat-flash", "nope", "x.toml", *JUNK[:4]],
            "--threads": ["1", "1,2", "100000", *HUGE_INTS, *SMALL, ",", "1,,2"],
            "--inject": [
                "weight:3",
                "combine:70:0",
                "gradient:1:0:2",
                "nope:1",
                "weight",
                "",
                ":::",
            ],
            "--data-cache": [CACHE, "missing", "file", "below-file", ""],
        },
    ),
    "sdc": Spec(
        SDC_BASE,
        {
            "--model": ["tiny", "longcat-flash", "nope", "x.toml", *JUNK[:4]],
            "--batch-size": ["1", "2", "100000", *SMALL],
            "--seq-len": ["1", "8", "2048", *SMALL],
            "--trials": ["1", "2", *SMALL],
            "--overhead-rounds": ["0", "1", *SMALL],
            "--clean-runs": ["1", "2", *SMALL],
            "--attribution-events": ["1", "2", *SMALL],
            "--recompute-experts": ["0", "1", "8", "9", *HUGE_INTS, *SMALL],
            "--threads": ["1", "2", "100000", *HUGE_INTS, *SMALL],
            "--sites": ["weight", "activation,combine", "routing_indices", "nope", "", ",", "all"],
            "--bits": ["0", "0-3", "31", "63", "64", "-1", "0-9999999999", "3-1", "a", ""],
        },
    ),
    "calibrate": Spec(
        CALIBRATE_BASE,
        {
            "--model": ["tiny", "longcat-flash", "nope", "x.toml", *JUNK[:4]],
            "--nproc": ["2", "2,4", "1", "0", "-1", "", ",", "a", *HUGE_INTS],
            "--batch-sizes": ["2", "4,8", "1", "0", "", ",", "a", *HUGE_INTS],
            "--wire-mbit": FLOATS,
            "--data-cache": [CACHE, "missing", "file", "below-file", ""],
        },
    ),
}


def _kind(action: argparse.Action) -> str:
    type_name = getattr(action.type, "__name__", "")
    if action.nargs == 0:
        return "switch"
    if action.dest == "overrides":
        return "set"
    if action.dest == "assume":
        return "assume"
    if isinstance(action, argparse._AppendAction):
        return "paths" if type_name in ("Path", "path_arg") else "str"
    if action.choices:
        return "choice"
    return {
        "int": "int",
        "float": "float",
        "Path": "path",
        "path_arg": "path",
        "list of int": "ints",
        "list of float": "floats",
        "list of str": "names",
    }.get(type_name, "str")


@cache
def flags(command: str) -> tuple[Flag, ...]:
    """The command's options as its parser declares them (``--help`` and ``--run-dir`` aside:
    the fuzz test places those itself)."""
    parser = build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = []
    for action in sub.choices[command]._actions:
        for option in action.option_strings:
            if option.startswith("--") and option not in ("--help", "--run-dir"):
                choices = tuple(str(c) for c in action.choices or ())
                found.append(Flag(option, _kind(action), choices, _default(action)))
    return tuple(found)


def _default(action: argparse.Action) -> str | None:
    if isinstance(action.default, int | float | str) and not isinstance(action.default, bool):
        return str(action.default)
    stated = re.search(r"\(default ([^;)]+)", " ".join((action.help or "").split()))
    return stated.group(1).strip() if stated and stated.group(1) != "unset" else None


def plausible(command: str, flag: Flag) -> list[str]:
    """Values a user would likely give: the spec's first (valid) values, or the default and
    small sizes."""
    if flag.option in SPECS[command].pools:
        return SPECS[command].pools[flag.option][:2]
    small = {"int": ["1", "2"], "float": ["0.5", "1"], "ints": ["8"], "floats": ["1"]}
    found = [flag.default] if flag.default else []
    return [*found, *small.get(flag.kind, []), *flag.choices]


def _pool(flag: Flag) -> list[str]:
    if flag.kind == "choice":
        return [*flag.choices, "nope", ""]
    if flag.kind == "int":
        return INTS
    if flag.kind == "float":
        return [*FLOATS, "abc", ""]
    if flag.kind in ("path", "paths"):
        return PATH_KINDS
    if flag.kind == "ints":
        return ["1", "8", "8,16", "0", "-1", ",", "1,,2", str(2**31), str(2**63), "a"]
    if flag.kind == "floats":
        return ["0.5", "1", "1,2", "0", "-1", "nan", "inf", "1e308", ",", "a"]
    return [*NAMES, *JUNK, *PATH_KINDS]


SET_KEYS = [
    "steps", "balance_alpha", "warmup_steps", "lr", "checkpoint_every", "slice_size",
    "bias_rate", "nope", "model.num_layers", "model.initializer_range", "model.moe_topk",
    "model.hidden_size", "model.nope", "model.deterministic", "model.kernels", "",
]  # fmt: skip
SET_VALUES = ["0", "1", "2", "-1", "nan", "inf", "abc", "", "true", "[1]", "1e308", "0.5"]
ASSUME_TERMS = ["routing", "context_cv", "mtp_accept", "nope", "", "spread", "hbm_runtime_gb"]
ASSUME_VALUES = ["balanced", "0.5", "0", "-1", "nan", "inf", "1e308", "", "abc"]


@st.composite
def flag_tokens(draw: st.DrawFn, command: str, flag: Flag) -> list[str]:
    """``flag`` with one drawn value (none for a switch), sometimes as ``--flag=value``."""
    if flag.kind == "switch":
        return [flag.option]
    if flag.kind == "set":
        key, value = draw(st.sampled_from(SET_KEYS)), draw(st.sampled_from(SET_VALUES))
        value = draw(st.sampled_from([f"{key}={value}", key, f"={value}"]))
    elif flag.kind == "assume":
        term, value = draw(st.sampled_from(ASSUME_TERMS)), draw(st.sampled_from(ASSUME_VALUES))
        value = draw(st.sampled_from([f"{term}={value}", term]))
    else:
        likely = plausible(command, flag)
        if likely and draw(st.integers(0, 9)) < 5:
            value = draw(st.sampled_from(likely))
        else:
            value = draw(st.sampled_from(SPECS[command].pools.get(flag.option) or _pool(flag)))
    if draw(st.integers(0, 9)) == 0:
        return [f"{flag.option}={value}"]
    return [flag.option, value]


@st.composite
def command_lines(draw: st.DrawFn, command: str, max_flags: int = 6) -> tuple[list[str], str]:
    """``(argv after the base, run directory kind)`` for ``command``; repeatable options
    (``--set``, ``--assume``) may come twice."""
    options = flags(command)
    chosen = draw(st.lists(st.sampled_from(options), max_size=max_flags, unique=True))
    chosen += [f for f in chosen if f.kind in ("set", "assume") and draw(st.booleans())]
    tokens: list[str] = []
    for flag in chosen:
        tokens += draw(flag_tokens(command, flag))
    if draw(st.integers(0, 7)) == 0:
        at = draw(st.integers(0, len(tokens)))
        tokens.insert(at, draw(st.sampled_from([*JUNK_TOKENS, *JUNK])))
    run_dir = draw(st.sampled_from(["fresh"] * 6 + ["none", "file", "below-file", "dir"]))
    return tokens, run_dir


def resolve(token: str, paths: dict[str, Path], cache_dir: Path) -> str:
    """A path kind or the cache placeholder as a real path; anything else as it is."""
    if token == CACHE:
        return str(cache_dir)
    if token in paths:
        return str(paths[token])
    return token


assert set(SPECS) == set(COMMANDS), "every command needs a fuzz spec"
