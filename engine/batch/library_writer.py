"""`medlens batch index`: the one process that writes the library, a transaction per shard of rows.

Design decisions
- Workers never open the library: they send the prepared scan rows
  (engine.library.store.Prepared: de-identified summary, thumbnail,
  embedding) back with their rows, and the runner writes them here, so
  SQLite has one writer however many workers or nodes run, and workers on
  other machines need no access to the library file.
- One transaction per flushed shard (hundreds of scans), not per scan:
  each commit costs an fsync, which dominated `medlens index` on small
  images. The library transaction commits before the shard of rows is
  renamed into place: a run killed in between redoes those units, and the
  library, idempotent by content hash, reports them 'present'. No scan is
  lost or stored twice.
- A row's scans get the library's status: 'added', 'present' (there with
  this model's embedding already) or 'embedded' (there, embedding new).
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from engine.library.db import LibraryError, connect, library_path, write
from engine.library.store import insert_prepared


class LibraryWriter:
    def __init__(self, path: str | os.PathLike | None):
        self.path = library_path(path)
        self._ctx = connect(path)
        self.db = self._ctx.__enter__()

    def write(self, items: list[tuple[dict[str, Any], list[Any]]]) -> None:
        """(row, [Prepared per good scan]) pairs -> the library, in one transaction; sets each scan's status in the row."""
        if not any(prepared for _row, prepared in items):
            return
        try:
            with write(self.db):
                for row, prepared in items:
                    good = [s for s in (row.get("result") or {}).get("scans", []) if "error" not in s]
                    for scan, item in zip(good, prepared):
                        _scan_id, scan["status"] = insert_prepared(self.db, item)
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise LibraryError(f"the library {self.path} stayed locked by another writer; run the batch again (it resumes)") from None
            raise

    def close(self) -> None:
        self._ctx.__exit__(None, None, None)
