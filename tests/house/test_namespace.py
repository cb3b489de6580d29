"""Installed, the project is one import name: ``longcat_sim`` (with ``longcat_sim.model``,
``longcat_sim.cluster`` and ``longcat_sim.reports``); nothing named ``model`` lands beside it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_CHECK = """
import importlib.util, json, sys
sys.path.insert(0, sys.argv[1])
import longcat_sim.model.config, longcat_sim.cluster.simulator, longcat_sim.reports.page
print(json.dumps({
    "model": longcat_sim.model.config.__file__,
    "cluster": longcat_sim.cluster.simulator.__file__,
    "reports": longcat_sim.reports.page.__file__,
    "bare": [n for n in ("model", "cluster", "reports") if importlib.util.find_spec(n)],
}))
"""


_NOT_SOURCES = shutil.ignore_patterns(
    ".git",
    ".venv",
    "runs",
    "build",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
    ".benchmarks",
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``pip install .`` would install, built from a copy of the sources (links kept),
    so no earlier build folder can leak stale modules into it."""
    tree = tmp_path_factory.mktemp("tree") / "longcat-sim"
    shutil.copytree(ROOT, tree, symlinks=True, ignore=_NOT_SOURCES)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(out), str(tree)],
        check=True, capture_output=True, cwd=out,
    )  # fmt: skip
    (found,) = out.glob("longcat_sim-*.whl")
    return found


def test_the_wheel_has_one_top_level_name_and_every_source_module(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {
        "longcat_sim"
    }
    sources = {
        f"longcat_sim/{p.relative_to(ROOT / folder).as_posix()}"
        if folder == "longcat_sim"
        else f"longcat_sim/{folder}/{p.relative_to(ROOT / folder).as_posix()}"
        for folder in ("longcat_sim", "model", "cluster", "reports")
        for p in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    modules = {n for n in names if n.endswith(".py")}
    assert modules == sources, sorted(modules ^ sources)


def test_installed_subpackages_import_and_bare_model_is_not_ours(
    wheel: Path, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    out = subprocess.run(
        [sys.executable, "-c", _CHECK, str(site)],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    found = json.loads(out.stdout)
    for key in ("model", "cluster", "reports"):
        assert Path(found[key]).is_relative_to(site / "longcat_sim" / key), found
    assert found["bare"] == []


def test_negative_control_a_bare_model_folder_on_the_path_is_found(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "__init__.py").write_text("")
    probe = "import importlib.util as u, sys; sys.path.insert(0, sys.argv[1]); print(bool(u.find_spec('model')))"
    out = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "True"
