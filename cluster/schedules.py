"""Schedules: stage times -> task DAGs on streams, plus the pipeline-bubble closed forms the
simulator must reproduce (the decode closed forms live in ``cluster.closedform``).

A layer is a dataflow graph of stages (``DATAFLOW``: each stage lists the stages whose output it
reads; ``IN`` is the layer input, ``OUT`` the layer output). A schedule fixes the issue order of
those stages on the streams (``cluster.streams``: every stream runs in issue order). Decode
schedules run ScMoE layers in the shortcut topology (``DATAFLOW["scmoe"]``, ``model/block.py``
with ``topology="shortcut"``):

- ``sequential``: every stage in forward order, each waiting for the one before it (communication
  blocks compute).
- ``sbo`` (single-batch overlap, LongCat-Flash §6.1): one batch, issue order attn0, dispatch ||
  (ffn0, attn1_qkv), moe, combine || (attn1_core, ffn1). On standard MoE layers it hides the
  dispatch behind the shared experts.
- ``tbo`` (two-batch overlap, DeepSeek-V3 decode): the batch split into two micro-batches that
  take turns layer by layer. Each micro-batch issues its whole layer in ``TBO_ORDER``: the
  attention before the dispatch (with the router), the dispatch, the compute that does not need
  the routed experts (shared experts; ScMoE's dense branch; a dense layer's FFN), the routed
  experts, the combine; then the other micro-batch issues the same layer. So one micro-batch's
  dispatch -> MoE -> combine runs serially on the communication stream while the compute
  stream runs the other micro-batch's attention (under the combine) and its own shared work
  (under the dispatch); the two micro-batches' chains alternate on the link. When attention
  fits under the combine a layer takes dispatch + MoE + combine of the whole batch, the
  paper's Table 7 TBO estimate; ``cluster.closedform.tbo_step_time`` is the exact form.

Training layers split the MoE path (router, dispatch, MoE GEMMs, combine) into C token chunks;
every other stage runs on the whole micro-batch. Three training schedules (``TRAIN_SCHEDULES``)
differ in what the MoE reads and what waits for it on ScMoE layers:

- ``scmoe`` (``model/block.py`` ``topology="shortcut"``, LongCat-Flash): the MoE reads
  ``u = norm(a)`` after the first attention (``DATAFLOW["scmoe"]``), so its chunks'
  dispatch/combine overlap the whole dense branch ffn0 -> attn1 -> ffn1 and each other.
- ``conventional`` (``model/block.py`` ``topology="conventional"``): the MoE reads
  ``n = norm(c)`` after the second attention, the tensor FFN_1 reads (``CONVENTIONAL_FLOW``):
  attn0, ffn0 and attn1 run first, then the chunks' dispatch/MoE/combine overlap FFN_1 and each
  other; the layer ends when both FFN_1 and the last combine are done
  (``cluster.closedform.conventional_layer_time`` with one chunk).
- ``baseline`` (no overlap, the paper's "without ScMoE" reference of sec. 5.3): the MoE reads the
  first attention's output and every later dense stage waits for the combine (``SERIAL_FLOW``),
  so the MoE sits in series after attn0 and its chunks overlap only each other; ffn0 -> attn1
  -> ffn1 are issued after the last combine. With one chunk it is the ``sequential`` layer.

The overlapping schedules place the chunks by one rule: every chunk's router and dispatch are
issued as soon as the router's input exists, and the chunks' MoE GEMMs (each followed by its
combine) are spread evenly over the dense blocks that do not depend on the MoE, never before the
first of them (``_moe_positions``), so the first dispatch always has dense work to hide behind;
with no such block (``baseline``) they follow the dispatches directly. A standard MoE layer's
shared experts are such a block (the conventional topology with the shared experts in FFN_1's
place), so standard MoE and dense layers are scheduled alike under all three schedules.
Training stage times are per token chunk; whole-micro-batch stages take chunks x that.
Backward reverses the dataflow; weight-gradient (W) tasks follow their input-gradient task, or
form a separate block for zero-bubble pipelines.

Pipelines (``none``, ``1f1b``, ``zb``) arrange whole forward/backward blocks of micro-batches
over pipeline stages; the closed-form bubbles are those of the DualPipe README.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from longcat_sim import stages
from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.cluster.streams import COMPUTE, Task
from longcat_sim.cluster.workload import StageTimes, TrainLayerTimes
from longcat_sim.stages import (
    ATTENTION_0,
    ATTENTION_1_CORE,
    ATTENTION_1_QKV,
    COMBINE,
    DISPATCH,
    ROUTED_EXPERTS,
    ROUTER,
)

IN = stages.IN
OUT = stages.OUT

# Stage -> stages it reads, in forward order (``longcat_sim.stages`` holds the one definition).
DATAFLOW = stages.LAYER_FLOW
# ``model/block.py`` with ``topology="conventional"``: the MoE reads n = norm(c), after the second
# attention, like FFN_1; everything else as in the shortcut topology.
CONVENTIONAL_FLOW = stages.CONVENTIONAL_FLOW
# The serial layer without overlap: the MoE reads the first attention's output (as in the
# shortcut topology) but FFN_0 also reads the MoE output, so every dense stage after attn0 waits
# for the last combine.
SERIAL_FLOW = stages.SERIAL_FLOW

_EXPERTS_PATH = (ROUTED_EXPERTS, COMBINE)
_LEAD = stages.BEFORE_ROUTER
_BESIDE = stages.BESIDE_EXPERTS

SBO_ORDER: dict[str, tuple[str, ...]] = {
    # the model's shortcut order, with the routed experts issued after attention 1's projections
    "scmoe": (
        ATTENTION_0,
        ROUTER,
        DISPATCH,
        *stages.PARTS[stages.DENSE_FFN_0],
        ATTENTION_1_QKV,
        *_EXPERTS_PATH,
        ATTENTION_1_CORE,
        *stages.PARTS[stages.DENSE_FFN_1],
    ),
    "moe": (*_LEAD["moe"], ROUTER, DISPATCH, *_BESIDE["moe"], *_EXPERTS_PATH),
    "dense": (*_LEAD["dense"], *_BESIDE["dense"]),
}

# Per micro-batch: attention up to the router, dispatch, the work beside the routed experts
# (shared experts / the ScMoE dense branch / a dense FFN), the routed experts, combine.
TBO_ORDER: dict[str, tuple[str, ...]] = {
    kind: (*_LEAD[kind], ROUTER, DISPATCH, *_BESIDE[kind], *_EXPERTS_PATH)
    for kind in ("scmoe", "moe")
}
TBO_ORDER["dense"] = SBO_ORDER["dense"]

DECODE_SCHEDULES = ("sbo", "sequential", "tbo")
TRAIN_SCHEDULES = ("baseline", "conventional", "scmoe")
PIPELINES = ("1f1b", "none", "zb")
MOE_PATH = stages.MOE_PATH  # the stages split into token chunks

Key = tuple[str, int]  # (stage, chunk); chunk -1: the whole micro-batch


@dataclass(frozen=True)
class Op:
    """One stage (or one chunk of it) in a layer program, with the ops whose output it reads."""

    stage: str
    chunk: int
    deps: tuple[Key, ...]
    reads_input: bool

    @property
    def key(self) -> Key:
        return (self.stage, self.chunk)


@dataclass(frozen=True)
class LayerProgram:
    """A layer's ops in issue order and the ops whose results form the layer output."""

    ops: tuple[Op, ...]
    out: tuple[Key, ...]


