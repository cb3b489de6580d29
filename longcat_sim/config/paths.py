"""Path arguments: refused when empty, and output folders and files checked up front.

An empty argument would otherwise mean the current directory (``Path("")`` is ``.``), so
:func:`path_arg` (an argparse ``type``) refuses it. :func:`check_output_dir` and
:func:`check_output_file` prove, before a long run starts, that its outputs can be written: the
folder is created if missing and a small probe file is written into it, so a path under a
regular file, a read-only or pseudo file system, or a full disk is one line naming the path.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from longcat_sim.errors import UserError

__all__ = ["check_output_dir", "check_output_file", "path_arg", "text_arg"]

PROBE_BYTES = 4096  # what the probe writes: one page, so a full disk refuses it


NAME_MAX = 255  # bytes in one path component (Linux, macOS)
PATH_MAX = 4096  # bytes in a whole path


def _unusable(text: str) -> str | None:
    """Why no file system can hold the path ``text``, or None."""
    if "\0" in text:
        return "contains a NUL character"
    if len(os.fsencode(text)) >= PATH_MAX:
        return f"is longer than {PATH_MAX - 1} bytes"
    if any(len(os.fsencode(part)) > NAME_MAX for part in Path(text).parts):
        return f"has a component longer than {NAME_MAX} bytes"
    return None


def path_arg(text: str) -> Path:
    """argparse ``type`` of a path option: the path, or a usage error when it is empty or no
    file system can hold it."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "needs a path, got an empty string (use '.' for the current folder)"
        )
    if (reason := _unusable(text)) is not None:
        raise argparse.ArgumentTypeError(f"the path {reason}")
    return Path(text)


def text_arg(text: str) -> str:
    """argparse ``type`` of a name-or-file option: the text, or a usage error when empty or
    not even a possible file name."""
    if not text.strip():
        raise argparse.ArgumentTypeError("needs a preset name or a file, got an empty string")
    if (reason := _unusable(text)) is not None:
        raise argparse.ArgumentTypeError(f"the file name {reason}")
    return text


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _file_above(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` (or ``path`` itself) that is not a folder."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def check_output_dir(path: str | Path, flag: str) -> Path:
    """Create ``path`` (and its parents) and write and remove a probe file in it; one line
    of :class:`UserError` naming ``flag`` and the reason when that fails."""
    folder = Path(path)
    where = f"{flag} {str(folder)!r}"
    blocker = _file_above(folder)
    if blocker is not None:
        raise UserError(f"{where}: {str(blocker)!r} is a file, not a folder; choose a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _probe(folder)
    except OSError as exc:
        raise UserError(f"{where} is not writable: {_reason(exc)}; choose another folder") from None
    return folder


def check_output_file(path: str | Path, flag: str) -> Path:
    """Refuse an output file path that is a folder or whose folder cannot be written (the
    folder must exist; it is probed, not created)."""
    file = Path(path)
    where = f"{flag} {str(file)!r}"
    if file.is_dir():
        raise UserError(f"{where} is a folder; give a file path such as out.json")
    blocker = _file_above(file.parent)
    if blocker is not None:
        raise UserError(f"{where}: {str(blocker)!r} is a file, not a folder")
    if not file.parent.is_dir():
        raise UserError(
            f"{where}: folder {str(file.parent)!r} does not exist; create it or choose a path "
            "in an existing folder"
        )
    try:
        _probe(file.parent)
    except OSError as exc:
        raise UserError(f"{where}: its folder is not writable: {_reason(exc)}") from None
    return file


def _probe(folder: Path) -> None:
    """Write ``PROBE_BYTES`` to a temporary file in ``folder`` and remove it."""
    # not named like an interrupted write's temporary, which a run directory's new owner removes
    fd, name = tempfile.mkstemp(dir=folder, prefix=".longcat-sim-probe.", suffix=".probe")
    try:
        os.write(fd, b"\0" * PROBE_BYTES)
    finally:
        os.close(fd)
        Path(name).unlink(missing_ok=True)
