"""Uploads: one private file per request, read from a private copy, and nothing left in Gradio's cache.

What Gradio 6.31 does (read in gradio/route_utils.py, routes.py):
- `POST /gradio_api/upload` streams each file into `<upload folder>/tmpXXXXXXXX`
  (NamedTemporaryFile, in the upload folder itself), then renames it to
  `<upload folder>/<sha256 of a per-machine seed + content>/<original name>`
  and answers with that absolute path. Identical files share one path, and
  anyone who can name a path in the upload folder can fetch it by URL.
- An aborted upload (the client disconnects) leaves its `tmp*` file behind
  for good; an upload that is never used stays until `delete_cache` runs.

What MedLens adds
- `UploadPrivacyMiddleware` (ASGI, on the upload route only) hard-links each
  uploaded file to `<upload folder>/<random 128-bit token>/upload<.ext>`
  and answers with that path instead: every upload gets its own path (two
  users sending the same file no longer share one, so deleting one user's
  upload can never break the other's), and neither the content hash nor the
  original file name appears on disk or in the answer. The shared content
  path is unlinked once no other upload is in flight (another upload of the
  same bytes may be about to be renamed onto it and linked in turn).
  Gradio itself requires the answer to be an absolute path inside its upload
  folder (its preprocessing refuses anything else), so that folder's name
  is the one server path still revealed.
- `private_copies` (used by the load handler) links each upload into a
  fresh folder outside Gradio's cache (not servable by URL), under the name
  the user gave it (`orig_name`, for messages), deletes the upload from the
  cache at once, and removes the private folder when reading is done.
- `sweep` (run by app.housekeeping at start-up and every few seconds):
  partial uploads idle for PARTIAL_IDLE_S, finished uploads that no queued
  or running event refers to after UNUSED_S, and private folders of dead
  processes are deleted. Partial and unknown files are only swept in an
  upload folder MedLens owns (`MARKER`): by default MedLens sets
  GRADIO_TEMP_DIR to a folder of its own per server process
  (`claim_upload_folder`), because Gradio's default `<tmp>/gradio` is
  shared with every other Gradio app of the user.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

log = logging.getLogger("medlens.app")

PARTIAL_IDLE_S = 30.0  # a partial upload not written to for this long is abandoned
UNUSED_S = 40.0  # a finished upload no event refers to is deleted after this long (swept within a minute)
MARKER = ".medlens-uploads"  # an empty folder inside an upload folder MedLens owns (a folder: never served, not a file)
_TOKEN_DIR = re.compile(r"^[0-9a-f]{32}$")  # ours
_HASH_DIR = re.compile(r"^[0-9a-f]{64}$")  # Gradio's content-addressed folders
_PARTIAL = re.compile(r"^tmp[a-z0-9_]{6,12}$")  # NamedTemporaryFile names of Gradio's multipart parser
_GRADIO_OWN = {"vibe_edit_history"}  # created by Gradio in the upload folder when a Blocks is built; never swept
_KEPT_SUFFIXES = (".nii.gz", ".nii", ".zip", ".dcm", ".dicom", ".ima", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gz")


# --------------------------------------------------------------------------- folders
def upload_folder() -> Path:
    """Gradio's upload cache folder (GRADIO_TEMP_DIR or <tmp>/gradio)."""
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()).resolve()


def _uid() -> str:
    return str(os.getuid()) if hasattr(os, "getuid") else "user"


def claim_upload_folder() -> Path:
    """Use MedLens's own upload folder unless GRADIO_TEMP_DIR names one; mark it ours when it is new or empty.

    The default is <tmp>/medlens-uploads-<uid>/<pid>: one folder per server
    process, so a server sweeping its own folder at start-up never touches
    another's uploads, and the folders of servers that are gone (a restart,
    a crash) are deleted here.
    """
    if not os.environ.get("GRADIO_TEMP_DIR"):
        base = Path(tempfile.gettempdir()) / f"medlens-uploads-{_uid()}"
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in base.iterdir():
            if stale.is_dir() and stale.name.isdigit() and int(stale.name) != os.getpid() and not _alive(int(stale.name)):
                shutil.rmtree(stale, ignore_errors=True)
        os.environ["GRADIO_TEMP_DIR"] = str(base / str(os.getpid()))
    folder = upload_folder()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    marker = folder / MARKER
    if not marker.exists() and all(entry.name in _GRADIO_OWN for entry in folder.iterdir()):
        marker.mkdir(mode=0o700)
    elif not marker.exists():
        log.warning("the upload folder (GRADIO_TEMP_DIR) is not MedLens's own: only upload folders are swept in it, not partial files")
    return folder


