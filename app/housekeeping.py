"""The server's housekeeping: one daemon thread, started with the server, that sweeps uploads and idle sessions.

It runs `app.uploads.sweep` at start-up (everything left by an earlier run
goes) and then, with `app.sessions.REGISTRY.sweep`, every SWEEP_S seconds.
It is started from the FastAPI lifespan that `app.launch_kwargs()` passes to
Gradio (`app_kwargs`), so every way of launching the app (app.py, the tests,
a Space) gets it, and it stops when the server stops.
"""

from __future__ import annotations

import contextlib
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
        for name, job in (("uploads", lambda: uploads.sweep(self.blocks, startup=startup)), ("sessions", sessions.REGISTRY.sweep)):
            try:
                job()
            except Exception as exc:  # housekeeping must never stop: log the type only (messages can quote paths)
                log.error("housekeeping of %s failed: %s", name, type(exc).__name__)

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


@contextlib.asynccontextmanager
async def lifespan(app):
    """FastAPI lifespan: housekeeping runs while the server does."""
    keeper = Housekeeper(app.get_blocks() if hasattr(app, "get_blocks") else None)
    keeper.start()
    try:
        yield
    finally:
        keeper.stop()
