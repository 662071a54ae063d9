"""SOURCE arguments of `medlens batch`: folder trees, listings, zips, single files (and, later, PACS queries).

Design decisions
- A SOURCE is opened by `open_source(spec)` into a `BatchSource`, whose
  `units()` lists the units under it (engine.batch.units). A folder is
  walked (hidden files and folders and symbolic links skipped, as
  engine.io does); a zip's members are listed through engine.io's safe zip
  reading (member count, sizes, compression ratio, traversal names, links,
  nested archives), never extracted; a listing (`*.txt`, `*.lst`, `*.list`,
  or `list:FILE` for any name) holds one path per line (blank lines and
  `#` comments skipped, relative paths taken from the listing's folder),
  each opened like a SOURCE of its own.
- Other kinds plug in by prefix: `register_source("dicomweb", factory)`
  makes `dicomweb:...` SOURCEs go to `factory(rest_of_spec)`, which returns
  any object with `spec` and `units()`. A PACS query source groups its
  instances into series units itself (members with scheme "dicomweb") and
  registers the matching member reader in engine.batch.reading.READERS.
  That is all a new source needs; the runner, engines and output do not
  change.
- Paths are made absolute, so fingerprints (and rows) do not depend on the
  folder the command was started from.
- Problems with one input never stop the plan: a refused archive, an
  unsafe member or a listed path that does not exist becomes a unit with a
  `problem`, i.e. one error row.
"""

from __future__ import annotations

import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

from engine.batch.errors import BatchError
from engine.batch.units import (
    KIND_FILE,
    SCHEME_ZIP,
    Found,
    Member,
    Unit,
    file_member,
    group,
    make_unit,
    merge_series,
    series_key,
    sniff,
)
from engine.io.sources import DEFAULT_LIMITS, Limits, zip_sources

LISTING_SUFFIXES = (".txt", ".lst", ".list")
SNIFF_THREADS = 8  # header reads are I/O bound (network file systems): a few threads hide the latency
Progress = Callable[[int], None]  # files looked at so far


class BatchSource(Protocol):
    spec: str

    def units(self, progress: Progress | None = None) -> list[Unit]: ...


SourceFactory = Callable[[str], BatchSource]
_PREFIXES: dict[str, SourceFactory] = {}


def register_source(prefix: str, factory: SourceFactory) -> None:
    """Make SOURCEs written `prefix:rest` open as factory(rest) (e.g. "dicomweb" for PACS queries)."""
    _PREFIXES[prefix.lower()] = factory


def source_prefixes() -> list[str]:
    return sorted(_PREFIXES)


