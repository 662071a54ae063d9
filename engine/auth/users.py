"""Login users: the credentials file ($MEDLENS_AUTH_FILE) and $MEDLENS_USERS, read and written.

Design decisions
- Two sources, merged: a file (one `NAME:HASH` line per user, `#` comments;
  or JSON `{"NAME": "HASH", ...}` / `{"users": {...}}`) for a server with
  a disk, and an environment variable (`NAME:HASH` pairs separated by
  commas or white space) for a Hugging Face Space or a container, whose
  secrets arrive as variables. A name in both is an error, not a silent
  override.
- Hashes only (engine.auth.passwords); a line holding anything else, a plain
  password included, is refused with the file and line number, never
  quoting the line.
- Names: 1-64 of letters, digits and `._@-`, starting with a letter or
  digit. `local` and `anonymous` are reserved (the CLI's and the single
  local user's library owner, and the visitor without login), and `:` can
  never appear, so OAuth users (`hf:NAME`) and password users cannot
  collide.
- Writing (`medlens user add/remove`): the whole file is written to a new
  file created 0600 in the same folder, flushed to disk, then renamed over
  the old one (atomic: a crash leaves the old or the new file, never half),
  and the folder is created 0700. Comments and other users' lines are kept.
- The app re-reads the file when its size or mtime changes, so adding a
  user needs no restart; a file that stops parsing makes every login fail
  (fail closed) and is reported in the server log.
- A file readable by other accounts (group/other permission bits) is
  reported: hashes are slow to crack, not impossible.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from engine import settings
from engine.auth.passwords import PasswordError, ScryptHash, hash_password, parse_hash, verify_password
from engine.errors import MedLensError

log = logging.getLogger("medlens.auth")

LOCAL = "local"  # owner and audit name of the single local user (no login) and of the CLI
ANONYMOUS = "anonymous"  # audit name of a visitor without login on a shared server
RESERVED = frozenset({LOCAL, ANONYMOUS})
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class UsersError(MedLensError):
    """The credentials cannot be read or changed; the message says where and what to do."""


def check_name(name: str) -> str:
    name = str(name).strip()
    if not NAME.match(name):
        raise UsersError("a user name is 1-64 letters, digits or . _ @ -, starting with a letter or digit")
    if name.lower() in RESERVED:
        raise UsersError(f"'{name}' is reserved (it names the local single user or visitors without login); choose another name")
    return name


@dataclass
class UserStore:
    """name -> stored hash; where each came from (for messages)."""

    hashes: dict[str, ScryptHash] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hashes)

    def __contains__(self, name: object) -> bool:
        return name in self.hashes

    def verify(self, name: str, password: str) -> bool:
        """Constant-time check; an unknown name costs the same as a wrong password."""
        return verify_password(password, self.hashes.get(str(name)))

    def add(self, name: str, stored: str, where: str) -> None:
        name = check_name(name)
        if name in self.hashes:
            raise UsersError(f"{where}: user '{name}' is defined twice")
        try:
            self.hashes[name] = parse_hash(stored)
        except PasswordError as exc:
            raise UsersError(f"{where}: user '{name}': {exc}") from None


# --------------------------------------------------------------------------- reading
def _pairs_from_text(text: str, where: str) -> list[tuple[str, str, str]]:
    """(name, hash, location) from `NAME:HASH` lines."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, stored = line.partition(":")
        if not sep or not name.strip() or not stored.strip():
            raise UsersError(f"{where}:{number}: expected NAME:HASH (a line written by `medlens user add NAME`)")
        out.append((name.strip(), stored.strip(), f"{where}:{number}"))
    return out


def _pairs_from_json(text: str, where: str) -> list[tuple[str, str, str]]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UsersError(f"{where}: not valid JSON (line {getattr(exc, 'lineno', '?')})") from None
    if isinstance(data, dict) and isinstance(data.get("users"), dict):
        data = data["users"]
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise UsersError(f'{where}: expected {{"NAME": "HASH", ...}} or {{"users": {{"NAME": "HASH"}}}}')
    return [(str(k), v, where) for k, v in data.items()]


