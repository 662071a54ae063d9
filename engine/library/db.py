"""The library database: one SQLite file, opened through sqlite-utils.

Design decisions
- Plain SQLite, readable by any tool: TEXT (JSON), INTEGER, REAL and BLOB
  columns only. Vectors are little-endian float32 BLOBs (`numpy.tobytes`),
  the thumbnail a PNG BLOB, JSON as TEXT.
- Where the file lives: `--library` flag, else $MEDLENS_LIBRARY, else the
  per-user data folder (the rule platformdirs uses, without the dependency):
  $XDG_DATA_HOME or ~/.local/share on Linux, ~/Library/Application Support
  on macOS, %LOCALAPPDATA% on Windows; then medlens/library.db.
- One connection per request (`connect()` is a context manager): SQLite
  connections are cheap, and a connection shared between Gradio's worker
  threads would need its own locking. WAL lets readers run while one writer
  writes; `busy_timeout` (10 s) makes a second writer wait for the lock
  instead of failing with "database is locked".
- The connection is in autocommit mode (`isolation_level=None`): the Python
  driver opens no hidden transactions. Every write goes through `write()`,
  which starts with BEGIN IMMEDIATE: the write lock is taken up front, so a
  transaction that reads and then writes (check the content hash, then
  insert) can never fail half-way with SQLITE_BUSY on the lock upgrade,
  which the busy timeout cannot retry. sqlite-utils' own `atomic()` blocks
  nest inside as savepoints.
- `synchronous=NORMAL` in WAL mode: a killed process loses nothing that was
  committed; only a power cut may lose the last transactions, never
  consistency.
- Schema migrations are a numbered list of functions. `connect()` applies
  the pending ones, all inside one BEGIN IMMEDIATE transaction (two
  processes opening a new library at once cannot both create tables), and
  records each in `schema_migrations` (also mirrored in PRAGMA user_version).
  Add a migration by appending a function; never edit an applied one.
  Foreign keys are switched off while migrations run (SQLite's documented
  12-step table rebuild: with them on, dropping `scans` to rebuild it would
  cascade-delete every embedding, note and tag) and `foreign_key_check`
  must come back clean before the transaction commits.
- Owners (migration 2, issue 16): one library file holds the scans of
  every user of a shared server. Each scan row has an `owner` (the login;
  `local` for the CLI and the single local user) and a `shared` flag
  (0 unless its owner shares it). The same image added by two users is two
  rows (UNIQUE (owner, content_hash)), so nobody's add, tag or delete ever
  touches another user's row. Tags and probes belong to the user who made
  them (`labels.owner`, `probes.owner`): tagging a shared scan writes the
  tagger's own tag, never its owner's. Notes go with their scan. Every read
  takes the viewer and selects `owner = viewer OR shared = 1` in SQL
  (engine.library.store.VISIBLE); ids are never access control. One file
  rather than a file per user: shared scans need no copies, the vector
  index (a cache of all embeddings of a model) is built once, and the CLI's
  library stays exactly where it was (its rows become `local`'s).
- Privacy: `scans.summary` holds `Scan.summary()`, which carries only the
  de-identified metadata engine.deid kept (an allow-list of technical
  attributes, mapped UIDs) and the *names* of what was removed. No DICOM
  header string is stored anywhere else. `source` is the path the user
  indexed from (the issue asks for it; it is the user's own path, not read
  from the file). A `dicomweb:` source (a PACS series) is stored sealed
  (engine.pacs.locator), never as the real study and series UIDs.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sqlite3
from pathlib import Path
from typing import Callable, Iterator

import sqlite_utils

from engine import settings
from engine.errors import MedLensError

BUSY_TIMEOUT_S = 10.0
ENV_LIBRARY = settings.LIBRARY.env


class LibraryError(MedLensError):
    """The library file cannot be opened or used; the message says what to do."""


# --------------------------------------------------------------------------- where the file lives
def default_library_path() -> Path:
    """The per-user default: <user data dir>/medlens/library.db (platformdirs' user_data_dir rule)."""
    return settings.user_data_dir() / "library.db"


def library_path(path: str | os.PathLike | None = None) -> Path:
    """The library file to use: `path` (the --library flag), else $MEDLENS_LIBRARY, else the default."""
    if path is not None and str(path).strip():
        return Path(path).expanduser()
    return settings.LIBRARY.get() or default_library_path()


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- migrations
def _m001_initial(db: sqlite_utils.Database) -> None:
    # DDL written out rather than through table.create(): sqlite-utils' create()
    # has no ON DELETE CASCADE or CHECK constraints, and these tables need both.
    db.execute(
        """
        CREATE TABLE scans (
            id INTEGER PRIMARY KEY,
            content_hash TEXT NOT NULL UNIQUE,   -- sha256 of pixels + geometry (Scan.content_hash)
            modality TEXT NOT NULL,              -- engine.scan.Modality value: CT, MR, XRAY, ...
            body_part TEXT,                      -- de-identified BodyPartExamined, upper case, or NULL
            shape TEXT NOT NULL,                 -- JSON list: voxel array shape
            spacing TEXT NOT NULL,               -- JSON list: mm per axis
            summary TEXT NOT NULL,               -- JSON: Scan.summary() (de-identified metadata only)
            thumbnail BLOB,                      -- PNG, longer side 128 px; NULL when not stored
            thumbnail_note TEXT,                 -- why there is no thumbnail, when there is none
            source TEXT,                         -- the path the user indexed it from
            added_at TEXT NOT NULL               -- ISO 8601 UTC
        )
        """
    )
    db.execute("CREATE INDEX scans_modality ON scans(modality)")
    db.execute("CREATE INDEX scans_source ON scans(source)")
    # AUTOINCREMENT: rowids are never reused, so (count, max(id)) per model
    # identifies the set of embeddings and can key the vector index cache.
    db.execute(
        """
        CREATE TABLE embeddings (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            scan_id INTEGER NOT NULL REFERENCES scans(id) ON DELETE CASCADE,
            model_id TEXT NOT NULL,              -- ClipModel.model_id (name@revision); ids never mix
            dim INTEGER NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('image', 'volume-mean')),
            vector BLOB NOT NULL,                -- little-endian float32 x dim, L2-normalised
            UNIQUE (scan_id, model_id)
        )
        """
    )
    db.execute("CREATE INDEX embeddings_model ON embeddings(model_id)")
    db.execute(
        """
        CREATE TABLE notes (
            id INTEGER PRIMARY KEY,
            scan_id INTEGER NOT NULL REFERENCES scans(id) ON DELETE CASCADE,
            text TEXT NOT NULL,
            added_at TEXT NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX notes_scan ON notes(scan_id)")
    # FTS5 external-content table kept in sync by triggers (sqlite-utils writes them)
    db["notes"].enable_fts(["text"], fts_version="FTS5", create_triggers=True, tokenize="porter")
    db.execute(
        """
        CREATE TABLE labels (
            scan_id INTEGER NOT NULL REFERENCES scans(id) ON DELETE CASCADE,
            label TEXT NOT NULL,
            positive INTEGER NOT NULL CHECK (positive IN (0, 1)),
            added_at TEXT NOT NULL,
            PRIMARY KEY (scan_id, label)
        )
        """
    )
    db.execute("CREATE INDEX labels_label ON labels(label)")
    db.execute(
        """
        CREATE TABLE probes (
            id INTEGER PRIMARY KEY,
            label TEXT NOT NULL,
            model_id TEXT NOT NULL,
            dim INTEGER NOT NULL,
            coef BLOB NOT NULL,                  -- little-endian float32 x dim
            intercept REAL NOT NULL,
            n_pos INTEGER NOT NULL,
            n_neg INTEGER NOT NULL,
            positive_ids TEXT NOT NULL,          -- JSON list of scan ids
            negative_ids TEXT NOT NULL,          -- JSON list of scan ids
            metrics TEXT NOT NULL,               -- JSON
            created_at TEXT NOT NULL,
            UNIQUE (label, model_id)
        )
        """
    )


_SCANS_COLUMNS = "id, content_hash, modality, body_part, shape, spacing, summary, thumbnail, thumbnail_note, source, added_at"


def _m002_owners(db: sqlite_utils.Database) -> None:
    # Table rebuilds (SQLite cannot change a UNIQUE or PRIMARY KEY constraint in place); foreign keys are off
    # here (migrate()), so dropping the old `scans` deletes nothing that references it.
    db.execute(
        """
        CREATE TABLE scans_new (
            id INTEGER PRIMARY KEY,
            content_hash TEXT NOT NULL,          -- sha256 of pixels + geometry (Scan.content_hash)
            modality TEXT NOT NULL,
            body_part TEXT,
            shape TEXT NOT NULL,
            spacing TEXT NOT NULL,
            summary TEXT NOT NULL,               -- JSON: Scan.summary() (de-identified metadata only)
            thumbnail BLOB,
            thumbnail_note TEXT,
            source TEXT,
            added_at TEXT NOT NULL,
            owner TEXT NOT NULL DEFAULT 'local', -- the login that added it ('local': the CLI / single local user)
            shared INTEGER NOT NULL DEFAULT 0 CHECK (shared IN (0, 1)),  -- 1: every signed-in user may see it
            UNIQUE (owner, content_hash)
        )
        """
    )
    db.execute(f"INSERT INTO scans_new ({_SCANS_COLUMNS}) SELECT {_SCANS_COLUMNS} FROM scans")
    db.execute("DROP TABLE scans")
    db.execute("ALTER TABLE scans_new RENAME TO scans")
    db.execute("CREATE INDEX scans_modality ON scans(modality)")
    db.execute("CREATE INDEX scans_source ON scans(source)")
    db.execute("CREATE INDEX scans_owner ON scans(owner, content_hash)")
    db.execute("CREATE INDEX scans_shared ON scans(shared) WHERE shared = 1")
    db.execute(
        """
        CREATE TABLE labels_new (
            scan_id INTEGER NOT NULL REFERENCES scans(id) ON DELETE CASCADE,
            label TEXT NOT NULL,
            positive INTEGER NOT NULL CHECK (positive IN (0, 1)),
            added_at TEXT NOT NULL,
            owner TEXT NOT NULL DEFAULT 'local', -- who tagged (a tag on a shared scan is the tagger's own)
            PRIMARY KEY (scan_id, label, owner)
        )
        """
    )
    db.execute("INSERT INTO labels_new (scan_id, label, positive, added_at) SELECT scan_id, label, positive, added_at FROM labels")
    db.execute("DROP TABLE labels")
    db.execute("ALTER TABLE labels_new RENAME TO labels")
    db.execute("CREATE INDEX labels_label ON labels(owner, label)")
    probe_columns = "id, label, model_id, dim, coef, intercept, n_pos, n_neg, positive_ids, negative_ids, metrics, created_at"
    db.execute(
        """
        CREATE TABLE probes_new (
            id INTEGER PRIMARY KEY,
            label TEXT NOT NULL,
            model_id TEXT NOT NULL,
            dim INTEGER NOT NULL,
            coef BLOB NOT NULL,
            intercept REAL NOT NULL,
            n_pos INTEGER NOT NULL,
            n_neg INTEGER NOT NULL,
            positive_ids TEXT NOT NULL,
            negative_ids TEXT NOT NULL,
            metrics TEXT NOT NULL,
            created_at TEXT NOT NULL,
            owner TEXT NOT NULL DEFAULT 'local', -- whose tags it was fitted on
            UNIQUE (label, model_id, owner)
        )
        """
    )
    db.execute(f"INSERT INTO probes_new ({probe_columns}) SELECT {probe_columns} FROM probes")
    db.execute("DROP TABLE probes")
    db.execute("ALTER TABLE probes_new RENAME TO probes")


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_m001_initial, _m002_owners]
SCHEMA_VERSION = len(MIGRATIONS)


def _current_version(db: sqlite_utils.Database) -> int:
    if not db["schema_migrations"].exists():
        return 0
    row = db.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return int(row[0] or 0)


def migrate(db: sqlite_utils.Database) -> int:
    """Apply pending migrations in order, in one write transaction; returns the schema version."""
    if _current_version(db) == SCHEMA_VERSION:
        return SCHEMA_VERSION  # the common case costs one read, no write lock
    foreign_keys = db.execute("PRAGMA foreign_keys").fetchone()[0]
    db.execute("PRAGMA foreign_keys = OFF")  # only outside a transaction; see the module docstring
    try:
        with write(db):
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            version = _current_version(db)  # again, under the lock: another process may have migrated
            if version > SCHEMA_VERSION:
                raise LibraryError(
                    f"this library was written by a newer MedLens (schema {version}, this one knows {SCHEMA_VERSION}); upgrade MedLens"
                )
            for number, fn in enumerate(MIGRATIONS[version:], start=version + 1):
                fn(db)
                db.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)", [number, fn.__name__, now()])
            if db.execute("PRAGMA foreign_key_check").fetchone() is not None:
                raise LibraryError("upgrading the library would break its references between tables; nothing was changed")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    finally:
        db.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
    return SCHEMA_VERSION


# --------------------------------------------------------------------------- connections and transactions
@contextlib.contextmanager
def write(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """A write transaction (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any error); nests as a savepoint."""
    if db.conn.in_transaction:
        with db.atomic():
            yield db
        return
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if db.conn.in_transaction:
            db.conn.execute("ROLLBACK")
        raise
    else:
        db.conn.execute("COMMIT")


@contextlib.contextmanager
def connect(path: str | os.PathLike | None = None, *, create: bool = True) -> Iterator[sqlite_utils.Database]:
    """Open the library (creating and migrating it when `create`), yield a Database, close it.

    `path` None means $MEDLENS_LIBRARY or the per-user default. With
    create=False a missing file raises LibraryError (search must not leave
    an empty library behind a typo).
    """
    file = library_path(path)
    if not file.exists():
        if not create:
            raise LibraryError(f"no library at {file}: index scans first (medlens index PATH --library {file})")
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LibraryError(f"cannot create the library folder {file.parent} ({exc.strerror or exc})") from None
    elif file.is_dir():
        raise LibraryError(f"{file} is a folder; give the library's .db file")
    try:
        conn = sqlite3.connect(str(file), timeout=BUSY_TIMEOUT_S, isolation_level=None)
    except sqlite3.Error as exc:
        raise LibraryError(f"cannot open the library {file} ({exc})") from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        db = sqlite_utils.Database(conn)
        try:
            db.enable_wal()
            conn.execute("PRAGMA synchronous = NORMAL")
            migrate(db)
        except sqlite3.DatabaseError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise LibraryError(f"the library {file} stayed locked for {BUSY_TIMEOUT_S:g} s; try again") from None
            raise LibraryError(f"{file} is not a MedLens library ({exc})") from None
        db.medlens_path = str(file.resolve())  # type: ignore[attr-defined]  # keys the vector index cache
        yield db
    finally:
        conn.close()


def db_path(db: sqlite_utils.Database) -> str:
    """The file behind a Database (set by connect(); asked of SQLite otherwise)."""
    path = getattr(db, "medlens_path", None)
    if path:
        return path
    row = db.execute("PRAGMA database_list").fetchone()
    return str(row[2] or ":memory:")
