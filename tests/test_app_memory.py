"""Shared-server safety of uploads and sessions, through a real server (gradio_client and raw HTTP):
identical uploads do not race, upload answers are neutral, unused and aborted uploads are swept,
and the memory of a session's scans is freed when it goes idle or its tab closes."""

from __future__ import annotations

import gc
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _app import running_app  # noqa: E402
from _big_series import write_ct_series  # noqa: E402

OUT_METADATA = 11  # /load_files outputs: ..., metadata, warnings, files (tests/test_app_client.py OUT)


@pytest.fixture(scope="module")
def viewer(tmp_path_factory):
    """(url, upload folder, demo): the app without models, with a short heartbeat so closed clients are noticed."""
    old = os.environ.get("GRADIO_HEARTBEAT_INTERVAL")
    os.environ["GRADIO_HEARTBEAT_INTERVAL"] = "0.3"
    cache = tmp_path_factory.mktemp("gradio_cache")
    try:
        with running_app(cache) as (url, demo):
            yield url, cache, demo
    finally:
        if old is None:
            os.environ.pop("GRADIO_HEARTBEAT_INTERVAL", None)
        else:
            os.environ["GRADIO_HEARTBEAT_INTERVAL"] = old


def _left(cache: Path) -> list[str]:
    """Files in the upload folder besides Gradio's own folder."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file() and "vibe_edit_history" not in p.parts)


def _wait(condition, timeout: float = 20.0, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def _upload(url: str, name: str, content: bytes) -> list[str]:
    import httpx

    response = httpx.post(url + "gradio_api/upload", files=[("files", (name, content, "application/octet-stream"))])
    assert response.status_code == 200, response.text
    return json.loads(response.text)


# --------------------------------------------------------------------------- races
def test_twenty_identical_uploads_at_once_all_load(viewer):
    from gradio_client import Client, handle_file
    from pydicom.data import get_testdata_file

    url, cache, _demo = viewer
    path = get_testdata_file("CT_small.dcm")
    clients = [Client(url, verbose=False) for _ in range(20)]
    shapes, errors = [], []
    barrier = threading.Barrier(20)

    def one(client):
        barrier.wait()
        try:
            out = client.predict([handle_file(path)], api_name="/load_files")
            shapes.append(out[OUT_METADATA]["series"]["shape"])
        except Exception as exc:  # the app's message
            errors.append(str(exc))

    threads = [threading.Thread(target=one, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in clients:
        c.close()
    assert errors == [] and shapes == [[128, 128]] * 20
    assert _wait(lambda: _left(cache) == []), f"uploads left in Gradio's cache: {_left(cache)}"


# --------------------------------------------------------------------------- what an upload answer reveals
def test_an_upload_answer_names_a_private_neutral_path(viewer):
    import httpx

    url, cache, _demo = viewer
    [path] = _upload(url, "patient_DOE_JOHN_1970.png", b"\x89PNG not really")
    where = Path(path)
    assert where.parent.parent == cache.resolve() and len(where.parent.name) == 32 and where.name == "upload.png"
    assert "DOE" not in path and "patient" not in path
    assert httpx.get(url + "gradio_api/file=" + path).status_code == 200  # Gradio needs the path to fetch it back
    assert _wait(lambda: _left(cache) == [str(where.relative_to(cache.resolve()))]), "the shared content path stayed"
    assert not any("DOE" in p for p in _left(cache))
    two = [_upload(url, "same.dcm", b"same bytes")[0] for _ in range(2)]
    assert two[0] != two[1], "identical uploads must get their own paths"


# --------------------------------------------------------------------------- sweeping
def test_an_upload_never_loaded_is_swept_within_a_minute(viewer):
    from app import housekeeping, uploads

    url, cache, demo = viewer
    [path] = _upload(url, "scan.dcm", b"never loaded")
    uploads.sweep(demo)
    assert Path(path).exists()  # fresh: kept
    assert uploads.sweep(demo, now=time.time() + uploads.UNUSED_S + 1) >= 1
    assert not Path(path).exists() and not Path(path).parent.exists()
    assert uploads.UNUSED_S + housekeeping.SWEEP_S <= 60


def test_an_upload_a_queued_event_refers_to_is_kept(viewer):
    from app import uploads

    url, _cache, _demo = viewer
    [path] = _upload(url, "queued.dcm", b"waiting for its turn")
    event = SimpleNamespace(data=SimpleNamespace(data=[[{"path": path, "meta": {"_type": "gradio.FileData"}}]]))
    blocks = SimpleNamespace(_queue=SimpleNamespace(event_ids_to_events={"e1": event}))
    uploads.sweep(blocks, now=time.time() + 3600)
    assert Path(path).exists()
    assert uploads.sweep(SimpleNamespace(_queue=SimpleNamespace(event_ids_to_events={})), now=time.time() + 3600) >= 1
    assert not Path(path).exists()


def _abort_upload(url: str, name: str, n_bytes: int) -> None:
    """Send the start of a multipart upload, then drop the connection (a browser tab closed mid-upload)."""
    host, port = url.split("//")[1].strip("/").split(":")
    boundary = "medlensboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
    ).encode()
    request = (
        f"POST /gradio_api/upload HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(head) + 50_000_000}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(request + head + os.urandom(n_bytes))
        time.sleep(0.5)


def test_an_aborted_upload_leaves_a_partial_file_that_is_swept(viewer):
    from app import uploads

    url, cache, demo = viewer
    before = set(_left(cache))
    _abort_upload(url, "big_series.zip", 2_000_000)
    # Gradio writes a partial upload into <upload folder>/tmpXXXXXXXX (NamedTemporaryFile in its upload folder)
    assert _wait(lambda: any(p.startswith("tmp") for p in set(_left(cache)) - before), 5), _left(cache)
    [partial] = [p for p in set(_left(cache)) - before if p.startswith("tmp")]
    assert (cache / partial).stat().st_size > 0
    assert uploads.sweep(demo) == 0 and (cache / partial).exists()  # being written a moment ago: kept
    uploads.sweep(demo, now=time.time() + uploads.PARTIAL_IDLE_S + 1)
    assert not (cache / partial).exists()


def test_start_up_sweeps_what_an_earlier_run_left(tmp_path, monkeypatch):
    from app import housekeeping, uploads

    cache = tmp_path / "uploads"
    cache.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    uploads.claim_upload_folder()
    left = [cache / ("a" * 64) / "patient_DOE_JOHN_1970.png", cache / ("b" * 32) / "upload.dcm", cache / "tmpk3j4h5g6"]
    for path in left:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"from an earlier run")
    keeper = housekeeping.Housekeeper(None, period_s=3600)
    keeper.start()
    keeper.stop()
    assert not any(p.exists() for p in left) and (cache / uploads.MARKER).is_dir()


def test_a_folder_that_is_not_ours_keeps_files_it_does_not_know(tmp_path, monkeypatch):
    from app import uploads

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "tmpnotours1").write_bytes(b"another program's temporary file")
    (shared / "notes").mkdir()
    (shared / "notes" / "x.txt").write_text("keep")
    (shared / ("c" * 64)).mkdir()
    (shared / ("c" * 64) / "upload.png").write_bytes(b"an old upload")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(shared))
    uploads.claim_upload_folder()
    assert not (shared / uploads.MARKER).exists()
    uploads.sweep(None, startup=True)
    assert (shared / "tmpnotours1").exists() and (shared / "notes" / "x.txt").exists()
    assert not (shared / ("c" * 64)).exists()


def test_the_default_upload_folder_is_per_process_and_dead_ones_go(tmp_path, monkeypatch):
    import tempfile

    from app import uploads

    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = tmp_path / f"medlens-uploads-{os.getuid()}" / "999999999"
    stale.mkdir(parents=True)
    (stale / "left.png").write_bytes(b"x")
    folder = uploads.claim_upload_folder()
    assert folder == (tmp_path / f"medlens-uploads-{os.getuid()}" / str(os.getpid())).resolve()
    assert (folder / uploads.MARKER).is_dir() and not stale.exists()


# --------------------------------------------------------------------------- memory of sessions
def test_memory_of_scans_returns_to_baseline_when_sessions_end(viewer, tmp_path, monkeypatch):
    """Three API sessions load a 5 MB series; one client closes, two go idle. Their voxel arrays are
    freed (weak references die), and engine.memory's ledger of live arrays -- bytes leave it only when
    the arrays are freed -- is back at (or below: other tests' sessions end too) its baseline."""
    import weakref

    from gradio_client import Client, handle_file

    from app import sessions
    from engine import memory

    url, _cache, _demo = viewer
    series = write_ct_series(tmp_path / "w", 40, 256, 256, zip_path=tmp_path / "ct.zip")
    nbytes = 40 * 256 * 256 * 2  # int16
    monkeypatch.setattr(sessions, "CLOSE_GRACE_S", 0.0)
    monkeypatch.setenv("MEDLENS_SESSION_IDLE_MIN", "60")
    ledger = memory.budget()
    gc.collect()
    baseline = ledger.tracked
    clients = [Client(url, verbose=False) for _ in range(3)]
    for c in clients:
        c.predict([handle_file(str(series))], api_name="/load_files")
    held = {s.owner: weakref.ref(s._scans[0].voxels) for s in sessions.REGISTRY.holding() if s.owner in {c.session_hash for c in clients}}
    assert len(held) == 3 and ledger.tracked >= 3 * nbytes

    def freed(owners) -> bool:
        gc.collect()
        return all(held[o]() is None for o in owners)

    closing = clients.pop()
    closing.close()  # its heartbeat stops: the server's unload event marks its session closed
    assert _wait(lambda: freed([closing.session_hash]), 30), "the closed client's scan is still in memory"
    assert not any(held[c.session_hash]() is None for c in clients), "an open session lost its scan"
    monkeypatch.setenv("MEDLENS_SESSION_IDLE_MIN", "0.01")  # the housekeeping thread releases idle sessions every few s
    assert _wait(lambda: freed(held), 30), "idle sessions' scans are still in memory"
    assert ledger.tracked <= baseline, f"{(ledger.tracked - baseline) / nbytes:.2f} scans still charged"
    with pytest.raises(Exception, match="released after 0.01 minutes without use"):
        clients[0].predict(0, api_name="/select_series")
    for c in clients:
        c.close()


def test_idle_and_closed_sessions_are_released_by_the_registry(monkeypatch):
    from app import sessions
    from engine.scan import Modality, Scan

    monkeypatch.setenv("MEDLENS_SESSION_IDLE_MIN", "1")
    registry = sessions.SessionRegistry()
    monkeypatch.setattr(sessions, "REGISTRY", registry)
    scan = Scan(np.zeros((4, 4), np.int16), (1.0, 1.0), np.eye(4), Modality.CT)
    busy, idle, closed = (sessions.ScanSession([scan]) for _ in range(3))
    closed.owner = "tab-1"
    t0 = time.monotonic()
    assert registry.close_owner("tab-1", now=t0) == 1
    busy.last_used = idle.last_used = closed.last_used = t0
    assert registry.sweep(now=t0 + 30) == 0  # within the grace and the idle time
    busy.touch()
    closed.touch()  # the tab came back (a network blip): no longer closed
    assert registry.sweep(now=busy.last_used + 59) == 0
    idle.last_used = t0 - 60
    assert registry.sweep(now=t0 + 1) == 1 and idle.released and not busy.released
    with pytest.raises(sessions.ScanReleased, match="released after 1 minutes without use"):
        _ = idle.scans
    registry.close_owner("tab-1", now=t0)
    busy.last_used = t0 + 5
    assert registry.sweep(now=t0 + sessions.CLOSE_GRACE_S) == 1 and closed.released == sessions.CLOSED_MESSAGE


def test_every_component_uses_the_upload_folder_medlens_claims(tmp_path, monkeypatch):
    """Each Gradio component keeps the upload folder it saw when built and copies uploads from
    elsewhere into it: the app must claim its folder before building any (else uploads land,
    and stay, in Gradio's shared <tmp>/gradio)."""
    import tempfile

    import app
    from app import uploads

    monkeypatch.setenv("GRADIO_TEMP_DIR", "")  # restored afterwards; empty = unset for Gradio and MedLens
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    demo = app.build_demo()
    caches = {b.GRADIO_CACHE for b in demo.blocks.values() if hasattr(b, "GRADIO_CACHE")}
    claimed = tmp_path / f"medlens-uploads-{os.getuid()}" / str(os.getpid())
    assert caches == {str(claimed)} and uploads.upload_folder() == claimed.resolve()
