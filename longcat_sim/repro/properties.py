"""Invariance properties of any ``nn.Module``, each naming the first divergent module.

Every property runs two executions that must agree bit for bit, hooks every module's outputs
in both (:mod:`longcat_sim.repro.trace`) and reports the first module, in execution order,
whose outputs differ. Outputs are aligned by their leading dimension: a tensor whose first
dimension is the batch (``B``) or the batch's tokens flattened (``B * T`` for inputs of shape
``(B, T, ...)``) is compared row by row; a tensor with leading dimension 1 or a scalar (e.g. a
rotary table broadcast over the batch) is compared whole; any other (e.g. tokens grouped by
expert inside an MoE) is not comparable row by row and is skipped (``skipped`` counts these).
Under a permutation, a submodule's tensor bitwise unchanged between the two calls agrees
whatever its shape (a positional table whose length happens to equal the batch size). The
model's own output (what ``forward`` returns) is always compared row by row: one that does not
line up with the batch is a ValueError asking for a ``forward`` that returns ``[B, ...]``.

- :func:`batch_invariance`: row ``index`` computed alone equals row ``index`` of the batch;
- :func:`permutation_invariance`: permuting the batch permutes every output row the same way;
- :func:`thread_invariance`: the same call on 1 and N intra-op threads;
- :func:`rerun_determinism`: two fresh processes running an entry point's training steps;
- :func:`world_size_invariance` (in :mod:`longcat_sim.repro.world`): one process against a
  gloo data-parallel world.

Each returns a :class:`PropertyResult`; ``result.check()`` raises :class:`PropertyViolation`
naming the module. :func:`expect_counterexample` is the negative control: it asserts a
property failed and returns where. :func:`coupled_rows` and :func:`thread_dependent` perturb a
module so that a property must fail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from longcat_sim.repro.trace import (
    ROOT,
    Align,
    ModuleDivergence,
    Traced,
    bitwise_equal,
    compare_traces,
    first_module_divergence,
    trace_outputs,
    with_output,
)

Forward = Callable[[nn.Module, torch.Tensor], Any]


def call_module(module: nn.Module, inputs: torch.Tensor) -> Any:
    return module(inputs)


class PropertyViolation(AssertionError):
    """A property failed; the message names the first divergent module."""


@dataclass(frozen=True)
class PropertyResult:
    """Whether ``name`` held; if not, the first divergent module. ``compared`` counts the
    tensor pairs compared, ``skipped`` the module outputs not comparable with the batch."""

    name: str
    holds: bool
    divergence: ModuleDivergence | None
    compared: int
    skipped: int = 0

    def describe(self) -> str:
        if self.holds:
            return (
                f"{self.name} holds ({self.compared} bitwise comparisons, "
                f"{self.skipped} tensors skipped as not aligned with the batch)"
            )
        where = self.divergence.describe() if self.divergence else "no module output"
        return f"{self.name} fails: first divergence at {where}"

    def check(self) -> PropertyResult:
        """``self`` when the property held; otherwise raise :class:`PropertyViolation`."""
        if not self.holds:
            raise PropertyViolation(self.describe())
        return self

    def to_dict(self) -> dict[str, Any]:
        div = None if self.divergence is None else self.divergence.to_dict()
        return {
            "property": self.name,
            "holds": self.holds,
            "divergence": div,
            "compared": self.compared,
            "skipped": self.skipped,
        }


def result(
    name: str, divergence: ModuleDivergence | None, compared: int, skipped: int = 0
) -> PropertyResult:
    return PropertyResult(name, divergence is None, divergence, compared, skipped)


def expect_counterexample(outcome: PropertyResult) -> ModuleDivergence:
    """Negative control: assert the property failed and return its first divergent module."""
    if outcome.holds or outcome.divergence is None:
        raise AssertionError(f"expected a counterexample, but {outcome.describe()}")
    return outcome.divergence


# -- alignment of outputs --------------------------------------------------------------------


def _rows(t: torch.Tensor, batch: int, per_row: int | None) -> torch.Tensor | None:
    """``t`` as (batch, ...) rows: its own leading dimension, or ``batch * per_row`` flattened
    tokens regrouped; None when its leading dimension is neither."""
    if t.dim() == 0:
        return None
    if t.shape[0] == batch:
        return t
    if per_row and per_row > 1 and t.shape[0] == batch * per_row:
        return t.reshape(batch, per_row, *t.shape[1:])
    return None


def _broadcast(a: torch.Tensor, b: torch.Tensor):
    """Tensors shared by every row (leading dimension 1, or scalars) are compared whole."""
    return (a, b) if a.shape == b.shape and (a.dim() == 0 or a.shape[0] == 1) else None


def slice_align(start: int, stop: int, batch: int, per_row: int | None = None) -> Align:
    """Run a had rows ``start:stop`` of the ``batch`` rows run b had; compare those rows.
    ``per_row`` is the tokens per row when modules flatten the rows' tokens."""
    n = stop - start

    def align(a: torch.Tensor, b: torch.Tensor):
        if n == batch:
            return (a, b) if a.shape == b.shape else None
        if a.dim() == 0 or b.dim() == 0:
            return None  # a reduction over the rows (a mean loss) may differ legitimately
        rows_a, rows_b = _rows(a, n, per_row), _rows(b, batch, per_row)
        if rows_a is not None and rows_b is not None and rows_a.shape[1:] == rows_b.shape[1:]:
            return rows_a, rows_b[start:stop]
        return _broadcast(a, b) if rows_b is None else None

    return align


