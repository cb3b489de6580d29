"""``longcat-sim report``: one self-contained HTML page (and PNG figures) from the simulator and
from other commands' run directories.

Writes ``DIR/report.html`` (``--run-dir``, default ``runs/report/CONFIG_HASH``), ``DIR/figures/*.png``
when kaleido and a Chromium are present, and the simulations it ran under ``DIR/cache`` keyed
by their inputs' hash, so a second report with the same settings simulates nothing. Without
``--determinism-run`` / ``--sdc-run`` it runs a quick ``determinism`` and ``sdc`` itself
(``report.repro``: their command lines parsed by the command's own parser and run in this
process), cached the same way; ``--no-repro`` leaves them out.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from longcat_sim.commands.base import CommandOutput
from longcat_sim.config.flags import add_config_flags, given_options, set_values
from longcat_sim.config.paths import path_arg
from longcat_sim.config.report import ReportConfig, load_report_config
from longcat_sim.errors import UserError
from longcat_sim.report import sections
from longcat_sim.report.pngs import PNG_DIR, write_pngs
from longcat_sim.reports import tables
from longcat_sim.reports.inputs import ReportInputError
from longcat_sim.reports.page import build_report
from longcat_sim.runs import claim_run_dir, default_run_dir, write_text_atomic

HELP = "HTML report: paper tables vs simulator, timelines, Pareto front, training results"
REPORT_NAME = "report.html"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=path_arg,
        default=None,
        metavar="FILE",
        help="TOML file whose [report] table overrides the default settings (options win)",
    )
    add_config_flags(parser, ReportConfig)
    parser.add_argument(
        "--train-run",
        type=path_arg,
        action="append",
        default=[],
        metavar="DIR",
        help="a longcat-sim train run directory to plot (repeatable)",
    )
    parser.add_argument(
        "--determinism-run", type=path_arg, default=None, metavar="DIR", help="determinism result"
    )
    parser.add_argument(
        "--sdc-run",
        type=path_arg,
        default=None,
        metavar="DIR",
        help="silent-data-corruption result",
    )
    parser.add_argument(
        "--repro",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="without --determinism-run / --sdc-run, run a quick determinism check and bit-flip "
        "campaign on the tiny model, cached like the simulations (default on; --no-repro skips)",
    )
    parser.add_argument(
        "--png",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write PNG figures through kaleido when Chromium is present (default on)",
    )


class _CommandParser(argparse.ArgumentParser):
    """A command's parser for the report's quick runs: a refused option is one line."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message}")


def run_command(argv: Sequence[str]) -> dict[str, Any]:
    """Results of one ``longcat-sim COMMAND ...`` line run in this process, as the command line
    would run it (its module's options beside ``--json`` and ``--run-dir``), without writing a
    run directory."""
    name, *rest = argv
    module = importlib.import_module(f"longcat_sim.commands.{name}")

    def build() -> argparse.ArgumentParser:
        parser = _CommandParser(prog=f"longcat-sim {name}", add_help=False)
        parser.add_argument("--json", action="store_true")
        parser.add_argument("--run-dir", type=path_arg, default=None)
        module.add_arguments(parser)
        return parser

    args = build().parse_args(rest)
    args.command, args._module = name, module
    args.given_options = given_options(build, rest)
    return module.run(args).results


def _summary(data: dict) -> dict:
    """The headline numbers: errors against the paper and the simulated shares."""
    t7 = tables.table7_errors(data["table7"])
    t6 = tables.table6_errors(data["table6"])
    overlap = data["training_overlap"]["simulated"]
    return {
        "table7_relative_error": t7,
        "table6_relative_error": [
            {"label": row["label"], **err}
            for row, err in zip(data["table6"]["rows"], t6, strict=True)
        ],
        "training_exposed_comm_share": {
            s: overlap[s]["exposed_comm_share"] for s in ("baseline", "scmoe")
        },
        "timelines": {
            name: {k: v for k, v in s.items() if k != "events"}
            for name, s in data["timelines"]["schedules"].items()
        },
        "pareto": data["pareto"]["models"],
        "repro": _repro_summary(data),
    }


