"""Shared fixtures. Tests that need ../shared/data skip cleanly when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network: no telemetry, no hub calls.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Labelling a volume consults the shipped Q-Former by default (the field-of-view check, engine.zeroshot.trusted):
# tests with tiny models use the physical evidence only; tests of the volume model ask for "auto" themselves.
os.environ.setdefault("MEDLENS_FOV_CHECK", "physical")
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


# --------------------------------------------------------------------------- shared fixtures (used by name)
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """A tiny random CLIP checkpoint (tests/_models.py) as a model source."""
    from _models import tiny_clip_folder

    folder = tiny_clip_folder(tmp_path_factory.mktemp("tiny_clip") / "model")
    return f"local-dir:{folder}"


@pytest.fixture(scope="module")
def tiny_ask(tmp_path_factory) -> str:
    """A tiny random Q-Former checkpoint (tests/_ask.py) as a model source."""
    from _ask import tiny_ask_folder

    return f"local-dir:{tiny_ask_folder(tmp_path_factory.mktemp('tiny_ask') / 'model')}"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny):
    """(url, gradio cache dir, demo): the app with the tiny model, on a free port."""
    from _app import running_app

    cache = tmp_path_factory.mktemp("gradio_cache")
    with running_app(cache, model=tiny) as (url, demo):
        yield url, cache, demo


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def library(tmp_path, monkeypatch) -> Path:
    """A library file of its own for the test (MEDLENS_LIBRARY), with the vector index cache cleared."""
    path = tmp_path / "lib" / "library.db"
    monkeypatch.setenv("MEDLENS_LIBRARY", str(path))
    from engine.library.vectors import clear_cache

    clear_cache()
    return path


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A private Orthanc for the test module (tests/_orthanc.py; skipped without it unless MEDLENS_REQUIRE_ORTHANC=1)."""
    from _orthanc import running_orthanc

    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture
def page(server):
    """A headless chromium page (tests/_browser.py) for the requesting module's `server`."""
    from _browser import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1100})
            page.set_default_timeout(TIMEOUT_MS)
            yield page
        finally:
            browser.close()
