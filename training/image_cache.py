"""A decoded-pixel cache for manifest rows: one uint8 .npy of (N, S, S, 3).

Decoding (DICOM/NIfTI/PNG readers, windowing, letterboxing through
`PixelLoader`) costs far more than a training step's augmentation, so
trainers decode every row once and then read a memory-mapped array.

    from training.image_cache import build_cache
    images = build_cache(rows, data_root, size, "runs/ssl/cache_111.npy")
    images[i]  # uint8 (size, size, 3), the PixelLoader output of rows[i]

Design decisions
- Row i of the manifest list is image i of the array: callers keep their
  `rows` list and index both with the same integer.
- A sidecar `<path>.json` records a key: the SHA-256 of the size and the
  row ids in order. `build_cache` reuses the file only when the key
  matches, so a changed manifest (rows added, removed, reordered) or a
  different size rebuilds it. The data root is not in the key: the same
  manifest read from another mount gives the same pixels.
- Written to `<path>.tmp.npy` and renamed at the end, so an interrupted
  build never leaves a file that looks complete (no resume: rebuilding
  is minutes).
- Rows are decoded grouped by file (stable order) so slices of one volume
  hit PixelLoader's small volume cache instead of re-reading the volume.
- Returned arrays are read-only memmaps (`mmap_mode="r"`): several
  processes (DDP ranks) share one page cache copy.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from training.manifest import PixelLoader, Row

CACHE_VERSION = 2  # bump when PixelLoader's output changes meaningfully


def cache_key(rows: Sequence[Row], size: int) -> str:
    """SHA-256 over the version, size and ordered row ids."""
    h = hashlib.sha256(f"medlens-image-cache v{CACHE_VERSION} size={int(size)}\n".encode())
    for row in rows:
        h.update(row.id.encode())
        h.update(b"\n")
    return h.hexdigest()


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def load_cache(path: str | Path, rows: Sequence[Row] | None = None, size: int | None = None) -> np.ndarray | None:
    """The cached (N, S, S, 3) uint8 memmap at `path`, or None when absent or stale.

    With `rows` and `size` the file must carry their key; without them any
    complete cache is returned (e.g. for inspection)."""
    path = Path(path)
    meta_path = _meta_path(path)
    if not path.is_file() or not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if rows is not None and size is not None and meta.get("key") != cache_key(rows, size):
        return None
    arr = np.load(path, mmap_mode="r")
    if arr.ndim != 4 or arr.shape[0] != meta.get("n") or arr.shape[1] != meta.get("size") or arr.dtype != np.uint8:
        return None
    return arr


def build_cache(rows: Sequence[Row], data_root: str | Path, size: int, path: str | Path, *, progress: bool = True) -> np.ndarray:
    """Decode every row at `size` into `path` (unless a matching cache exists); returns a read-only memmap."""
    path = Path(path)
    size = int(size)
    found = load_cache(path, rows, size)
    if found is not None:
        return found
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(rows), size, size, 3))
    loader = PixelLoader(data_root, size)
    order = sorted(range(len(rows)), key=lambda i: rows[i].path)  # stable: slices of a volume stay in order
    it = order
    if progress:
        from tqdm import tqdm

        it = tqdm(order, desc=f"decoding {len(rows)} images at {size}px", unit="img", smoothing=0.05)
    for i in it:
        out[i] = loader(rows[i])
    out.flush()
    del out
    _meta_path(path).unlink(missing_ok=True)  # never pair a new array with an old key
    os.replace(tmp, path)
    _meta_path(path).write_text(
        json.dumps({"key": cache_key(rows, size), "n": len(rows), "size": size, "version": CACHE_VERSION}, indent=1)
    )
    return np.load(path, mmap_mode="r")