def check_stages(st: StageTimes, layer: int) -> None:
    """Every stage of ``st`` must belong to its layer kind and run on exactly one kind of stream."""
    known = DATAFLOW.get(st.kind)
    if known is None:
        raise ClusterInputError(
            f"layer {layer} has unknown kind {st.kind!r}; use scmoe, moe or dense"
        )
    both = set(st.compute) & set(st.comm)
    if both:
        raise ClusterInputError(
            f"layer {layer}: stages {sorted(both)} are listed as both compute and communication"
        )
    unknown = (set(st.compute) | set(st.comm)) - set(known)
    if unknown:
        raise ClusterInputError(
            f"layer {layer} ({st.kind}) has unknown stages {sorted(unknown)}; "
            f"{st.kind} stages are {', '.join(s for s in known if s != OUT)}"
        )


def _program(kind: str, order: Sequence[str], chain: bool = False) -> LayerProgram:
    """Whole-batch program: ``order`` is the issue order; ``chain`` adds a dependency on the
    previous stage (sequential execution)."""
    flow = DATAFLOW[kind]
    ops = []
    previous: Key | None = None
    for stage in order:
        reads = flow[stage]
        deps = tuple((s, -1) for s in reads if s != IN)
        if chain and previous is not None:
            deps = (*deps, previous)
        ops.append(Op(stage, -1, deps, IN in reads or (chain and previous is None)))
        previous = (stage, -1)
    out = tuple((s, -1) for s in flow[OUT])
    if chain and previous is not None:
        out = (*out, previous)
    return LayerProgram(tuple(ops), out)


