"""Every name a benchmark or training script imports from the project still exists.

Benchmarks import inside their functions (so `--help` stays fast), and no unit test runs them: a
renamed engine function broke bench/encoder3d.py unnoticed until someone ran it. This reads each
script's `from engine/training/app/_helper import name` statements and checks the names resolve."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "bench").glob("*.py")) + sorted((REPO / "training").glob("*.py"))
PROJECT_PACKAGES = ("engine", "training", "app")


def project_imports(script: Path) -> list[tuple[str, str]]:
    """(module, name) for each `from <project module> import name` in the script, at any depth."""
    found = []
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in PROJECT_PACKAGES or node.module.startswith("_"):
                found += [(node.module, alias.name) for alias in node.names if alias.name != "*"]
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=[f"{p.parent.name}/{p.name}" for p in SCRIPTS])
def test_every_project_name_a_script_imports_exists(script, monkeypatch):
    # the scripts' own helpers (bench/_*.py, tests/_*.py) are found the way the scripts find them
    for folder in (REPO / "tests", REPO / "bench", REPO):
        monkeypatch.syspath_prepend(str(folder))
    missing = []
    for module_name, name in project_imports(script):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] in PROJECT_PACKAGES or (exc.name or "").startswith("_"):
                raise
            continue  # an optional dependency of that module (ray, SimpleITK, ...) is not installed here
        if hasattr(module, name):
            continue
        try:
            importlib.import_module(f"{module_name}.{name}")  # a submodule
        except ImportError:
            missing.append(f"{module_name}.{name}")
    assert not missing, f"{script.name} imports names that no longer exist: {missing}"
