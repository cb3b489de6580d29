"""The ``longcat-sim`` command line: parse, call an experiment, print. No logic lives here."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from pathlib import Path
from typing import NoReturn

from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.config.flags import given_options
from longcat_sim.config.paths import path_arg
from longcat_sim.errors import UserError, os_error_line
from longcat_sim.model.config import ConfigError
from longcat_sim.processes import Stopped, signals_held, stop_signals
from longcat_sim.runs import (
    build_manifest,
    claim_run_dir,
    default_run_dir,
    dumps_json,
    release_run_dir,
    write_run,
)

# command name -> module in longcat_sim.commands exposing HELP, add_arguments(parser), run(args)
COMMANDS: dict[str, str] = {
    "params": "longcat_sim.commands.params",
    "train": "longcat_sim.commands.train",
    "report": "longcat_sim.commands.report",
    "simulate": "longcat_sim.commands.simulate",
    "sweep": "longcat_sim.commands.sweep",
    "serve": "longcat_sim.commands.serve",
    "plan": "longcat_sim.commands.plan",
    "determinism": "longcat_sim.commands.determinism",
    "sdc": "longcat_sim.commands.sdc",
    "calibrate": "longcat_sim.commands.calibrate",
}

PROG = "longcat-sim"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``selected``, only that command's module is imported, so a
    command never pays for (or breaks on) another command's dependencies."""
    parser = _Parser(
        prog=PROG, description="Simulation and reproducibility testbed for MoE systems."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, module_name in COMMANDS.items():
        if selected is not None and name != selected:
            sub.add_parser(name)
            continue
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        cmd.add_argument("--json", action="store_true", help="print machine-readable JSON only")
        cmd.add_argument(
            "--run-dir",
            type=path_arg,
            default=None,
            help="where to write manifest.json and results.json (default runs/COMMAND/CONFIG_HASH)",
        )
        module.add_arguments(cmd)
        cmd.set_defaults(_module=module)
    return parser


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run one command line; SIGINT or SIGTERM at any point ends it with one line and exit
    code 130 or 143, and no results committed."""
    try:
        with stop_signals():
            return _main(argv)
    except Stopped as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    selected = argv[0] if argv and argv[0] in COMMANDS else None
    try:
        args = build_parser(selected).parse_args(argv)
        given = given_options(lambda: build_parser(selected), argv)
    except SystemExit as exc:  # a usage error (already one line on stderr) or --help
        return int(exc.code or 0)
    args.given_options = given - {"command", "_module"}
    try:
        return _run_and_commit(args)
    finally:
        if args.run_dir is not None:
            release_run_dir(args.run_dir)


def _abandon(run_dir: Path | None) -> None:
    """A command that stopped before its results: release the run directory it claimed (the
    command sets ``--run-dir`` when it picks the default itself), removing it if the claim
    created it and it holds nothing else."""
    if run_dir is not None:
        release_run_dir(run_dir, unused=True)


def _run_and_commit(args: argparse.Namespace) -> int:
    """Claim the run directory, run the command, commit its manifest and results, print."""
    try:
        if args.run_dir is not None:
            claim_run_dir(args.run_dir, args.command)
        output = args._module.run(args)
        run_dir = args.run_dir or claim_run_dir(
            default_run_dir(args.command, output.config_hash), args.command
        )
    except Stopped:
        _abandon(args.run_dir)
        raise
    except (UserError, ConfigError, ClusterInputError) as exc:
        _abandon(args.run_dir)
        return _fail(str(exc))
    except OSError as exc:  # a full disk, a folder removed meanwhile, a refused socket
        _abandon(args.run_dir)
        return _fail(os_error_line(exc))
    manifest = build_manifest(
        args.command, output.config, output.config_hash, output.seeds, output.device
    )
    with signals_held():  # the commit and its report finish; a stop signal waits for them
        try:
            write_run(run_dir, manifest, output.results)
        except OSError as exc:
            return _fail(f"cannot write run directory {str(run_dir)!r}: {exc.strerror or exc}")
        finally:
            release_run_dir(run_dir)
        for warning in output.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if args.json:
            sys.stdout.write(dumps_json(output.results))
        else:
            print(output.text)
            print(f"run directory: {run_dir}")
        sys.stdout.flush()
    return output.exit_code


def entry() -> NoReturn:  # pragma: no cover - thin wrapper
    try:
        code = main()
    except KeyboardInterrupt:  # Ctrl-C before main installed its handlers
        print(f"{PROG}: {Stopped(signal.SIGINT)}", file=sys.stderr)
        code = Stopped(signal.SIGINT).exit_code
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
