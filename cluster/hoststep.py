"""One expert-parallel training step of ``longcat-sim train --nproc`` on a calibrated host: a
task DAG run on the SimPy streams (:mod:`cluster.streams`), and the same step in closed form.

The inputs are a host profile written by ``longcat-sim calibrate``: per world size W the load
terms of the host (:class:`WorldTerms`: the compute contention with W ranks busy, and
alpha-beta fits of what a synchronous all-to-all, an overlapped one and an all-gather add to
a step), and the model's measured costs (:class:`EpModelTerms`). Every rank does the same work
in lock step (ranks wait for each other at every exchange), so one rank's timeline is the
step. Per slice (one sequence) and MoE layer the forward exchanges the expert counts, then
dispatches the rows and combines the expert outputs:

- conventional (no ScMoE): the dispatch and the combine are waited for at once, the dense
  blocks run afterwards;
- ScMoE: the dispatch is in flight while FFN_0 + MLA_1 compute, the combine while FFN_1
  computes. Each window costs ``max(exchange, measured window)``: the probe times the window
  itself at the model's sizes (an exchange in flight over compute as long as those blocks,
  every rank busy), since on a host with few cores the exchange's progress and the compute
  share the cores in ways no rate captures.

Compute in the windows (with and without an exchange) comes from the probe; the rest of a
slice is the measured one-process slice stretched by the contention.

The backward sends both reverses synchronously; after the slices the dense gradients of every
slice, three expert-weight shards per layer, the losses and the bias controller's counts are
gathered, and the optimizer runs (``t_fixed``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from longcat_sim import stages as S
from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.cluster.streams import COMPUTE, Task, run_tasks
from longcat_sim.config.toml import read_toml

LINK = "nvlink"  # the stream the inter-process exchanges run on
ON_CORES = "exchange on the cores"  # a window's extra time: an exchange in flight takes CPU
COLLECTIVE_KINDS = ("a2a", "a2a_async", "gather")


@dataclass(frozen=True)
class WorldTerms:
    """A host's load terms at one world size (measured with every rank busy)."""

    compute_slowdown: float  # the model's own compute with every rank computing / alone
    a2a_latency_us: float
    a2a_gb_s: float
    # what an all-to-all overlapped with ample compute still costs: reported, not used (the
    # measured windows below price the overlap)
    a2a_async_latency_us: float
    a2a_async_gb_s: float
    gather_latency_us: float
    gather_gb_s: float
    # the model's two ScMoE windows measured at this world size, with every rank busy: the
    # dispatch in flight over compute as long as FFN_0 + MLA_1, the combine over FFN_1, and
    # the same compute without an exchange
    dispatch_window_s: float
    dispatch_compute_s: float
    combine_window_s: float
    combine_compute_s: float

    def seconds(self, kind: str, n_bytes: float) -> float:
        """Cost of one ``kind`` (a2a, a2a_async, gather) of ``n_bytes`` per rank."""
        if kind not in COLLECTIVE_KINDS:
            raise ClusterInputError(f"unknown collective {kind!r}; use {COLLECTIVE_KINDS}")
        alpha = getattr(self, f"{kind}_latency_us") * 1e-6
        return alpha + n_bytes / (getattr(self, f"{kind}_gb_s") * 1e9)

    @property
    def overlap_efficiency(self) -> float:
        """Share of a small synchronous exchange's cost that overlapping it saves."""
        return 1.0 - self.a2a_async_latency_us / max(self.a2a_latency_us, 1e-9)


@dataclass(frozen=True)
class EpModelTerms:
    """The model's costs measured on the host, one process, sequences of ``seq_len`` tokens."""

    seq_len: int
    hidden: int
    layers: int
    n_routed_experts: int
    ffn_slots_per_token: float
    t_slice_s: float  # forward + backward of one sequence
    t_fixed_s: float  # once per step: gradient sums, clipping, optimizer
    # FFN_0 + MLA_1 and FFN_1 forward of one sequence, one layer: they size the probe's
    # windows (WorldTerms), which price the overlap
    t_dispatch_hide_s: float
    t_combine_hide_s: float
    grad_bytes_per_slice: int  # dense gradient of one sequence
    expert_weight_bytes: int  # one stacked expert weight (all experts) of one layer

    @property
    def row_bytes(self) -> float:
        """Bytes each rank sends per row exchange (float32 rows of its FFN slots)."""
        return 4.0 * self.seq_len * self.ffn_slots_per_token * self.hidden


@dataclass(frozen=True)
class HostProfile:
    """What a ``calibrate`` profile gives the step model."""

    worlds: dict[int, WorldTerms]
    model: EpModelTerms

    def terms(self, world: int) -> WorldTerms:
        if world not in self.worlds:
            raise ClusterInputError(
                f"the profile has no measurements for {world} processes (it has "
                f"{sorted(self.worlds)}); calibrate with --nproc including {world}"
            )
        return self.worlds[world]


