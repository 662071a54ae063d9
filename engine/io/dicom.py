"""DICOM reader: single files, series (many files), enhanced multi-frame, Siemens mosaic.

Design decisions
- Read each file once (header + pixels) and turn it into `_Frame`s: one 2D
  image in physical units with its own geometry. Single-frame files give one
  frame; enhanced multi-frame files give one per frame, with geometry from the
  functional groups. Assembly then works on frames only, so series of files
  and multi-frame files share one code path.
- Grouping: SeriesInstanceUID, then sub-groups by orientation, matrix, echo
  and image type, so a 3-plane localiser or a magnitude/phase pair become
  separate scans the user picks from (as dcm2niix splits them).
- Ordering follows the geometry, never InstanceNumber: slices are sorted by
  the projection of ImagePositionPatient on the slice normal (cross product
  of the ImageOrientationPatient vectors); the slice step and spacing come
  from the positions. Repeated positions (fMRI, perfusion) become volumes,
  ordered by temporal position / acquisition / instance number.
- Pixel pipeline per frame: decode (pydicom 3 dispatches compressed syntaxes
  to pylibjpeg-openjpeg, pyjpegls, python-gdcm; RLE natively; YBR is converted
  to RGB) -> palette colour LUT -> modality LUT / rescale (CT in HU) ->
  MONOCHROME1 inversion over the assembled volume.
- Siemens mosaics (one file = a grid of slices) are unpacked with nibabel's
  CSA-aware MosaicWrapper rather than a hand-written CSA parser.
- Files without patient geometry (radiographs, secondary captures, cine) are
  each their own scan: stacking them by InstanceNumber would invent geometry.
"""

from __future__ import annotations

import io
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from nibabel import orientations

from engine.deid import deidentify
from engine.io.dicom_pixels import MAX_VOXELS, decode, pixel_header
from engine.io.geometry import LPS_TO_RAS, dicom_affine, slice_normal, spacing_zyx, to_canonical, xyz_to_scan_order
from engine.io.sources import Skipped, Source
from engine.scan import Modality, Provenance, Scan, ScanError

