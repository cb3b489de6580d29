"""Request traces, generated and damaged (CSV and JSONL: odd headers, timestamps that are not
times, token counts that are not counts, bytes that are not UTF-8), replayed by ``serve`` and
planned for by ``plan``, keep the command line's contract."""

from __future__ import annotations

import itertools
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz.conftest import FUZZ
from tests.fuzz.harness import check, run_case
from tests.fuzz.pools import PLAN_BASE

HEADERS = [("timestamp", "input_tokens", "output_tokens"),
           ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
           ("timestamp", "input", "output_tokens"), ("t",)]  # fmt: skip
TIMES = [0, 1, 0.5, -1, 1e308, "nan", "inf", "2023-11-16 18:15:46.68", "2023-13-40", "", "x"]
TOKENS = [1, 512, 0, -1, 1.5, 1e308, 2**63, "nan", "12", "", "x", None, [1]]
USES = [
    ["serve", "--duration-s", "1", "--trace", "FILE"],
    ["serve", "--duration-s", "1", "--rate", "1", "--trace", "FILE"],
    ["plan", *PLAN_BASE, "--trace", "FILE"],
]
_serial = itertools.count()


@st.composite
def traces(draw: st.DrawFn) -> tuple[str, bytes]:
    """``(suffix, bytes)`` of a trace of up to 5 rows: valid ones, with one cell often
    replaced by a value from the pools above."""
    header = draw(st.sampled_from([HEADERS[0], HEADERS[1], *HEADERS]))
    row = st.tuples(st.sampled_from(TIMES[:3]), *[st.sampled_from(TOKENS[:2])] * 2)
    rows = [list(r) for r in draw(st.lists(row, max_size=5))]
    if rows and draw(st.booleans()):
        r, c = draw(st.integers(0, len(rows) - 1)), draw(st.integers(0, 2))
        rows[r][c] = draw(st.sampled_from(TIMES if c == 0 else TOKENS))
    suffix = draw(st.sampled_from([".csv", ".jsonl"]))
    if suffix == ".jsonl":
        lines = [json.dumps(dict(zip(header, row, strict=False))) for row in rows]
        text = "\n".join([*lines, *draw(st.sampled_from([[], ["[]"], ["{"], ["null"]]))])
    else:
        lines = [",".join(str(v) for v in row[: len(header)]) for row in rows]
        text = "\n".join([",".join(header), *lines])
    data = text.encode()
    if draw(st.integers(0, 9)) == 0:
        data = b"\xff" + data
    return suffix, data


@settings(FUZZ, max_examples=120)
@given(command=st.sampled_from(USES), trace=traces())
def test_trace_files(command, trace, sandbox) -> None:
    suffix, data = trace
    n = next(_serial)
    file = sandbox / "traces" / f"case-{n}{suffix}"
    file.parent.mkdir(exist_ok=True)
    file.write_bytes(data)
    argv = [str(file) if t == "FILE" else t for t in command]
    check(run_case([*argv, "--json", "--run-dir", str(sandbox / "runs" / f"trace-{n}")]))