def permutation_align(perm: torch.Tensor, per_row: int | None = None) -> Align:
    batch = len(perm)

    def align(a: torch.Tensor, b: torch.Tensor):
        if a.shape != b.shape:
            return None
        rows_a, rows_b = _rows(a, batch, per_row), _rows(b, batch, per_row)
        if rows_a is None or rows_b is None:
            return _broadcast(a, b)
        if bitwise_equal(a, b):  # unchanged by the permutation: not tied to the rows (e.g. a
            return a, b  # positional table whose length happens to equal the batch)
        return rows_a[perm], rows_b

    return align


def tokens_per_row(batch: torch.Tensor) -> int | None:
    return int(batch.shape[1]) if batch.dim() >= 2 else None


def _unaligned(t: torch.Tensor, batch: int) -> ValueError:
    return ValueError(
        f"the model's output of shape {tuple(t.shape)} does not line up with the batch of "
        f"{batch} rows; pass forward= returning a tensor of shape [B, ...]"
    )


def root_slice_align(start: int, stop: int, batch: int, per_row: int | None = None) -> Align:
    """:func:`slice_align` for the model's own output: it must be rows of the batch."""
    n = stop - start

    def align(a: torch.Tensor, b: torch.Tensor):
        if n == batch and a.shape == b.shape:
            return a, b
        rows_a, rows_b = _rows(a, n, per_row), _rows(b, batch, per_row)
        if rows_a is None or rows_b is None or rows_a.shape[1:] != rows_b.shape[1:]:
            raise _unaligned(b, batch)
        return rows_a, rows_b[start:stop]

    return align


def root_permutation_align(perm: torch.Tensor, per_row: int | None = None) -> Align:
    """:func:`permutation_align` for the model's own output: rows of the batch, permuted,
    even when the permutation left it bitwise unchanged."""
    batch = len(perm)

    def align(a: torch.Tensor, b: torch.Tensor):
        rows_a, rows_b = _rows(a, batch, per_row), _rows(b, batch, per_row)
        if a.shape != b.shape or rows_a is None or rows_b is None:
            raise _unaligned(a, batch)
        return rows_a[perm], rows_b

    return align


def _traced(module: nn.Module, forward: Forward, inputs: torch.Tensor) -> Traced:
    """Every module's outputs, the root's being what ``forward`` returned."""
    out, traced = trace_outputs(module, lambda: forward(module, inputs))
    traced = with_output(traced, out)
    if not any(name == ROOT for name, _, _ in traced):
        raise ValueError("the model's output holds no tensor; pass forward= returning [B, ...]")
    return traced


# -- the properties ----------------------------------------------------------------------------