__all__ = ["MAX_VOXELS", "looks_like_dicom", "read_dicom"]
_LUMINANCE = np.float32([0.299, 0.587, 0.114])  # ITU-R BT.601 grey from RGB
POSITION_TOLERANCE_MM = 0.01  # positions closer than this are the same slice
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def looks_like_dicom(head: bytes, name: str) -> bool:
    """DICOM Part 10 (preamble + DICM + group 0002), or a bare dataset starting at group 0002/0008.

    The extension alone is not enough: pydicom, forced, will parse any bytes (a
    file of zeros becomes millions of empty elements), so we never force it on a
    file whose first tag is not a plausible DICOM group.
    """
    if len(head) >= 134 and head[128:132] == b"DICM":
        return head[132:134] == b"\x02\x00"
    # Files without the 128-byte preamble start with a group 0002 or 0008 tag (either byte
    # order); one stray leading byte is tolerated, as pydicom itself reads such files.
    groups = (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")
    return len(head) >= 8 and (head[:2] in groups or head[1:3] in groups)


@dataclass
class _Frame:
    raw: np.ndarray  # stored values (rows, cols) any dtype, or (rows, cols, 3) colour; physical = raw * slope + intercept
    ds: Any  # the file's pydicom Dataset (shared by all frames of a multi-frame file)
    name: str  # source name, for messages only
    ipp: np.ndarray | None
    iop: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    order: tuple  # temporal ordering key for repeated positions
    key: tuple  # what must match within one volume: matrix, echo, image type
    thickness: float | None = None
    slope: float = 1.0
    intercept: float = 0.0
    monochrome1: bool = False

    @property
    def colour(self) -> bool:
        return self.raw.ndim == 3

    def physical(self) -> np.ndarray:
        out = self.raw.astype(np.float32)
        if self.slope != 1.0:
            out *= np.float32(self.slope)
        if self.intercept != 0.0:
            out += np.float32(self.intercept)
        return out


@dataclass
class _Mosaic:
    data_crs: np.ndarray  # (cols, rows, slices) float32
    affine: np.ndarray  # RAS+, voxel (col, row, slice)
    ds: Any
    name: str
    order: tuple


@dataclass
class _Read:
    frames: list[_Frame] = field(default_factory=list)
    mosaics: list[_Mosaic] = field(default_factory=list)


# --------------------------------------------------------------------------- reading
def _dcmread(source: Source):
    """Parse a file; preamble-less files (sniffed as DICOM already) are read with force."""
    if source.dataset is not None:  # parsed already (a DICOMweb instance)
        return source.dataset
    import pydicom
    from pydicom.errors import InvalidDicomError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if source.path:
            try:
                return pydicom.dcmread(source.path)
            except InvalidDicomError:
                return pydicom.dcmread(source.path, force=True)
        data = source.read()
        return pydicom.dcmread(io.BytesIO(data), force=not (len(data) >= 132 and data[128:132] == b"DICM"))


def _float_list(value, n: int) -> np.ndarray | None:
    try:
        arr = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def _spacing(value) -> tuple[float, float] | None:
    arr = _float_list(value, 2) if value is not None else None
    if arr is None or np.any(arr <= 0) or np.any(arr > 1e4):  # beyond 10 m per pixel is a broken header
        return None
    return float(arr[0]), float(arr[1])


def _orientation(value) -> np.ndarray | None:
    """ImageOrientationPatient if it is two (nearly) unit, (nearly) orthogonal vectors, else None."""
    iop = _float_list(value or [], 6)
    if iop is None:
        return None
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > 0.05 or abs(np.linalg.norm(col) - 1) > 0.05 or abs(float(row @ col)) > 0.05:
        return None
    return iop


def _get(ds, keyword: str):
    """A header value, or None when absent or unreadable (pydicom converts lazily and can raise)."""
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    return None if value == "" else value


def _int(ds, keyword: str, default: int = 0) -> int:
    value = _get(ds, keyword)
    try:
        return int(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def _float(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _order_key(ds, frame_index: int = 0) -> tuple:
    return (
        _int(ds, "TemporalPositionIdentifier"),
        _int(ds, "AcquisitionNumber"),
        _int(ds, "InstanceNumber"),
        frame_index,
    )


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text[:200] if text else f"{type(exc).__name__}"


def _file_rescale(ds) -> tuple[float, float]:
    slope, intercept = _float(_get(ds, "RescaleSlope")), _float(_get(ds, "RescaleIntercept"))
    slope = 1.0 if slope is None or slope == 0 else slope
    return slope, 0.0 if intercept is None else intercept


def _frame_key(ds, shape: tuple) -> tuple:
    echo = _get(ds, "EchoNumbers")
    try:
        if echo is None:
            pass
        elif isinstance(echo, (str, bytes)) or not hasattr(echo, "__iter__"):
            echo = int(echo)
        else:
            echo = tuple(int(e) for e in echo)
    except (TypeError, ValueError):
        echo = None
    image_type = _get(ds, "ImageType")
    try:
        image_type = tuple(str(v).upper() for v in image_type)[:3] if image_type is not None and not isinstance(image_type, str) else (str(image_type).upper(),)
    except Exception:
        image_type = ()
    return (shape, echo, image_type)


def _functional(ds, index: int, seq: str, item: str):
    """Attribute `item` of functional group `seq` for frame `index` (per-frame, else shared)."""
    for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        try:
            container = ds.get(groups)
            if not container:
                continue
            group = container[index] if groups.startswith("PerFrame") else container[0]
            sub = group.get(seq)
            if sub:
                value = sub[0].get(item)
                if value is not None:
                    return value
        except (IndexError, AttributeError, TypeError, KeyError):
            continue
    return None


def _is_mosaic(ds) -> bool:
    image_type = _get(ds, "ImageType") or []
    image_type = [str(v).upper() for v in (image_type if not isinstance(image_type, str) else [image_type])]
    return "MOSAIC" in image_type and "SIEMENS" in str(_get(ds, "Manufacturer") or "").upper()


def _read_mosaic(ds, name: str) -> _Mosaic:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel warns on import that its readers are experimental
        from nibabel.nicom import dicomwrappers

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapper = dicomwrappers.wrapper_from_data(ds)
            data = np.asarray(wrapper.get_data(), dtype=np.float32)  # (rows, cols, slices), scaled
            affine_rcs = np.asarray(wrapper.affine, dtype=float)  # voxel (row, col, slice) -> LPS
    except Exception as exc:
        raise ScanError(f"{name}: Siemens mosaic could not be unpacked ({_short(exc)})") from None
    affine_crs = affine_rcs[:, [1, 0, 2, 3]]
    return _Mosaic(data.transpose(1, 0, 2), LPS_TO_RAS @ affine_crs, ds, name, _order_key(ds))


def _read_file(source: Source, out: _Read) -> None:
    ds = _dcmread(source)
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        kind = getattr(_get(ds, "SOPClassUID"), "name", "") or ("DICOMDIR" if "DirectoryRecordSequence" in ds else "")
        raise ScanError(f"{source.name}: DICOM file holds no image ({kind or 'no pixel data'})")
    if _is_mosaic(ds):
        out.mosaics.append(_read_mosaic(ds, source.name))
        return
    try:
        header = pixel_header(ds, source.name)
        arr = decode(ds, header, source.name)
    except ScanError as exc:
        raise ScanError(f"{source.name}: {exc}") from None
    n_frames = header.frames
    colour = header.samples == 3 or header.photometric == "PALETTE COLOR"
    frames_arr = arr[None] if n_frames == 1 else arr
    if frames_arr.shape[0] != n_frames or frames_arr.shape[1:3] != (header.rows, header.cols):
        raise ScanError(f"{source.name}: decoded {frames_arr.shape[:3]} but the header says {n_frames} x {header.rows} x {header.cols}")
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    file_iop = _orientation(_get(ds, "ImageOrientationPatient"))
    file_ipp = _float_list(_get(ds, "ImagePositionPatient") or [], 3)
    file_spacing = _spacing(_get(ds, "PixelSpacing")) or _spacing(_get(ds, "ImagerPixelSpacing"))
    grid = _get(ds, "GridFrameOffsetVector")
    thickness = _float(_get(ds, "SliceThickness"))
    monochrome1 = header.photometric == "MONOCHROME1"
    has_lut = "ModalityLUTSequence" in ds and not colour
    file_slope, file_intercept = _file_rescale(ds)
    offsets = _float_list(grid, n_frames) if (n_frames > 1 and grid is not None) else None
    for k in range(n_frames):
        iop, ipp, spacing = file_iop, file_ipp, file_spacing
        slope, intercept = (1.0, 0.0) if colour else (file_slope, file_intercept)
        if enhanced:
            iop = _orientation(_functional(ds, k, "PlaneOrientationSequence", "ImageOrientationPatient"))
            ipp = _float_list(_functional(ds, k, "PlanePositionSequence", "ImagePositionPatient") or [], 3)
            spacing = _spacing(_functional(ds, k, "PixelMeasuresSequence", "PixelSpacing")) or file_spacing
            f_slope = _float(_functional(ds, k, "PixelValueTransformationSequence", "RescaleSlope"))
            f_intercept = _float(_functional(ds, k, "PixelValueTransformationSequence", "RescaleIntercept"))
            if not colour and (f_slope is not None or f_intercept is not None):
                slope, intercept = (f_slope or 1.0), (f_intercept or 0.0)
        elif n_frames > 1 and iop is not None and ipp is not None and offsets is not None:
            ipp = ipp + offsets[k] * slice_normal(iop)
        elif n_frames > 1:
            ipp = None  # legacy multi-frame without per-frame positions: a cine/stack
        raw = frames_arr[k]
        if has_lut:
            from pydicom.pixels import apply_modality_lut

            try:
                raw, slope, intercept = np.asarray(apply_modality_lut(raw, ds), dtype=np.float32), 1.0, 0.0
            except Exception:
                pass  # a broken LUT: stored values are what the header can support
        out.frames.append(
            _Frame(raw, ds, source.name, ipp, iop, spacing, _order_key(ds, k), _frame_key(ds, raw.shape), thickness,
                   slope, intercept, monochrome1)
        )


# --------------------------------------------------------------------------- assembly
def _provenance(ds, reader: str, n_files: int, warnings_: list[str]) -> tuple[dict, Provenance]:
    deid = deidentify(ds)
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    prov = Provenance(
        reader=reader,
        transfer_syntax=getattr(ts, "name", None) or (str(ts) if ts else None),
        n_files=n_files,
        warnings=list(warnings_),
        removed_attributes=deid.removed,
        burned_in_text_risk=deid.burned_in_text_risk,
    )
    if deid.burned_in_text_risk:
        prov.warnings.append("pixels may carry burned-in identifying text: " + "; ".join(deid.burned_in_reasons))
    return deid.metadata, prov


def _modality(ds) -> Modality:
    return Modality.from_dicom(str(_get(ds, "Modality") or ""))


def _invert(voxels: np.ndarray) -> np.ndarray:
    """MONOCHROME1 (high = dark) -> high = bright, over the whole assembled image, in place."""
    lo, hi = float(np.min(voxels)), float(np.max(voxels))
    np.subtract(np.float32(lo + hi), voxels, out=voxels)
    return voxels


def _scan_2d(frame: _Frame, n_files: int, extra_warnings: list[str]) -> Scan:
    ds = frame.ds
    warn = list(extra_warnings)
    spacing = frame.pixel_spacing
    if spacing is None:
        warn.append("no pixel spacing in the header: 1 mm assumed")
        spacing = (1.0, 1.0)
    pixels = frame.physical()
    if frame.monochrome1 and not frame.colour:
        pixels = _invert(pixels)
    affine = np.eye(4)
    if frame.iop is not None and frame.ipp is not None:
        affine = dicom_affine(frame.iop, spacing, frame.ipp, slice_normal(frame.iop) * (frame.thickness or 1.0))
    else:
        affine[0, 0], affine[1, 1] = spacing[1], spacing[0]
    metadata, prov = _provenance(ds, "dicom-image", n_files, warn)
    return Scan(pixels, spacing, affine, _modality(ds), metadata, prov)


def _stack_without_geometry(frames: list[_Frame]) -> Scan:
    """A multi-frame file with no per-frame positions (cine, NM, US loops)."""
    ds = frames[0].ds
    frames = sorted(frames, key=lambda f: f.order)
    voxels = np.stack([f.physical() if not f.colour else f.physical() @ _LUMINANCE for f in frames])
    warn = ["frames have no patient positions: shown as a stack in acquisition order, geometry unknown"]
    if frames[0].colour:
        warn.append("colour frames shown in greyscale")
    spacing2 = frames[0].pixel_spacing or (1.0, 1.0)
    step = _float(_get(ds, "SpacingBetweenSlices")) or frames[0].thickness or 1.0
    if frames[0].monochrome1 and not frames[0].colour:
        voxels = _invert(voxels)
    affine = np.diag([spacing2[1], spacing2[0], step, 1.0])
    metadata, prov = _provenance(ds, "dicom-multiframe", 1, warn)
    return Scan(voxels, (step, spacing2[0], spacing2[1]), affine, _modality(ds), metadata, prov)


def _canonical_target(affine: np.ndarray, shape_crkt: tuple[int, int, int, int]):
    """Allocate the final RAS+ array and a writable view of it in acquisition layout (col, row, slice, t).

    Writing each slice through the view puts it straight into its canonical
    place: one copy per voxel instead of stack -> reorient -> make contiguous.
    """
    ornt = orientations.io_orientation(affine)
    n_t = shape_crkt[3]
    canon_xyz = [0, 0, 0]
    for i in range(3):
        canon_xyz[int(ornt[i, 0])] = shape_crkt[i]
    final = np.empty(((n_t,) if n_t > 1 else ()) + tuple(canon_xyz[::-1]), dtype=np.float32)
    view_xyzt = final.transpose(tuple(range(final.ndim))[::-1])
    if n_t == 1:
        view_xyzt = view_xyzt[..., None]
    inverse = np.zeros((3, 2))
    for i in range(3):
        inverse[int(ornt[i, 0])] = [i, ornt[i, 1]]
    acquisition_view = orientations.apply_orientation(view_xyzt, inverse)
    new_affine = affine @ orientations.inv_ornt_aff(ornt, shape_crkt[:3])
    return final, acquisition_view, new_affine


def _assemble_volume(frames: list[_Frame], n_files: int, reader: str) -> Scan:
    """Frames sharing orientation and matrix -> one RAS+ volume (or 4D series)."""
    ds = frames[0].ds
    warn: list[str] = []
    iop = frames[0].iop
    normal = slice_normal(iop)
    dist = np.array([float(f.ipp @ normal) for f in frames])
    order = np.lexsort((np.arange(len(frames)), dist))
    # Cluster equal positions (repeats over time), keeping the temporal order inside each.
    clusters: list[list[int]] = []
    for idx in order:
        if clusters and abs(dist[idx] - dist[clusters[-1][0]]) <= POSITION_TOLERANCE_MM:
            clusters[-1].append(idx)
        else:
            clusters.append([idx])
    if len({len(c) for c in clusters}) > 1:
        warn.append(
            f"slice positions repeat unevenly ({len(frames)} images at {len(clusters)} positions): "
            "kept the first image at each position"
        )
        clusters = [[min(c, key=lambda i: frames[i].order)] for c in clusters]
    n_vol = len(clusters[0])
    for c in clusters:
        c.sort(key=lambda i: frames[i].order)
    if len(clusters) < 2 and n_vol == 1:
        return _scan_2d(frames[clusters[0][0]], n_files, warn)
    positions = np.array([frames[c[0]].ipp for c in clusters])
    d_unique = np.array([dist[c[0]] for c in clusters])
    n_pos = len(clusters)
    regular_grid = None  # target positions along the normal when the slices must be resampled
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
    ps = frames[0].pixel_spacing or (1.0, 1.0)
    if len(spacings - {None}) > 1:
        warn.append("pixel spacing differs between slices: the first slice's spacing is used")
    rows, cols = frames[0].raw.shape[:2]
    affine = dicom_affine(iop, ps, positions[0], step_vec)
    n_k = n_pos if regular_grid is None else len(regular_grid)
    final, view, affine = _canonical_target(affine, (cols, rows, n_k, n_vol))
    if frames[0].colour:
        warn.append("colour slices shown in greyscale")
    if regular_grid is None:
        for k, c in enumerate(clusters):
            for t, idx in enumerate(c):
                f = frames[idx]
                target = view[:, :, k, t]
                source = (f.raw if not f.colour else f.raw.astype(np.float32) @ _LUMINANCE).T
                if f.slope == 1.0:
                    # Cast, shift and place in one pass (the usual CT case: slope 1, intercept -1024).
                    np.add(source, np.float32(f.intercept), out=target, casting="unsafe")
                    continue
                np.copyto(target, source, casting="unsafe")
                if f.slope != 1.0 or f.intercept != 0.0:
                    # Same memory with positive strides: numpy's in-place ufuncs are ~10x slower on reversed views.
                    plane = target[tuple(slice(None, None, -1) if st < 0 else slice(None) for st in target.strides)]
                    if f.slope != 1.0:
                        plane *= np.float32(f.slope)
                    if f.intercept != 0.0:
                        plane += np.float32(f.intercept)
    else:
        stack = np.empty((n_vol, n_pos, rows, cols), dtype=np.float32)
        for k, c in enumerate(clusters):
            for t, idx in enumerate(c):
                f = frames[idx]
                stack[t, k] = f.physical() if not f.colour else f.physical() @ _LUMINANCE
        view[...] = _resample_slices(stack, d_unique, regular_grid).transpose(3, 2, 1, 0)
    if frames[0].monochrome1:
        _invert(final)
    metadata, prov = _provenance(ds, reader, n_files, warn)
    return Scan(final, spacing_zyx(affine), affine, _modality(ds), metadata, prov)


def _resample_slices(stack: np.ndarray, positions: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Linear interpolation along the slice axis (axis 1 of (t, k, rows, cols))."""
    upper = np.clip(np.searchsorted(positions, targets, side="left"), 1, len(positions) - 1)
    lower = upper - 1
    span = positions[upper] - positions[lower]
    w = np.clip((targets - positions[lower]) / np.where(span == 0, 1, span), 0.0, 1.0).astype(np.float32)
    w = w[None, :, None, None] if stack.ndim == 4 else w[None, :, None, None, None]
    return (1 - w) * stack[:, lower] + w * stack[:, upper]


def _assemble_mosaics(mosaics: list[_Mosaic]) -> Scan:
    mosaics = sorted(mosaics, key=lambda m: m.order)
    first = mosaics[0]
    warn: list[str] = []
    kept = [m for m in mosaics if m.data_crs.shape == first.data_crs.shape and np.allclose(m.affine, first.affine, atol=1e-3)]
    if len(kept) < len(mosaics):
        warn.append(f"{len(mosaics) - len(kept)} mosaic file(s) with different geometry left out")
    data = np.stack([m.data_crs for m in kept], axis=-1)
    if data.shape[-1] == 1:
        data = data[..., 0]
    data, affine = to_canonical(data, first.affine)
    metadata, prov = _provenance(first.ds, "dicom-mosaic", len(kept), warn)
    return Scan(xyz_to_scan_order(data), spacing_zyx(affine), affine, _modality(first.ds), metadata, prov)


def _series_key(ds, name: str) -> str:
    """SeriesInstanceUID; without one (seen in exported data), the best stand-in."""
    uid = str(_get(ds, "SeriesInstanceUID") or "")
    if uid:
        return uid
    folder = name.rsplit("/", 1)[0] if "/" in name else ""
    parts = [str(_get(ds, k) or "") for k in ("StudyInstanceUID", "SeriesNumber", "FrameOfReferenceUID", "Modality")]
    return "no-series-uid|" + "|".join(parts + [folder])


IOP_TOLERANCE = 1e-3  # direction cosines closer than this are the same orientation (scanners write noisy IOPs)


def _split_by_geometry(frames: list[_Frame]) -> list[list[_Frame]]:
    """Sub-series: same matrix/echo/image type and orientation within IOP_TOLERANCE."""
    groups: list[tuple[tuple, np.ndarray, list[_Frame]]] = []
    for f in frames:
        key = f.key
        for gkey, giop, members in groups:
            if gkey == key and np.max(np.abs(giop - f.iop)) <= IOP_TOLERANCE:
                members.append(f)
                break
        else:
            groups.append((key, f.iop, [f]))
    return [members for _, _, members in groups]


def read_dicom(sources: Iterable[Source]) -> tuple[list[Scan], list[Skipped]]:
    """All scans found in DICOM sources (read once, in order: a stream works); unreadable files become `Skipped`."""
    skipped: list[Skipped] = []
    by_series: dict[str, _Read] = defaultdict(_Read)
    multiframe_files: list[tuple[str, list[_Frame]]] = []
    for source in sources:
        one = _Read()
        try:
            _read_file(source, one)
        except ScanError as exc:
            skipped.append(Skipped(source.name, str(exc).split(": ", 1)[-1] if str(exc).startswith(source.name) else str(exc)))
            continue
        except MemoryError:
            skipped.append(Skipped(source.name, "image too large to load into memory"))
            continue
        except Exception as exc:  # pydicom raises many types on corrupt headers
            skipped.append(Skipped(source.name, f"not a readable DICOM file ({_short(exc)})"))
            continue
        ds = (one.frames[0].ds if one.frames else one.mosaics[0].ds)
        key = _series_key(ds, source.name)
        if len(one.frames) > 1:
            multiframe_files.append((key, one.frames))
            continue
        by_series[key].frames.extend(one.frames)
        by_series[key].mosaics.extend(one.mosaics)

    scans: list[Scan] = []

    def attempt(label: str, fn, *args) -> None:
        try:
            scans.append(fn(*args))
        except ScanError as exc:
            skipped.append(Skipped(label, str(exc)))
        except MemoryError:
            skipped.append(Skipped(label, "series too large to load into memory"))
        except Exception as exc:
            skipped.append(Skipped(label, f"series could not be assembled ({_short(exc)})"))

    for key, frames in multiframe_files:
        label = frames[0].name
        if all(f.ipp is not None and f.iop is not None for f in frames):
            for group in _split_by_geometry(frames):
                attempt(label, _assemble_volume, group, 1, "dicom-multiframe")
        else:
            attempt(label, _stack_without_geometry, frames)

    for key, read in by_series.items():
        if read.mosaics:
            attempt(read.mosaics[0].name, _assemble_mosaics, read.mosaics)
        with_geometry = [f for f in read.frames if f.ipp is not None and f.iop is not None]
        without = [f for f in read.frames if f.ipp is None or f.iop is None]
        for f in without:
            attempt(f.name, _scan_2d, f, 1, [])
        groups = _split_by_geometry(with_geometry)
        if len(groups) > 1:
            note = f"series split into {len(groups)} parts (different orientation, matrix, echo or image type)"
        else:
            note = None
        for group in groups:
            before = len(scans)
            attempt(group[0].name, _assemble_volume, group, len({f.name for f in group}), "dicom-series")
            if note and len(scans) > before:
                scans[-1].provenance.warnings.append(note)
    return scans, skipped
