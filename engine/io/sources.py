"""Turn what the user gave (files, folders, zips) into a flat list of `Source`s.

Design decisions
- A `Source` is a named byte stream: a file on disk or a member of a zip.
  Zip members are read straight from the archive, never extracted, so no
  member name ever becomes a path on disk (path traversal cannot happen) and
  nothing is written that would outlive the request.
- Archives are untrusted. Limits (member count, total and per-member
  uncompressed size, compression ratio) are checked from the central
  directory before reading and enforced again while reading, because the
  declared sizes can lie. Nested archives are skipped, not opened.
- Problems with one member are recorded as `Skipped` and the rest go on.
"""

from __future__ import annotations

import io
import os
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable

from engine.scan import ScanError


@dataclass(frozen=True)
class Limits:
    max_members: int = 10_000  # per archive; a 10,001-member zip is refused
    max_member_bytes: int = 2 << 30  # 2 GiB uncompressed for one member
    max_total_bytes: int = 4 << 30  # 4 GiB uncompressed for one archive
    max_ratio: float = 200.0  # compression ratio above which a big member is a bomb
    ratio_floor_bytes: int = 16 << 20  # ratio only checked for members above 16 MiB
    max_files: int = 20_000  # files gathered from folders


DEFAULT_LIMITS = Limits()


@dataclass
class Skipped:
    name: str
    reason: str


@dataclass
class Source:
    """A readable byte stream with a display name (never used as a path)."""

    name: str
    size: int
    _opener: Callable[[], io.BufferedIOBase]
    path: str | None = None  # set for plain files so readers may use memory maps
    dataset: Any = None  # an already parsed pydicom Dataset (DICOMweb delivers parsed instances: engine.pacs)
    member: str | None = None  # set for zip members: the (checked, relative) member name inside the archive
    version: str = ""  # set for zip members: "crc32:size", which changes when the member's bytes do

    def open(self) -> io.BufferedIOBase:
        return self._opener()

    def read(self) -> bytes:
        with self.open() as fh:
            return fh.read()

    def head(self, n: int = 512) -> bytes:
        with self.open() as fh:
            return fh.read(n)


class _BoundedReader(io.RawIOBase):
    """Reads a zip member, failing once more bytes come out than were declared."""

    def __init__(self, fh, limit: int, name: str):
        self._fh, self._left, self._name = fh, limit, name

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._fh.read(min(len(b), self._left + 1))
        if len(data) > self._left:
            raise ScanError(f"{self._name}: archive member is larger than declared (possible zip bomb); skipped")
        self._left -= len(data)
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._fh.close()
        super().close()


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def _safe_member_name(name: str) -> str | None:
    """The member's name if it is a plain relative path, else None."""
    if not name or "\x00" in name:
        return None
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and p.parts[0].endswith(":")):
        return None
    return str(p)


def _zip_sources(path: Path, display: str, limits: Limits, skipped: list[Skipped]) -> list[Source]:
    try:
        zf = zipfile.ZipFile(path)
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as exc:
        raise ScanError(f"{display}: not a readable zip archive ({exc})") from None
    if len(infos) > limits.max_members:
        raise ScanError(
            f"{display}: archive has {len(infos):,} members, more than the limit of {limits.max_members:,}; split it into smaller zips"
        )
    total = sum(max(i.file_size, 0) for i in infos)
    if total > limits.max_total_bytes:
        raise ScanError(
            f"{display}: archive would unpack to {total / 2**30:.1f} GiB, more than the "
            f"{limits.max_total_bytes / 2**30:.0f} GiB limit (possible zip bomb)"
        )
    out: list[Source] = []
    for info in infos:
        if info.is_dir():
            continue
        label = f"{display}/{info.filename}"
        name = _safe_member_name(info.filename)
        if name is None:
            skipped.append(Skipped(label, "unsafe path in archive (absolute or '..'); skipped"))
            continue
        mode = (info.external_attr >> 16) & 0o170000
        if mode == stat.S_IFLNK:
            skipped.append(Skipped(label, "symbolic link in archive; skipped"))
            continue
        if PurePosixPath(name).name.startswith(".") or "__MACOSX" in PurePosixPath(name).parts:
            continue  # OS metadata (.DS_Store, AppleDouble): not data, not worth a message
        if info.flag_bits & 0x1:
            skipped.append(Skipped(label, "encrypted archive member; skipped"))
            continue
        if info.file_size > limits.max_member_bytes:
            skipped.append(Skipped(label, f"member unpacks to {info.file_size / 2**30:.1f} GiB, over the limit; skipped"))
            continue
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > limits.ratio_floor_bytes and ratio > limits.max_ratio:
            skipped.append(Skipped(label, f"compression ratio {ratio:.0f}:1 looks like a zip bomb; skipped"))
            continue
        lower = name.lower()
        if lower.endswith((".zip", ".tar", ".gz.tar", ".tgz", ".7z", ".rar")):
            skipped.append(Skipped(label, "nested archive; unpack it and upload its contents"))
            continue
        out.append(
            Source(
                name=label,
                size=info.file_size,
                _opener=_member_opener(zf, info, label),
                member=name,
                version=f"{info.CRC:08x}:{info.file_size}",
            )
        )
    return out


