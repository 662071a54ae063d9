"""The audit log: one JSON line per action, appended; who, when, what, with which model, on which scan, and how it ended.

Design decisions
- JSON Lines, append-only: any tool reads it (`jq`, a SIEM's file input),
  and a line once written is never rewritten. Rotation and retention are
  the operator's (logrotate with copytruncate works: lines are appended).
- A line: `time` (UTC, ISO 8601, ms), `user` (the login, `hf:NAME` for
  Hugging Face sign-in, `local` for the single local user and the CLI,
  `anonymous` for a visitor without login), `action` (a lower-case word:
  load, label, ask, search, open, add, tag, teach, share, index, login;
  others add export, push, batch through the same `record()`), `outcome`
  (`ok`, `denied`, `refused` (a request the app turned down with a message)
  or `error:<ExceptionClass>`), `model` and `revision`, `scans` (content
  hashes of the scans acted on), `results` (hashes of the scans a search
  showed, so "who saw scan X" has an answer) and `detail` (counts and
  code-chosen words).
- No PHI, by construction: a scan appears only as its content hash (hex,
  checked), never a name, path, file name or UID; free text a user typed
  (queries, labels, questions) is never recorded; `detail` accepts numbers
  and short code words only (no spaces), so a label or a file name cannot
  slip in; error messages are not recorded, only the exception's class
  (messages quote file names). Tested like the library: PHI-laden DICOM in,
  the file's bytes searched for every identifying value of the headers.
- Concurrency: the file is opened O_APPEND and each line goes out in one
  write() under an exclusive flock (where the OS has flock): lines from
  several processes and threads never interleave.
- Failing to write is logged (once per reason) and does not stop the user's
  action: the action has already happened, and a full disk must not take
  the viewer down. Set MEDLENS_AUDIT_LOG to a path on a monitored volume.
- MEDLENS_AUDIT_LOG: a file path, or `off`; default
  <user data dir>/medlens/audit.jsonl, created 0600 in a 0700 folder.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import os
import re
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from engine import settings

log = logging.getLogger("medlens.audit")

ACTION = re.compile(r"^[a-z][a-z_]{1,31}$")
HASH = re.compile(r"^[0-9a-f]{16,128}$")
WORD = re.compile(r"^[A-Za-z0-9_.@:-]{0,64}$")
OK, DENIED, REFUSED = "ok", "denied", "refused"
_reported: set[tuple[str, str]] = set()
_lock = threading.Lock()  # flock is per open file description; threads of one process also take this


def log_path() -> Path | None:
    """The audit file ($MEDLENS_AUDIT_LOG, else <user data dir>/medlens/audit.jsonl), or None when `off`."""
    raw = settings.AUDIT_LOG.get()
    if raw is None:
        return settings.user_data_dir() / "audit.jsonl"
    if raw.strip().lower() == "off":
        return None
    return Path(raw).expanduser()


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class AuditRecord:
    time: str
    user: str
    action: str
    outcome: str = OK
    model: str | None = None
    revision: str | None = None
    scans: list[str] = field(default_factory=list)
    results: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=True, separators=(",", ":"))


def split_model(model: Any) -> tuple[str | None, str | None]:
    """(name, revision) of a model object (.name/.revision or .model_id "name@revision") or string."""
    if model is None:
        return None, None
    name, revision = getattr(model, "name", None), getattr(model, "revision", None)
    if name is None:
        text = str(getattr(model, "model_id", model))
        name, _, revision = text.rpartition("@") if "@" in text else (text, "", None)
    return (None if name is None else str(name)), (str(revision) if revision else None)


def _hashes(values: Iterable[Any], what: str) -> list[str]:
    out = []
    for value in values:
        text = str(value)
        if not HASH.match(text):
            raise ValueError(f"audit {what} must be content hashes (hex), never names or paths")
        out.append(text)
    return out


def _detail(detail: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (detail or {}).items():
        if not WORD.match(str(key)) or (isinstance(value, str) and not WORD.match(value)):
            raise ValueError("audit detail holds numbers and short code words only (no user text)")
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise ValueError("audit detail holds numbers and short code words only")
        out[str(key)] = value
    return out


def append(record: AuditRecord, path: Path | None = None) -> bool:
    """Append one line (O_APPEND, one write under flock); False (and a log line) when it could not be written."""
    path = path if path is not None else log_path()
    if path is None:
        return False
    data = (record.to_json() + "\n").encode("ascii")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with _lock:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                with _flocked(fd):
                    view = memoryview(data)
                    while view:  # one write() in practice; a short write on a full disk finishes the line
                        view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        return True
    except OSError as exc:
        key = (str(path), type(exc).__name__)
        if key not in _reported:
            _reported.add(key)
            log.error("cannot append to the audit log %s (%s); actions go on unrecorded", path, exc.strerror or type(exc).__name__)
        return False


@contextlib.contextmanager
def _flocked(fd: int) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: O_APPEND alone
        yield
        return
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def record(
    action: str,
    *,
    user: str,
    outcome: str = OK,
    model: Any = None,
    scans: Iterable[Any] = (),
    results: Iterable[Any] = (),
    detail: dict[str, Any] | None = None,
) -> AuditRecord:
    """Record one action (the one function every part of MedLens calls); returns the record written.

    ValueError for an action that is not a word, a user that is not a login, or a scan that is not a hash.
    """
    if not ACTION.match(str(action)):
        raise ValueError(f"audit action {action!r} must be a lower-case word")
    if not WORD.match(str(user)) or not str(user):
        raise ValueError("audit user must be a login name")
    name, revision = split_model(model)
    rec = AuditRecord(
        time=now(),
        user=str(user),
        action=str(action),
        outcome=str(outcome),
        model=name,
        revision=revision,
        scans=_hashes(scans, "scans"),
        results=_hashes(results, "results"),
        detail=_detail(detail),
    )
    append(rec)
    return rec


@dataclass
class Entry:
    """An action in progress (`recorded()`): fill in what becomes known; written when the block ends."""

    action: str
    user: str
    model: Any = None
    scans: list[str] = field(default_factory=list)
    results: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)
    outcome: str | None = None  # None: decided by how the block ends

    def scan(self, *scans: Any) -> "Entry":
        """Add the scans acted on (Scan objects or content hashes)."""
        self.scans.extend(str(getattr(s, "content_hash", s)) for s in scans)
        return self


# Who is acting, for records written deep inside an action (exports, pushes) by code that is not told:
# the app sets it per event (app.access.acting), the CLI leaves the default, the single local user.
_acting_user: contextvars.ContextVar[str] = contextvars.ContextVar("medlens_audit_user", default="local")


def current_user() -> str:
    return _acting_user.get()


@contextlib.contextmanager
def acting_as(user: str) -> Iterator[None]:
    """Records written inside the block without a user of their own name `user`."""
    token = _acting_user.set(str(user))
    try:
        yield
    finally:
        _acting_user.reset(token)


def outcome_of(exc: BaseException | None) -> str:
    return OK if exc is None else f"error:{type(exc).__name__}"


@contextlib.contextmanager
def recorded(action: str, *, user: str, model: Any = None) -> Iterator[Entry]:
    """`with recorded("label", user=u, model=m) as entry: ...; entry.scan(scan)` writes one line at the end.

    An exception leaving the block is recorded as error:<class> (its message
    is not) and raised on; `entry.outcome` set inside the block wins.
    """
    entry = Entry(action=action, user=user, model=model)
    error: BaseException | None = None
    try:
        yield entry
    except BaseException as exc:
        error = exc
        raise
    finally:
        outcome = entry.outcome or outcome_of(error)
        try:
            record(
                action, user=entry.user, outcome=outcome, model=entry.model, scans=entry.scans, results=entry.results, detail=entry.detail
            )
        except ValueError:
            if error is None:
                raise
            log.error("an audit record of a failed %s action was malformed", action)


# --------------------------------------------------------------------------- reading
def parse_since(text: str) -> datetime.datetime:
    """A date (2026-12-01) or ISO time, as UTC."""
    try:
        value = datetime.datetime.fromisoformat(str(text).strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a date or ISO time: {text!r} (e.g. 2026-12-01 or 2026-12-01T08:00)") from None
    return value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)


def read(
    path: Path | None = None,
    *,
    user: str | None = None,
    action: str | None = None,
    since: datetime.datetime | None = None,
    scan: str | None = None,
) -> tuple[list[AuditRecord], int]:
    """(matching records in file order, number of unreadable lines skipped)."""
    path = path if path is not None else log_path()
    out: list[AuditRecord] = []
    bad = 0
    if path is None or not path.exists():
        return out, bad
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                rec = AuditRecord(**data)
                when = parse_since(rec.time)
            except (ValueError, TypeError):
                bad += 1
                continue
            if user is not None and rec.user != user:
                continue
            if action is not None and rec.action != action:
                continue
            if since is not None and when < since:
                continue
            if scan is not None and not any(h.startswith(scan) for h in rec.scans + rec.results):
                continue
            out.append(rec)
    return out, bad