def sequential_program(kind: str) -> LayerProgram:
    return _program(kind, [s for s in DATAFLOW[kind] if s != OUT], chain=True)


def sbo_program(kind: str) -> LayerProgram:
    return _program(kind, SBO_ORDER[kind])


# Read-only tables built once: the programs do not depend on stage times.
SEQUENTIAL_PROGRAMS = MappingProxyType({kind: sequential_program(kind) for kind in DATAFLOW})
SBO_PROGRAMS = MappingProxyType({kind: sbo_program(kind) for kind in DATAFLOW})
TBO_PROGRAMS = MappingProxyType({kind: _program(kind, TBO_ORDER[kind]) for kind in DATAFLOW})


class DagBuilder:
    """Collects tasks; ``emit`` places a layer program's present stages and returns the outputs."""

    def __init__(self) -> None:
        self.tasks: list[Task] = []

    def add(self, task: Task) -> int:
        self.tasks.append(task)
        return len(self.tasks) - 1

    def layer(
        self,
        st: StageTimes,
        layer_in: Iterable[int],
        *,
        scale_whole: int = 1,
        **labels,
    ) -> LayerEmitter:
        return LayerEmitter(self, st, frozenset(layer_in), scale_whole, labels)


class LayerEmitter:
    """Emits ops of one layer of one micro-batch, possibly in several calls (TBO phases).

    A stage absent from the layer's stage times is skipped and its readers inherit its inputs;
    unlike a zero-second task it makes no stream wait for those inputs.
    Whole-batch ops of a chunked layer take ``scale_whole`` x the per-chunk stage time.
    """

    def __init__(
        self,
        dag: DagBuilder,
        st: StageTimes,
        layer_in: frozenset[int],
        scale_whole: int,
        labels: dict[str, int],
    ) -> None:
        self.dag = dag
        self.st = st
        self.layer_in = layer_in
        self.scale_whole = scale_whole
        self.labels = labels
        self.resolved: dict[Key, frozenset[int]] = {}

    def emit(self, ops: Iterable[Op], *, phase: str = "") -> None:
        st = self.st
        for op in ops:
            deps = set(self.layer_in) if op.reads_input else set()
            for key in op.deps:
                deps |= self.resolved[key]
            if op.stage in st.compute or op.stage in st.comm:
                stream = COMPUTE if op.stage in st.compute else st.comm_link[op.stage]
                base = st.get(op.stage)
                duration = base if op.chunk >= 0 else base * self.scale_whole
                index = self.dag.add(
                    Task(
                        op.stage,
                        stream,
                        duration,
                        tuple(sorted(deps)),
                        chunk=max(op.chunk, 0),
                        phase=phase,
                        **self.labels,
                    )
                )
                self.resolved[op.key] = frozenset((index,))
            else:
                self.resolved[op.key] = frozenset(deps)

    def outputs(self, program: LayerProgram) -> frozenset[int]:
        out: set[int] = set()
        for key in program.out:
            out |= self.resolved[key]
        return frozenset(out)


# ---------------------------------------------------------------------------- decode


