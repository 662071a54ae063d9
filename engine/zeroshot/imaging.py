"""Scan -> the images a 2D model sees.

Design decisions
- 2D grey images are windowed with the scan's default window (auto
  percentiles for X-ray/US/unknown) to uint8; colour images go in as they
  are (clipped to 0-255; a 16-bit colour image is scaled from its full range).
- Volumes go through a 2D model slice by slice: `n_slices` evenly spaced
  slices per chosen plane (axial by default) over the non-empty extent, so
  air above the head or below the feet and zero padding are not scored.
  A slice is "non-empty" when at least 2 % of it is brighter than 10 % of the
  volume's 1st-99th percentile range (checked on a strided subsample).
- Slices come from engine.views.extract_slice, so the model sees exactly the
  orientation the user sees (radiological convention), windowed with the
  scan's default window (CT in HU: the abdomen / soft-tissue window; a lung
  window for chest labels is a later improvement).
- Each slice is resampled to square physical pixels and letterboxed into a
  black square (like the viewer) rather than centre-cropped: a thin coronal
  reformat or a wide fundus photo keeps all its content when the model
  resizes it to its input size. `box` records where the slice sits so a
  heat map computed on the model image maps back to slice space.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from engine.scan import Scan, ScanError
from engine.views import IMAGE, PLANES, canonical_volume, extract_slice, plane_sizes
from engine.windowing import apply_window, default_window, full_range

DEFAULT_SLICES = 12  # per plane; ~1.5 s for 12 slices through a ViT-B/16 in bf16 on 2 cores
MODEL_IMAGE_SIZE = 448  # side of the square model image; the model resizes it to its own input
_FOREGROUND_FRACTION = 0.02
_FOREGROUND_LEVEL = 0.10
_NORMAL_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}  # slice normal in canonical (z, y, x)


@dataclass
class ModelImage:
    """One image for the model, and where it came from in the scan."""

    pixels: np.ndarray  # uint8 RGB (S, S, 3): the slice letterboxed into a square
    plane: str  # "image" for a 2D scan, else "axial" / "coronal" / "sagittal"
    index: int  # slice index along the plane's normal (views.py convention); 0 for 2D
    box: tuple[int, int, int, int]  # (top, left, height, width) of the slice inside `pixels`
    slice_shape: tuple[int, int]  # (rows, cols) of the slice in slice space (views.extract_slice)


def _to_uint8(scan: Scan, image: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    if scan.is_color:
        lo, hi = float(np.nanmin(image)), float(np.nanmax(image))
        if lo >= 0.0 and hi <= 255.0:
            return np.clip(np.nan_to_num(image), 0, 255).astype(np.uint8)
        center, width = window or full_range(image)
        return apply_window(image, center, width)
    if window is None:
        center, width, _name = default_window(scan)
    else:
        center, width = window
    return apply_window(image, center, width)


def _letterbox(grey_or_rgb: np.ndarray, row_mm: float, col_mm: float, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    rows, cols = grey_or_rgb.shape[:2]
    height_mm, width_mm = rows * row_mm, cols * col_mm
    scale = size / max(height_mm, width_mm)
    out_w, out_h = max(1, int(round(width_mm * scale))), max(1, int(round(height_mm * scale)))
    pil = Image.fromarray(grey_or_rgb)
    if (out_w, out_h) != (cols, rows):
        pil = pil.resize((out_w, out_h), Image.Resampling.BILINEAR)
    pil = pil.convert("RGB")
    top, left = (size - out_h) // 2, (size - out_w) // 2
    canvas = Image.new("RGB", (size, size))
    canvas.paste(pil, (left, top))
    return np.asarray(canvas), (top, left, out_h, out_w)


def model_image(
    scan: Scan,
    plane: str = "axial",
    index: int | None = None,
    *,
    volume: int = 0,
    window: tuple[float, float] | None = None,
    size: int = MODEL_IMAGE_SIZE,
) -> ModelImage:
    """The model's view of one slice (volumes) or of the image (2D scans)."""
    image, (row_mm, col_mm) = extract_slice(scan, plane, index, volume=volume)
    if scan.is_2d:
        plane, index = IMAGE, 0
    elif index is None:
        index = plane_sizes(scan)[plane][1]
    pixels, box = _letterbox(_to_uint8(scan, image, window), row_mm, col_mm, size)
    return ModelImage(pixels=pixels, plane=plane, index=int(index), box=box, slice_shape=tuple(image.shape[:2]))  # type: ignore[arg-type]


