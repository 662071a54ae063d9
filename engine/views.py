"""Render a scan the way a radiologist expects to see it.

Design decisions
- Input voxels are closest-canonical RAS+ (array (z, y, x): x to the
  patient's Right, y to Anterior, z to Superior). A scan whose affine says
  otherwise is first reoriented with nibabel's orientation helpers (views
  only, no copy), so rendering never trusts array order blindly.
- Radiological convention: axial seen from the feet (patient Right on the
  screen's left, Anterior at the top), coronal seen from the front (Right on
  the left, Superior at the top), sagittal seen from the patient's left
  (Anterior on the left, Superior at the top). Each is a slice plus two
  flips, i.e. numpy views.
- Physical aspect: the windowed uint8 slice is resized (bilinear, Pillow)
  so one screen pixel is square in millimetres; the longer side becomes
  `size` pixels. Windowing before resizing keeps the float work on the
  native slice, which is what makes a 512x512 render take a few ms.
- 3D views are letterboxed into a square black viewport (as on a
  workstation) so a thin reformat (20 slices across 500 mm) stays
  readable; orientation letters sit at the middle of each viewport edge.
- MIP: maximum over a slab of `mip_mm` centred on the slice, along the
  plane's normal, before windowing (MIP of HU, like a workstation).
- Slice indices are array indices along the canonical axis: axial 0 is the
  most inferior slice, coronal 0 the most posterior, sagittal 0 the most left.
- "Slice space" is the slice as `extract_slice` returns it: already in the
  display orientation, on the native pixel grid (before the physical-aspect
  resize). An `overlay` (a heat map in [0, 1], e.g. zero-shot evidence) is
  given in slice space at any resolution; it is resized with the slice and
  blended before letterboxing and letters, with an opacity that grows with
  the heat so cold regions leave the image untouched.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from engine.scan import Scan, ScanError
from engine.windowing import apply_window

PLANES = ("axial", "coronal", "sagittal")
IMAGE = "image"  # the single view of a 2D scan

# plane -> (array axis of the slice normal in (z, y, x), row axis, column axis,
#           letters (left, right, top, bottom))
_PLANE_AXES = {
    "axial": (0, 1, 2, ("R", "L", "A", "P")),
    "coronal": (1, 0, 2, ("R", "L", "S", "I")),
    "sagittal": (2, 0, 1, ("A", "P", "S", "I")),
}

_LETTER_FILL = (255, 215, 0)  # amber, legible on black and on white bone


def canonical_volume(scan: Scan, volume: int = 0) -> tuple[np.ndarray, tuple[float, float, float]]:
    """One volume as a (z, y, x) RAS+ array view plus its (z, y, x) spacing in mm."""
    if scan.is_2d:
        raise ScanError("this is a 2D image: it has no axial/coronal/sagittal planes")
    voxels = scan.voxels
    if voxels.ndim == 4:
        if not -voxels.shape[0] <= volume < voxels.shape[0]:
            raise ScanError(f"volume {volume} does not exist: this scan has {voxels.shape[0]} volumes (0-{voxels.shape[0] - 1})")
        voxels = voxels[volume]  # indexing, not scan.volume(): that would rehash the voxels
    elif volume not in (0, -1):
        raise ScanError(f"this scan has one volume; volume {volume} does not exist")
    spacing = tuple(scan.spacing)
    transform = _to_ras(scan.affine)
    if transform is None:
        return voxels, spacing  # type: ignore[return-value]
    from nibabel.orientations import apply_orientation

    # affine axes are (x, y, z) = array axes reversed
    xyz = apply_orientation(voxels.T, transform)
    sp_xyz = spacing[::-1]
    new_sp_xyz = tuple(sp_xyz[int(np.nonzero(transform[:, 0] == axis)[0][0])] for axis in range(3))
    return xyz.T, new_sp_xyz[::-1]  # type: ignore[return-value]


@lru_cache(maxsize=64)
def _to_ras_cached(affine_bytes: bytes) -> np.ndarray | None:
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    affine = np.frombuffer(affine_bytes, dtype=np.float64).reshape(4, 4)
    ornt = io_orientation(affine)
    ras = axcodes2ornt("RAS")
    if np.array_equal(ornt, ras):
        return None
    return ornt_transform(ornt, ras)


def _to_ras(affine: np.ndarray) -> np.ndarray | None:
    """nibabel orientation transform from the affine's axes to RAS (None when already RAS)."""
    return _to_ras_cached(np.ascontiguousarray(affine, dtype=np.float64).tobytes())