def decode_tasks(
    layers: Sequence[StageTimes],
    layers_half: Sequence[StageTimes],
    schedule: str,
    overhead_s: float = 0.0,
) -> list[Task]:
    """All tasks of one decode step: every layer under ``schedule``, then the per-step overhead
    (embedding, LM head, sampling) on the compute stream."""
    if schedule not in DECODE_SCHEDULES:
        raise ClusterInputError(
            f"unknown decode schedule {schedule!r}; choose one of {', '.join(DECODE_SCHEDULES)}"
        )
    for i, st in enumerate(layers):
        check_stages(st, i)
    for i, st in enumerate(layers_half):
        check_stages(st, i)
    dag = DagBuilder()
    if schedule == "tbo":
        if not layers_half:
            raise ClusterInputError(
                "the tbo schedule needs stage times of the two micro-batches; price the "
                "workload with micro_batches including 2"
            )
        ends = [frozenset(), frozenset()]
        for i, st in enumerate(layers_half):
            program = TBO_PROGRAMS[st.kind]
            for mb in (0, 1):
                emitter = dag.layer(st, ends[mb], layer=i, microbatch=mb)
                emitter.emit(program.ops)
                ends[mb] = emitter.outputs(program)
        last = ends[0] | ends[1]
    else:
        if not layers:
            raise ClusterInputError(
                f"the {schedule} schedule needs stage times of the whole batch; price the "
                "workload with micro_batches including 1"
            )
        programs = SEQUENTIAL_PROGRAMS if schedule == "sequential" else SBO_PROGRAMS
        last = frozenset()
        for i, st in enumerate(layers):
            program = programs[st.kind]
            emitter = dag.layer(st, last, layer=i)
            emitter.emit(program.ops)
            last = emitter.outputs(program)
    if overhead_s > 0.0:
        dag.add(Task("overhead", COMPUTE, overhead_s, tuple(sorted(last))))
    return dag.tasks


# ---------------------------------------------------------------------------- training layers


