"""DICOM frames -> voxel arrays: planning from headers, then decoding into one preallocated array.

Design decisions
- Two steps. `plan_volume` works from headers only (positions, orientation,
  matrix, temporal order): it sorts and clusters the frames, decides the
  slice grid and the affine, and so knows the exact size of the output before
  any pixel is decoded; the caller checks that size against the memory
  bounds (engine.memory). `fill_volume` then allocates the final RAS+ array
  once and decodes file after file straight into its place, through a
  strided view in acquisition layout: the peak is the output plus one file's
  pixels, never a list of frames + np.stack + reorientation copies.
- Storage dtype from headers (`storage_dtype`): int16 when every frame holds
  integers with an integral rescale (CT in HU, most MR), else float32
  (engine.scan). Each frame is range-checked as it is written; a frame whose
  values do not fit int16 (padding of -32768 below a -1024 intercept, a
  full-range 16-bit MR) raises `NeedsFloat` and the caller fills again in
  float32, usually after the first frame.
- A file that fails to decode does not stop the others: `fill_volume`
  returns it as bad, and the caller plans again without it (as if it had
  been skipped before assembly).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from nibabel import orientations

from engine.io.geometry import dicom_affine, slice_normal
from engine.memory import SeriesSize

LUMINANCE = np.float32([0.299, 0.587, 0.114])  # ITU-R BT.601 grey from RGB
POSITION_TOLERANCE_MM = 0.01  # positions closer than this are the same slice
_INT16 = (-32768, 32767)


class NeedsFloat(Exception):
    """A frame's values do not fit int16 storage: fill the scan again as float32."""


@dataclass
class Frame:
    """One 2D image of a file, described from its header; pixels are decoded later through `file`."""

    file: Any  # engine.io.dicom.DicomFile: .decode() -> (frames, rows, cols[, 3]) as stored, .ds, .header, .name
    index: int  # frame number inside its file
    ipp: np.ndarray | None
    iop: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    order: tuple  # temporal ordering key for repeated positions
    key: tuple  # what must match within one volume: matrix, echo, image type
    thickness: float | None = None
    slope: float = 1.0
    intercept: float = 0.0
    monochrome1: bool = False
    colour: bool = False
    lut: bool = False  # a modality LUT sequence replaces slope/intercept

    @property
    def ds(self):
        return self.file.ds

    @property
    def name(self) -> str:
        return self.file.name

    @property
    def shape(self) -> tuple[int, int]:
        return self.file.header.rows, self.file.header.cols


# --------------------------------------------------------------------------- values
def _integral(x: float) -> bool:
    return abs(x - round(x)) < 1e-9


def storage_dtype(frames: list[Frame]) -> np.dtype:
    """int16 when every frame holds integers (at most 16 bits stored, integral rescale), else float32.

    Optimistic on range: a 16-bit CT's header allows values beyond int16 after
    the intercept, its pixels almost never hold them. `place` checks each
    frame's real range and raises NeedsFloat, usually on the first frame.
    """
    for f in frames:
        h = f.file.header
        if f.colour or f.lut or h.bits_stored > 16 or not (_integral(f.slope) and _integral(f.intercept)):
            return np.dtype(np.float32)
    return np.dtype(np.int16)


def frame_values(raw: np.ndarray, f: Frame) -> tuple[np.ndarray, float, float]:
    """(values, slope, intercept) of one decoded frame: colour -> grey luminance, modality LUT applied."""
    if f.colour:
        return (raw.astype(np.float32) @ LUMINANCE if raw.ndim == 3 else raw.astype(np.float32)), 1.0, 0.0
    if f.lut:
        from pydicom.pixels import apply_modality_lut

        try:
            return np.asarray(apply_modality_lut(raw, f.ds), dtype=np.float32), 1.0, 0.0
        except Exception:
            pass  # a broken LUT: stored values are what the header can support
    return raw, f.slope, f.intercept