# --------------------------------------------------------------------------- files, folders, zips
def _sniff_file(path: Path) -> Found:
    member = file_member(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(352)
    except OSError:
        return Found(member, str(path), str(path.parent), None)  # its read reports why
    _kind, key = sniff(lambda: open(path, "rb"), path.name, head)
    return Found(member, str(path), str(path.parent), series_key(key, str(path.parent)))


def _zip_found(path: Path, limits: Limits) -> tuple[list[Found], list[Unit]]:
    """A zip's members as Found entries, and its refused members (or the whole refused archive) as problem units."""
    display = str(path)
    try:
        sources, skipped = zip_sources(path, display, limits)
    except Exception as exc:  # ScanError (refused archive) or an unreadable file
        message = str(exc)
        message = message[len(display) + 2 :] if message.startswith(display + ": ") else message
        return [], [make_unit(display, KIND_FILE, [file_member(path)], problem=message)]
    version = file_member(path).version
    problems = [
        make_unit(s.name, KIND_FILE, [Member(SCHEME_ZIP, display, s.name[len(display) + 1 :], version, s.name)], problem=s.reason)
        for s in skipped
    ]
    found = []
    for source in sources:
        member = Member(SCHEME_ZIP, display, source.member or "", source.version or version, source.name)
        _kind, key = sniff(source.open, source.name)
        folder = os.path.dirname(source.name)
        found.append(Found(member, source.name, folder, series_key(key, folder)))
    return found, problems


def _is_zip(path: Path) -> bool:
    if path.suffix.lower() != ".zip":
        return False
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def _walk(root: Path) -> Iterator[Path]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # hidden folders: OS metadata, VCS
        here = Path(folder)
        for name in sorted(files):
            path = here / name
            if name.startswith(".") or path.is_symlink():
                continue
            yield path


def _units_of_paths(paths: Iterable[Path], limits: Limits, progress: Progress | None) -> list[Unit]:
    """Units of plain files and zips (grouped into series across all of them)."""
    files: list[Path] = []
    found: list[Found] = []
    problems: list[Unit] = []
    for path in paths:
        if _is_zip(path):
            zip_found, zip_problems = _zip_found(path, limits)
            found.extend(zip_found)
            problems.extend(zip_problems)
        else:
            files.append(path)
    seen = len(found)
    with ThreadPoolExecutor(SNIFF_THREADS) as pool:
        for item in pool.map(_sniff_file, files, chunksize=64):
            found.append(item)
            seen += 1
            if progress is not None and seen % 256 == 0:
                progress(seen)
    if progress is not None:
        progress(seen)
    return group(found) + problems


class PathSource:
    """A folder tree, a zip or a single file."""

    def __init__(self, spec: str, limits: Limits = DEFAULT_LIMITS):
        self.spec = spec
        self.path = Path(os.path.abspath(os.path.expanduser(spec)))
        self.limits = limits
        if not self.path.exists():
            raise BatchError(f"{spec}: no such file or folder")

    def units(self, progress: Progress | None = None) -> list[Unit]:
        paths = _walk(self.path) if self.path.is_dir() else [self.path]
        return _units_of_paths(paths, self.limits, progress)


class ListingSource:
    """A text file naming one path (file, folder or zip) per line."""

    def __init__(self, spec: str, limits: Limits = DEFAULT_LIMITS):
        self.spec = spec
        self.path = Path(os.path.abspath(os.path.expanduser(spec)))
        self.limits = limits
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BatchError(f"{spec}: cannot read the listing ({getattr(exc, 'strerror', None) or exc})") from None
        self.lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]

    def units(self, progress: Progress | None = None) -> list[Unit]:
        plain: list[Path] = []
        units: list[Unit] = []
        for line in self.lines:
            path = Path(os.path.abspath(self.path.parent / os.path.expanduser(line)))
            if path.is_dir():
                plain.extend(_walk(path))
            elif path.exists():
                plain.append(path)
            else:  # listed but absent: one error row, so every listed line is accounted for
                units.append(make_unit(str(path), KIND_FILE, [file_member(path)], problem="no such file or folder (named in the listing)"))
        return _units_of_paths(plain, self.limits, progress) + units


def open_source(spec: str, limits: Limits = DEFAULT_LIMITS) -> BatchSource:
    """A SOURCE argument -> its BatchSource (BatchError when it names nothing)."""
    text = str(spec).strip()
    if not text:
        raise BatchError("an empty SOURCE was given")
    prefix, sep, rest = text.partition(":")
    if sep and not os.path.exists(text):
        if prefix.lower() == "list":
            return ListingSource(rest, limits)
        if prefix.lower() in _PREFIXES:
            return _PREFIXES[prefix.lower()](rest)
        if len(prefix) > 1 and prefix.isalpha():
            known = ", ".join(["list", *source_prefixes()])
            raise BatchError(f"{text}: unknown kind of SOURCE '{prefix}:' (known: {known}; or a folder, zip, file or listing)")
    path = Path(os.path.expanduser(text))
    if path.is_file() and path.suffix.lower() in LISTING_SUFFIXES:
        return ListingSource(text, limits)
    return PathSource(text, limits)


def plan_units(specs: Iterable[str], progress: Progress | None = None, limits: Limits = DEFAULT_LIMITS) -> list[Unit]:
    """Every unit under the SOURCEs, series merged across them, each unit once, sorted by source."""
    opened = [open_source(spec, limits) for spec in specs]  # every SOURCE is checked before any is walked
    units: list[Unit] = []
    offset = 0
    for source in opened:

        def counted(n: int, _base=offset) -> None:
            if progress is not None:
                progress(_base + n)

        found = source.units(counted)
        offset += sum(len(u.members) for u in found)
        units.extend(found)
    unique = {u.fingerprint: u for u in units}  # a file named by two SOURCEs is one unit
    return merge_series(list(unique.values()))
