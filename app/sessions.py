"""How long a session's scans live: released after MEDLENS_SESSION_IDLE_MIN without use, or soon after the tab closes.

Design decisions
- gr.State's own expiry does not bound memory (read in gradio 6.31,
  state_holder.py and routes.py): `time_to_live` counts from the last
  *write* of a state, not its last use, so a radiologist scrolling one scan
  longer than the TTL would lose it; once a tab closes, Gradio keeps every
  State of that session for an hour (`STATE_TTL_WHEN_CLOSED` overrides any
  shorter time_to_live); API clients (gradio_client) never close, so their
  state lives for the whole TTL. And freeing needs every reference gone.
- So a `ScanSession` (what gr.State holds) records when its scans were last
  used (any handler reading `session.scans`), and a registry of weak
  references (it never keeps a session alive) is swept every few seconds
  (app.housekeeping): scans idle for MEDLENS_SESSION_IDLE_MIN are dropped
  from the session object; the gr.State keeps the empty shell and the next
  event tells the user to upload again. A tab's unload event (demo.unload)
  marks its sessions closed; they are released CLOSE_GRACE_S later unless
  used again, because a network blip also ends the heartbeat and the page
  then reconnects with the same session.
- Memory is accounted by engine.memory's ledger of live voxel arrays: bytes
  leave it only when the arrays are really freed, so the tests check that
  the ledger returns to its baseline, not an RSS figure.
- The owner is Gradio's session hash of the request that created the
  session, read from gradio.context.LocalContext.request (as Gradio's own
  per-session cache does), so no handler signature changes for it.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any, Iterable

from engine import settings
from engine.errors import MedLensError

CLOSE_GRACE_S = 60.0  # a closed tab's scans are released this long after its unload event


def idle_seconds() -> float:
    return float(settings.SESSION_IDLE_MIN.get()) * 60.0


def current_session_hash() -> str | None:
    """The Gradio session hash of the request being handled, if any."""
    try:
        from gradio.context import LocalContext

        request = LocalContext.request.get(None)
        return getattr(request, "session_hash", None) if request is not None else None
    except Exception:  # outside a Gradio event (tests, the CLI)
        return None


class ScanReleased(MedLensError):
    """The session's scans were released; the message says why and what to do."""


class ScanSession:
    """What one user has loaded: every series found, and the files that were skipped."""

    def __init__(self, scans: Iterable[Any] | None = None, skipped: Iterable[str] | None = None):
        self._scans = list(scans or [])
        self.skipped: list[str] = list(skipped or [])  # "name: reason", shown only to this user
        self.owner = current_session_hash()
        self.last_used = time.monotonic()
        self.closed_at: float | None = None
        self.released: str | None = None  # why the scans were dropped
        REGISTRY.add(self)

    @property
    def scans(self) -> list[Any]:
        """The loaded scans (reading them counts as use); raises ScanReleased once they were released."""
        if self.released:
            raise ScanReleased(self.released)
        self.touch()
        return self._scans

    def touch(self) -> None:
        self.last_used = time.monotonic()
        self.closed_at = None

    def holds_scans(self) -> bool:
        return bool(self._scans)

    def release(self, reason: str) -> None:
        """Drop the scans (their memory is freed once nothing else refers to them)."""
        self._scans = []
        self.released = reason

    def __repr__(self) -> str:
        return f"ScanSession({len(self._scans)} scans, released={self.released is not None})"


def _idle_message(minutes: float) -> str:
    return (
        f"This scan was released after {minutes:g} minutes without use, to free the server's memory for other users "
        "(MEDLENS_SESSION_IDLE_MIN). Upload it again to go on."
    )


CLOSED_MESSAGE = "This scan was released when its browser tab closed. Upload it again to go on."


class SessionRegistry:
    """Every live ScanSession, weakly held; `sweep` releases the idle and the closed ones."""

    def __init__(self) -> None:
        self._sessions: "weakref.WeakSet[ScanSession]" = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, session: ScanSession) -> None:
        with self._lock:
            self._sessions.add(session)

    def _snapshot(self) -> list[ScanSession]:
        with self._lock:
            return list(self._sessions)

    def holding(self) -> list[ScanSession]:
        """Sessions that still hold scans."""
        return [s for s in self._snapshot() if s.holds_scans()]

    def close_owner(self, owner: str | None, now: float | None = None) -> int:
        """The tab of `owner` closed: its sessions are released after CLOSE_GRACE_S unless used again."""
        if not owner:
            return 0
        now = time.monotonic() if now is None else now
        marked = 0
        for s in self._snapshot():
            if s.owner == owner and s.holds_scans():
                s.closed_at = now
                marked += 1
        return marked

    def sweep(self, now: float | None = None) -> int:
        """Release sessions idle longer than MEDLENS_SESSION_IDLE_MIN or closed CLOSE_GRACE_S ago; return how many."""
        now = time.monotonic() if now is None else now
        idle = idle_seconds()
        released = 0
        for s in self.holding():
            if s.closed_at is not None and now - s.closed_at >= CLOSE_GRACE_S:
                s.release(CLOSED_MESSAGE)
                released += 1
            elif now - s.last_used >= idle:
                s.release(_idle_message(idle / 60.0))
                released += 1
        return released


REGISTRY = SessionRegistry()


def on_unload(request: Any = None) -> None:
    """demo.unload handler: the tab of this request's session closed."""
    REGISTRY.close_owner(getattr(request, "session_hash", None) or current_session_hash())
