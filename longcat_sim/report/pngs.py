"""PNG export of the report's figures through kaleido and a system Chromium."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from longcat_sim.reports.html import Figure
from longcat_sim.runs import write_bytes_atomic

PNG_DIR = "figures"
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PNG_WIDTH = 1100


def find_browser() -> str | None:
    """A Chromium-family browser on PATH for kaleido, or None."""
    for name in BROWSER_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


async def _render_pngs(figures: Sequence[Figure], browser: str) -> list[bytes]:
    import kaleido

    out = []
    async with kaleido.Kaleido(n=1, timeout=120, mathjax=False, path=browser) as k:
        for f in figures:
            height = f.figure.layout.height or 500
            opts = {"format": "png", "width": PNG_WIDTH, "height": height, "scale": 1}
            out.append(await k.calc_fig(f.figure, opts=opts))
    return out


@dataclass(frozen=True)
class PngResult:
    written: tuple[str, ...]  # paths relative to the run directory
    skipped: str | None  # why no PNGs were written, else None


def write_pngs(figures: Sequence[Figure], run_dir: Path) -> PngResult:
    """One PNG per figure under ``run_dir/figures`` through kaleido and a system Chromium;
    skipped, with the reason, when either is missing or the export fails."""
    try:
        import kaleido  # noqa: F401
        from kaleido.errors import ChromeNotFoundError, KaleidoError
    except ImportError:
        return PngResult((), "kaleido is not installed (pip install kaleido)")
    browser = find_browser()
    if browser is None:
        return PngResult((), "no Chromium on PATH (install chromium to get PNG figures)")
    try:
        images = asyncio.run(_render_pngs(figures, browser))
    except (ChromeNotFoundError, KaleidoError, RuntimeError, OSError, TimeoutError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return PngResult((), f"PNG export through kaleido failed: {reason}")
    written = []
    for f, image in zip(figures, images, strict=True):
        relative = f"{PNG_DIR}/{f.div_id}.png"
        write_bytes_atomic(run_dir / relative, image)
        written.append(relative)
    return PngResult(tuple(written), None)
