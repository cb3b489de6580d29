"""What the reproducibility library runs: an :class:`Experiment`, built by an entry point.

An entry point is a ``package.module:function`` string. The function is called as
``function(seed=SEED)`` after the caller has set ``torch.manual_seed(SEED)`` and the intra-op
thread count, and must return an :class:`Experiment` whose model, optimizer and data depend on
nothing but the seed. Its ``step(i)`` runs training step ``i`` completely (zero the gradients,
forward, loss, backward, optimizer step) and returns the loss as a scalar tensor; it may read
only ``i``, the model, the optimizer and torch's global RNG, so that a step rerun from a
snapshot of those computes the same values. ``batch`` and ``loss`` are optional; the
world-size property needs them (``batch(i)`` is step ``i``'s global batch, a tensor or tuple of
tensors split along dimension 0; ``loss(model, batch)`` is the mean loss over its samples).

The module is imported from ``sys.path`` plus the working directory; worker processes get this
process's ``sys.path`` as ``PYTHONPATH``.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from longcat_sim.errors import UserError

ENTRY_PATTERN = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


@dataclass
class Experiment:
    """A model, its optimizer and one training step ``step(i) -> loss``."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    step: Callable[[int], torch.Tensor]
    batch: Callable[[int], Any] | None = None
    loss: Callable[[nn.Module, Any], torch.Tensor] | None = None

    @classmethod
    def supervised(
        cls,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batch: Callable[[int], Any],
        loss: Callable[[nn.Module, Any], torch.Tensor],
    ) -> Experiment:
        """The usual step from a batch source and a loss: zero grads, backward, update."""

        def step(i: int) -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            value = loss(model, batch(i))
            value.backward()
            optimizer.step()
            return value.detach()

        return cls(model, optimizer, step, batch, loss)


def load_entry(entry: str) -> Callable[..., Experiment]:
    """The function an entry string names; a malformed or unimportable one is a UserError."""
    if not ENTRY_PATTERN.match(entry or ""):
        raise UserError(f"entry {entry!r} is not 'package.module:function'; e.g. mypkg.train:build")
    module_name, _, attr = entry.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # a console script does not search the working directory
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure of the user's module is one line, not a traceback
        raise UserError(
            f"cannot import {module_name!r} for entry {entry!r} ({type(exc).__name__}: {exc}); "
            "check PYTHONPATH and the module"
        ) from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise UserError(f"module {module_name!r} has no function {attr!r} (entry {entry!r})")
    return function


def build_experiment(entry: str, seed: int = 0, threads: int | None = None) -> Experiment:
    """Set the seed (and thread count), then call the entry point and check what it returned."""
    function = load_entry(entry)
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    try:
        experiment = function(seed=seed)
    except Exception as exc:
        raise UserError(f"entry {entry!r} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(experiment, Experiment):
        raise UserError(
            f"entry {entry!r} returned {type(experiment).__name__}; it must return an Experiment"
        )
    return experiment


def refuse_options_with_entry(args: Any, options: tuple[str, ...], what: str) -> None:
    """One line naming the ``options`` of the built-in model that the command line gave
    (``args.given_options``: ``config.flags.given_options``): with ``--entry`` they would be ignored (``what``
    says what runs instead), even when they repeat a default."""
    given = [name for name in options if name in args.given_options]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise UserError(f"{flags} do not apply with --entry ({what})")