def place(target: np.ndarray, source: np.ndarray, slope: float, intercept: float) -> None:
    """target[...] = source * slope + intercept, cast to target's dtype (float32, or int16 after a range check)."""
    if target.dtype == np.int16:
        if source.dtype.kind not in "iub":
            raise NeedsFloat()
        if source.size:
            lo, hi = int(source.min()), int(source.max())
            a, b = sorted((lo * slope + intercept, hi * slope + intercept))
            if a < _INT16[0] or b > _INT16[1]:
                raise NeedsFloat()
        if slope == 1.0:
            np.add(source, np.int32(intercept), out=target, dtype=np.int32, casting="unsafe")
        else:
            np.copyto(target, source.astype(np.int32) * np.int32(slope) + np.int32(intercept), casting="unsafe")
        return
    if slope == 1.0:
        # Cast, shift and place in one pass (the usual CT case: slope 1, intercept -1024).
        np.add(source, np.float32(intercept), out=target, casting="unsafe")
        return
    np.copyto(target, source, casting="unsafe")
    # Same memory with positive strides: numpy's in-place ufuncs are ~10x slower on reversed views.
    plane = target[tuple(slice(None, None, -1) if st < 0 else slice(None) for st in target.strides)]
    plane *= np.float32(slope)
    if intercept != 0.0:
        plane += np.float32(intercept)


def invert(voxels: np.ndarray) -> np.ndarray:
    """MONOCHROME1 (high = dark) -> high = bright, over the whole assembled image, in place."""
    if voxels.size == 0:
        return voxels
    lo, hi = voxels.min(), voxels.max()
    if voxels.dtype == np.float32:
        np.subtract(np.float32(float(lo) + float(hi)), voxels, out=voxels)
        return voxels
    # int16: lo + hi - v stays inside [lo, hi], but lo + hi itself may not fit int16
    total = np.int32(int(lo) + int(hi))
    for part in voxels.reshape(voxels.shape[0], -1):
        np.subtract(total, part, out=part, dtype=np.int32, casting="unsafe")
    return voxels


def decode_files(items: dict[Any, list], write: Callable[[np.ndarray, Any], None]) -> dict[Any, str]:
    """Decode each file once and `write(frames_array, item)` for its items; {file: reason} of files that failed."""
    from engine.scan import ScanError

    bad: dict[Any, str] = {}
    for file, file_items in items.items():
        try:
            arr = file.decode()
        except ScanError as exc:
            bad[file] = str(exc)
            continue
        except MemoryError:
            raise
        except Exception as exc:  # pydicom and the decoders raise many types on corrupt data
            bad[file] = f"not a readable DICOM file ({_short(exc)})"
            continue
        for item in file_items:
            write(arr, item)
        del arr  # one file's pixels at a time
    return bad


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text[:200] if text else type(exc).__name__