def zip_sources(path: str | os.PathLike, display: str | None = None, limits: Limits = DEFAULT_LIMITS) -> tuple[list[Source], list[Skipped]]:
    """The members of one zip that pass the safety checks (as Sources, read in place), and the refused ones.

    Raises ScanError when the archive as a whole is refused (unreadable, too
    many members, would unpack beyond the limit).
    """
    path = Path(path)
    skipped: list[Skipped] = []
    sources = _zip_sources(path, display or path.name, limits, skipped)
    return sources, skipped


def _member_opener(zf: zipfile.ZipFile, info: zipfile.ZipInfo, label: str):
    def opener():
        # a small buffer: sniffing a format or reading a DICOM header must not inflate the whole member
        return io.BufferedReader(_BoundedReader(zf.open(info), info.file_size, label), buffer_size=64 << 10)

    return opener


def _file_opener(path: Path):
    return lambda: open(path, "rb")


def gather_sources(paths: Iterable[str | os.PathLike], limits: Limits = DEFAULT_LIMITS) -> tuple[list[Source], list[Skipped]]:
    """Expand files, folders (recursively) and zips into Sources.

    Never raises for one bad input: a missing path, a refused archive or a bad
    member becomes a `Skipped` entry and the rest go on.
    """
    sources: list[Source] = []
    skipped: list[Skipped] = []
    for raw in paths:
        path = Path(raw)
        display = path.name or str(path)
        if not path.exists():
            skipped.append(Skipped(str(raw), "no such file or folder"))
            continue
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
            if len(files) > limits.max_files:
                skipped.append(Skipped(str(raw), f"folder holds {len(files):,} files, more than the limit of {limits.max_files:,}"))
                continue
            for f in files:
                rel = f.relative_to(path)
                if any(part.startswith(".") for part in rel.parts):
                    continue
                if f.suffix.lower() == ".zip" and _is_zip(f):
                    try:
                        sources.extend(_zip_sources(f, f"{display}/{rel}", limits, skipped))
                    except ScanError as exc:
                        skipped.append(Skipped(f"{display}/{rel}", str(exc)))
                    continue
                sources.append(Source(f"{display}/{rel}", f.stat().st_size, _file_opener(f), path=str(f)))
        elif path.suffix.lower() == ".zip" or (_is_zip(path) and not _looks_like_nifti_or_dicom(path)):
            try:
                sources.extend(_zip_sources(path, display, limits, skipped))
            except ScanError as exc:
                msg = str(exc)
                skipped.append(Skipped(display, msg[len(display) + 2 :] if msg.startswith(display + ": ") else msg))
        else:
            sources.append(Source(display, path.stat().st_size, _file_opener(path), path=str(path)))
    return sources, skipped


def _looks_like_nifti_or_dicom(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith((".nii", ".nii.gz", ".dcm"))