@torch.no_grad()
def batch_invariance(
    module: nn.Module, batch: torch.Tensor, index: int = 0, *, forward: Forward = call_module
) -> PropertyResult:
    """Row ``index`` of ``batch`` alone gives the same module outputs as inside the batch."""
    size = batch.shape[0]
    if not 0 <= index < size:
        raise ValueError(f"index {index} is outside a batch of {size}")
    alone = _traced(module, forward, batch[index : index + 1])
    full = _traced(module, forward, batch)
    span = (index, index + 1, size, tokens_per_row(batch))
    found = compare_traces(alone, full, slice_align(*span), root_slice_align(*span))
    return result("batch invariance", found.divergence, found.compared, found.skipped)


@torch.no_grad()
def permutation_invariance(
    module: nn.Module,
    batch: torch.Tensor,
    permutation: Sequence[int] | torch.Tensor | None = None,
    *,
    forward: Forward = call_module,
) -> PropertyResult:
    """Permuting the batch's rows permutes every module output's rows alike (default: reversed)."""
    size = batch.shape[0]
    perm = torch.as_tensor(
        list(range(size))[::-1] if permutation is None else permutation, dtype=torch.long
    )
    if sorted(perm.tolist()) != list(range(size)):
        raise ValueError(f"{perm.tolist()} is not a permutation of {size} rows")
    plain = _traced(module, forward, batch)
    permuted = _traced(module, forward, batch[perm])
    per_row = tokens_per_row(batch)
    found = compare_traces(
        plain, permuted, permutation_align(perm, per_row), root_permutation_align(perm, per_row)
    )
    return result("permutation invariance", found.divergence, found.compared, found.skipped)


@contextmanager
def num_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the block."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def thread_invariance(
    module: nn.Module,
    inputs: torch.Tensor,
    threads: tuple[int, int] = (1, 2),
    *,
    forward: Forward = call_module,
) -> PropertyResult:
    """The same call on ``threads[0]`` and ``threads[1]`` intra-op threads, bitwise."""
    traces = []
    for n in threads:
        with num_threads(n):
            traces.append(trace_outputs(module, lambda: forward(module, inputs))[1])
    div, compared = first_module_divergence(*traces)
    return result(f"thread invariance {threads[0]} vs {threads[1]}", div, compared)


def rerun_determinism(
    entry: str,
    *,
    steps: int = 2,
    runs: int = 2,
    seed: int = 0,
    threads: Sequence[int] = (1,),
    in_process: bool = False,
    workers: int = 1,
) -> PropertyResult:
    """``runs`` runs of an entry point's first ``steps`` training steps, each in a fresh
    process (unless ``in_process``; ``workers`` at a time), are bitwise equal; names the first
    divergent module."""
    from longcat_sim.repro.library import check_entry_determinism

    report = check_entry_determinism(
        entry,
        runs=runs,
        steps=steps,
        threads=threads,
        seed=seed,
        in_process=in_process,
        workers=workers,
    )
    div = report.first_divergence
    found = None
    if div is not None:
        tensor = f"step {div.step}: {div.tensor}"
        found = ModuleDivergence(div.module, tensor, div.max_abs, div.max_ulp)
    compared = (report.runs - 1) * report.steps  # step digests compared with run 0
    return result("rerun determinism", found, compared)


# -- perturbations for negative controls ------------------------------------------------------


@contextmanager
def _output_hook(model: nn.Module, name: str, change: Callable[[torch.Tensor], torch.Tensor]):
    module = dict(model.named_modules()).get(name)
    if module is None:
        raise ValueError(f"module {name!r} is not in the model")

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return change(output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (change(output[0]), *output[1:])
        raise ValueError(f"module {name!r} returns no tensor to perturb")

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def coupled_rows(model: nn.Module, name: str, scale: float = 1e-3):
    """Module ``name`` adds ``scale`` times its first output row to every row: its outputs
    then depend on the batch's other rows and their order."""
    return _output_hook(model, name, lambda t: t + scale * t[:1])


def thread_dependent(model: nn.Module, name: str, scale: float = 1e-3):
    """Module ``name`` adds ``scale * (threads - 1)`` to its output."""
    return _output_hook(model, name, lambda t: t + scale * (torch.get_num_threads() - 1))