# --------------------------------------------------------------------------- volumes
@dataclass
class VolumePlan:
    """How frames sharing orientation and matrix become one RAS+ volume (or 4D series); headers only."""

    frames: list[Frame]
    clusters: list[list[int]]  # frame indices per position (sorted along the normal), temporal order inside
    positions: np.ndarray  # distance of each cluster along the slice normal (mm)
    regular_grid: np.ndarray | None  # target positions when uneven slices are resampled, else None
    affine: np.ndarray  # voxel (col, row, slice) -> RAS+, before reorientation
    warnings: list[str] = field(default_factory=list)

    @property
    def single_image(self) -> bool:
        return len(self.clusters) < 2 and len(self.clusters[0]) == 1

    @property
    def n_vol(self) -> int:
        return len(self.clusters[0])

    @property
    def n_k(self) -> int:
        return len(self.clusters) if self.regular_grid is None else len(self.regular_grid)

    def size(self) -> SeriesSize:
        rows, cols = self.frames[0].shape
        return SeriesSize(self.n_k, rows, cols, volumes=self.n_vol)

    def transient_bytes(self) -> int:
        """Decoding beside the output: two copies of the largest file, and the float32 stack when resampling."""
        largest = max(f.file.header.frames * f.file.header.rows * f.file.header.cols * f.file.header.samples for f in self.frames)
        out = 2 * largest * max(1, self.frames[0].file.header.bits_allocated // 8)
        if self.regular_grid is not None:
            rows, cols = self.frames[0].shape
            out += self.n_vol * len(self.clusters) * rows * cols * 4
        return out


def _cluster(frames: list[Frame], normal: np.ndarray, warn: list[str]) -> tuple[list[list[int]], np.ndarray]:
    """Frames grouped by position along `normal` (repeats over time kept in temporal order)."""
    dist = np.array([float(f.ipp @ normal) for f in frames])
    order = np.lexsort((np.arange(len(frames)), dist))
    clusters: list[list[int]] = []
    for idx in order:
        if clusters and abs(dist[idx] - dist[clusters[-1][0]]) <= POSITION_TOLERANCE_MM:
            clusters[-1].append(idx)
        else:
            clusters.append([idx])
    if len({len(c) for c in clusters}) > 1:
        warn.append(
            f"slice positions repeat unevenly ({len(frames)} images at {len(clusters)} positions): kept the first image at each position"
        )
        clusters = [[min(c, key=lambda i: frames[i].order)] for c in clusters]
    for c in clusters:
        c.sort(key=lambda i: frames[i].order)
    return clusters, np.array([dist[c[0]] for c in clusters])


def plan_volume(frames: list[Frame]) -> VolumePlan:
    """Order, spacing and geometry of a volume from its frames' headers (nothing decoded)."""
    warn: list[str] = []
    iop = frames[0].iop
    normal = slice_normal(iop)
    clusters, d_unique = _cluster(frames, normal, warn)
    positions = np.array([frames[c[0]].ipp for c in clusters])
    n_pos = len(clusters)
    regular_grid = None
    if n_pos >= 2:
        spacing_z = (d_unique[-1] - d_unique[0]) / (n_pos - 1)
        steps = np.diff(d_unique)
        step_vec = (positions[-1] - positions[0]) / (n_pos - 1)
        if np.max(np.abs(steps - spacing_z)) > max(0.01 * abs(spacing_z), 0.02):
            median = float(np.median(steps))
            gap = float(np.max(steps)) > 1.5 * median
            message = f"inconsistent slice spacing: {steps.min():.3g} to {steps.max():.3g} mm between slices" + (
                " (gap: slices may be missing)" if gap else ""
            )
            n_out = int(round((d_unique[-1] - d_unique[0]) / median)) + 1
            if n_out <= 4 * n_pos:
                # Like dcm2niix's "_Eq" output: a regular grid at the usual step, so every
                # slice sits where it was acquired and missing ones are interpolated.
                regular_grid = d_unique[0] + median * np.arange(n_out)
                step_vec = (positions[-1] - positions[0]) / (d_unique[-1] - d_unique[0]) * median
                message += f"; resampled to a regular {median:.3g} mm grid ({n_out - n_pos:+d} slices, interpolated linearly)"
            else:
                message += "; spacing averaged, slices may be misplaced"
            warn.append(message)
        along = float(step_vec @ normal)
        if np.linalg.norm(step_vec - along * normal) > 1e-3 * max(abs(along), 1e-6) + 1e-4:
            warn.append("slice positions are not along the slice normal (gantry tilt or shear): sheared geometry kept")
    else:
        step_vec = normal * (frames[0].thickness or 1.0)
    spacings = {f.pixel_spacing for f in frames}
    if None in spacings:
        warn.append("no pixel spacing in the header: 1 mm assumed")
    if len(spacings - {None}) > 1:
        warn.append("pixel spacing differs between slices: the first slice's spacing is used")
    affine = dicom_affine(iop, frames[0].pixel_spacing or (1.0, 1.0), positions[0], step_vec)
    if frames[0].colour:
        warn.append("colour slices shown in greyscale")
    return VolumePlan(frames, clusters, d_unique, regular_grid, affine, warn)


def canonical_target(affine: np.ndarray, shape_crkt: tuple[int, int, int, int], dtype):
    """Allocate the final RAS+ array and a writable view of it in acquisition layout (col, row, slice, t).

    Writing each slice through the view puts it straight into its canonical
    place: one copy per voxel instead of stack -> reorient -> make contiguous.
    """
    ornt = orientations.io_orientation(affine)
    n_t = shape_crkt[3]
    canon_xyz = [0, 0, 0]
    for i in range(3):
        canon_xyz[int(ornt[i, 0])] = shape_crkt[i]
    final = np.empty(((n_t,) if n_t > 1 else ()) + tuple(canon_xyz[::-1]), dtype=dtype)
    view_xyzt = final.transpose(tuple(range(final.ndim))[::-1])
    if n_t == 1:
        view_xyzt = view_xyzt[..., None]
    inverse = np.zeros((3, 2))
    for i in range(3):
        inverse[int(ornt[i, 0])] = [i, ornt[i, 1]]
    acquisition_view = orientations.apply_orientation(view_xyzt, inverse)
    new_affine = affine @ orientations.inv_ornt_aff(ornt, shape_crkt[:3])
    return final, acquisition_view, new_affine


def _by_file(plan: VolumePlan) -> dict[Any, list[tuple[int, int, Frame]]]:
    """file -> [(k, t, frame)]: where each of its frames goes (k: position, t: volume)."""
    items: dict[Any, list[tuple[int, int, Frame]]] = {}
    for k, c in enumerate(plan.clusters):
        for t, idx in enumerate(c):
            f = plan.frames[idx]
            items.setdefault(f.file, []).append((k, t, f))
    return items


def fill_volume(plan: VolumePlan, dtype, track: Callable[[np.ndarray], Any]) -> tuple[np.ndarray, np.ndarray, dict[Any, str]]:
    """(voxels in RAS+ scan order, affine, {bad file: reason}); `track` is called on the output array once allocated."""
    rows, cols = plan.frames[0].shape
    dtype = np.dtype(np.float32) if plan.regular_grid is not None else np.dtype(dtype)
    final, view, affine = canonical_target(plan.affine, (cols, rows, plan.n_k, plan.n_vol), dtype)
    track(final)
    items = _by_file(plan)
    if plan.regular_grid is None:

        def write(arr: np.ndarray, item) -> None:
            k, t, f = item
            values, slope, intercept = frame_values(arr[f.index], f)
            place(view[:, :, k, t], values.T, slope, intercept)

        bad = decode_files(items, write)
    else:
        stack = np.empty((plan.n_vol, len(plan.clusters), rows, cols), dtype=np.float32)

        def write(arr: np.ndarray, item) -> None:
            k, t, f = item
            values, slope, intercept = frame_values(arr[f.index], f)
            place(stack[t, k], values, slope, intercept)

        bad = decode_files(items, write)
        _resample_slices(stack, plan.positions, plan.regular_grid, view)
        del stack
    if plan.frames[0].monochrome1:
        invert(final)
    return final, affine, bad


def _resample_slices(stack: np.ndarray, positions: np.ndarray, targets: np.ndarray, view: np.ndarray) -> None:
    """Linear interpolation along the slice axis of (t, k, rows, cols) into view (cols, rows, k, t), slice by slice."""
    upper = np.clip(np.searchsorted(positions, targets, side="left"), 1, len(positions) - 1)
    lower = upper - 1
    span = positions[upper] - positions[lower]
    weights = np.clip((targets - positions[lower]) / np.where(span == 0, 1, span), 0.0, 1.0).astype(np.float32)
    for j, (lo, hi, w) in enumerate(zip(lower, upper, weights)):
        for t in range(stack.shape[0]):
            view[:, :, j, t] = ((1 - w) * stack[t, lo] + w * stack[t, hi]).T


# --------------------------------------------------------------------------- images and stacks
def image_pixels(frame: Frame, arr: np.ndarray, dtype, track: Callable[[np.ndarray], Any]) -> np.ndarray:
    """One decoded frame -> a 2D scan's pixels: grey (rows, cols) in `dtype`, or RGB (rows, cols, 3) float32."""
    if frame.colour:
        out = track(np.array(arr, dtype=np.float32))
        return out
    out = track(np.empty(frame.shape, dtype=dtype))
    values, slope, intercept = frame_values(arr, frame)
    place(out, values, slope, intercept)
    if frame.monochrome1:
        invert(out)
    return out


def fill_stack(frames: list[Frame], dtype, track: Callable[[np.ndarray], Any]) -> tuple[np.ndarray, dict[Any, str]]:
    """Frames without positions (cine, US loops) stacked in acquisition order: (n, rows, cols), grey."""
    frames = sorted(frames, key=lambda f: f.order)
    dtype = np.dtype(np.float32) if frames[0].colour else np.dtype(dtype)
    out = track(np.empty((len(frames),) + frames[0].shape, dtype=dtype))
    items: dict[Any, list[tuple[int, Frame]]] = {}
    for i, f in enumerate(frames):
        items.setdefault(f.file, []).append((i, f))

    def write(arr: np.ndarray, item) -> None:
        i, f = item
        values, slope, intercept = frame_values(arr[f.index], f)
        place(out[i], values, slope, intercept)

    bad = decode_files(items, write)
    if frames[0].monochrome1 and not frames[0].colour:
        invert(out)
    return out, bad
