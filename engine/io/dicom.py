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
from typing import Any

import numpy as np

from engine.deid import deidentify
from engine.io.geometry import LPS_TO_RAS, dicom_affine, slice_normal, spacing_zyx, to_canonical, xyz_to_scan_order
from engine.io.sources import Skipped, Source
from engine.scan import Modality, Provenance, Scan, ScanError

MAX_VOXELS = 600_000_000  # one decoded series; ~2.4 GB as float32
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
    pixels: np.ndarray  # (rows, cols) float32, or (rows, cols, 3) for colour
    ds: Any  # the file's pydicom Dataset (shared by all frames of a multi-frame file)
    name: str  # source name, for messages only
    ipp: np.ndarray | None
    iop: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    order: tuple  # temporal ordering key for repeated positions
    thickness: float | None = None


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
    import pydicom

    head = source.head(132)
    has_preamble = len(head) >= 132 and head[128:132] == b"DICM"
    src = source.path if source.path else io.BytesIO(source.read())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(src, force=not has_preamble)


def _float_list(value, n: int) -> np.ndarray | None:
    try:
        arr = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def _spacing(value) -> tuple[float, float] | None:
    arr = _float_list(value, 2) if value is not None else None
    if arr is None or np.any(arr <= 0):
        return None
    return float(arr[0]), float(arr[1])


def _int(ds, keyword: str, default: int = 0) -> int:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _order_key(ds, frame_index: int = 0) -> tuple:
    return (
        _int(ds, "TemporalPositionIdentifier"),
        _int(ds, "AcquisitionNumber"),
        _int(ds, "InstanceNumber"),
        frame_index,
    )


def _decode(ds, name: str) -> np.ndarray:
    """Decoded pixels: (frames, rows, cols[, 3]) for multi-frame, else (rows, cols[, 3])."""
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    frames = max(_int(ds, "NumberOfFrames", 1), 1)
    samples = max(_int(ds, "SamplesPerPixel", 1), 1)
    if rows <= 0 or cols <= 0:
        raise ScanError(f"{name}: image has no rows/columns (Rows={rows}, Columns={cols})")
    if rows * cols * frames * samples > MAX_VOXELS:
        raise ScanError(f"{name}: image claims {rows}x{cols}x{frames} pixels, too large to load")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        ts_name = getattr(ts, "name", str(ts))
        # pydicom lists each plugin's reason on the lines after the first: those are the specific part.
        reasons = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        detail = "; ".join(reasons)[:300] if reasons else _short(exc)
        raise ScanError(f"{name}: pixel data compressed as {ts_name} cannot be decoded by the installed decoders ({detail})") from None
    except Exception as exc:  # truncated / corrupt pixel data: decoders raise many types
        raise ScanError(f"{name}: pixel data is corrupt or truncated ({_short(exc)})") from None
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            arr = apply_color_lut(arr, ds)
        except Exception as exc:
            raise ScanError(f"{name}: palette colour lookup table is unusable ({_short(exc)})") from None
    return arr


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def _rescale(arr: np.ndarray, ds, slope_intercept: tuple[float, float] | None) -> np.ndarray:
    """Modality LUT / rescale to physical units (HU for CT), as float32."""
    if arr.ndim >= 2 and arr.shape[-1] == 3 and _int(ds, "SamplesPerPixel", 1) == 3 or \
            str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
        return arr.astype(np.float32)
    if slope_intercept is not None:
        slope, intercept = slope_intercept
        out = arr.astype(np.float32)
        if slope != 1.0:
            out *= np.float32(slope)
        if intercept != 0.0:
            out += np.float32(intercept)
        return out
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        try:
            return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
        except Exception:
            pass  # a broken LUT: fall back to stored values, which is what the header can support
    return arr.astype(np.float32)