def foreground_extent(scan: Scan, plane: str, volume: int = 0) -> tuple[int, int]:
    """(first, last) slice index along `plane` holding anything but background (whole range if none)."""
    if plane not in _NORMAL_AXIS:
        raise ScanError(f"unknown plane {plane!r}; choose axial, coronal or sagittal")
    vol, _ = canonical_volume(scan, volume)
    normal = _NORMAL_AXIS[plane]
    n = vol.shape[normal]
    # stride the two in-plane axes so a 500 x 512 x 512 CT costs a few ms
    steps = [max(1, s // 128) for s in vol.shape]
    steps[normal] = 1
    sub = vol[:: steps[0], :: steps[1], :: steps[2]]
    finite = sub[np.isfinite(sub)]
    if finite.size == 0:
        return 0, n - 1
    lo, hi = np.percentile(finite[:: max(1, finite.size // 1_000_000)], [1, 99])
    if hi <= lo:
        return 0, n - 1
    level = lo + _FOREGROUND_LEVEL * (hi - lo)
    axes = tuple(a for a in range(3) if a != normal)
    fraction = np.mean(np.nan_to_num(sub, nan=lo) > level, axis=axes)
    keep = np.nonzero(fraction >= _FOREGROUND_FRACTION)[0]
    if keep.size == 0:
        return 0, n - 1
    return int(keep[0]), int(keep[-1])


def sample_indices(scan: Scan, plane: str, n_slices: int = DEFAULT_SLICES, volume: int = 0) -> list[int]:
    """Up to `n_slices` evenly spaced slice indices over the non-empty extent, ascending."""
    if n_slices < 1:
        raise ScanError("the number of slices to sample must be at least 1")
    first, last = foreground_extent(scan, plane, volume)
    count = min(int(n_slices), last - first + 1)
    if count == 1:
        return [(first + last) // 2]
    return sorted({int(round(x)) for x in np.linspace(first, last, count)})


def scan_images(
    scan: Scan,
    *,
    planes: tuple[str, ...] | list[str] = ("axial",),
    n_slices: int = DEFAULT_SLICES,
    volume: int = 0,
    window: tuple[float, float] | None = None,
    size: int = MODEL_IMAGE_SIZE,
) -> list[ModelImage]:
    """The model images of a scan: the image itself (2D), or sampled slices per plane (volumes)."""
    if scan.is_2d:
        return [model_image(scan, IMAGE, 0, window=window, size=size)]
    planes = tuple(planes) or ("axial",)
    unknown = [p for p in planes if p not in PLANES]
    if unknown:
        raise ScanError(f"unknown plane {unknown[0]!r}; choose axial, coronal or sagittal")
    if window is None:
        center, width, _name = default_window(scan)
        window = (center, width)
    out = []
    for plane in dict.fromkeys(planes):
        for index in sample_indices(scan, plane, n_slices, volume):
            out.append(model_image(scan, plane, index, volume=volume, window=window, size=size))
    return out


def heat_to_slice(heat: np.ndarray, image: ModelImage) -> np.ndarray:
    """A heat map over `image.pixels` (S, S) -> float32 (rows, cols) in slice space (views.extract_slice)."""
    heat = np.asarray(heat, dtype=np.float32)
    size = image.pixels.shape[0]
    if heat.shape != (size, size):
        heat = np.asarray(Image.fromarray(heat, mode="F").resize((size, size), Image.Resampling.BILINEAR))
    top, left, h, w = image.box
    crop = heat[top : top + h, left : left + w]
    rows, cols = image.slice_shape
    if crop.shape != (rows, cols):
        crop = np.asarray(Image.fromarray(np.ascontiguousarray(crop), mode="F").resize((cols, rows), Image.Resampling.BILINEAR))
    return np.clip(crop, 0.0, 1.0).astype(np.float32)
