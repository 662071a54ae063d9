"""The server's housekeeping: one daemon thread, started with the server, that sweeps uploads and idle sessions.

It runs `app.uploads.sweep` at start-up (everything left by an earlier run
goes) and then, with `app.sessions.REGISTRY.sweep`, every SWEEP_S seconds.
It is started from the FastAPI lifespan that `app.launch_kwargs()` passes to
Gradio (`app_kwargs`), so every way of launching the app (app.py, the tests,
a Space) gets it, and it stops when the server stops.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import threading

from app import sessions, uploads

log = logging.getLogger("medlens.app")

SWEEP_S = 10.0  # unused uploads (UNUSED_S) and partial ones (PARTIAL_IDLE_S) go within a minute


class Housekeeper:
    def __init__(self, blocks=None, period_s: float = SWEEP_S):
        self.blocks = blocks
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self, startup: bool = False) -> None:
        released = 0
        for name, job in (("uploads", lambda: uploads.sweep(self.blocks, startup=startup)), ("sessions", sessions.REGISTRY.sweep)):
            try:
                count = job()
                released += count if name == "sessions" else 0
            except Exception as exc:  # housekeeping must never stop: log the type only (messages can quote paths)
                log.error("housekeeping of %s failed: %s", name, type(exc).__name__)
        if released:
            return_freed_memory()

    def start(self) -> None:
        self.run_once(startup=True)
        self._thread = threading.Thread(target=self._loop, name="medlens-housekeeping", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.run_once()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def return_freed_memory() -> None:
    """After scans were released: collect cycles, then ask glibc to hand free heap pages back to the OS.

    Big voxel arrays are memory-mapped and go back at once; the many
    sub-megabyte buffers of decoding (file bytes, frames) come from malloc's
    heaps and arenas, which otherwise keep the pages (RSS stays high although
    the memory is free). No-op where malloc_trim does not exist (musl, macOS).
    """
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.asynccontextmanager
async def lifespan(app):
    """FastAPI lifespan: housekeeping runs while the server does."""
    keeper = Housekeeper(app.get_blocks() if hasattr(app, "get_blocks") else None)
    keeper.start()
    try:
        yield
    finally:
        keeper.stop()
