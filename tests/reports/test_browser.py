"""The report in a real browser: headless Chromium opens the page from disk (offline), and the test
reads back from the rendered DOM that no script failed, nothing was fetched and every figure drew
its data, and from a screenshot that the page is not blank.

The page is opened with two scripts injected by the test: one first in <head> that collects
errors (``error`` and ``unhandledrejection`` events, ``console.error``), one last in <body> that,
after load, writes a JSON probe into the DOM, which ``--dump-dom`` prints.
"""

from __future__ import annotations

import html as html_module
import json
import re
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from longcat_sim.reports.page import build_report
from tests.reports import sample_report_data

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")

# Without the networking flags a closed network refuses Chromium's background connections.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=20000",
)

COLLECTOR = """<script>
window.__errors = [];
window.addEventListener("error", function (e) { window.__errors.push(String(e.message || e)); });
window.addEventListener("unhandledrejection", function (e) {
  window.__errors.push("unhandled rejection: " + String(e.reason));
});
(function () {
  var original = console.error;
  console.error = function () {
    window.__errors.push("console.error: " + Array.prototype.join.call(arguments, " "));
    original.apply(console, arguments);
  };
})();
</script>"""

PROBE = """<script>
window.addEventListener("load", function () { setTimeout(function () {
  var figures = Array.prototype.map.call(document.querySelectorAll("div.figure"), function (gd) {
    var traces = (gd._fullData || []).map(function (t) {
      return (t.z || t.x || t.y || []).length;
    });
    // drawn marks: trace paths with a non-empty outline and heat-map images
    var marks = Array.prototype.filter.call(
      gd.querySelectorAll("g.trace path, g.hm image, g.trace image"),
      function (el) {
        var d = el.getAttribute("d");
        return el.tagName === "image" || (d && d !== "M0,0Z" && d !== "M0,0");
      }
    );
    // greyed marks: traces or points drawn at under half opacity (do not fit in HBM)
    var faint = Array.prototype.filter.call(
      gd.querySelectorAll("g.trace, g.points path, path.point"),
      function (el) { var o = el.style.opacity; return o !== "" && parseFloat(o) < 0.5; }
    );
    return {id: gd.id, plotly: gd.classList.contains("js-plotly-plot"), traces: traces,
            marks: marks.length, faint: faint.length};
  });
  var probe = document.createElement("pre");
  probe.id = "test-probe";
  probe.textContent = JSON.stringify({
    errors: window.__errors,
    figures: figures,
    resources: performance.getEntriesByType("resource").map(function (r) { return r.name; })
  });
  document.body.appendChild(probe);
}, 1000); });
</script>"""


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    return subprocess.run(
        [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def probe_page(html: str, tmp_path: Path, window: str = "1280,1000") -> tuple[dict, np.ndarray]:
    """Render ``html`` with the collector and probe injected, in one Chromium run: the probe's
    JSON and a screenshot of the first ``window`` pixels (RGB array)."""
    assert html.count("<head>") == 1 and html.count("</body>") == 1
    instrumented = html.replace("<head>", "<head>\n" + COLLECTOR).replace(
        "</body>", PROBE + "\n</body>"
    )
    path = tmp_path / "probed.html"
    path.write_text(instrumented)
    shot = tmp_path / "probed.png"
    done = run_chromium(
        tmp_path, f"--window-size={window}", f"--screenshot={shot}", "--dump-dom", path.as_uri()
    )
    assert done.returncode == 0, done.stderr[-2000:]
    match = re.search(r'<pre id="test-probe">(.*?)</pre>', done.stdout, re.S)
    assert match, "the probe never ran: " + done.stderr[-2000:]
    return json.loads(html_module.unescape(match.group(1))), png_pixels(shot.read_bytes())


def _unfilter(kind: int, line: bytearray, prev: bytearray, bpp: int) -> bytearray:
    """Undo one PNG row filter (None, Sub, Up, Average, Paeth)."""
    if kind == 0:
        return line
    if kind == 2:
        return bytearray((np.frombuffer(line, np.uint8) + np.frombuffer(prev, np.uint8)).tobytes())
    for x in range(len(line)):
        a = line[x - bpp] if x >= bpp else 0
        if kind == 1:
            predictor = a
        elif kind == 3:
            predictor = (a + prev[x]) >> 1
        else:
            b, c = prev[x], prev[x - bpp] if x >= bpp else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            predictor = a if pa <= pb and pa <= pc else b if pb <= pc else c
        line[x] = (line[x] + predictor) & 255
    return line


def png_pixels(data: bytes) -> np.ndarray:
    """Decode an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium writes) to height x
    width x RGB."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks, header = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and interlace == 0 and color in (2, 6), header
    bpp = 3 if color == 2 else 4
    stride = width * bpp
    raw = zlib.decompress(b"".join(chunks))
    out = bytearray()
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        line = _unfilter(raw[start], bytearray(raw[start + 1 : start + 1 + stride]), prev, bpp)
        out += line
        prev = line
    return np.frombuffer(bytes(out), dtype=np.uint8).reshape(height, width, bpp)[:, :, :3]


def screenshot(html_path: Path, tmp_path: Path, size: str = "1280,1600") -> np.ndarray:
    shot = tmp_path / "shot.png"
    done = run_chromium(
        tmp_path, f"--window-size={size}", f"--screenshot={shot}", html_path.as_uri()
    )
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    return png_pixels(shot.read_bytes())


def assert_every_figure_drew(probe: dict, expected_ids: list[str]) -> None:
    assert probe["errors"] == []
    assert probe["resources"] == []  # nothing fetched: plotly.js and data are inline
    assert [f["id"] for f in probe["figures"]] == expected_ids
    for figure in probe["figures"]:
        assert figure["plotly"], f"{figure['id']} was not drawn by plotly"
        assert figure["traces"] and all(n > 0 for n in figure["traces"]), figure
        assert figure["marks"] >= len(figure["traces"]), f"{figure['id']}: too few drawn marks"


# -- the tests --------------------------------------------------------------------------------


def test_every_section_renders_and_the_probe_catches_faults(tmp_path: Path) -> None:
    """Every figure of a report with all optional sections draws its data without errors. The
    same page carries two injected faults, an empty figure and a failing script, which the probe
    must report: the negative control."""
    report = build_report(sample_report_data())
    ids = [f.div_id for f in report.figures]
    faulty = report.html.replace(
        "</main>",
        '<div id="fig-empty" class="figure"></div>'
        "<script>Plotly.newPlot('fig-empty', [], {}); undefinedFunction();</script></main>",
    )
    probe, pixels = probe_page(faulty, tmp_path)
    assert pixels.std() > 20.0
    assert len(probe["errors"]) == 1 and "undefinedFunction" in probe["errors"][0]
    empty = probe["figures"].pop()
    assert empty["id"] == "fig-empty" and empty["traces"] == [] and empty["marks"] == 0
    with pytest.raises(AssertionError):
        assert_every_figure_drew({**probe, "figures": [empty]}, ["fig-empty"])
    assert_every_figure_drew({**probe, "errors": []}, ids)
    faint = {f["id"]: f["faint"] for f in probe["figures"]}
    # the sample's points that do not fit in HBM are drawn greyed; figures without any are not
    assert faint["fig-memory"] >= 4  # the four parts of each model's batch-192 bar
    assert faint["fig-pareto"] >= 2  # LongCat's batch 256, in both panels
    assert faint["fig-training-overlap"] == 0 and faint["fig-sdc"] == 0
    assert faint["fig-serving-latency"] == 0 and faint["fig-serving-load"] == 0


def test_negative_control_a_blank_page_has_no_pixel_variance(tmp_path: Path) -> None:
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    assert screenshot(blank, tmp_path, "320,240").std() < 1.0
