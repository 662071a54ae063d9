"""The Space installs from requirements.txt (and packages.txt), not pyproject: both must name what the app imports.

Fast and offline: reads the files and the app's source; the slow check that a
fresh venv built from requirements.txt really runs app.py is tests/test_space.py.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"engine", "app", "training"}
# imported only inside a guard, with a fallback: not needed at run time
OPTIONAL = {
    "faiss": "engine.library.vectors falls back to numpy without it",
    "ray": "medlens batch --engine ray only (the `scale` extra); without it the command says how to install it",
    "pyarrow": "medlens batch's Parquet output only (the `scale` extra); JSON Lines without it",
    "openvino": "the `fast` extra: engine.models.openvino_path is a candidate path only when installed",
    "nncf": "the `fast` extra (with openvino): static int8, only with MEDLENS_CALIBRATION_IMAGES",
}
# needed at run time but never imported by name: pydicom's decoder plugins find them
PLUGINS = {"pylibjpeg", "pylibjpeg-openjpeg", "pyjpegls", "python-gdcm"}


def requirements_txt() -> dict[str, Requirement]:
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            out[canonicalize_name(req.name)] = req
    return out


def pyproject_core() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {canonicalize_name(Requirement(r).name): Requirement(r) for r in project["dependencies"]}


def runtime_imports() -> dict[str, set[str]]:
    """Top-level third-party modules imported anywhere in app.py, app/ and engine/ (lazy imports included)."""
    found: dict[str, set[str]] = {}
    for path in [ROOT / "app.py", *(ROOT / "app").rglob("*.py"), *(ROOT / "engine").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_requirements_txt_and_pyproject_name_the_same_dependencies():
    txt, core = requirements_txt(), pyproject_core()
    assert sorted(txt) == sorted(core), (
        f"only in requirements.txt: {sorted(set(txt) - set(core))}; only in pyproject: {sorted(set(core) - set(txt))}"
    )
    differ = {name: (str(txt[name]), str(core[name])) for name in txt if str(txt[name]) != str(core[name])}
    assert not differ, f"versions differ (requirements.txt, pyproject): {differ}"


def test_every_module_the_app_imports_is_listed_in_requirements_txt():
    listed = set(requirements_txt())
    to_dists = md.packages_distributions()
    missing = {}
    for module, files in runtime_imports().items():
        if module in OPTIONAL:
            continue
        dists = {canonicalize_name(d) for d in to_dists.get(module, [])}
        assert dists, f"{module} (imported by {sorted(files)[:3]}) is not installed here: which package provides it?"
        if not dists & listed:
            missing[module] = (sorted(dists), sorted(files)[:3])
    assert not missing, f"imported by the app but not in requirements.txt (a transitive dependency can vanish): {missing}"
    assert {canonicalize_name(p) for p in PLUGINS} <= listed, "pydicom's decoders must be installed on the Space"


def test_the_space_installs_tesseract_for_burned_in_text_removal():
    packages = (ROOT / "packages.txt").read_text().split()
    assert "tesseract-ocr" in packages  # engine.redact; without it every ultrasound stays unredacted and flagged
    assert all(not p.startswith("#") for p in packages), "packages.txt is fed to apt-get as is: no comments"