_INT_FIELDS = {"seq_len", "hidden", "layers", "n_routed_experts", "grad_bytes_per_slice",
               "expert_weight_bytes"}  # fmt: skip
_RATE_SUFFIX = "_gb_s"


def _check_value(name: str, value: Any, where: str) -> float | int:
    """A finite number; ints where counts are meant; rates and counts positive, times >= 0."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if name in _INT_FIELDS:
        ok = ok and isinstance(value, int) and value >= 1
    elif name.endswith(_RATE_SUFFIX) or name in ("compute_slowdown", "ffn_slots_per_token"):
        ok = ok and value > 0
    else:
        ok = ok and value >= 0
    if not ok:
        kind = "a positive integer" if name in _INT_FIELDS else "a finite number"
        sign = " > 0" if name.endswith(_RATE_SUFFIX) else ""
        raise ClusterInputError(f"{where} {name} = {value!r} must be {kind}{sign}")
    return value


def _from_table(cls: type, table: Any, where: str) -> Any:
    if not isinstance(table, dict):
        raise ClusterInputError(f"{where} must be a table; rerun longcat-sim calibrate")
    names = [f.name for f in fields(cls)]
    missing = [n for n in names if n not in table]
    if missing:
        raise ClusterInputError(f"{where} lacks {', '.join(missing)}; rerun longcat-sim calibrate")
    return cls(**{n: _check_value(n, table[n], where) for n in names})


def _world(key: str) -> int:
    try:
        world = int(key)
    except ValueError:
        world = 0
    if world < 1:
        raise ClusterInputError(f'[host.worlds."{key}"]: world sizes are positive integers')
    return world


def host_profile_from_dict(data: dict[str, Any]) -> HostProfile:
    host, model = data.get("host", {}), data.get("ep_model")
    worlds = host.get("worlds") if isinstance(host, dict) else None
    if not isinstance(worlds, dict) or not worlds or model is None:
        raise ClusterInputError(
            'not a calibrate profile: it needs [host.worlds."W"] and [ep_model] tables '
            "(write one with longcat-sim calibrate)"
        )
    terms = {
        _world(w): _from_table(WorldTerms, t, f'[host.worlds."{w}"]') for w, t in worlds.items()
    }
    return HostProfile(terms, _from_table(EpModelTerms, model, "[ep_model]"))


def load_host_profile(path: str | Path) -> HostProfile:
    """Read a profile written by ``longcat-sim calibrate`` (one-line errors when it is not)."""
    what = f"host profile {str(path)!r}"
    return host_profile_from_dict(read_toml(path, what=what, error=ClusterInputError))


@dataclass(frozen=True)
class EpStep:
    """One step: ``batch_size`` sequences over ``world`` processes, ScMoE overlap or not."""

    world: int
    batch_size: int
    scmoe: bool

    def slices(self) -> int:
        if self.world < 1 or self.batch_size < 1:
            raise ClusterInputError(
                f"world ({self.world}) and batch size ({self.batch_size}) must be positive"
            )
        if self.batch_size % self.world:
            raise ClusterInputError(
                f"the batch of {self.batch_size} must split evenly over {self.world} processes"
            )
        return self.batch_size // self.world


def _step_collectives(m: EpModelTerms, t: WorldTerms, world: int, slices: int) -> list[tuple]:
    """(name, seconds) of the gathers after the slices."""
    return [
        ("gather dense gradients", t.seconds("gather", slices * m.grad_bytes_per_slice)),
        *[
            (f"gather expert gradients {i}", t.seconds("gather", m.expert_weight_bytes / world))
            for i in range(3 * m.layers)
        ],
        ("gather losses", t.seconds("gather", 4 * slices)),
        ("all-reduce counts", t.seconds("gather", 8 * m.layers * (m.n_routed_experts + 1))),
    ]


@dataclass(frozen=True)
class _Costs:
    """What each piece of a multi-process step costs (seconds), from the profile."""

    t: WorldTerms
    sync: float  # one synchronous row exchange
    counts: float  # the expert-count exchange
    hide_d: float  # FFN_0 + MLA_1 with every rank busy, no exchange in flight
    hide_c: float  # FFN_1, likewise
    window_d: float  # FFN_0 + MLA_1 with the dispatch in flight (never below hide_d)
    window_c: float  # FFN_1 with the combine in flight (never below hide_c)
    rest: float  # the rest of a slice's forward and backward
    fixed: float  # the optimizer and gradient sums, once per step


# the dense steps each ScMoE exchange is in flight over, as task names
_BEHIND_DISPATCH, _BEHIND_COMBINE = (
    " + ".join(S.in_flight_over(S.layer_order("shortcut"), e)) for e in (S.DISPATCH, S.COMBINE)
)
_DENSE = f"{_BEHIND_DISPATCH} + {_BEHIND_COMBINE}"


def _costs(profile: HostProfile, step: EpStep) -> _Costs:
    m, t = profile.model, profile.terms(step.world)
    slow = t.compute_slowdown
    hide_d, hide_c = t.dispatch_compute_s, t.combine_compute_s
    return _Costs(
        t=t,
        sync=t.seconds("a2a", m.row_bytes),
        counts=t.seconds("a2a", 8 * m.n_routed_experts),
        hide_d=hide_d,
        hide_c=hide_c,
        window_d=max(t.dispatch_window_s, hide_d),
        window_c=max(t.combine_window_s, hide_c),
        rest=max(0.0, slow * m.t_slice_s - m.layers * (hide_d + hide_c)),
        fixed=slow * m.t_fixed_s,
    )


def step_tasks(profile: HostProfile, step: EpStep) -> list[Task]:
    """One rank's step as tasks on a compute stream and a link stream (see the module doc)."""
    slices, m = step.slices(), profile.model
    if step.world == 1:
        return [Task("one process", COMPUTE, slices * m.t_slice_s + m.t_fixed_s)]
    c = _costs(profile, step)
    sync = c.sync
    tasks: list[Task] = []

    def add(name: str, stream: str, seconds: float, deps: list[int], **labels: Any) -> int:
        tasks.append(Task(name, stream, seconds, tuple(d for d in deps if d >= 0), **labels))
        return len(tasks) - 1

    last = -1
    for s in range(slices):
        for layer in range(m.layers):
            lab = {"layer": layer, "microbatch": s, "phase": "fwd"}
            counted = add("counts", LINK, c.counts, [last], **lab)
            dispatch = add(S.DISPATCH, LINK, sync, [counted], **lab)
            if step.scmoe:
                # the window's compute, then what the exchange in flight adds on the cores
                dense = add(_BEHIND_DISPATCH, COMPUTE, c.hide_d, [counted], **lab)
                dense = add(ON_CORES, COMPUTE, c.window_d - c.hide_d, [dense], **lab)
                experts = add(S.ROUTED_EXPERTS, COMPUTE, 0.0, [dispatch, dense], **lab)
                combine = add(S.COMBINE, LINK, sync, [experts], **lab)
                ffn1 = add(_BEHIND_COMBINE, COMPUTE, c.hide_c, [experts], **lab)
                ffn1 = add(ON_CORES, COMPUTE, c.window_c - c.hide_c, [ffn1], **lab)
                last = add("MoE output", COMPUTE, 0.0, [combine, ffn1], **lab)
            else:
                experts = add(S.ROUTED_EXPERTS, COMPUTE, 0.0, [dispatch], **lab)
                combine = add(S.COMBINE, LINK, sync, [experts], **lab)
                dense_s = c.hide_d + c.hide_c
                last = add(_DENSE, COMPUTE, dense_s, [combine], **lab)
        last = add("rest of forward and backward", COMPUTE, c.rest, [last], microbatch=s)
        for layer in reversed(range(m.layers)):
            for name in (f"{S.COMBINE} backward", f"{S.DISPATCH} backward"):
                last = add(name, LINK, sync, [last], layer=layer, microbatch=s, phase="bwd")
    for name, seconds in _step_collectives(m, c.t, step.world, slices):
        last = add(name, LINK, seconds, [last])
    add("optimizer", COMPUTE, c.fixed, [last])
    return tasks


