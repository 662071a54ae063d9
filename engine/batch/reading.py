"""Worker side of reading: a unit's members -> bytes in memory -> engine.io Sources, and the unit's content hash.

Design decisions
- Each member is read once into memory: the same bytes are hashed and
  decoded, so a unit on a network file system crosses the network once.
  A unit is at most one series (hundreds of MB for a large CT); the batch
  worker drops each scan as soon as its model images are made.
- The content hash of a unit is the SHA-256 of its members' SHA-256
  digests in sorted order: the same files give the same hash wherever they
  lie and whatever they are called, so a moved or renamed archive is
  recognised as done.
- Readers are a table keyed by Member.scheme. Zip members are read through
  engine.io.sources.zip_sources, with its checks, every time (the archive
  may have changed since planning); a worker keeps the listings of the last
  few archives it opened.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from engine.batch.units import SCHEME_FILE, SCHEME_ZIP, Member, Unit
from engine.io.sources import DEFAULT_LIMITS, Source, zip_sources
from engine.scan import ScanError

ZIP_LISTINGS_KEPT = 4


class _ZipListings:
    """The safe members of the last few archives read, by (path, size, mtime)."""

    def __init__(self, keep: int = ZIP_LISTINGS_KEPT):
        self._keep = keep
        self._cache: OrderedDict[tuple, dict[str, Source]] = OrderedDict()

    def source(self, member: Member) -> Source:
        try:
            st = os.stat(member.location)
        except OSError as exc:
            raise ScanError(f"{member.name}: the archive cannot be read ({exc.strerror or exc})") from None
        key = (member.location, st.st_size, st.st_mtime_ns)
        listing = self._cache.get(key)
        if listing is None:
            sources, _skipped = zip_sources(member.location, member.location, DEFAULT_LIMITS)
            listing = {s.member or "": s for s in sources}
            self._cache[key] = listing
            while len(self._cache) > self._keep:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        found = listing.get(member.inner)
        if found is None:
            raise ScanError(f"{member.name}: no longer in the archive, or refused by its checks")
        return found


_zips = _ZipListings()


def _read_file(member: Member) -> bytes:
    try:
        size = os.path.getsize(member.location)
        if size > DEFAULT_LIMITS.max_member_bytes:
            raise ScanError(
                f"{member.name}: {size / 2**30:.1f} GiB is over the {DEFAULT_LIMITS.max_member_bytes / 2**30:.0f} GiB limit for one file"
            )
        with open(member.location, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise ScanError(f"{member.name}: no such file (it was there when the run was planned)") from None
    except IsADirectoryError:
        raise ScanError(f"{member.name}: is a folder") from None
    except OSError as exc:
        raise ScanError(f"{member.name}: cannot be read ({exc.strerror or exc})") from None


def _read_zip_member(member: Member) -> bytes:
    return _zips.source(member).read()


# scheme -> reader; a PACS source adds "dicomweb" here (a function fetching one instance's bytes)
READERS: dict[str, Callable[[Member], bytes]] = {SCHEME_FILE: _read_file, SCHEME_ZIP: _read_zip_member}


@dataclass
class ReadUnit:
    sources: list[Source]  # in memory: readers never touch the disk again
    content_hash: str
    n_bytes: int


def _memory_source(name: str, data: bytes) -> Source:
    return Source(name, len(data), lambda: io.BytesIO(data))


def read_unit(unit: Unit) -> ReadUnit:
    """Every member's bytes, as Sources engine.io.load_sources reads, and the unit's content hash.

    Raises ScanError naming the member when one cannot be read (a unit is read whole or not at all:
    a series missing a slice would give a different scan than the one planned).
    """
    digests: list[bytes] = []
    sources: list[Source] = []
    total = 0
    for member in unit.members:
        reader = READERS.get(member.scheme)
        if reader is None:
            raise ScanError(f"{member.name}: no reader for '{member.scheme}' members in this install")
        data = reader(member)
        digests.append(hashlib.sha256(data).digest())
        sources.append(_memory_source(member.name or member.location, data))
        total += len(data)
    overall = hashlib.sha256()
    for digest in sorted(digests):
        overall.update(digest)
    return ReadUnit(sources, overall.hexdigest(), total)
