"""Volume -> slice rows, with what each slice shows read from an aligned label map.

Design decisions
- The slice convention is the engine's: a row's `slice={"plane", "index"}`
  means `engine.views.extract_slice(scan, plane, index)` on the Scan that
  `engine.io.load_one([path])` returns (closest-canonical RAS+, array
  (z, y, x)); PixelLoader renders the same slice through `model_image`.
- Label maps are loaded by the same reader and sliced by the same
  `extract_slice`, so "organ present on this slice" is measured on exactly
  the pixels the model sees. `extract_slice` only takes an index and flips
  (no interpolation; the NIfTI reader reorients with
  `as_closest_canonical`, a permutation/flip), so label values survive
  intact; they are rounded to int as a guard against float storage.
- Image and label map must share the grid after loading: same volume shape
  and affines equal within `GRID_TOL_MM` (1e-3 mm), else the recipe fails
  rather than label the wrong slice.
- A structure is present when its voxels (all label ids mapped to that
  name, e.g. the five lung lobes -> "left lung"/"right lung") cover at least
  `MIN_FRACTION` (0.5 %) of the slice and at least `MIN_PIXELS` (20) pixels.
- A slice "has body in it" when at least 2 % of its pixels are brighter than
  10 % of the volume's 1st-99th percentile range: the rule the engine uses
  to skip air and padding when it scores a volume (engine.zeroshot.imaging).
  Atlas recipes can use "label map non-empty" instead.
- Slice counts stay sane: every `step`-th body slice, and at most
  `MAX_PER_PLANE` per plane (the step grows evenly when a plane has more,
  e.g. the 512 coronal slices of a 512x512 CT).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from training.manifest import Row
from training.recipes._common import rel, require

PLANES = ("axial", "coronal", "sagittal")
NORMAL_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}  # slice normal in canonical (z, y, x)
GRID_TOL_MM = 1e-3
MIN_FRACTION = 0.005
MIN_PIXELS = 20
MAX_PER_PLANE = 120
_FG_FRACTION, _FG_LEVEL = 0.02, 0.10


def load_scan(path: Path):
    from engine.io import load_one

    scan, _result = load_one([require(Path(path))])
    return scan


def check_same_grid(image, labels, what: str = "label map") -> None:
    if tuple(image.volume_shape) != tuple(labels.volume_shape):
        raise ValueError(f"{what}: shape {labels.volume_shape} differs from the image's {image.volume_shape}")
    diff = float(np.max(np.abs(np.asarray(image.affine) - np.asarray(labels.affine))))
    if diff > GRID_TOL_MM:
        raise ValueError(f"{what}: affine differs from the image's by {diff:.4g} mm (> {GRID_TOL_MM} mm)")


def foreground(scan, plane: str, volume: int = 0) -> np.ndarray:
    """Per slice along `plane`: True when the slice has body in it (intensity rule above)."""
    from engine.views import canonical_volume

    vol, _ = canonical_volume(scan, volume)
    finite = vol[np.isfinite(vol)]
    sample = finite[:: max(1, finite.size // 1_000_000)]
    lo, hi = np.percentile(sample, [1, 99]) if sample.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(vol.shape[NORMAL_AXIS[plane]], bool)
    level = lo + _FG_LEVEL * (hi - lo)
    axes = tuple(a for a in range(3) if a != NORMAL_AXIS[plane])
    return np.mean(np.nan_to_num(vol, nan=lo) > level, axis=axes) >= _FG_FRACTION


def labelled(seg, plane: str) -> np.ndarray:
    """Per slice along `plane`: True when the label map covers >= MIN_FRACTION / MIN_PIXELS of it."""
    from engine.views import canonical_volume

    vol, _ = canonical_volume(seg, 0)
    axes = tuple(a for a in range(3) if a != NORMAL_AXIS[plane])
    count = np.sum(vol > 0.5, axis=axes)
    pixels = vol.size // vol.shape[NORMAL_AXIS[plane]]
    return (count >= MIN_PIXELS) & (count >= MIN_FRACTION * pixels)


def pick(mask: np.ndarray, step: int = 1, cap: int = MAX_PER_PLANE) -> list[int]:
    """Every `step`-th True index, thinned evenly to at most `cap`."""
    idx = np.nonzero(mask)[0][:: max(1, int(step))]
    if len(idx) > cap:
        idx = idx[np.unique(np.round(np.linspace(0, len(idx) - 1, cap)).astype(int))]
    return [int(i) for i in idx]


def slice_label_areas(seg, plane: str, index: int) -> tuple[dict[int, int], int]:
    """(label id -> pixel count, total pixels) on exactly the slice extract_slice returns."""
    from engine.views import extract_slice

    sl, _ = extract_slice(seg, plane, index)
    ids = np.rint(sl).astype(np.int64)
    counts = np.bincount(ids[ids > 0].ravel())
    return {int(i): int(c) for i, c in enumerate(counts) if c and i > 0}, int(sl.size)


def present_structures(areas: dict[int, int], n_pixels: int, id_names: dict[int, str]) -> tuple[dict[str, list[int]], dict[str, int]]:
    """(name -> present label ids, name -> pixel count) of structures passing the presence rule."""
    by_name: dict[str, list[int]] = {}
    area: dict[str, int] = {}
    for i, c in areas.items():
        name = id_names.get(i)
        if name is None:
            continue
        by_name.setdefault(name, []).append(i)
        area[name] = area.get(name, 0) + c
    keep = {n for n, a in area.items() if a >= MIN_PIXELS and a >= MIN_FRACTION * n_pixels}
    return ({n: sorted(by_name[n]) for n in sorted(keep)}, {n: area[n] for n in sorted(keep)})


def volume_rows(
    root: Path,
    *,
    dataset: str,
    modality: str,
    subject: str,
    split: str,
    image: Path,
    seg: Path | None = None,
    id_names: dict[int, str] | None = None,
    step: int = 1,
    cap: int = MAX_PER_PLANE,
    body_from_labels: bool = False,
    always: tuple[str, ...] = (),
    body_part: Callable[[dict[str, int]], str | None] | str | None = None,
    extra: dict | None = None,
    volume: int | None = None,
) -> list[Row]:
    """Slice rows of one volume; with `seg` + `id_names`, labels = present structures (+ `always`)."""
    root = Path(root)
    scan = load_scan(image)
    seg_scan = None
    if seg is not None:
        seg_scan = load_scan(seg)
        check_same_grid(scan, seg_scan, f"{Path(seg).name} vs {Path(image).name}")
    rows = []
    for plane in PLANES:
        mask = labelled(seg_scan, plane) if body_from_labels and seg_scan is not None else foreground(scan, plane, volume or 0)
        for index in pick(mask, step, cap):
            labels, row_extra, areas = list(always), dict(extra or {}), {}
            if seg_scan is not None and id_names is not None:
                ids, areas = present_structures(*slice_label_areas(seg_scan, plane, index), id_names)
                labels = sorted(set(labels) | set(ids))
                row_extra["mask"] = rel(Path(seg), root)
                row_extra["mask_ids"] = ids
            if volume is not None:
                row_extra["volume"] = int(volume)
            part = body_part(areas) if callable(body_part) else body_part
            rows.append(
                Row(
                    id=f"{dataset}/{subject}/{plane}/{index:03d}",
                    dataset=dataset,
                    modality=modality,
                    path=rel(Path(image), root),
                    split=split,
                    subject=subject,
                    labels=labels,
                    slice={"plane": plane, "index": index},
                    view=plane,
                    body_part=part,
                    extra=row_extra,
                )
            )
    return rows
