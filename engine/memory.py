"""Memory bounds for loaded scans: a per-series voxel cap and a per-process budget.

Design decisions
- Sizes are counted from headers before any pixel is decoded (DICOM Rows x
  Columns x frames x samples over the files grouped into a series, the NIfTI
  header's shape, the image's declared size), so a series over a bound is
  refused in the time it takes to read headers, whatever its pixels hold.
- The cap (`MEDLENS_MAX_SERIES_VOXELS`) is in voxels, what a reader can check
  against a series (slices x rows x columns); the budget
  (`MEDLENS_MEMORY_BUDGET_MB`) is in bytes, because int16 and float32
  storage cost differently.
- The budget is a ledger of live arrays. A reader reserves its estimate
  (output array plus the largest transient decode) before decoding; the
  reservation is refused at once when it does not fit. Each voxel array the
  reader allocates is then handed to the ledger (`Reservation.track`), which
  holds its bytes until the array is garbage-collected (`weakref.finalize`).
  So the figure is what is really alive, whoever keeps the scan (a browser
  session, a cache, a leak), and it returns to its baseline only when the
  arrays have actually been freed; tests rely on that.
- One ledger per process (`budget()`): a server's sessions share it, and a
  CLI or batch process is bounded by the same setting.
- When the budget is full a new load is refused with a message saying how
  much is in use; nobody else's scan is evicted. Evicting would take a scan
  away from a radiologist in the middle of reading it; a refused upload can
  be retried, and idle sessions free their scans within minutes
  (`MEDLENS_SESSION_IDLE_MIN`, app.sessions).
- One load (all series of one upload) may hold at most half the budget
  (`LOAD_SHARE`), so a single upload of many series cannot fill the server
  and at least two users always fit.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine import settings
from engine.scan import ScanError

MB = 1 << 20
LOAD_SHARE = 0.5  # largest part of the budget one load (one upload) may hold
MIN_DEFAULT_BUDGET = 512 * MB


class MemoryLimitError(ScanError):
    """A series or load is over a memory bound; the message names the bound and the size."""


def _millions(n: int) -> str:
    return f"{n / 1e6:,.0f} M" if n >= 10e6 else f"{n / 1e6:.2g} M"


def _mb(n: int | float) -> str:
    return f"{n / MB:,.0f} MB" if n >= 10 * MB else f"{n / MB:.2g} MB"


@dataclass(frozen=True)
class SeriesSize:
    """The size of one scan-to-be, from its headers: planes x rows x cols x samples x volumes."""

    planes: int  # slices of a series, frames of a multi-frame file, 1 for an image
    rows: int
    cols: int
    samples: int = 1  # values per pixel kept in the scan (3 for a colour image)
    volumes: int = 1  # repeated acquisitions (4D)
    unit: str = "slices"

    @property
    def voxels(self) -> int:
        return int(self.planes) * int(self.rows) * int(self.cols) * int(self.samples) * int(self.volumes)

    def nbytes(self, dtype) -> int:
        return self.voxels * np.dtype(dtype).itemsize

    def describe(self) -> str:
        """e.g. '3,000 slices of 512x512' or 'an image of 4000x3000 x 3 colour channels'."""
        text = (
            f"{self.planes:,} {self.unit} of {self.rows}x{self.cols}"
            if self.planes != 1
            else f"one {self.unit.rstrip('s')} of {self.rows}x{self.cols}"
        )
        if self.volumes > 1:
            text += f" x {self.volumes:,} volumes"
        if self.samples > 1:
            text += f" x {self.samples} colour channels"
        return text


def max_series_voxels() -> int:
    return int(settings.MAX_SERIES_VOXELS.get())


def check_series(size: SeriesSize, what: str = "series") -> None:
    """Refuse a series over MEDLENS_MAX_SERIES_VOXELS, naming its size and the limit."""
    limit = max_series_voxels()
    if size.voxels > limit:
        raise MemoryLimitError(
            f"this {what} has {size.describe()} = {_millions(size.voxels)} voxels; the limit is "
            f"{_millions(limit)} voxels ({settings.MAX_SERIES_VOXELS.env}): load fewer slices, or raise the limit "
            "if this machine has the memory"
        )


# --------------------------------------------------------------------------- the budget
def available_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its container's (cgroup) limit if lower."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and 0 < int(raw) < total:
            total = int(raw)
    return int(total)


def default_budget_bytes() -> int:
    """A quarter of the memory this process may use (models, requests and the OS need the rest)."""
    return max(MIN_DEFAULT_BUDGET, available_memory() // 4)


def budget_limit_bytes() -> int:
    mb = settings.MEMORY_BUDGET_MB.get()
    return int(mb) * MB if mb else default_budget_bytes()


class MemoryBudget:
    """A thread-safe ledger of bytes held by voxel arrays (tracked) and loads in progress (reserved)."""

    def __init__(self, limit_bytes: int):
        self.limit = int(limit_bytes)
        self._lock = threading.Lock()
        self._tracked = 0
        self._reserved = 0
        self._arrays = 0

    @property
    def in_use(self) -> int:
        with self._lock:
            return self._tracked + self._reserved

    @property
    def tracked(self) -> int:
        """Bytes of tracked voxel arrays still alive."""
        with self._lock:
            return self._tracked

    @property
    def live_arrays(self) -> int:
        with self._lock:
            return self._arrays

    def reserve(self, nbytes: int, what: str = "this series") -> "Reservation":
        """Hold `nbytes` for a load about to decode, or raise MemoryLimitError when they do not fit."""
        nbytes = max(0, int(nbytes))
        with self._lock:
            used = self._tracked + self._reserved
            if used + nbytes > self.limit:
                raise MemoryLimitError(
                    f"loading {what} needs {_mb(nbytes)}, but the server's memory budget has {_mb(max(self.limit - used, 0))} "
                    f"free of {_mb(self.limit)} ({settings.MEMORY_BUDGET_MB.env}; other loaded scans hold the rest): "
                    f"try again in a few minutes (idle sessions release their scans after "
                    f"{settings.SESSION_IDLE_MIN.get():g} min) or load a smaller series"
                )
            self._reserved += nbytes
        return Reservation(self, nbytes)

    def _move_to_tracked(self, from_reserved: int, nbytes: int) -> None:
        with self._lock:
            self._reserved -= from_reserved
            self._tracked += nbytes
            self._arrays += 1

    def _untrack(self, nbytes: int) -> None:
        with self._lock:
            self._tracked -= nbytes
            self._arrays -= 1

    def _unreserve(self, nbytes: int) -> None:
        with self._lock:
            self._reserved -= nbytes


class Reservation:
    """Bytes held for one load in progress; `track` turns them into a live array's charge."""

    def __init__(self, budget: MemoryBudget, nbytes: int):
        self._budget = budget
        self._left = nbytes
        self._lock = threading.Lock()

    def track(self, array: np.ndarray) -> np.ndarray:
        """Charge `array` (which owns its memory) to the budget until it is garbage-collected."""
        nbytes = int(array.nbytes)
        with self._lock:
            taken = min(nbytes, self._left)
            self._left -= taken
        self._budget._move_to_tracked(taken, nbytes)
        weakref.finalize(array, self._budget._untrack, nbytes)
        return array

    def release(self) -> None:
        """Give back what was reserved and not tracked (idempotent)."""
        with self._lock:
            left, self._left = self._left, 0
        if left:
            self._budget._unreserve(left)

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_BUDGET: MemoryBudget | None = None
_BUDGET_LOCK = threading.Lock()


