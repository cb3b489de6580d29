"""One self-contained HTML page: plotly.js from the installed plotly package, figures embedded as
JSON with sorted keys under fixed div ids, no timestamps, random ids or network requests, so
the same inputs give the same bytes and the page works offline.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import plotly
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.utils import PlotlyJSONEncoder

from longcat_sim.reports.tables import Table

_ID = re.compile(r"[a-z][a-z0-9-]*")
PLOT_CONFIG = {"displaylogo": False, "responsive": True}

_CSS = """
body { font-family: Helvetica, Arial, sans-serif; color: #222; margin: 0; background: #fafafa; }
main { max-width: 1180px; margin: 0 auto; padding: 16px 28px 48px; background: #fff; }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 20px; margin: 34px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
p, li { line-height: 1.45; font-size: 14px; }
.subtitle { color: #555; margin: 0 0 10px; }
nav a { margin-right: 14px; font-size: 14px; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 13px; }
caption { text-align: left; font-size: 13px; color: #444; padding: 4px 0; caption-side: top; }
th, td { border: 1px solid #ddd; padding: 4px 8px; }
th { background: #f2f2f2; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.good, td.fair, td.miss { text-align: right; font-variant-numeric: tabular-nums; }
td.good { background: #e3f3e1; }
td.fair { background: #fdf1d8; }
td.miss { background: #fbe0de; }
.figure { width: 100%; margin: 6px 0 10px; }
.note { color: #666; font-size: 13px; }
.verdict { font-size: 16px; padding: 10px 14px; border-radius: 4px; margin: 8px 0; }
.verdict.identical { background: #e3f3e1; border: 1px solid #7fbf7b; }
.verdict.diverged { background: #fbe0de; border: 1px solid #d6604d; }
.verdict.control { background: #e4ecf7; border: 1px solid #6b8fc7; }
.verdict.control-failed { background: #fbe0de; border: 2px solid #b2182b; font-weight: 600; }
"""


@dataclass(frozen=True)
class Figure:
    """A figure and the fixed id of the div it is drawn into."""

    div_id: str
    figure: go.Figure

    def __post_init__(self) -> None:
        if not _ID.fullmatch(self.div_id):
            raise ValueError(
                f"figure id {self.div_id!r} must be lower-case letters, digits and dashes"
            )


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def figure_json(fig: go.Figure) -> str:
    """Canonical JSON of a figure: sorted keys, no whitespace, safe inside a <script> element."""
    text = json.dumps(
        fig.to_plotly_json(),
        cls=PlotlyJSONEncoder,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def figure_div(div_id: str) -> str:
    return f'<div id="{esc(div_id)}" class="figure"></div>'


def table_html(table: Table) -> str:
    lines = ["<table>", f"<caption>{esc(table.caption)}</caption>"]
    if table.groups:
        spans = "".join(
            f'<th colspan="{n}">{esc(label)}</th>' if n > 1 else f"<th>{esc(label)}</th>"
            for label, n in table.groups
        )
        lines.append(f"<tr>{spans}</tr>")
    if any(table.columns):
        lines.append("<tr>" + "".join(f"<th>{esc(c)}</th>" for c in table.columns) + "</tr>")
    for row in table.rows:
        cells = "".join(
            f'<td class="{cell.kind}">{esc(cell.text)}</td>'
            if cell.kind
            else f"<td>{esc(cell.text)}</td>"
            for cell in row
        )
        lines.append(f"<tr>{cells}</tr>")
    lines.append("</table>")
    return "\n".join(lines)


@cache
def plotly_js() -> str:
    """The plotly.js bundle shipped inside the installed plotly package."""
    return get_plotlyjs()


def page(title: str, body: str, figures: Sequence[Figure]) -> str:
    """The whole document: ``body`` (HTML holding a ``figure_div`` per figure) and one script that
    draws every figure into its div."""
    ids = [f.div_id for f in figures]
    if len(set(ids)) != len(ids):
        raise ValueError(f"figure ids must be unique, got {ids}")
    config = json.dumps(PLOT_CONFIG, sort_keys=True, separators=(",", ":"))
    draws = "\n".join(
        f'(function (fig) {{ Plotly.newPlot("{f.div_id}", fig.data, fig.layout, {config}); }})'
        f"({figure_json(f.figure)});"
        for f in figures
    )
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f'<meta name="generator" content="longcat-sim report, plotly {esc(plotly.__version__)}">',
            f"<title>{esc(title)}</title>",
            f"<style>{_CSS}</style>",
            f'<script type="text/javascript">{plotly_js()}</script>',
            "</head>",
            "<body>",
            "<main>",
            body,
            "</main>",
            f'<script type="text/javascript">\n{draws}\n</script>',
            "</body>",
            "</html>",
            "",
        ]
    )
