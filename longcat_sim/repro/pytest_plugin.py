"""pytest plugin (entry point ``longcat_sim_repro``): the ``repro`` fixture and two markers.

``repro`` exposes the invariance properties of :mod:`longcat_sim.repro` as methods; each
returns a :class:`~longcat_sim.repro.PropertyResult` (call ``.check()`` to fail the test with
the first divergent module named) and ``repro.expect_counterexample(result)`` is the negative
control. Markers set the fixture's defaults:

- ``@pytest.mark.repro_threads(1, 2)``: the thread counts ``repro.thread_invariance`` compares
  (default ``(1, 2)``);
- ``@pytest.mark.repro_entry("pkg.mod:build")``: the entry point ``repro.rerun_determinism``
  and ``repro.world_size_invariance`` use when called without one.

torch is imported only when a test asks for the fixture.
"""

from __future__ import annotations

from typing import Any

import pytest

MARKERS = (
    "repro_threads(a, b): the two intra-op thread counts repro.thread_invariance compares",
    "repro_entry(entry): the default entry point (package.module:function) of the repro fixture",
)


def pytest_configure(config: pytest.Config) -> None:
    for line in MARKERS:
        config.addinivalue_line("markers", line)


class Repro:
    """The properties with this test's marker defaults applied."""

    def __init__(self, threads: tuple[int, int], entry: str | None) -> None:
        import longcat_sim.repro as api

        self.api = api
        self.threads = threads
        self.entry = entry
        self.batch_invariance = api.batch_invariance
        self.permutation_invariance = api.permutation_invariance
        self.expect_counterexample = api.expect_counterexample
        self.coupled_rows = api.coupled_rows
        self.thread_dependent = api.thread_dependent

    def thread_invariance(self, module: Any, inputs: Any, **options: Any) -> Any:
        options.setdefault("threads", self.threads)
        return self.api.thread_invariance(module, inputs, **options)

    def _entry(self, entry: str | None) -> str:
        chosen = entry or self.entry
        if chosen is None:
            raise pytest.UsageError("name an entry point or mark the test with repro_entry(...)")
        return chosen

    def rerun_determinism(self, entry: str | None = None, **options: Any) -> Any:
        return self.api.rerun_determinism(self._entry(entry), **options)

    def world_size_invariance(self, entry: str | None = None, **options: Any) -> Any:
        return self.api.world_size_invariance(self._entry(entry), **options)


@pytest.fixture
def repro(request: pytest.FixtureRequest) -> Repro:
    """The reproducibility properties (see the module docstring for the markers)."""
    threads = request.node.get_closest_marker("repro_threads")
    entry = request.node.get_closest_marker("repro_entry")
    pair = tuple(threads.args) if threads else (1, 2)
    if len(pair) != 2 or not all(isinstance(n, int) and n > 0 for n in pair):
        raise pytest.UsageError(f"repro_threads takes two positive thread counts, got {pair}")
    return Repro(pair, entry.args[0] if entry else None)  # type: ignore[arg-type]