def _moe_positions(chunks: int, blocks: int) -> list[int]:
    """After which dense block (1-based) each MoE chunk's GEMM is issued: spread evenly over the
    ``blocks`` dense blocks beside the MoE, never before the first (so one of two chunks lands
    after ffn0 + attn1_qkv on a shortcut layer, like SBO, and after FFN_1 or the shared experts
    on a conventional one)."""
    return [max(1, ((c + 1) * blocks + (chunks + 1) // 2) // (chunks + 1)) for c in range(chunks)]


@dataclass(frozen=True)
class TrainLayout:
    """Issue order of one training layer: ``lead`` before the chunks' routers (the router's
    input and what it depends on), ``beside`` the dense blocks the chunks' MoE GEMMs are spread
    over, ``tail`` the stages issued after every chunk."""

    lead: tuple[str, ...]
    beside: tuple[tuple[str, ...], ...]
    tail: tuple[str, ...] = ()


_MOE_LAYOUT = TrainLayout(_LEAD["moe"], (_BESIDE["moe"],))
_FFN0, _ATTN1, _FFN1 = (
    stages.PARTS[s] for s in (stages.DENSE_FFN_0, stages.ATTENTION_1, stages.DENSE_FFN_1)
)

# Per layer kind and training schedule (dense layers have no MoE path).
_TRAIN_LAYOUT: dict[tuple[str, str], TrainLayout] = {
    ("scmoe", "scmoe"): TrainLayout(
        _LEAD["scmoe"], (_FFN0, (ATTENTION_1_QKV,), (ATTENTION_1_CORE,), _FFN1)
    ),
    ("scmoe", "conventional"): TrainLayout((ATTENTION_0, *_FFN0, *_ATTN1), (_FFN1,)),
    ("scmoe", "baseline"): TrainLayout(_LEAD["scmoe"], (), _BESIDE["scmoe"]),
    **{("moe", schedule): _MOE_LAYOUT for schedule in TRAIN_SCHEDULES},
}

_TRAIN_FLOW: dict[tuple[str, str], Mapping[str, tuple[str, ...]]] = {
    ("scmoe", "conventional"): CONVENTIONAL_FLOW,
    ("scmoe", "baseline"): SERIAL_FLOW,
}


def train_forward_program(kind: str, schedule: str, chunks: int) -> LayerProgram:
    """Forward program of one training layer with the MoE path split into ``chunks``:
    ``scmoe`` the shortcut topology, ``conventional`` the conventional one, ``baseline`` the
    serial layer without overlap (module docstring)."""
    if schedule not in TRAIN_SCHEDULES:
        raise ClusterInputError(
            f"unknown training schedule {schedule!r}; choose one of {', '.join(TRAIN_SCHEDULES)}"
        )
    flow = _TRAIN_FLOW.get((kind, schedule), DATAFLOW[kind])

    def op(stage: str, chunk: int) -> Op:
        deps = []
        for src in flow[stage]:
            if src == IN:
                continue
            if src in MOE_PATH and chunk < 0:
                deps.extend((src, c) for c in range(chunks))
            else:
                deps.append((src, chunk if src in MOE_PATH else -1))
        return Op(stage, chunk, tuple(deps), IN in flow[stage])

    def experts(c: int) -> list[Op]:
        return [op(s, c) for s in _EXPERTS_PATH]

    if kind == "dense":
        ops = [op(s, -1) for s in SBO_ORDER["dense"]]
        return LayerProgram(tuple(ops), tuple((s, -1) for s in DATAFLOW["dense"][OUT]))
    layout = _TRAIN_LAYOUT[(kind, schedule)]
    ops = [op(s, -1) for s in layout.lead]
    ops += [op(s, c) for c in range(chunks) for s in (ROUTER, DISPATCH)]
    if layout.beside:
        positions = _moe_positions(chunks, len(layout.beside))
        for b, block in enumerate(layout.beside, start=1):
            ops.extend(op(s, -1) for s in block)
            for c in range(chunks):
                if positions[c] == b:
                    ops.extend(experts(c))
    else:
        ops.extend(o for c in range(chunks) for o in experts(c))
    ops.extend(op(s, -1) for s in layout.tail)
    out = [(src, c) for src in flow[OUT] for c in (range(chunks) if src in MOE_PATH else (-1,))]
    return LayerProgram(tuple(ops), tuple(out))


def reverse_program(forward: LayerProgram) -> LayerProgram:
    """Backward program: every dataflow edge reversed, issued in reverse forward order."""
    readers: dict[Key, list[Key]] = {op.key: [] for op in forward.ops}
    for op in forward.ops:
        for dep in op.deps:
            readers[dep].append(op.key)
    outputs = set(forward.out)
    ops = tuple(
        Op(op.stage, op.chunk, tuple(readers[op.key]), op.key in outputs)
        for op in reversed(forward.ops)
    )
    return LayerProgram(ops, tuple(op.key for op in forward.ops if op.reads_input))


def train_layer_tasks(
    layers: Sequence[TrainLayerTimes],
    schedule: str,
    chunks: int,
    *,
    defer_weight_grad: bool,
    gpu: int = 0,
) -> tuple[list[Task], list[Task], float]:
    """One micro-batch through a pipeline stage's layers: (forward tasks, backward tasks, W).

    Weight-gradient tasks follow their input-gradient task unless ``defer_weight_grad``; then
    they are left out and their total seconds are returned as the W block (pure compute)."""
    for i, lt in enumerate(layers):
        check_stages(lt.forward, i)
        check_stages(lt.backward, i)
        if lt.forward.kind != lt.backward.kind:
            raise ClusterInputError(f"layer {i}: forward and backward kinds differ")
    forward_programs = {k: train_forward_program(k, schedule, chunks) for k in DATAFLOW}
    backward_programs = {k: reverse_program(p) for k, p in forward_programs.items()}
    fwd = DagBuilder()
    last: frozenset[int] = frozenset()
    for i, lt in enumerate(layers):
        program = forward_programs[lt.forward.kind]
        emitter = fwd.layer(lt.forward, last, scale_whole=chunks, layer=i, gpu=gpu)
        emitter.emit(program.ops, phase="fwd")
        last = emitter.outputs(program)

    bwd = DagBuilder()
    deferred = 0.0
    last = frozenset()
    for i in reversed(range(len(layers))):
        lt = layers[i]
        program = backward_programs[lt.backward.kind]
        emitter = bwd.layer(lt.backward, last, scale_whole=chunks, layer=i, gpu=gpu)
        for op in program.ops:
            emitter.emit((op,), phase="bwd")
            w = lt.weight_grad.get(op.stage, 0.0) * (1 if op.chunk >= 0 else chunks)
            if w <= 0.0:
                continue
            if defer_weight_grad:
                deferred += w
            else:
                source = tuple(sorted(emitter.resolved[op.key]))
                bwd.add(
                    Task(
                        op.stage,
                        COMPUTE,
                        w,
                        source,
                        layer=i,
                        chunk=max(op.chunk, 0),
                        gpu=gpu,
                        phase="wgrad",
                    )
                )
        last = emitter.outputs(program)
    return fwd.tasks, bwd.tasks, deferred


# ---------------------------------------------------------------------------- pipelines


def pipeline_tasks(
    pipeline: str,
    stages: int,
    microbatches: int,
    forward: float,
    backward: float,
    weight: float = 0.0,
) -> list[Task]:
    """Forward (F), backward (B) and weight-gradient (W) blocks of every micro-batch on every
    pipeline stage (GPU class = stage). ``backward`` excludes ``weight``; 1F1B and ``none`` run W
    inside the backward block, ``zb`` (ZB1P) defers it: stage s keeps s weight-gradient blocks
    pending and flushes them at the end, which fills the cool-down bubbles."""
    if pipeline not in PIPELINES:
        raise ClusterInputError(
            f"unknown pipeline {pipeline!r}; choose one of {', '.join(PIPELINES)}"
        )
    if stages <= 0 or microbatches <= 0:
        raise ClusterInputError("pipeline stages and micro-batches must be positive")
    split = pipeline == "zb"
    b_block = backward if split else backward + weight
    if pipeline == "none":
        stages = 1  # without pipeline dependencies every stage runs the same timeline
    order: list[list[tuple[str, int]]] = []
    for s in range(stages):
        if pipeline == "none":
            seq = [(k, i) for i in range(microbatches) for k in ("F", "B")]
            order.append(seq)
            continue
        warmup = min(stages - 1 - s, microbatches)
        seq = [("F", i) for i in range(warmup)]
        pending: list[int] = []
        next_f = warmup
        for i in range(microbatches):
            if next_f < microbatches:
                seq.append(("F", next_f))
                next_f += 1
            seq.append(("B", i))
            if split:
                pending.append(i)
                while len(pending) > s:
                    seq.append(("W", pending.pop(0)))
        seq.extend(("W", i) for i in pending)
        order.append(seq)

    index: dict[tuple[int, str, int], int] = {}
    flat = [(s, kind, i) for s, seq in enumerate(order) for kind, i in seq]
    for n, key in enumerate(flat):
        index[key] = n
    seconds = {"F": forward, "B": b_block, "W": weight}
    phases = {"F": "fwd", "B": "bwd", "W": "wgrad"}
    tasks = []
    linked = pipeline != "none"
    for s, kind, i in flat:
        deps = []
        if kind == "F" and linked and s > 0:
            deps.append(index[(s - 1, "F", i)])
        if kind == "B":
            deps.append(index[(s, "F", i)])
            if linked and s < stages - 1:
                deps.append(index[(s + 1, "B", i)])
        if kind == "W":
            deps.append(index[(s, "B", i)])
        tasks.append(
            Task(kind, COMPUTE, seconds[kind], tuple(deps), microbatch=i, gpu=s, phase=phases[kind])
        )
    return tasks


def bubble_1f1b(stages: int, forward: float, backward: float) -> float:
    """1F1B bubble per stage, (PP - 1)(F + B), B the whole backward (DualPipe README)."""
    return (stages - 1) * (forward + backward)


def bubble_zb1p(stages: int, forward: float, backward: float, weight: float) -> float:
    """ZB1P bubble, (PP - 1)(F + B - 2W), B the whole backward including W (DualPipe README).
    The ``zb`` pipeline reproduces it when W <= min(F, B - W) and micro-batches >= stages."""
    return (stages - 1) * (forward + backward - 2 * weight)


def bubble_dualpipe(
    stages: int, forward_and_backward: float, backward: float, weight: float
) -> float:
    """DualPipe bubble, (PP/2 - 1)(F&B + B - 3W), F&B one overlapped forward+backward chunk
    (DualPipe README). A closed form only; DualPipe is not simulated."""
    if stages % 2:
        raise ClusterInputError(f"DualPipe needs an even number of pipeline stages, got {stages}")
    return (stages / 2 - 1) * (forward_and_backward + backward - 3 * weight)
