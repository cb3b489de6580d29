"""``longcat-sim simulate --mode host-ep``: one step of ``train --nproc W`` on the host a
``calibrate`` profile describes, run on the SimPy streams (``cluster.hoststep``)."""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from longcat_sim.cluster import hoststep
from longcat_sim.cluster.trace import chrome_trace_json
from longcat_sim.commands.base import CommandOutput
from longcat_sim.errors import UserError
from longcat_sim.runs import write_text_atomic

SCHEDULES = ("scmoe", "conventional")
OWN = ("profile", "world", "batch_size")  # flags of this mode only
# simulate's flags that describe a GPU deployment: meaningless for a host profile
FOREIGN = ("model", "hardware", "rdma_gb_s", "gpus", "ep", "redundant_experts", "assumptions",
           "seed", "batch_per_device", "context", "attention_dtype", "mtp_draft_tokens",
           "mtp_accept", "attention_tp", "ffn_tp", "cp", "pp", "seq_len",
           "tokens_per_microbatch", "microbatches", "moe_chunks", "pipeline")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("host-ep")
    group.add_argument("--profile", type=Path, help="host.toml written by longcat-sim calibrate")
    group.add_argument("--world", type=int, help="processes (default 2)")
    group.add_argument("--batch-size", type=int, help="sequences per step (default 8)")


def _check(args: argparse.Namespace) -> None:
    given = [n for n in FOREIGN if getattr(args, n, None) is not None] + (
        ["assume"] if args.assume else []
    )
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise UserError(f"{flag} does not apply to --mode host-ep (the profile fixes the model)")
    if args.profile is None:
        raise UserError("--mode host-ep needs --profile RUN/host.toml (from longcat-sim calibrate)")
    if args.schedule is not None and args.schedule not in SCHEDULES:
        raise UserError(
            f"--schedule {args.schedule!r} is not a host-ep schedule; use {' or '.join(SCHEDULES)}"
        )


def run(args: argparse.Namespace) -> CommandOutput:
    _check(args)
    profile = hoststep.load_host_profile(args.profile)
    world = 2 if args.world is None else args.world
    batch = 8 if args.batch_size is None else args.batch_size
    schedule = args.schedule or "scmoe"
    step = hoststep.EpStep(world, batch, schedule == "scmoe")
    simulated = hoststep.simulate_step(profile, step)
    records = simulated.pop("records")
    closed = hoststep.step_closed_form(profile, step)
    results: dict[str, Any] = {
        "mode": "host-ep",
        "profile": str(args.profile),
        "world": world,
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
        "world": world,
        "batch_size": batch,
        "schedule": schedule,
        "profile": {
            "worlds": {w: asdict(t) for w, t in profile.worlds.items()},
            "model": asdict(profile.model),
        },
    }
    if args.trace is not None:
        try:
            trace = chrome_trace_json(records, metadata={"mode": "host-ep", "world": world})
            write_text_atomic(args.trace, trace)
        except OSError as exc:
            raise UserError(
                f"cannot write trace {str(args.trace)!r}: {exc.strerror or exc}"
            ) from None
        text += f"\ntrace written to {args.trace}"
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return CommandOutput(results=results, text=text, config=config, config_hash=digest)
