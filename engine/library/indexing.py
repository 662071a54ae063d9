"""Indexing: files, folders and zips -> scans + embeddings in the library. Resumable and idempotent.

Design decisions
- Inputs are split into small units before anything is read, so a folder
  of 10,000 images is never loaded at once and each scan is committed as
  soon as it is embedded: a plain file (PNG, NIfTI, a lone DICOM outside a
  folder walk) or a zip is one unit; inside a folder, the DICOM files of one
  directory form one unit (a series is split over files, and the series
  reader must see them together), every other file is its own unit. Each
  unit goes through engine.io.load, so files, folders and zips are read,
  sniffed and de-identified exactly as in the viewer.
- `source` is the path the scan was indexed from: the file, the zip, or the
  directory holding a DICOM series; a `dicomweb:` path (a PACS series or
  study) is one unit and is stored sealed (engine.pacs.locator: the library
  never holds a real study or series UID).
- Idempotent by content hash (pixels + geometry): a scan already in the
  library is not embedded again; re-running an interrupted run skips what
  is in and finishes the rest. A scan indexed earlier with another model
  gets this model's embedding added ('embedded').
- One transaction per scan (store.insert_prepared): the scan row and its
  embedding commit together or not at all.
- Bad inputs never stop the run: each becomes a (path, reason) entry in
  `failed` and the rest go on.
- Scans are indexed for one `owner` (default `local`, the CLI's user) and,
  with `shared=True`, shared with every user of the library from the start
  (e.g. a department's teaching collection indexed by its administrator).
  Idempotence is per owner: the same image indexed by two users is two rows.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import sqlite_utils

from engine.auth.users import LOCAL
from engine.library.db import LibraryError, connect
from engine.library.store import VOLUME_SLICES, ImageEncoder, has_embedding, insert_prepared, prepare, scan_id_by_hash, share
from engine.pacs.locator import is_locator
from engine.scan import Scan, ScanError

Progress = Callable[[int, int], None]  # (units done, units in all)


@dataclass
class IndexReport:
    added: int = 0  # new scans (with their embedding)
    present: int = 0  # scans already in the library with this model's embedding
    embedded: int = 0  # scans already in the library that got this model's embedding now
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    scan_ids: list[int] = field(default_factory=list)  # every scan seen, in input order

    @property
    def indexed(self) -> int:
        """Scans that are now searchable with this model."""
        return self.added + self.present + self.embedded

    def line(self) -> str:
        parts = [f"{self.added} added", f"{self.present} already present"]
        if self.embedded:
            parts.append(f"{self.embedded} embedded with this model")
        parts.append(f"{len(self.failed)} failed")
        return ", ".join(parts)


@dataclass
class Unit:
    source: str  # the path reported and stored
    files: list[str]  # what engine.io.load reads
    is_dir: bool = False


# --------------------------------------------------------------------------- inputs -> units
def _is_dicom_file(path: Path) -> bool:
    from engine.io.dicom import looks_like_dicom
    from engine.io.nifti import looks_like_nifti

    try:
        with open(path, "rb") as fh:
            head = fh.read(352)
    except OSError:
        return False
    if looks_like_nifti(head, path.name) and head[128:132] != b"DICM":
        return False
    return looks_like_dicom(head, path.name)


def plan(paths: Iterable[str | os.PathLike]) -> tuple[list[Unit], list[tuple[str, str]]]:
    """Split inputs into units (see module docstring) -> (units, [(path, reason)] for missing inputs)."""
    units: list[Unit] = []
    failed: list[tuple[str, str]] = []
    for raw in paths:
        if is_locator(raw):
            units.append(Unit(str(raw).strip(), [str(raw).strip()]))
            continue
        path = Path(raw)
        if not path.exists():
            failed.append((str(raw), "no such file or folder"))
            continue
        if not path.is_dir():
            units.append(Unit(str(raw), [str(path)]))
            continue
        for folder, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # hidden folders: OS metadata, VCS
            here = Path(folder)
            dicom: list[str] = []
            for name in sorted(files):
                file = here / name
                if name.startswith(".") or file.is_symlink() or not file.is_file():
                    continue
                if _is_dicom_file(file):
                    dicom.append(str(file))
                else:
                    units.append(Unit(str(file), [str(file)]))
            if dicom:
                units.append(Unit(str(here) if len(dicom) > 1 else dicom[0], dicom, is_dir=len(dicom) > 1))
    return units, failed


def _failure_path(unit: Unit, name: str) -> str:
    """A readable path for a file engine.io skipped (its names are display names, not paths)."""
    if is_locator(unit.source):
        return name  # engine.pacs names a failure by the dicomweb: path itself
    base = unit.source if unit.is_dir else os.path.dirname(unit.source)
    if not unit.is_dir and name == os.path.basename(unit.source):
        return unit.source
    return os.path.join(base, name)


# --------------------------------------------------------------------------- one scan
def _add(
    db: sqlite_utils.Database, scan: Scan, model: ImageEncoder, source: str | None, n_slices: int, owner: str, shared: bool = False
) -> tuple[int, str]:
    existing = scan_id_by_hash(db, scan.content_hash, owner=owner)
    if existing is not None and shared:
        share(db, [existing], True, owner=owner)  # indexing again with shared=True shares what is already in
    if existing is not None and has_embedding(db, existing, model.model_id):
        return existing, "present"  # the common case of a re-run: no model call, no write
    kwargs = dict(n_slices=n_slices, owner=owner, shared=shared)
    prepared = prepare(scan, model, source, with_row=existing is None, **kwargs)
    try:
        return insert_prepared(db, prepared)
    except ValueError:
        # the scan vanished between the check and the write (deleted meanwhile): write it whole
        return insert_prepared(db, prepare(scan, model, source, **kwargs))


def add_scan(
    db: sqlite_utils.Database, scan: Scan, model: ImageEncoder, source: str | None = None, *, owner: str = LOCAL
) -> tuple[int, str]:
    """Add one loaded scan to `owner`'s library (the app's "add current scan") -> (scan_id, 'added' | 'present' | 'embedded')."""
    return _add(db, scan, model, source, VOLUME_SLICES, owner)


# --------------------------------------------------------------------------- many
def index_paths(
    paths: Iterable[str | os.PathLike],
    db_path: str | os.PathLike | None,
    model: ImageEncoder,
    progress: Progress | None = None,
    *,
    n_slices: int = VOLUME_SLICES,
    owner: str = LOCAL,
    shared: bool = False,
) -> IndexReport:
    """Index every scan under `paths` into `owner`'s part of the library at `db_path` (None: $MEDLENS_LIBRARY / default)."""
    units, failed = plan(paths)
    report = IndexReport(failed=list(failed))
    if progress is not None:
        progress(0, len(units))
    with connect(db_path) as db:
        for done, unit in enumerate(units, start=1):
            _index_unit(db, unit, model, report, n_slices, owner, shared)
            if progress is not None:
                progress(done, len(units))
    return report


def _index_unit(
    db: sqlite_utils.Database, unit: Unit, model: ImageEncoder, report: IndexReport, n_slices: int, owner: str, shared: bool
) -> None:
    from engine.io import load

    try:
        result = load(unit.files)
    except ScanError as exc:
        message = str(exc)
        name = os.path.basename(unit.source)
        message = message[len(name) + 2 :] if message.startswith(name + ": ") else message
        report.failed.append((unit.source, message))
        return
    except Exception as exc:  # engine.io reports bad files itself; this is the last line of defence
        report.failed.append((unit.source, f"could not be read ({type(exc).__name__})"))
        return
    for skipped in result.skipped:
        report.failed.append((_failure_path(unit, skipped.name), skipped.reason))
    for scan in result.scans:
        try:
            scan_id, status = _add(db, scan, model, unit.source, n_slices, owner, shared)
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise LibraryError("the library stayed locked by another writer for 10 s; run the index again (it resumes)") from None
            raise
        except (ScanError, ValueError) as exc:
            report.failed.append((unit.source, f"{scan.label}: {exc}"))
            continue
        report.scan_ids.append(scan_id)
        if status == "added":
            report.added += 1
        elif status == "embedded":
            report.embedded += 1
        else:
            report.present += 1
