"""Config files, mutated: model, hardware, sweep grid and report TOMLs built from the real
fields, then given wrong types, NaN/Inf, huge or negative values, missing and extra keys,
nested tables, or damaged as bytes (not UTF-8, truncated, empty, not TOML at all)."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from hypothesis import strategies as st

from longcat_sim.cluster.hardware import get_hardware
from longcat_sim.config.deployment import DecodeDeployment
from longcat_sim.config.report import ReportConfig
from longcat_sim.model.config import get_preset

MODEL = get_preset("tiny").to_dict()
HARDWARE = {k: v for k, v in dataclasses.asdict(get_hardware("H800")).items() if k not in ("name",)}
GRID = {"model": ["tiny"], "gpus": [8], "ep": [8], "batch_per_device": [8, 16], "seed": [0]}
GRID_KEYS = [f.name for f in dataclasses.fields(DecodeDeployment)]
# the report's own cost fields stay on the command line (options win over the file)
REPORT = {"seed": 1, "context": 4000, "attention_dtype": "bf16", "timeline_layers": 1}
REPORT_KEYS = [f.name for f in dataclasses.fields(ReportConfig)]

BAD_VALUES: list[Any] = [
    math.nan, math.inf, -math.inf, 0, -1, 2**31, 2**63 - 1, -(2**63), 1e308, 0.5, "abc", "",
    True, [1, 2], [], {"a": 1}, "tiny", "é💥",
]  # fmt: skip
BROKEN_BYTES = [b"", b"[]", b"null", b"\xff\xfe\x00garbage", b"[model", b"= 1", b"\x00" * 16]


def _value(v: Any) -> str:
    """One TOML value (inline tables and arrays included)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return (
            "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
        )
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(str(k))} = {_value(x)}" for k, x in v.items()) + "}"


def dumps(table: dict[str, Any], name: str | None) -> str:
    """``table`` as TOML, under ``[name]`` (or at the top level when ``name`` is None)."""
    body = "".join(f"{json.dumps(str(k))} = {_value(v)}\n" for k, v in table.items())
    return body if name is None else f"[{name}]\n{body}"


@st.composite
def mutated(
    draw: st.DrawFn, base: dict[str, Any], keys: list[str], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``base`` with one to three keys set to bad values, deleted, or added."""
    table = dict(base) | dict(extra or {})
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([*keys, "nope", ""]))
        op = draw(st.sampled_from(["set", "set", "delete", "list"]))
        if op == "delete":
            table.pop(key, None)
        elif op == "list":
            table[key] = [draw(st.sampled_from(BAD_VALUES)), draw(st.sampled_from(BAD_VALUES))]
        else:
            table[key] = draw(st.sampled_from(BAD_VALUES))
    return table


@st.composite
def toml_bytes(draw: st.DrawFn, table: dict[str, Any], name: str) -> bytes:
    """A table as a file: under ``[name]``, at the top level, nested one table too deep, or
    damaged as bytes."""
    layout = draw(st.sampled_from(["table", "table", "top", "nested", "bytes", "truncated"]))
    if layout == "bytes":
        return draw(st.sampled_from(BROKEN_BYTES))
    if layout == "nested":
        return dumps({name: table}, name).encode()
    text = dumps(table, None if layout == "top" else name).encode()
    if layout == "truncated":
        return text[: draw(st.integers(0, max(0, len(text) - 1)))]
    if draw(st.integers(0, 9)) == 0:  # one byte that is not UTF-8
        at = draw(st.integers(0, len(text)))
        return text[:at] + b"\xc3\x28" + text[at:]
    return text


def model_files() -> st.SearchStrategy[bytes]:
    """Model TOMLs: the tiny preset's fields (or ``preset = "tiny"`` and a few), mutated."""
    full = mutated(MODEL, list(MODEL))
    based = mutated({"preset": "tiny", "num_layers": 1}, [*MODEL, "preset"])
    return st.one_of(full, based).flatmap(lambda t: toml_bytes(t, "model"))


def hardware_files() -> st.SearchStrategy[bytes]:
    """Hardware TOMLs: H800's fields in full or as ``base = "H800"`` and overrides, mutated."""
    full = mutated(HARDWARE, list(HARDWARE))
    based = mutated({"base": "H800", "hbm_gb": 80.0}, [*HARDWARE, "base"])
    return st.one_of(full, based).flatmap(lambda t: toml_bytes(t, "hardware"))


def grid_files() -> st.SearchStrategy[bytes]:
    """Sweep grid TOMLs: a small valid grid, mutated (``assume`` included)."""
    table = mutated(GRID, [*GRID_KEYS, "assume"])
    return table.flatmap(lambda t: toml_bytes(t, "grid"))


def report_files() -> st.SearchStrategy[bytes]:
    """Report TOMLs: a few ``[report]`` settings, mutated."""
    return mutated(REPORT, REPORT_KEYS).flatmap(lambda t: toml_bytes(t, "report"))