def _file_rescale(ds) -> tuple[float, float]:
    slope, intercept = ds.get("RescaleSlope", 1), ds.get("RescaleIntercept", 0)
    try:
        slope = float(slope) if slope not in (None, "") else 1.0
        intercept = float(intercept) if intercept not in (None, "") else 0.0
    except (TypeError, ValueError):
        slope, intercept = 1.0, 0.0
    if not np.isfinite(slope) or slope == 0 or not np.isfinite(intercept):
        slope, intercept = 1.0, 0.0
    return slope, intercept


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
    image_type = [str(v).upper() for v in ds.get("ImageType", []) or []]
    return "MOSAIC" in image_type and "SIEMENS" in str(ds.get("Manufacturer", "")).upper()


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
        sop = str(ds.get("SOPClassUID", ""))
        kind = getattr(ds.get("SOPClassUID"), "name", "") or ("DICOMDIR" if "DirectoryRecordSequence" in ds else "")
        raise ScanError(f"{source.name}: DICOM file holds no image ({kind or sop or 'no pixel data'})")
    if _is_mosaic(ds):
        out.mosaics.append(_read_mosaic(ds, source.name))
        return
    arr = _decode(ds, source.name)
    n_frames = max(_int(ds, "NumberOfFrames", 1), 1)
    colour = arr.ndim >= 3 and arr.shape[-1] == 3 and _int(ds, "SamplesPerPixel", 1) in (1, 3) and (
        _int(ds, "SamplesPerPixel", 1) == 3 or str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR"
    )
    if n_frames == 1:
        frames_arr = arr[None]
    else:
        frames_arr = arr
    if frames_arr.shape[0] != n_frames:
        raise ScanError(f"{source.name}: NumberOfFrames says {n_frames} but {frames_arr.shape[0]} frames decoded")
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    file_iop = _float_list(ds.get("ImageOrientationPatient") or [], 6)
    file_ipp = _float_list(ds.get("ImagePositionPatient") or [], 3)
    file_spacing = _spacing(ds.get("PixelSpacing")) or _spacing(ds.get("ImagerPixelSpacing"))
    grid = ds.get("GridFrameOffsetVector")
    thickness = ds.get("SliceThickness")
    try:
        thickness = float(thickness) if thickness not in (None, "") else None
    except (TypeError, ValueError):
        thickness = None
    for k in range(n_frames):
        iop, ipp, spacing = file_iop, file_ipp, file_spacing
        rescale = _file_rescale(ds) if "ModalityLUTSequence" not in ds else None
        if enhanced:
            iop = _float_list(_functional(ds, k, "PlaneOrientationSequence", "ImageOrientationPatient") or [], 6)
            ipp = _float_list(_functional(ds, k, "PlanePositionSequence", "ImagePositionPatient") or [], 3)
            spacing = _spacing(_functional(ds, k, "PixelMeasuresSequence", "PixelSpacing")) or file_spacing
            slope = _functional(ds, k, "PixelValueTransformationSequence", "RescaleSlope")
            intercept = _functional(ds, k, "PixelValueTransformationSequence", "RescaleIntercept")
            if slope is not None or intercept is not None:
                try:
                    rescale = (float(slope if slope not in (None, "") else 1), float(intercept if intercept not in (None, "") else 0))
                except (TypeError, ValueError):
                    pass
        elif n_frames > 1 and grid is not None and iop is not None and ipp is not None:
            offsets = _float_list(grid, n_frames)
            ipp = ipp + offsets[k] * slice_normal(iop) if offsets is not None else None
        elif n_frames > 1:
            ipp = None  # legacy multi-frame without per-frame positions: a cine/stack
        pixels = _rescale(frames_arr[k], ds, rescale)
        if colour is False and pixels.ndim == 3:
            pixels = pixels[..., 0]
        out.frames.append(
            _Frame(pixels, ds, source.name, ipp, iop, spacing, _order_key(ds, k), thickness)
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
    return Modality.from_dicom(str(ds.get("Modality", "")))


def _invert_monochrome1(voxels: np.ndarray, ds) -> np.ndarray:
    if str(ds.get("PhotometricInterpretation", "")).upper() != "MONOCHROME1":
        return voxels
    lo, hi = float(np.min(voxels)), float(np.max(voxels))
    return (lo + hi) - voxels


def _scan_2d(frame: _Frame, n_files: int, extra_warnings: list[str]) -> Scan:
    ds = frame.ds
    warn = list(extra_warnings)
    spacing = frame.pixel_spacing
    if spacing is None:
        warn.append("no pixel spacing in the header: 1 mm assumed")
        spacing = (1.0, 1.0)
    pixels = frame.pixels
    if pixels.ndim == 2:
        pixels = _invert_monochrome1(pixels, ds)
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
    pixels = [f.pixels if f.pixels.ndim == 2 else f.pixels.astype(np.float32) @ np.float32([0.299, 0.587, 0.114]) for f in frames]
    warn = ["frames have no patient positions: shown as a stack in acquisition order, geometry unknown"]
    if frames[0].pixels.ndim == 3:
        warn.append("colour frames shown in greyscale")
    voxels = np.stack(pixels)
    spacing2 = frames[0].pixel_spacing or (1.0, 1.0)
    step = float(ds.get("SpacingBetweenSlices") or frames[0].thickness or 1.0)
    voxels = _invert_monochrome1(voxels, ds)
    affine = np.diag([spacing2[1], spacing2[0], step, 1.0])
    metadata, prov = _provenance(ds, "dicom-multiframe", 1, warn)
    return Scan(voxels, (step, spacing2[0], spacing2[1]), affine, _modality(ds), metadata, prov)


def _assemble_volume(frames: list[_Frame], n_files: int, reader: str) -> Scan:
    """Frames sharing orientation and matrix -> one RAS+ volume (or 4D series)."""
    ds = frames[0].ds
    warn: list[str] = []
    iop = frames[0].iop
    normal = slice_normal(iop)
    dist = np.array([float(f.ipp @ normal) for f in frames])
    order = np.lexsort((np.array([i for i in range(len(frames))]), dist))
    # Cluster equal positions (repeats over time), keeping the temporal order inside each.
    clusters: list[list[int]] = []
    for idx in order:
        if clusters and abs(dist[idx] - dist[clusters[-1][0]]) <= POSITION_TOLERANCE_MM:
            clusters[-1].append(idx)
        else:
            clusters.append([idx])
    counts = {len(c) for c in clusters}
    if len(counts) > 1:
        warn.append(
            f"slice positions repeat unevenly ({len(frames)} images at {len(clusters)} positions): "
            "kept the first image at each position"
        )
        clusters = [[min(c, key=lambda i: frames[i].order)] for c in clusters]
    n_vol = len(clusters[0])
    for c in clusters:
        c.sort(key=lambda i: frames[i].order)
    if len(clusters) < 2:
        # One position only: repeated 2D frames (a time series of one slice).
        first = frames[clusters[0][0]]
        if n_vol == 1:
            return _scan_2d(first, n_files, warn)
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
    # (t, k, r, c) -> NIfTI order (c, r, k, t)
    stack = np.empty((n_vol, n_pos) + frames[0].pixels.shape, dtype=np.float32)
    for k, c in enumerate(clusters):
        for t, idx in enumerate(c):
            stack[t, k] = frames[idx].pixels
    if regular_grid is not None:
        stack = _resample_slices(stack, d_unique, regular_grid)
    stack = _invert_monochrome1(stack, ds)
    affine = dicom_affine(iop, ps, positions[0], step_vec)
    data_xyz = stack.transpose(3, 2, 1, 0)
    if n_vol == 1:
        data_xyz = data_xyz[..., 0]
    data_xyz, affine = to_canonical(data_xyz, affine)
    voxels = xyz_to_scan_order(data_xyz)
    metadata, prov = _provenance(ds, reader, n_files, warn)
    return Scan(voxels, spacing_zyx(affine), affine, _modality(ds), metadata, prov)


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
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    if uid:
        return uid
    folder = name.rsplit("/", 1)[0] if "/" in name else ""
    parts = [str(ds.get(k, "") or "") for k in ("StudyInstanceUID", "SeriesNumber", "FrameOfReferenceUID", "Modality")]
    return "no-series-uid|" + "|".join(parts + [folder])


IOP_TOLERANCE = 1e-3  # direction cosines closer than this are the same orientation (scanners write noisy IOPs)


def _subgroup_key(frame: _Frame) -> tuple:
    """What must match exactly within one volume (orientation is compared with a tolerance)."""
    ds = frame.ds
    echo = ds.get("EchoNumbers")
    try:
        if echo in (None, ""):
            echo = None
        elif isinstance(echo, (str, bytes)) or not hasattr(echo, "__iter__"):
            echo = int(echo)
        else:
            echo = tuple(int(e) for e in echo)
    except (TypeError, ValueError):
        echo = None
    image_type = tuple(str(v).upper() for v in (ds.get("ImageType") or []))[:3]
    return (frame.pixels.shape, echo, image_type)


def _split_by_geometry(frames: list[_Frame]) -> list[list[_Frame]]:
    """Sub-series: same matrix/echo/image type and orientation within IOP_TOLERANCE."""
    groups: list[tuple[tuple, np.ndarray, list[_Frame]]] = []
    for f in frames:
        key = _subgroup_key(f)
        for gkey, giop, members in groups:
            if gkey == key and np.max(np.abs(giop - f.iop)) <= IOP_TOLERANCE:
                members.append(f)
                break
        else:
            groups.append((key, f.iop, [f]))
    return [members for _, _, members in groups]


def read_dicom(sources: list[Source]) -> tuple[list[Scan], list[Skipped]]:
    """All scans found in DICOM sources; unreadable files become `Skipped`."""
    skipped: list[Skipped] = []
    by_series: dict[str, _Read] = defaultdict(_Read)
    files_per_series: dict[str, set[str]] = defaultdict(set)
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
        files_per_series[key].add(source.name)

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
        n_files = len(files_per_series[key])
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