def simulate_step(profile: HostProfile, step: EpStep) -> dict[str, Any]:
    """Run :func:`step_tasks` on the SimPy streams: the step time and where it went."""
    records = run_tasks(step_tasks(profile, step))
    total = max(r.end for r in records)
    compute = sum(r.duration for r in records if not r.is_comm and r.name != ON_CORES)
    link = sum(r.duration for r in records if r.is_comm or r.name == ON_CORES)
    return {
        "step_s": total,
        "compute_busy_s": compute,
        "link_busy_s": link,  # exchanges, and their share of the windows' time on the cores
        "exposed_comm_s": total - compute,
        "records": records,
    }


def step_closed_form(profile: HostProfile, step: EpStep) -> dict[str, float]:
    """The same step without the simulator: sums along the one rank's critical path."""
    slices, m = step.slices(), profile.model
    if step.world == 1:
        single = slices * m.t_slice_s + m.t_fixed_s
        return {"compute": single, "exchanges": 0.0, "collectives": 0.0,
                "overlap_saving": 0.0, "step": single}  # fmt: skip
    c = _costs(profile, step)
    conventional_windows = 2 * c.sync + c.hide_d + c.hide_c
    windows = conventional_windows
    if step.scmoe:
        windows = max(c.sync, c.window_d) + max(c.sync, c.window_c)
    per_slice = m.layers * (c.counts + windows + 2 * c.sync) + c.rest
    collectives = sum(s for _, s in _step_collectives(m, c.t, step.world, slices))
    compute = c.t.compute_slowdown * (slices * m.t_slice_s + m.t_fixed_s)
    total = slices * per_slice + collectives + c.fixed
    conventional = m.layers * conventional_windows
    return {
        "compute": compute,
        "exchanges": total - compute - collectives,
        "collectives": collectives,
        "overlap_saving": slices * (conventional - m.layers * windows) if step.scmoe else 0.0,
        "step": total,
    }