def _repro_summary(data: dict) -> dict:
    """Per determinism and SDC: where the result came from and its headline."""
    out = {}
    for name in ("determinism", "sdc"):
        origin, result = data["provenance"][name], data[name]
        entry = {"source": origin["source"], "command": origin.get("command")}
        if name == "determinism" and result is not None:
            entry |= {"verdict": result["verdict"], "injected": result.get("injected")}
        if name == "sdc" and result is not None:
            entry["detected_share"] = {
                d: (
                    c["detected"] / (c["detected"] + c["missed"])
                    if c["detected"] + c["missed"]
                    else None
                )
                for d, c in result.get("counts", {}).items()
            }
        out[name] = entry
    return out


def _verdict_words(verdict: str, injected: bool) -> str:
    if not injected:
        return verdict
    if verdict == "diverged":
        return "negative control, the planted fault was found (expected)"
    return "negative control FAILED: the planted fault was not found"


def _repro_lines(summary: dict) -> list[str]:
    lines = []
    for name, entry in summary.items():
        source = {"report": "quick run", "run": "from the run given"}.get(
            entry["source"], entry["source"]
        )
        if "verdict" in entry:
            what = _verdict_words(entry["verdict"], entry["injected"] is not None)
        elif entry.get("detected_share"):
            what = "detected " + ", ".join(
                f"{d} {'n/a' if v is None else f'{v * 100:.0f} %'}"
                for d, v in entry["detected_share"].items()
            )
        else:
            what = ""
        lines.append(f"  {name:<18} {source}{': ' + what if what else ''}")
    return lines


def _text(summary: dict, run_dir: Path, seconds: float, gathered, pngs) -> str:
    lines = [f"report {run_dir / REPORT_NAME}"]
    worst7 = max(
        abs(e) for model in summary["table7_relative_error"].values() for e in model.values()
    )
    worst6 = max(
        abs(row[k]) for row in summary["table6_relative_error"] for k in ("tgs", "tps_per_user")
    )
    lines.append(f"  Table 7 rows       largest error {worst7 * 100:.1f} %")
    lines.append(f"  Table 6 rows       largest error {worst6 * 100:.1f} %")
    share = summary["training_exposed_comm_share"]
    lines.append(
        f"  training overlap   exposed comm {share['baseline'] * 100:.1f} % without ScMoE, "
        f"{share['scmoe'] * 100:.1f} % with (paper 25.3 % / 8.4 %)"
    )
    for name, s in sorted(summary["timelines"].items()):
        lines.append(f"  {name:<18} {s['tpl_us']:.0f} us/layer, TPOT {s['tpot_ms']:.1f} ms")
    lines += _repro_lines(summary["repro"])
    reused = ", ".join(gathered.reused) or "none"
    lines.append(f"  simulated now      {', '.join(gathered.computed) or 'none'}")
    lines.append(f"  from the cache     {reused}")
    if pngs is None:
        lines.append("  PNG figures        not requested (--no-png)")
    elif pngs.skipped:
        lines.append(f"  PNG figures        skipped: {pngs.skipped}")
    else:
        lines.append(f"  PNG figures        {len(pngs.written)} under {run_dir / PNG_DIR}")
    lines.append(f"  built in           {seconds:.1f} s")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> CommandOutput:
    start = time.perf_counter()
    config = load_report_config(args.config, set_values(args, ReportConfig))
    resolved = sections.resolve(config)
    config_hash = sections.config_hash(resolved)
    if args.run_dir is None:
        args.run_dir = default_run_dir("report", config_hash)
    run_dir = claim_run_dir(args.run_dir, "report")
    gathered = sections.gather(
        resolved,
        run_dir,
        train_runs=args.train_run,
        determinism_run=args.determinism_run,
        sdc_run=args.sdc_run,
        repro_runner=run_command if args.repro else None,
    )
    try:
        report = build_report(gathered.data)
    except ReportInputError as exc:
        raise UserError(f"cannot build the report: {exc}") from None
    write_text_atomic(run_dir / REPORT_NAME, report.html)
    pngs = write_pngs(report.figures, run_dir) if args.png else None
    summary = _summary(gathered.data)
    seconds = time.perf_counter() - start
    results = {
        "report": REPORT_NAME,
        "figures": [f.div_id for f in report.figures],
        "png": list(pngs.written) if pngs else [],
        "png_skipped": (pngs.skipped if pngs else "not requested (--no-png)"),
        "simulated": list(gathered.computed),
        "cached": list(gathered.reused),
        "seconds": seconds,
        **summary,
    }
    return CommandOutput(
        results=results,
        text=_text(summary, run_dir, seconds, gathered, pngs),
        config=resolved.identity(),
        config_hash=config_hash,
        seeds={"seed": config.seed},
        warnings=gathered.warnings,
    )
