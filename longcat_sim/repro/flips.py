"""A bit-flip campaign on any :class:`~longcat_sim.repro.entry.Experiment`, with detectors.

After ``warmup`` clean steps (which also fill the optimizer state) the experiment is
snapshotted (model and optimizer state, torch's RNG) before step ``warmup``. Each trial
restores the snapshot, flips one bit (:func:`~longcat_sim.repro.inject.flip_bit_`) at a site
and runs the step:

==================  ===================================================================
``weight``          a parameter, before the step reads it
``activation``      the first tensor output of a module, in the forward pass
``gradient``        a parameter's gradient once backward has accumulated it
``optimizer_state`` the parameter's first optimizer moment (``exp_avg`` or
                    ``momentum_buffer``; ``NAME:exp_avg_sq`` the second), before the
                    step reads it
==================  ===================================================================

Detectors: ``replay`` restores the snapshot and reruns the step without the fault (a
transient fault does not recur); it detects when the two state digests differ.
``validators`` flag a non-finite loss, gradient or parameter, or a loss above ``spike`` times
the median of the last ``window`` clean losses. Per trial and detector the outcome is
``masked`` when the faulty step's state digest (parameters, buffers and optimizer state after
the step) equals the clean one, ``crashed`` when the faulty step raised (counted apart from
the others), else ``detected`` or ``missed``. A step that raises without a fault is a
:class:`~longcat_sim.errors.UserError`.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import random
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from longcat_sim.errors import UserError
from longcat_sim.model.hashing import tensor_hash
from longcat_sim.repro.entry import Experiment, build_experiment
from longcat_sim.repro.fingerprint import state_tensors
from longcat_sim.repro.inject import flip_bit_, flipped
from longcat_sim.repro.targets import MODEL_SITES, check_target, default_target

DETECTORS = ("replay", "validators")
DEFAULT_BITS = (0, 22, 23, 30, 31)
OUTCOMES = ("detected", "masked", "missed", "crashed")


def state_digest(exp: Experiment) -> str:
    """SHA-256 over parameters, buffers and optimizer state (not gradients)."""
    h = hashlib.sha256()
    for module, label, tensor in state_tensors(exp.model, exp.optimizer):
        if not label.startswith("grad."):
            h.update(f"{module}|{label}|{tensor_hash(tensor)}\n".encode())
    return h.hexdigest()


def snapshot(exp: Experiment) -> dict[str, Any]:
    opt = None if exp.optimizer is None else copy.deepcopy(exp.optimizer.state_dict())
    return {
        "model": copy.deepcopy(exp.model.state_dict()),
        "optimizer": opt,
        "rng": torch.get_rng_state(),
    }


def restore(exp: Experiment, snap: dict[str, Any]) -> None:
    exp.model.load_state_dict(snap["model"])
    if exp.optimizer is not None:
        exp.optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))
    exp.model.zero_grad(set_to_none=True)
    torch.set_rng_state(snap["rng"])


def _moment(exp: Experiment, param: torch.Tensor, key: str = "") -> torch.Tensor:
    state = {} if exp.optimizer is None else exp.optimizer.state.get(param, {})
    if key:
        if not isinstance(state.get(key), torch.Tensor):
            raise UserError(f"the optimizer keeps no {key!r} for the target parameter")
        return state[key]
    for key in ("exp_avg", "momentum_buffer"):
        if isinstance(state.get(key), torch.Tensor):
            return state[key]
    for _key, value in sorted(state.items()):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 1:
            return value
    raise UserError("the optimizer keeps no moment for the target parameter; pick another site")


@contextmanager
def planted(exp: Experiment, site: str, target: str, index: int, bit: int) -> Iterator[None]:
    """One bit flip at ``site``/``target`` during the block (one step)."""
    handles: list[Any] = []
    fired: list[bool] = []
    if site == "activation":

        def hook(_m: torch.nn.Module, _i: Any, out: Any) -> Any:
            if fired:
                return None
            fired.append(True)
            if isinstance(out, tuple):
                return (flipped(out[0], index, bit), *out[1:])
            return flipped(out, index, bit)

        module = dict(exp.model.named_modules())[target]
        handles.append(module.register_forward_hook(hook))
    else:
        name, _, key = target.partition(":")
        param = dict(exp.model.named_parameters())[name]
        if site == "weight":
            flip_bit_(param.data, index, bit)
        elif site == "optimizer_state":
            flip_bit_(_moment(exp, param, key), index, bit)
        else:

            def grad_hook(p: torch.Tensor) -> None:
                if not fired and p.grad is not None:
                    fired.append(True)
                    flip_bit_(p.grad, index, bit)

            handles.append(param.register_post_accumulate_grad_hook(grad_hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def validators_flag(exp: Experiment, loss: float, recent: Sequence[float], spike: float) -> bool:
    """Non-finite loss, gradient or parameter, or a loss spike against the recent median."""
    if not math.isfinite(loss):
        return True
    for p in exp.model.parameters():
        if not torch.isfinite(p).all() or (p.grad is not None and not torch.isfinite(p.grad).all()):
            return True
    finite = [x for x in recent if math.isfinite(x)]
    return bool(finite) and loss > spike * statistics.median(finite)


def _run(exp: Experiment, step: int) -> tuple[float, str]:
    loss = float(exp.step(step).detach().double().item())
    return loss, state_digest(exp)


def _clean_run(exp: Experiment, step: int) -> tuple[float, str]:
    """:func:`_run` of a step without a fault, which must not raise."""
    try:
        return _run(exp, step)
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise UserError(
            f"step {step} raised {type(exc).__name__}: {first} without a fault; "
            "fix the experiment's step"
        ) from None


def _trial(
    exp: Experiment, snap: dict[str, Any], fault: tuple[str, str, int, int], ctx: dict[str, Any]
) -> dict[str, str]:
    """One faulty step and its replay; the outcome for each detector."""
    site, target, index, bit = fault
    restore(exp, snap)
    try:
        with planted(exp, site, target, index, bit):
            loss, digest = _run(exp, ctx["step"])
    except UserError:
        raise
    except Exception:
        return dict.fromkeys(DETECTORS, "crashed")
    flagged = validators_flag(exp, loss, ctx["recent"], ctx["spike"])
    restore(exp, snap)
    _, replayed = _clean_run(exp, ctx["step"])
    if digest == ctx["clean_digest"]:
        return dict.fromkeys(DETECTORS, "masked")
    return {
        "replay": "detected" if replayed != digest else "missed",
        "validators": "detected" if flagged else "missed",
    }


def run_campaign(
    exp: Experiment,
    *,
    sites: Sequence[str] = MODEL_SITES,
    bits: Sequence[int] = DEFAULT_BITS,
    trials: int = 1,
    warmup: int = 2,
    seed: int = 0,
    targets: dict[str, str] | None = None,
    spike: float = 10.0,
    window: int = 8,
) -> dict[str, Any]:
    """Flip each bit at each site ``trials`` times (random elements) in step ``warmup``; a
    JSON-able dict (non-finite numbers as None) with one row per (site, bit, detector)."""
    start = time.perf_counter()
    _check_campaign(sites, bits, trials, warmup)
    chosen = {s: (targets or {}).get(s) or default_target(exp.model, s) for s in sites}
    for site, target in chosen.items():
        check_target(exp.model, site, target)
    recent = [_clean_run(exp, i)[0] for i in range(warmup)][-window:]
    snap = snapshot(exp)
    clean_loss, clean_digest = _clean_run(exp, warmup)
    ctx = {"step": warmup, "recent": recent, "spike": spike, "clean_digest": clean_digest}
    clean_flag = validators_flag(exp, clean_loss, recent, spike)
    restore(exp, snap)
    clean_replay = _clean_run(exp, warmup)[1]
    rng, rows = random.Random(seed), []
    for site in sites:
        for bit in bits:
            counts = {d: dict.fromkeys(OUTCOMES, 0) for d in DETECTORS}
            for _ in range(trials):
                fault = (site, chosen[site], rng.randrange(2**31), bit)
                for detector, outcome in _trial(exp, snap, fault, ctx).items():
                    counts[detector][outcome] += 1
            rows += [
                {
                    "site": site,
                    "target": chosen[site],
                    "bit": bit,
                    "detector": d,
                    "trials": trials,
                    **counts[d],
                }
                for d in DETECTORS
            ]
    restore(exp, snap)
    return {
        "step": warmup,
        "trials": trials,
        "sites": list(sites),
        "bits": list(bits),
        "targets": chosen,
        "clean": {
            "loss": _finite(clean_loss),
            "digest": clean_digest,
            "false_positives": {"replay": clean_replay != clean_digest, "validators": clean_flag},
        },
        "results": rows,
        "seconds": time.perf_counter() - start,
    }


def _check_campaign(sites: Sequence[str], bits: Sequence[int], trials: int, warmup: int) -> None:
    bad = [s for s in sites if s not in MODEL_SITES]
    if bad or not sites:
        raise UserError(f"unknown sites {bad or sites}; choose from {', '.join(MODEL_SITES)}")
    if not bits or any(not 0 <= b < 32 for b in bits):
        raise UserError(f"bits must be in 0..31 (float32), got {list(bits)}")
    if trials < 1 or warmup < 1:
        raise UserError(f"trials and warmup must be positive, got {trials} and {warmup}")


def run_entry_campaign(
    entry: str, *, seed: int = 0, threads: int = 1, **options: Any
) -> dict[str, Any]:
    """:func:`run_campaign` on the experiment ``entry`` builds from ``seed`` (in this process,
    on ``threads`` threads); ``options`` are run_campaign's keywords. Adds ``entry``."""
    previous = torch.get_num_threads()
    try:
        exp = build_experiment(entry, seed, threads)
        report = run_campaign(exp, seed=seed, **options)
    finally:
        torch.set_num_threads(previous)
    return {"entry": entry, **report}


def add_entry_argument(parser: argparse.ArgumentParser) -> None:
    """``--entry package.module:function``: run on a user experiment instead of the built-in model."""
    parser.add_argument(
        "--entry",
        default=None,
        metavar="MODULE:FUNCTION",
        help="run on the Experiment this function builds from a seed (see docs/reproducibility.md)",
    )


def describe_campaign(report: dict[str, Any]) -> str:
    """The campaign as text: one line per (site, bit) with each detector's counts."""
    lines = [f"bit flips at step {report['step']}, {report['trials']} trial(s) per site and bit"]
    for row in report["results"]:
        lines.append(
            f"  {row['site']:<16} bit {row['bit']:>2}  {row['detector']:<10} "
            f"detected {row['detected']}  masked {row['masked']}  missed {row['missed']}  "
            f"crashed {row['crashed']}"
        )
    fp = report["clean"]["false_positives"]
    lines.append(f"  clean step flagged: replay {fp['replay']}, validators {fp['validators']}")
    return "\n".join(lines)
