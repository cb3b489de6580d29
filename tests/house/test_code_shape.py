"""Every function stays under 80 lines and every class under 250, across the whole tree."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("longcat_sim", "model", "cluster", "reports", "tests")
MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 250


def oversized(source: str, where: str) -> list[str]:
    """``where:line name (N lines)`` for each function over 80 lines and class over 250."""
    found = []
    for node in ast.walk(ast.parse(source)):
        limit = None
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            limit = MAX_FUNCTION_LINES
        elif isinstance(node, ast.ClassDef):
            limit = MAX_CLASS_LINES
        if limit is None:
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        lines = node.end_lineno - start + 1
        if lines > limit:
            found.append(f"{where}:{node.lineno} {node.name} ({lines} lines, limit {limit})")
    return found


def project_sources() -> list[Path]:
    """The project's Python files; longcat_sim/'s links to model/, cluster/ and reports/ are
    not followed, so each file is read once."""
    files = []
    for folder in FOLDERS:
        files += [p for p in (ROOT / folder).rglob("*.py") if not _behind_link(p)]
    return sorted(files)


def _behind_link(path: Path) -> bool:
    parts = path.relative_to(ROOT).parts
    return any((ROOT / Path(*parts[:i])).is_symlink() for i in range(1, len(parts)))


def test_no_function_over_80_lines_and_no_class_over_250() -> None:
    sources = project_sources()
    assert len(sources) > 100
    found = []
    for path in sources:
        found += oversized(path.read_text(), str(path.relative_to(ROOT)))
    assert not found, "split these:\n" + "\n".join(found)


def test_negative_control_the_check_flags_long_pieces() -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(80))
    long_function = f"def f():\n{body}"
    assert oversized(long_function, "f.py") == ["f.py:1 f (81 lines, limit 80)"]
    assert oversized(f"def f():\n{body[: -len('    x79 = 79') - 1]}", "f.py") == []
    methods = "".join(f"    def m{i}(self):\n        return {i}\n\n" for i in range(84))
    assert oversized(f"class C:\n{methods}", "c.py") == ["c.py:1 C (252 lines, limit 250)"]