def plane_sizes(scan: Scan) -> dict[str, tuple[int, int]]:
    """plane -> (number of slices, default (middle) index); {"image": (1, 0)} for 2D."""
    if scan.is_2d:
        return {IMAGE: (1, 0)}
    shape = scan.volume_shape
    transform = _to_ras(scan.affine)
    if transform is not None:
        shape_xyz = shape[::-1]
        shape = tuple(shape_xyz[int(np.nonzero(transform[:, 0] == axis)[0][0])] for axis in range(3))[::-1]
    out = {}
    for plane, (normal, *_rest) in _PLANE_AXES.items():
        n = int(shape[normal])
        out[plane] = (n, n // 2)
    return out


def _slab(vol: np.ndarray, normal: int, index: int, spacing: float, mip_mm: float | None) -> np.ndarray:
    n = vol.shape[normal]
    if not 0 <= index < n:
        raise ScanError(f"slice {index} is outside this plane (0-{n - 1})")
    if not mip_mm or mip_mm <= 0:
        return np.take(vol, index, axis=normal)
    count = max(1, int(round(float(mip_mm) / spacing)))
    start = max(0, index - count // 2)
    stop = min(n, start + count)
    sl = [slice(None)] * 3
    sl[normal] = slice(start, stop)
    return vol[tuple(sl)].max(axis=normal)


def _display_size(rows: int, cols: int, row_mm: float, col_mm: float, size: int) -> tuple[int, int]:
    """(width, height) in screen pixels with square pixels in mm and the long side = size."""
    height_mm, width_mm = rows * row_mm, cols * col_mm
    scale = size / max(height_mm, width_mm)
    return max(1, int(round(width_mm * scale))), max(1, int(round(height_mm * scale)))


@lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=px)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def draw_letters(image: Image.Image, letters: tuple[str, str, str, str]) -> None:
    """Draw (left, right, top, bottom) orientation letters at the middle of each edge."""
    w, h = image.size
    px = max(10, min(24, min(w, h) // 12))
    font = _font(px)
    draw = ImageDraw.Draw(image)
    margin = max(2, px // 4)
    stroke = max(1, px // 10)
    left, right, top, bottom = letters
    anchors = (
        (left, (margin, h / 2), "lm"),
        (right, (w - margin, h / 2), "rm"),
        (top, (w / 2, margin), "mt"),
        (bottom, (w / 2, h - margin), "mb"),
    )
    for text, xy, anchor in anchors:
        try:
            draw.text(xy, text, fill=_LETTER_FILL, font=font, anchor=anchor, stroke_width=stroke, stroke_fill=(0, 0, 0))
        except ValueError:  # bitmap fonts support no anchors
            draw.text(xy, text, fill=_LETTER_FILL, font=font)


def extract_slice(
    scan: Scan,
    plane: str,
    index: int | None = None,
    *,
    mip_mm: float | None = None,
    volume: int = 0,
) -> tuple[np.ndarray, tuple[float, float]]:
    """One slice in display orientation ("slice space") and its (row_mm, col_mm) pixel size.

    Volumes: float32 (rows, cols), whatever the storage dtype, of plane `plane` at `index` (None = middle),
    flipped to the radiological convention (top = Anterior/Superior, left =
    patient Right for axial/coronal, Anterior for sagittal), optionally a MIP
    slab. 2D scans: the image itself, (y, x) or (y, x, 3); `plane` is ignored.
    """
    if scan.is_2d:
        row_mm, col_mm = scan.spacing
        return _float32(scan.voxels), (float(row_mm), float(col_mm))
    if plane not in _PLANE_AXES:
        raise ScanError(f"unknown plane {plane!r}; choose axial, coronal or sagittal")
    vol, spacing = canonical_volume(scan, volume)
    normal, row_axis, col_axis, _letters = _PLANE_AXES[plane]
    if index is None:
        index = vol.shape[normal] // 2
    slab = _slab(vol, normal, int(index), spacing[normal], mip_mm)
    # after removing `normal`, the remaining axes keep their (z, y, x) order, so
    # rows/cols are already (row_axis, col_axis); both flips give the convention
    # (top = Anterior/Superior, left = Right for axial/coronal, Anterior for sagittal)
    return _float32(slab[::-1, ::-1]), (float(spacing[row_axis]), float(spacing[col_axis]))


def _float32(part: np.ndarray) -> np.ndarray:
    """A slice as float32: a view when stored as float32, a copy of this slice only when int16 (engine.scan)."""
    return part if part.dtype == np.float32 else part.astype(np.float32)


def render_view(
    scan: Scan,
    plane: str,
    index: int | None,
    center: float,
    width: float,
    mip_mm: float | None = None,
    volume: int = 0,
    *,
    size: int = 512,
    letters: bool = True,
    square: bool = True,
    overlay: np.ndarray | None = None,
    overlay_alpha: float = 0.45,
) -> np.ndarray:
    """RGB uint8 image (H, W, 3) of one slice of `scan`, in the radiological convention.

    plane: "axial", "coronal" or "sagittal" for volumes; ignored for 2D scans,
    which have the single view "image". index None = the middle slice.
    size: length in pixels of the longer side of the slice on screen.
    square: letterbox a 3D view into a black size x size viewport (centred),
    like a workstation's viewport, so thin reformats keep legible letters and
    the three planes line up; False returns just the resampled slice.
    overlay: optional float (h, w) heat map in [0, 1] in slice space (the
    orientation `extract_slice` returns; any resolution, resized to the view),
    blended with at most `overlay_alpha` opacity where the heat is 1.
    """
    if scan.is_2d:
        return _render_2d(scan, center, width, size=size, overlay=overlay, overlay_alpha=overlay_alpha)
    image, (row_mm, col_mm) = extract_slice(scan, plane, index, mip_mm=mip_mm, volume=volume)
    plane_letters = _PLANE_AXES[plane][3]
    grey = apply_window(image, center, width)
    out_w, out_h = _display_size(grey.shape[0], grey.shape[1], row_mm, col_mm, size)
    pil = Image.fromarray(grey, mode="L")
    if (out_w, out_h) != (grey.shape[1], grey.shape[0]):
        pil = pil.resize((out_w, out_h), Image.Resampling.BILINEAR)
    pil = pil.convert("RGB")
    if overlay is not None:
        pil = Image.fromarray(blend_heat(np.asarray(pil), overlay, overlay_alpha))
    if square and pil.size != (size, size):
        canvas = Image.new("RGB", (size, size))
        canvas.paste(pil, ((size - pil.width) // 2, (size - pil.height) // 2))
        pil = canvas
    if letters:
        draw_letters(pil, plane_letters)
    return np.asarray(pil)


# Heat colour map: (position, RGB) stops, dark red -> red -> orange -> yellow -> white.
_HEAT_STOPS = (
    (0.0, (96, 0, 0)),
    (0.35, (220, 20, 0)),
    (0.65, (255, 140, 0)),
    (0.9, (255, 235, 40)),
    (1.0, (255, 255, 210)),
)


def heat_colors(heat: np.ndarray) -> np.ndarray:
    """float heat in [0, 1] (any shape) -> uint8 RGB (shape + (3,)) on the heat colour map."""
    heat = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float32)), 0.0, 1.0)
    xs = np.array([p for p, _ in _HEAT_STOPS], dtype=np.float32)
    rgb = np.array([c for _, c in _HEAT_STOPS], dtype=np.float32)
    out = np.stack([np.interp(heat, xs, rgb[:, k]) for k in range(3)], axis=-1)
    return (out + 0.5).astype(np.uint8)


def blend_heat(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a heat map (h, w) in [0, 1] into an RGB uint8 image; the heat is resized to the image.

    Opacity per pixel is alpha * heat: where the heat is 0 the image is unchanged.
    """
    rgb = np.asarray(rgb)
    heat = np.asarray(heat, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"an overlay is a 2D heat map (h, w); got shape {heat.shape}")
    h, w = rgb.shape[:2]
    if heat.shape != (h, w):
        heat = np.asarray(Image.fromarray(heat, mode="F").resize((w, h), Image.Resampling.BILINEAR))
    heat = np.clip(np.nan_to_num(heat), 0.0, 1.0)
    colours = heat_colors(heat).astype(np.float32)
    a = (float(alpha) * heat)[..., None]
    base = rgb.astype(np.float32) if rgb.ndim == 3 else np.repeat(rgb.astype(np.float32)[..., None], 3, axis=2)
    return (base * (1.0 - a) + colours * a + 0.5).astype(np.uint8)


def _render_2d(
    scan: Scan, center: float, width: float, *, size: int, overlay: np.ndarray | None = None, overlay_alpha: float = 0.45
) -> np.ndarray:
    voxels = scan.voxels
    row_mm, col_mm = scan.spacing
    if scan.is_color:
        pil = Image.fromarray(apply_window(voxels, center, width), mode="RGB")
    else:
        pil = Image.fromarray(apply_window(voxels, center, width), mode="L")
    rows, cols = voxels.shape[:2]
    out_w, out_h = _display_size(rows, cols, row_mm, col_mm, size)
    if (out_w, out_h) != (cols, rows):
        pil = pil.resize((out_w, out_h), Image.Resampling.BILINEAR)
    rgb = np.asarray(pil.convert("RGB"))
    if overlay is not None:
        rgb = blend_heat(rgb, overlay, overlay_alpha)
    return rgb