def _owned(folder: Path) -> bool:
    return (folder / MARKER).is_dir()


def private_root() -> Path:
    """<tmp>/medlens-private-<uid>/<pid>: outside the upload folder (never served by URL), one per process."""
    root = Path(tempfile.gettempdir()) / f"medlens-private-{_uid()}"
    if _inside(root, upload_folder()):
        root = Path.home() / ".cache" / "medlens" / "private"
    path = root / str(os.getpid())
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


# --------------------------------------------------------------------------- one path per upload
class _Issued:
    """Upload paths this process handed out, the shared content paths awaiting deletion, uploads in flight."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.paths: set[str] = set()
        self.shared: set[str] = set()
        self.in_flight = 0

    def begin(self) -> None:
        with self.lock:
            self.in_flight += 1

    def end(self) -> None:
        with self.lock:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._drop_shared()

    def _drop_shared(self) -> None:
        for path in list(self.shared):
            _unlink(Path(path))
            self.shared.discard(path)

    def drop_shared_if_idle(self) -> None:
        with self.lock:
            if self.in_flight == 0:
                self._drop_shared()


ISSUED = _Issued()


def neutral_name(name: str) -> str:
    """'upload' plus the extension the readers look at (.nii.gz, .zip, .dcm, ...): no part of a user's file name."""
    lower = name.lower()
    return "upload" + next((s for s in _KEPT_SUFFIXES if lower.endswith(s)), "")


def reissue(path: str) -> str:
    """Hard-link Gradio's content path to a fresh `<token>/upload.ext` and return that path (or `path` itself if it cannot)."""
    root = upload_folder()
    source = Path(path)
    if not _inside(source, root) or not source.is_file():
        return path  # not an upload we can move (e.g. a background copy not done yet): left to the sweeper
    token = root / secrets.token_hex(16)
    token.mkdir(mode=0o700)
    target = token / neutral_name(source.name)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
    with ISSUED.lock:
        ISSUED.paths.add(str(target))
        ISSUED.shared.add(str(source))
    return str(target)