def read_file(path: Path) -> list[tuple[str, str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsersError(f"no credentials file at {path}: create it with `medlens user add NAME --file {path}`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsersError(f"cannot read the credentials file {path} ({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
    if os.name == "posix":
        try:
            if path.stat().st_mode & 0o077:
                log.warning("the credentials file %s is readable by other accounts: chmod 600 it", path)
        except OSError:
            pass
    return _pairs_from_json(text, str(path)) if text.lstrip().startswith("{") else _pairs_from_text(text, str(path))


def read_env(text: str) -> list[tuple[str, str, str]]:
    where = settings.USERS.env
    out = []
    for i, item in enumerate(re.split(r"[\s,]+", text.strip()), 1):
        if not item:
            continue
        name, sep, stored = item.partition(":")
        if not sep or not name or not stored:
            raise UsersError(f"{where}: entry {i} is not NAME:HASH (hashes from `medlens user hash NAME`)")
        out.append((name, stored, f"{where} entry {i}"))
    return out


def configured() -> bool:
    """Is login configured ($MEDLENS_AUTH_FILE or $MEDLENS_USERS set)?"""
    return bool(settings.AUTH_FILE.get() or settings.USERS.get())


def load_users() -> UserStore | None:
    """The users of $MEDLENS_AUTH_FILE and $MEDLENS_USERS, or None when neither is set."""
    if not configured():
        return None
    store = UserStore()
    path = settings.AUTH_FILE.get()
    if path is not None:
        store.sources.append(str(path))
        for name, stored, where in read_file(path):
            store.add(name, stored, where)
    env = settings.USERS.get()
    if env:
        store.sources.append(settings.USERS.env)
        for name, stored, where in read_env(env):
            store.add(name, stored, where)
    if not store:
        raise UsersError(f"login is configured ({', '.join(store.sources)}) but lists no user: add one with `medlens user add NAME`")
    return store


class LiveUsers:
    """The configured users, re-read when the credentials file changes (no restart to add a user)."""

    def __init__(self, store: UserStore):
        self._store = store
        self._stamp = self._file_stamp()
        self._lock = threading.Lock()

    @staticmethod
    def _file_stamp():
        path = settings.AUTH_FILE.get()
        try:
            st = path.stat() if path is not None else None
        except OSError:
            return ("missing", str(path))
        return None if st is None else (str(path), st.st_size, st.st_mtime_ns)

    def current(self) -> UserStore | None:
        """The users now; None when the file no longer parses (every login then fails: fail closed)."""
        stamp = self._file_stamp()
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._store = load_users() or UserStore()
                except MedLensError as exc:
                    log.error("login refused for everyone until the credentials are fixed: %s", exc)
                    self._store = UserStore()
                self._stamp = stamp
            return self._store

    def verify(self, name: str, password: str) -> bool:
        store = self.current() or UserStore()
        return store.verify(name, password)


# --------------------------------------------------------------------------- writing
def default_file() -> Path:
    """$MEDLENS_AUTH_FILE, else <user config dir>/medlens/users.txt."""
    return settings.AUTH_FILE.get() or settings.user_config_dir() / "users.txt"


def _write_private(path: Path, text: str) -> None:
    """Replace `path` atomically with `text`, readable by its owner only (0600)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise UsersError(f"cannot create the folder {path.parent} ({exc.strerror or exc})") from None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)  # O_CREAT's mode is masked by the umask; be explicit
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsersError(f"cannot write the credentials file {path} ({exc.strerror or exc})") from None


def _lines(path: Path) -> list[str]:
    if not path.exists():
        return ["# MedLens login users: NAME:scrypt hash (written by `medlens user add`; never plain passwords)"]
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("{"):
        raise UsersError(f"{path} is a JSON credentials file: edit it by hand, or point `--file` at a new NAME:HASH file")
    _pairs_from_text(text, str(path))  # refuse to rewrite a file that does not parse
    return text.splitlines()


def set_user(path: Path, name: str, password: str, *, replace: bool = False) -> bool:
    """Add user `name` (or change their password when `replace`) in the file; True when they were new."""
    name = check_name(name)
    stored = hash_password(password)
    lines = _lines(path)
    index = next((i for i, line in enumerate(lines) if line.partition(":")[0].strip() == name), None)
    if index is not None and not replace:
        raise UsersError(f"user '{name}' already exists in {path}; pass --replace to change the password")
    if index is None:
        lines.append(f"{name}:{stored}")
    else:
        lines[index] = f"{name}:{stored}"
    _write_private(path, "\n".join(lines) + "\n")
    return index is None


def remove_user(path: Path, name: str) -> None:
    lines = _lines(path)
    kept = [line for line in lines if line.partition(":")[0].strip() != name or line.lstrip().startswith("#")]
    if len(kept) == len(lines):
        raise UsersError(f"no user '{name}' in {path}")
    _write_private(path, "\n".join(kept) + "\n")


def names_in(path: Path) -> list[str]:
    return [name for name, _stored, _where in read_file(path)]
