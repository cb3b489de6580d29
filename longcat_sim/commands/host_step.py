"""``longcat-sim simulate --mode host-ep``: one step of ``train --nproc W`` on the host a
``calibrate`` profile describes, run on the SimPy streams (``cluster.hoststep``)."""

from __future__ import annotations

import argparse
from dataclasses import asdict, fields
from typing import Any

from longcat_sim.cluster import hoststep
from longcat_sim.cluster.trace import chrome_trace_json
from longcat_sim.commands.base import CommandOutput
from longcat_sim.config.deployment import DecodeDeployment, HostStep, TrainDeployment
from longcat_sim.config.fields import flag
from longcat_sim.config.flags import add_config_flags, given, set_values
from longcat_sim.errors import UserError
from longcat_sim.runs import config_hash, write_text_atomic

SCHEDULES = ("scmoe", "conventional")
OWN = tuple(f.name for f in fields(HostStep))  # flags of this mode only
# simulate's flags that describe a GPU deployment: meaningless for a host profile
FOREIGN = tuple(
    name
    for name in dict.fromkeys(
        f.name for c in (DecodeDeployment, TrainDeployment) for f in fields(c)
    )
    if name != "schedule"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser.add_argument_group("host-ep"), HostStep)


def _check(args: argparse.Namespace) -> HostStep:
    wrong = given(args, FOREIGN) + (["assume"] if args.assume else [])
    if wrong:
        raise UserError(
            f"{flag(wrong[0])} does not apply to --mode host-ep (the profile fixes the model)"
        )
    if args.profile is None:
        raise UserError("--mode host-ep needs --profile RUN/host.toml (from longcat-sim calibrate)")
    if args.schedule is not None and args.schedule not in SCHEDULES:
        raise UserError(
            f"--schedule {args.schedule!r} is not a host-ep schedule; use {' or '.join(SCHEDULES)}"
        )
    return HostStep(**set_values(args, HostStep))


def run(args: argparse.Namespace) -> CommandOutput:
    host = _check(args)
    profile = hoststep.load_host_profile(host.profile)
    world, batch = host.nproc, host.batch_size
    schedule = args.schedule or "scmoe"
    step = hoststep.EpStep(world, batch, schedule == "scmoe")
    simulated = hoststep.simulate_step(profile, step)
    records = simulated.pop("records")
    closed = hoststep.step_closed_form(profile, step)
    results: dict[str, Any] = {
        "mode": "host-ep",
        "profile": host.profile,
        "nproc": world,
        "batch_size": batch,
        "schedule": schedule,
        **simulated,
        "closed_form": closed,
        "tasks": len(records),
    }
    text = (
        f"train --nproc {world}, batch {batch}, {schedule}: step {simulated['step_s'] * 1e3:.1f} ms "
        f"(compute {simulated['compute_busy_s'] * 1e3:.1f} ms, exposed communication "
        f"{simulated['exposed_comm_s'] * 1e3:.1f} ms; closed form {closed['step'] * 1e3:.1f} ms)"
    )
    config = {
        "mode": "host-ep",
        "nproc": world,
        "batch_size": batch,
        "schedule": schedule,
        "profile": {
            "worlds": {w: asdict(t) for w, t in profile.worlds.items()},
            "model": asdict(profile.model),
        },
    }
    if args.trace is not None:
        try:
            trace = chrome_trace_json(records, metadata={"mode": "host-ep", "nproc": world})
            write_text_atomic(args.trace, trace)
        except OSError as exc:
            raise UserError(
                f"cannot write trace {str(args.trace)!r}: {exc.strerror or exc}"
            ) from None
        text += f"\ntrace written to {args.trace}"
    return CommandOutput(results=results, text=text, config=config, config_hash=config_hash(config))
