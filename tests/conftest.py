"""Shared fixtures. Tests that need ../shared/data skip cleanly when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network: no telemetry, no hub calls.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Inference-path decisions and ONNX exports go to a throwaway folder, never the user's cache.
if "MEDLENS_FASTPATH_CACHE" not in os.environ:
    import tempfile

    os.environ["MEDLENS_FASTPATH_CACHE"] = tempfile.mkdtemp(prefix="medlens-fastpath-")
# Tests run the fp32 reference path unless they are about choosing one (those unset this): a first-load probe
# exports and measures every candidate (30-70 s for the shipped models), and answers must not depend on it.
os.environ.setdefault("MEDLENS_INFERENCE", "fp32")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDLENS_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data, or skip the test when this machine lacks it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent on this machine")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _private_uid_salt(monkeypatch, tmp_path_factory):
    """A fixed UID-mapping salt so tests never write into the user's config folder."""
    monkeypatch.setenv("MEDLENS_UID_SALT", "medlens-test-salt")
    import engine.deid as deid

    monkeypatch.setattr(deid, "_salt_cache", None)


def require_openvino(int8: bool = False) -> None:
    """Skip a test of the OpenVINO paths when the `fast` extra is not installed, unless MEDLENS_REQUIRE_OPENVINO=1 (CI)."""
    from engine.models import openvino_path

    if openvino_path.int8_available() if int8 else openvino_path.available():
        return
    problem = f"openvino{' and nncf' if int8 else ''} not installed: pip install -e '.[fast]'"
    if os.environ.get("MEDLENS_REQUIRE_OPENVINO") == "1":
        pytest.fail(f"MEDLENS_REQUIRE_OPENVINO=1 but {problem}")
    pytest.skip(problem)
@pytest.fixture
def installed_models(monkeypatch, tmp_path_factory):
    """Set which shipped models are installed: `installed_models({"name": folder, ...})` ({} = none).

    Points MEDLENS_ASSETS at a fresh folder whose models/ links to the given
    checkpoint folders, so every listing (engine.models.catalog) sees the same."""

    def install(models: dict) -> Path:
        root = tmp_path_factory.mktemp("assets")
        (root / "models").mkdir()
        for name, folder in models.items():
            (root / "models" / name).symlink_to(Path(folder), target_is_directory=True)
        monkeypatch.setenv("MEDLENS_ASSETS", str(root))
        from engine.models import catalog

        catalog.clear_cache()
        return root

    return install


@pytest.fixture(autouse=True)
def _private_audit_log_and_no_login(monkeypatch, tmp_path_factory):
    """Audit lines go to a throwaway file (never the user's data folder); a login configured in the
    developer's shell never leaks into a test (tests that need login set it themselves)."""
    monkeypatch.setenv("MEDLENS_AUDIT_LOG", str(tmp_path_factory.mktemp("audit") / "audit.jsonl"))
    for name in ("MEDLENS_AUTH_FILE", "MEDLENS_USERS", "MEDLENS_ALLOW_ANONYMOUS"):
        monkeypatch.delenv(name, raising=False)
