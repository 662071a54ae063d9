"""engine.settings: every MEDLENS_* variable is read there and nowhere else, typed, and documented in the README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine import settings

ROOT = Path(__file__).resolve().parents[1]
READ = re.compile(r"""(environ\.get\(|environ\[|getenv\()\s*["']MEDLENS_""")


def test_no_medlens_variable_is_read_outside_settings():
    offenders = []
    for folder in ("engine", "app", "training"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == ROOT / "engine" / "settings.py":
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if READ.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "read MEDLENS_* through engine.settings:\n" + "\n".join(offenders)


def test_readme_lists_every_setting():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert settings.markdown_table() in readme, "README's settings table is stale: paste engine.settings.markdown_table()"


def test_unset_and_blank_give_the_default(monkeypatch):
    monkeypatch.delenv("MEDLENS_INFERENCE", raising=False)
    assert settings.INFERENCE.get() == "auto"
    monkeypatch.setenv("MEDLENS_INFERENCE", "   ")
    assert settings.INFERENCE.get() == "auto"
    monkeypatch.setenv("MEDLENS_INFERENCE", "bf16")
    assert settings.INFERENCE.get() == "bf16"


def test_values_are_typed(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDLENS_THREADS", "3")
    assert settings.THREADS.get() == 3
    monkeypatch.setenv("MEDLENS_LIBRARY", str(tmp_path / "lib.db"))
    assert settings.LIBRARY.get() == tmp_path / "lib.db"


@pytest.mark.parametrize("raw", ["two", "0", "-1", "1.5"])
def test_a_malformed_value_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv("MEDLENS_THREADS", raw)
    with pytest.raises(settings.SettingsError, match="MEDLENS_THREADS"):
        settings.THREADS.get()


def test_assets_folder_is_found_one_way(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDLENS_ASSETS", raising=False)
    assert settings.assets_dir() == ROOT / "assets"
    monkeypatch.setenv("MEDLENS_ASSETS", str(tmp_path))
    assert settings.assets_dir() == tmp_path
    from engine.models.registry import shipped_models

    assert shipped_models() == {}  # the override is honoured by the model listing too