class UploadPrivacyMiddleware:
    """Pure ASGI middleware on Gradio's upload route: each answered path becomes a private, neutral one."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope.get("path", "").endswith("/gradio_api/upload"):
            await self.app(scope, receive, send)
            return
        ISSUED.begin()
        start: dict | None = None
        body = bytearray()

        async def capture(message):
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body"):
                return
            payload = bytes(body)
            if start is not None and start["status"] == 200:
                payload = _rewrite(payload)
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"] if start else []
            headers.append((b"content-length", str(len(payload)).encode()))
            await send({**(start or {"type": "http.response.start", "status": 200}), "headers": headers})
            await send({"type": "http.response.body", "body": payload})

        try:
            await self.app(scope, receive, capture)
        finally:
            ISSUED.end()


def _rewrite(payload: bytes) -> bytes:
    try:
        paths = json.loads(payload)
    except ValueError:
        return payload
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        return payload
    return json.dumps([reissue(p) for p in paths]).encode()


# --------------------------------------------------------------------------- reading an upload
def _safe_display(name: str, index: int) -> str:
    from gradio_client.utils import strip_invalid_filename_characters

    base = strip_invalid_filename_characters(Path(str(name)).name) if name else ""
    return base if base and base not in (".", "..") and not base.startswith(".") else f"file{index + 1}"


@contextlib.contextmanager
def private_copies(uploads: Iterable[tuple[str, str | None]]) -> Iterator[list[str]]:
    """Private paths (named as the user named them) of uploaded files; the uploads leave Gradio's cache at once.

    uploads: (path in the upload folder, the user's file name or None). Paths
    outside the upload folder, or gone already, are skipped. The private
    folder is deleted when the block ends, whatever happened inside it.
    """
    root = upload_folder()
    folder = Path(tempfile.mkdtemp(prefix="read-", dir=private_root()))
    out: list[str] = []
    try:
        for i, (raw, display) in enumerate(uploads):
            try:
                source = Path(raw).resolve()
            except (OSError, RuntimeError):
                continue
            if not _inside(source, root) or source == root or not source.is_file():
                continue
            target = folder / str(i) / _safe_display(display or source.name, i)
            target.parent.mkdir()
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
            out.append(str(target))
            _forget(source)
        yield out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _forget(source: Path) -> None:
    """Delete an upload once it has a private copy: at once when its path is ours (one request per path)."""
    with ISSUED.lock:
        ours = str(source) in ISSUED.paths
        ISSUED.paths.discard(str(source))
    if ours or _TOKEN_DIR.match(source.parent.name):
        _unlink(source)
    # a content-addressed path may be shared with another request still queued: the sweeper deletes it when unused


def _unlink(path: Path) -> None:
    """Delete an upload file and its folder when empty (never anything outside the upload folder)."""
    root = upload_folder()
    if not _inside(path, root) or path == root:
        return
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
    parent = path.parent
    while parent != root and _inside(parent, root):
        try:
            parent.rmdir()  # only succeeds when empty
        except OSError:
            break
        parent = parent.parent


# --------------------------------------------------------------------------- sweeping
def referenced_paths(blocks: Any) -> set[str]:
    """Upload paths named by events waiting in, or running from, Gradio's queue (they must not be swept)."""
    queue = getattr(blocks, "_queue", None)
    events = getattr(queue, "event_ids_to_events", None)
    if events is None:
        return set()
    for _ in range(5):
        try:
            snapshot = list(events.values())
            break
        except RuntimeError:  # changed size while copied: the event loop runs beside this thread
            time.sleep(0.01)
    else:
        raise RuntimeError("the event queue kept changing")
    found: set[str] = set()
    for event in snapshot:
        _collect_paths(getattr(getattr(event, "data", None), "data", None), found)
    return found


def _collect_paths(value: Any, found: set[str]) -> None:
    if isinstance(value, dict):
        path = value.get("path")
        if isinstance(path, str):
            found.add(str(Path(path).resolve()))
        for v in value.values():
            _collect_paths(v, found)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _collect_paths(v, found)
    elif isinstance(value, str) and os.sep in value:
        found.add(str(Path(value).resolve()))


def sweep(blocks: Any = None, *, startup: bool = False, now: float | None = None) -> int:
    """Delete abandoned partial uploads, unused finished ones and dead processes' private folders; return the count.

    At start-up nothing is in flight or queued, so every upload left from an
    earlier run goes, whatever its age.
    """
    root = upload_folder()
    if not root.is_dir():
        return 0
    now = time.time() if now is None else now
    ISSUED.drop_shared_if_idle()
    try:
        keep = set() if startup else referenced_paths(blocks)
    except RuntimeError:
        return 0  # cannot tell what is in use: sweep next time
    owned = _owned(root)
    removed = 0
    for entry in root.iterdir():
        try:
            if entry.name == MARKER or entry.name in _GRADIO_OWN:
                continue
            if entry.is_file() and owned and (_PARTIAL.match(entry.name) or startup):
                if startup or now - entry.stat().st_mtime > PARTIAL_IDLE_S:
                    entry.unlink(missing_ok=True)
                    removed += 1
            elif entry.is_dir() and (owned or _TOKEN_DIR.match(entry.name) or _HASH_DIR.match(entry.name)):
                removed += _sweep_upload_dir(entry, keep, now, startup)
        except OSError:
            continue
    _sweep_private(startup)
    return removed


def _sweep_upload_dir(folder: Path, keep: set[str], now: float, startup: bool) -> int:
    removed = 0
    folder_mtime = folder.stat().st_mtime
    for path in list(folder.rglob("*")):  # a list: deleting the last file removes the folder under the walk
        if not path.is_file() or str(path.resolve()) in keep:
            continue
        age = now - max(path.stat().st_mtime, folder_mtime)
        if startup or age > UNUSED_S:
            _unlink(path)
            with ISSUED.lock:
                ISSUED.paths.discard(str(path))
            removed += 1
    with contextlib.suppress(OSError):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return removed


def _sweep_private(startup: bool) -> None:
    """Private read folders of processes that are gone (a crash mid-read); at start-up, this process's too."""
    mine = private_root()
    for folder in mine.parent.iterdir():
        if not folder.is_dir() or not folder.name.isdigit():
            continue
        if folder == mine:
            if startup:
                for child in folder.iterdir():
                    shutil.rmtree(child, ignore_errors=True)
            continue
        if not _alive(int(folder.name)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