def budget() -> MemoryBudget:
    """This process's ledger; its limit follows MEDLENS_MEMORY_BUDGET_MB at each call."""
    global _BUDGET
    limit = budget_limit_bytes()
    with _BUDGET_LOCK:
        if _BUDGET is None:
            _BUDGET = MemoryBudget(limit)
        _BUDGET.limit = limit
        return _BUDGET


class LoadGuard:
    """Admits the scans of one load: the series cap, then a reservation on the budget.

    One load may hold at most LOAD_SHARE of the budget in total, so one upload
    of many series under the cap still cannot fill the server.
    """

    def __init__(self, ledger: MemoryBudget | None = None):
        self.ledger = ledger if ledger is not None else budget()
        self._admitted = 0
        self._lock = threading.Lock()

    def admit(self, size: SeriesSize, dtype, *, transient_bytes: int = 0, what: str = "series") -> Reservation:
        """Check `size` against the cap and reserve its array (`dtype`) plus `transient_bytes` of decoding."""
        check_series(size, what)
        final = size.nbytes(dtype)
        share = int(self.ledger.limit * LOAD_SHARE)
        with self._lock:
            if self._admitted + final > share:
                raise MemoryLimitError(
                    f"this {what} ({size.describe()}, {_mb(final)}) would bring this upload to "
                    f"{_mb(self._admitted + final)}; one upload may hold at most {_mb(share)}, half the memory budget "
                    f"({settings.MEMORY_BUDGET_MB.env}): upload fewer series at a time"
                )
            self._admitted += final
        try:
            return self.ledger.reserve(final + int(transient_bytes), f"this {what} ({size.describe()})")
        except MemoryLimitError:
            with self._lock:
                self._admitted -= final
            raise
