"""Units of work: one scan each (a DICOM series split over many files is one unit), found without decoding pixels.

Design decisions
- A `Unit` is what gets one output row: a DICOM series (every file with the
  same SeriesInstanceUID, wherever in the tree it lies), or any other file
  (a PNG, a NIfTI volume, a DICOM file whose header cannot be parsed, a
  file that is not a scan at all: that one becomes an error row). Zip members are
  units exactly like files.
- A `Member` is one byte stream of a unit, named by a `scheme` and a
  `location` (a file path; for zip members the zip's path plus the member
  name). Workers read members through engine.batch.reading's table of
  readers, keyed by scheme, so a new kind of source (a PACS query: scheme
  "dicomweb") adds a reader there and a source in engine.batch.sources.
- Series are found by a header-only scan: the first 352 bytes say whether a
  file is DICOM (engine.io.classify, the viewer's own sniffing), and pydicom
  reads the header up to the pixel data keeping only SeriesInstanceUID. The
  UID itself is never stored or shown (it identifies a patient's study): a
  unit keeps its SHA-256 as `series_key`, used only to group. DICOM files
  whose SeriesInstanceUID is blank (de-identified exports) are grouped by
  folder, which is how engine.io reads such a folder: as one series.
- `fingerprint` names a unit's inputs as they are on disk (scheme,
  location, member name, size and modification time; a zip member's CRC and
  size). A rerun skips a unit whose fingerprint already has a row without
  reading a byte, which is what makes resuming a million-file run cheap.
  The content hash (computed by the worker from the bytes) is the key of
  the row; engine.batch.runner uses both (see there).
- `problem` marks a unit refused at planning (an archive over its limits,
  an unsafe member name, a path in a listing that does not exist): it gets
  an error row like any bad file, so every input is accounted for once.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Iterable

KIND_SERIES = "dicom-series"
KIND_FILE = "file"
SCHEME_FILE = "file"
SCHEME_ZIP = "zip"


@dataclass(frozen=True)
class Member:
    """One byte stream of a unit."""

    scheme: str  # how a worker reads it: "file", "zip" (engine.batch.reading.READERS)
    location: str  # a file path; for "zip" the archive's path
    inner: str = ""  # for "zip": the member's name inside the archive
    version: str = ""  # changes when the bytes do: "size:mtime_ns" for files, "crc:size" for zip members
    name: str = ""  # how messages name it (engine.io's display names)

    def token(self) -> str:
        return "\x1f".join((self.scheme, self.location, self.inner, self.version))


@dataclass(frozen=True)
class Unit:
    """One scan to process: its members, how it is shown, and what identifies it without reading it."""

    source: str  # shown in rows and stored in the library: a file, "zip/member", or a series' folder
    kind: str  # KIND_SERIES or KIND_FILE
    members: tuple[Member, ...]
    fingerprint: str = ""  # sha256 over the members' tokens (set by make_unit)
    series_key: str = field(default="", compare=False)  # sha256 of the SeriesInstanceUID (grouping only)
    problem: str | None = None  # refused at planning: becomes an error row without being read


def fingerprint(members: Iterable[Member]) -> str:
    digest = hashlib.sha256()
    for token in sorted(m.token() for m in members):
        digest.update(token.encode("utf-8", "surrogateescape"))
        digest.update(b"\x1e")
    return digest.hexdigest()


def make_unit(source: str, kind: str, members: Iterable[Member], *, series_key: str = "", problem: str | None = None) -> Unit:
    members = tuple(sorted(members, key=lambda m: (m.location, m.inner)))
    return Unit(source, kind, members, fingerprint(members), series_key, problem)


def file_member(path: Path) -> Member:
    """A file on disk as a member; a path that cannot be stat'ed gets version 'missing' (its read will fail)."""
    try:
        st = path.stat()
        version = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        version = "missing"
    return Member(SCHEME_FILE, str(path), "", version, str(path))


# --------------------------------------------------------------------------- header-only sniffing
HEADER_PREFIX = 1 << 16  # bytes read to find the series UID (group 0020 comes early); more only if the header is longer


def _series_key(opener, head: bytes) -> str | None:
    """sha256 of the SeriesInstanceUID read from the header only; "" when it has none; None when the header is damaged.

    Reads a 64 KB prefix into memory (zip members are not seekable, and one read is the fastest
    way through a network file system); a header longer than that is read whole.
    """
    import io
    import warnings

    import pydicom

    force = not (len(head) >= 132 and head[128:132] == b"DICM")
    for limit in (HEADER_PREFIX, None):
        try:
            with opener() as fh:
                data = fh.read(limit) if limit else fh.read()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["SeriesInstanceUID"], force=force)
            uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
        except Exception:  # truncated prefix: read it whole; a damaged header: the file is its own unit
            if limit is not None and len(data) == limit:
                continue
            return None
        if uid or limit is None or len(data) < limit:
            return hashlib.sha256(uid.encode()).hexdigest() if uid else ""
    return ""


def sniff(opener, name: str, head: bytes | None = None) -> tuple[str, str | None]:
    """(kind, series key) of a byte stream: kind as engine.io.classify says; the key for DICOM only
    ("" for DICOM without a SeriesInstanceUID: see `series_key`).

    `head`: its first 352 bytes when the caller has read them already.
    """
    import io

    from engine.io import Source, classify

    try:
        if head is None:
            with opener() as fh:
                head = fh.read(352)
        kind = classify(Source(name, len(head), lambda: io.BytesIO(head)))
    except Exception:
        return "unreadable", None
    return kind, (_series_key(opener, head) if kind == "dicom" else None)


def series_key(key: str | None, folder: str) -> str | None:
    """The grouping key of a sniffed member: DICOM files without a SeriesInstanceUID (de-identified exports
    often blank it) are taken as one series per folder, as engine.io reads a folder of them as one series."""
    if key == "":
        return hashlib.sha256(f"folder without series UID\0{folder}".encode("utf-8", "surrogateescape")).hexdigest()
    return key


# --------------------------------------------------------------------------- grouping
@dataclass
class Found:
    """A member seen while walking a source, before grouping."""

    member: Member
    source: str  # the unit's source if it stays alone
    folder: str  # where a series it belongs to is said to live
    series_key: str | None


def group(found: Iterable[Found]) -> list[Unit]:
    """Members -> units: DICOM members with one series key form one unit; every other member is alone."""
    singles: list[Unit] = []
    series: dict[str, list[Found]] = {}
    for f in found:
        if f.series_key:
            series.setdefault(f.series_key, []).append(f)
        else:
            singles.append(make_unit(f.source, KIND_FILE, [f.member]))
    grouped = []
    for key, items in series.items():
        if len(items) == 1:
            grouped.append(make_unit(items[0].source, KIND_FILE, [items[0].member], series_key=key))
            continue
        grouped.append(make_unit(_series_source({f.folder for f in items}), KIND_SERIES, [f.member for f in items], series_key=key))
    return disambiguate(singles + grouped)


def _series_source(folders: set[str]) -> str:
    """Where a series is said to be: its folder, or the folders' common parent, saying so."""
    if len(folders) == 1:
        return next(iter(folders))
    return f"{os.path.commonpath(sorted(folders))} [series across {len(folders)} folders]"  # folders are absolute (sources.py)


def disambiguate(units: list[Unit]) -> list[Unit]:
    """Sorted by source; series sharing a folder get ' [series k/n]' so every source names one unit."""
    by_source: dict[str, list[Unit]] = {}
    for unit in units:
        by_source.setdefault(unit.source, []).append(unit)
    out: list[Unit] = []
    for source in sorted(by_source):
        same = sorted(by_source[source], key=lambda u: (u.members[0].location, u.members[0].inner))
        if len(same) == 1:
            out.append(same[0])
            continue
        out.extend(replace(u, source=f"{source} [series {k}/{len(same)}]") for k, u in enumerate(same, 1))
    return out


def merge_series(units: list[Unit]) -> list[Unit]:
    """Units of one series found under different SOURCEs become one unit (a series split over folders given apart)."""
    by_key: dict[str, list[Unit]] = {}
    rest: list[Unit] = []
    for unit in units:
        (by_key.setdefault(unit.series_key, []) if unit.series_key and unit.problem is None else rest).append(unit)
    for key, same in by_key.items():
        if len(same) == 1:
            rest.append(same[0])
            continue
        members = {m for u in same for m in u.members}
        rest.append(make_unit(_series_source({os.path.dirname(m.name) for m in members}), KIND_SERIES, members, series_key=key))
    return disambiguate(rest)


def zip_member_name(zip_display: str, inner: str) -> str:
    return f"{zip_display}/{PurePosixPath(inner)}"
