"""DICOM reader: single files, series (many files), enhanced multi-frame, Siemens mosaic.

Design decisions
- Two passes. The first reads each file's header only (pydicom
  `stop_before_pixels`; zip members are read up to the pixel data, not
  inflated whole) and turns it into `Frame`s: one 2D image each, with its
  own geometry (enhanced multi-frame files give one per frame, geometry from
  the functional groups). Grouping, ordering and the output size are then
  known before any pixel is decoded, and each scan-to-be is checked against
  the memory bounds (engine.memory: the per-series voxel cap and the budget)
  first: a series over the cap is refused in the time it takes to read its
  headers, whatever its pixel data hold. The second pass decodes file after
  file straight into the scan's preallocated array (engine.io.dicom_assembly).
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
  MONOCHROME1 inversion over the assembled volume. Storage is int16 when the
  headers say the values are integers inside int16 (engine.scan), else float32.
- A file whose pixels cannot be decoded is skipped with its reason and its
  series is assembled from the others, as when its header is unreadable.
- Siemens mosaics (one file = a grid of slices) are unpacked with nibabel's
  CSA-aware MosaicWrapper rather than a hand-written CSA parser.
- Files without patient geometry (radiographs, secondary captures, cine) are
  each their own scan: stacking them by InstanceNumber would invent geometry.
"""

from __future__ import annotations

import io
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterable

import numpy as np

from engine.deid import deidentify
from engine.io import dicom_assembly as assembly
from engine.io.dicom_assembly import Frame, NeedsFloat
from engine.io.dicom_pixels import PixelHeader, decode, pixel_header
from engine.io.geometry import LPS_TO_RAS, dicom_affine, slice_normal, spacing_zyx, to_canonical, xyz_to_scan_order
from engine.io.sources import Skipped, Source
from engine.memory import LoadGuard, SeriesSize
from engine.scan import Modality, Provenance, Scan, ScanError

__all__ = ["looks_like_dicom", "read_dicom"]
_PIXEL_TAGS = (b"\xe0\x7f", b"\x7f\xe0")  # group 0x7FE0 (pixel data) in either byte order
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
_HEADER_CHUNK = 64 << 10  # bytes read at a time from a zip member during the header pass


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


# --------------------------------------------------------------------------- reading
class _Rewindable(io.RawIOBase):
    """A forward-only stream (a zip member) made seekable by keeping what was read: pydicom
    rewinds while parsing, and the header pass reads kilobytes, never the whole member."""

    def __init__(self, raw):
        self._raw, self._buf, self._pos, self._eof = raw, bytearray(), 0, False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _fill(self, upto: int | None) -> None:
        while not self._eof and (upto is None or len(self._buf) < upto):
            chunk = self._raw.read(_HEADER_CHUNK if upto is None else max(upto - len(self._buf), _HEADER_CHUNK))
            if not chunk:
                self._eof = True
            self._buf += chunk

    def readinto(self, b) -> int:
        self._fill(self._pos + len(b))
        n = max(0, min(len(b), len(self._buf) - self._pos))
        b[:n] = self._buf[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 2:
            self._fill(None)
            offset += len(self._buf)
        elif whence == 1:
            offset += self._pos
        self._pos = max(0, offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._raw.close()
        super().close()


def _parse(fh, *, stop_before_pixels: bool, force: bool):
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(fh, stop_before_pixels=stop_before_pixels, force=force)


def _dcmread(source: Source, stop_before_pixels: bool = False) -> tuple[Any, bool]:
    """(dataset, pixel data follows); preamble-less files (sniffed as DICOM already) are read with force.

    With `stop_before_pixels` the dataset holds the header only, and the next
    tag in the stream says whether pixel data follow.
    """
    from pydicom.errors import InvalidDicomError

    if source.dataset is not None:  # parsed already, pixels included (a DICOMweb instance: engine.pacs)
        return source.dataset, any(k in source.dataset for k in _PIXEL_KEYWORDS)
    if source.path:
        fh = open(source.path, "rb")
    elif stop_before_pixels:
        fh = _Rewindable(source.open())
    else:
        fh = io.BytesIO(source.read())
    with fh:
        try:
            ds = _parse(fh, stop_before_pixels=stop_before_pixels, force=False)
        except InvalidDicomError:
            fh.seek(0)
            ds = _parse(fh, stop_before_pixels=stop_before_pixels, force=True)
        has_pixels = True
        if stop_before_pixels:
            has_pixels = fh.read(2) in _PIXEL_TAGS
    if stop_before_pixels and not has_pixels and _DEFLATED in str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "")):
        # a deflated dataset is parsed from an inflated copy, so the stream's position says nothing: read it whole (rare, small)
        ds, _ = _dcmread(source)
        has_pixels = any(k in ds for k in _PIXEL_KEYWORDS)
    return ds, has_pixels


class DicomFile:
    """One DICOM file after the header pass; `decode` reads it again for its pixels."""

    def __init__(self, source: Source, ds: Any, header: PixelHeader, mosaic: bool):
        self.source, self.ds, self.header, self.mosaic = source, ds, header, mosaic

    @property
    def name(self) -> str:
        return self.source.name

    def full_dataset(self):
        return _dcmread(self.source)[0]

    def decode(self) -> np.ndarray:
        """Pixels as stored, (frames, rows, cols[, 3]), after checking them against the header."""
        h = self.header
        try:
            arr = decode(self.full_dataset(), h, self.name)
        except ScanError as exc:
            raise ScanError(f"{self.name}: {exc}") from None
        arr = arr[None] if h.frames == 1 else arr
        if arr.shape[0] != h.frames or arr.shape[1:3] != (h.rows, h.cols):
            raise ScanError(f"{self.name}: decoded {arr.shape[:3]} but the header says {h.frames} x {h.rows} x {h.cols}")
        return arr


def _read_header(source: Source) -> DicomFile:
    """The header pass of one file: no pixel is decoded (or, for a zip member, even inflated)."""
    ds, has_pixels = _dcmread(source, stop_before_pixels=True)
    if not has_pixels:
        kind = getattr(_get(ds, "SOPClassUID"), "name", "") or ("DICOMDIR" if "DirectoryRecordSequence" in ds else "")
        raise ScanError(f"{source.name}: DICOM file holds no image ({kind or 'no pixel data'})")
    try:
        header = pixel_header(ds, source.name)
    except ScanError as exc:
        raise ScanError(f"{source.name}: {exc}") from None
    return DicomFile(source, ds, header, _is_mosaic(ds))


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
        image_type = (
            tuple(str(v).upper() for v in image_type)[:3]
            if image_type is not None and not isinstance(image_type, str)
            else (str(image_type).upper(),)
        )
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


def _frames_of(file: DicomFile) -> list[Frame]:
    """The file's frames, each with its geometry and rescale, from the header alone."""
    ds, header = file.ds, file.header
    n_frames = header.frames
    colour = header.samples == 3 or header.photometric == "PALETTE COLOR"
    shape = (header.rows, header.cols, 3) if colour else (header.rows, header.cols)
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
    key = _frame_key(ds, shape)
    frames = []
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
        frames.append(Frame(file, k, ipp, iop, spacing, _order_key(ds, k), key, thickness, slope, intercept, monochrome1, colour, has_lut))
    return frames


def _read_mosaic(file: DicomFile) -> tuple[np.ndarray, np.ndarray]:
    """(data (cols, rows, slices) float32, affine RAS+ of voxel (col, row, slice)) of one mosaic file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel warns on import that its readers are experimental
        from nibabel.nicom import dicomwrappers

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapper = dicomwrappers.wrapper_from_data(file.full_dataset())
            data = np.asarray(wrapper.get_data(), dtype=np.float32)  # (rows, cols, slices), scaled
            affine_rcs = np.asarray(wrapper.affine, dtype=float)  # voxel (row, col, slice) -> LPS
    except Exception as exc:
        raise ScanError(f"{file.name}: Siemens mosaic could not be unpacked ({_short(exc)})") from None
    affine_crs = affine_rcs[:, [1, 0, 2, 3]]
    return data.transpose(1, 0, 2), LPS_TO_RAS @ affine_crs


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


def _scan(voxels: np.ndarray, affine: np.ndarray, ds, reader: str, n_files: int, warn: list[str], spacing=None) -> Scan:
    metadata, prov = _provenance(ds, reader, n_files, warn)
    return Scan(voxels, spacing if spacing is not None else spacing_zyx(affine), affine, _modality(ds), metadata, prov)


def _with_float_retry(fill: Callable[[Any], Any], dtype) -> Any:
    """fill(dtype); when a frame's values do not fit int16 after all, fill again in float32."""
    try:
        return fill(dtype)
    except NeedsFloat:
        pass  # leave the except block first: its traceback holds the int16 array
    return fill(np.dtype(np.float32))


def _scan_2d(frame: Frame, n_files: int, extra_warnings: list[str], guard: LoadGuard) -> Scan:
    warn = list(extra_warnings)
    spacing = frame.pixel_spacing
    if spacing is None:
        warn.append("no pixel spacing in the header: 1 mm assumed")
        spacing = (1.0, 1.0)
    rows, cols = frame.shape
    size = SeriesSize(1, rows, cols, samples=3 if frame.colour else 1, unit="images")
    h = frame.file.header
    transient = 2 * h.frames * rows * cols * h.samples * max(1, h.bits_allocated // 8)

    def fill(dtype) -> Scan:
        with guard.admit(size, np.float32 if frame.colour else dtype, transient_bytes=transient, what="image") as r:
            pixels = assembly.image_pixels(frame, frame.file.decode()[frame.index], dtype, r.track)
        affine = np.eye(4)
        if frame.iop is not None and frame.ipp is not None:
            affine = dicom_affine(frame.iop, spacing, frame.ipp, slice_normal(frame.iop) * (frame.thickness or 1.0))
        else:
            affine[0, 0], affine[1, 1] = spacing[1], spacing[0]
        return _scan(pixels, affine, frame.ds, "dicom-image", n_files, warn, spacing=spacing)

    return _with_float_retry(fill, assembly.storage_dtype([frame]))


def _stack_without_geometry(frames: list[Frame], guard: LoadGuard, skipped: list[Skipped]) -> Scan:
    """A multi-frame file with no per-frame positions (cine, NM, US loops)."""
    first = min(frames, key=lambda f: f.order)
    ds = first.ds
    warn = ["frames have no patient positions: shown as a stack in acquisition order, geometry unknown"]
    if first.colour:
        warn.append("colour frames shown in greyscale")
    spacing2 = first.pixel_spacing or (1.0, 1.0)
    step = _float(_get(ds, "SpacingBetweenSlices")) or first.thickness or 1.0
    rows, cols = first.shape
    size = SeriesSize(len(frames), rows, cols, unit="frames")
    h = first.file.header
    transient = 2 * h.frames * rows * cols * h.samples * max(1, h.bits_allocated // 8)

    def fill(dtype) -> Scan:
        with guard.admit(size, np.float32 if first.colour else dtype, transient_bytes=transient, what="multi-frame image") as r:
            voxels, bad = assembly.fill_stack(frames, dtype, r.track)
        if bad:
            raise ScanError(next(iter(bad.values())))
        affine = np.diag([spacing2[1], spacing2[0], step, 1.0])
        scan = _scan(voxels, affine, ds, "dicom-multiframe", 1, warn, spacing=(step, spacing2[0], spacing2[1]))
        scan.provenance.frames_as_stored = True  # burned-in text is read on the frames as acquired (engine.redact)
        return scan

    return _with_float_retry(fill, assembly.storage_dtype(frames))


def _assemble_volume(frames: list[Frame], n_files: int, reader: str, guard: LoadGuard, skipped: list[Skipped]) -> Scan | None:
    """Frames sharing orientation and matrix -> one RAS+ volume (or 4D series), checked against the bounds first.

    Files that fail to decode are reported in `skipped` and the volume is
    planned again without them (at most once more: the first fill finds them all).
    """
    for _attempt in range(2):
        plan = assembly.plan_volume(frames)
        if plan.single_image:
            return _scan_2d(frames[plan.clusters[0][0]], n_files, plan.warnings, guard)

        bad: dict = {}

        def fill(dtype, plan=plan) -> Scan | None:
            with guard.admit(plan.size(), dtype, transient_bytes=plan.transient_bytes()) as r:
                voxels, affine, failed = assembly.fill_volume(plan, dtype, r.track)
            if failed:
                bad.update(failed)
                return None
            n = len({f.name for f in plan.frames}) if n_files > 1 else n_files
            return _scan(voxels, affine, plan.frames[0].ds, reader, n, plan.warnings)

        scan = _with_float_retry(fill, assembly.storage_dtype(frames))
        if scan is not None:
            return scan
        for file, reason in bad.items():
            prefix = file.name + ": "
            skipped.append(Skipped(file.name, reason[len(prefix) :] if reason.startswith(prefix) else reason))
        frames = [f for f in frames if f.file not in bad]
        if not frames:
            return None  # every file failed, and each is reported already
    raise ScanError("the series' pixel data could not be decoded")


def _assemble_mosaics(files: list[DicomFile], guard: LoadGuard, skipped: list[Skipped]) -> Scan:
    files = sorted(files, key=lambda f: _order_key(f.ds))
    h = files[0].header
    size = SeriesSize(len(files), h.rows, h.cols, unit="mosaic images")
    with guard.admit(size, np.float32, transient_bytes=3 * size.nbytes(np.float32), what="mosaic series") as r:
        mosaics = []
        for f in files:
            try:
                mosaics.append((f,) + _read_mosaic(f))
            except ScanError as exc:
                reason = str(exc)
                skipped.append(Skipped(f.name, reason[len(f.name) + 2 :] if reason.startswith(f.name + ": ") else reason))
        if not mosaics:
            raise ScanError("no mosaic of this series could be unpacked")
        first = mosaics[0]
        warn: list[str] = []
        kept = [m for m in mosaics if m[1].shape == first[1].shape and np.allclose(m[2], first[2], atol=1e-3)]
        if len(kept) < len(mosaics):
            warn.append(f"{len(mosaics) - len(kept)} mosaic file(s) with different geometry left out")
        data = np.stack([m[1] for m in kept], axis=-1)
        del mosaics
        if data.shape[-1] == 1:
            data = data[..., 0]
        data, affine = to_canonical(data, first[2])
        voxels = r.track(xyz_to_scan_order(data))
    return _scan(voxels, affine, first[0].ds, "dicom-mosaic", len(kept), warn)


def _series_key(ds, name: str) -> str:
    """SeriesInstanceUID; without one (seen in exported data), the best stand-in."""
    uid = str(_get(ds, "SeriesInstanceUID") or "")
    if uid:
        return uid
    folder = name.rsplit("/", 1)[0] if "/" in name else ""
    parts = [str(_get(ds, k) or "") for k in ("StudyInstanceUID", "SeriesNumber", "FrameOfReferenceUID", "Modality")]
    return "no-series-uid|" + "|".join(parts + [folder])


IOP_TOLERANCE = 1e-3  # direction cosines closer than this are the same orientation (scanners write noisy IOPs)


def _split_by_geometry(frames: list[Frame]) -> list[list[Frame]]:
    """Sub-series: same matrix/echo/image type and orientation within IOP_TOLERANCE."""
    groups: list[tuple[tuple, np.ndarray, list[Frame]]] = []
    for f in frames:
        key = f.key
        for gkey, giop, members in groups:
            if gkey == key and np.max(np.abs(giop - f.iop)) <= IOP_TOLERANCE:
                members.append(f)
                break
        else:
            groups.append((key, f.iop, [f]))
    return [members for _, _, members in groups]


def _header_pass(sources: Iterable[Source], skipped: list[Skipped]) -> tuple[dict[str, list[DicomFile]], list[DicomFile]]:
    """({series key: single-frame and mosaic files}, multi-frame files); unreadable headers become `Skipped`."""
    by_series: dict[str, list[DicomFile]] = defaultdict(list)
    multiframe: list[DicomFile] = []
    for source in sources:
        try:
            file = _read_header(source)
        except ScanError as exc:
            skipped.append(Skipped(source.name, str(exc).split(": ", 1)[-1] if str(exc).startswith(source.name) else str(exc)))
            continue
        except MemoryError:
            skipped.append(Skipped(source.name, "image too large to load into memory"))
            continue
        except Exception as exc:  # pydicom raises many types on corrupt headers
            skipped.append(Skipped(source.name, f"not a readable DICOM file ({_short(exc)})"))
            continue
        if file.header.frames > 1 and not file.mosaic:
            multiframe.append(file)
        else:
            by_series[_series_key(file.ds, source.name)].append(file)
    return by_series, multiframe


def read_dicom(sources: Iterable[Source], guard: LoadGuard | None = None) -> tuple[list[Scan], list[Skipped]]:
    """All scans found in DICOM sources (iterated once: a stream works); unreadable files and scans over a memory bound become `Skipped`."""
    guard = guard or LoadGuard()
    skipped: list[Skipped] = []
    by_series, multiframe = _header_pass(sources, skipped)
    scans: list[Scan] = []

    def attempt(label: str, build: Callable[[], Scan | None]) -> Scan | None:
        try:
            scan = build()
            if scan is not None:
                scans.append(scan)
            return scan
        except ScanError as exc:
            skipped.append(Skipped(label, str(exc)))
        except MemoryError:
            skipped.append(Skipped(label, "series too large to load into memory"))
        except Exception as exc:
            skipped.append(Skipped(label, f"series could not be assembled ({_short(exc)})"))
        return None

    for file in multiframe:
        frames = _frames_of(file)
        if all(f.ipp is not None and f.iop is not None for f in frames):
            for group in _split_by_geometry(frames):
                attempt(file.name, lambda group=group: _assemble_volume(group, 1, "dicom-multiframe", guard, skipped))
        else:
            attempt(file.name, lambda frames=frames: _stack_without_geometry(frames, guard, skipped))

    for files in by_series.values():
        mosaics = [f for f in files if f.mosaic]
        if mosaics:
            attempt(mosaics[0].name, lambda: _assemble_mosaics(mosaics, guard, skipped))
        frames = [fr for f in files if not f.mosaic for fr in _frames_of(f)]
        for f in (f for f in frames if f.ipp is None or f.iop is None):
            attempt(f.name, lambda f=f: _scan_2d(f, 1, [], guard))
        groups = _split_by_geometry([f for f in frames if f.ipp is not None and f.iop is not None])
        note = f"series split into {len(groups)} parts (different orientation, matrix, echo or image type)" if len(groups) > 1 else None
        for group in groups:
            scan = attempt(
                group[0].name, lambda group=group: _assemble_volume(group, len({f.name for f in group}), "dicom-series", guard, skipped)
            )
            if note and scan is not None:
                scan.provenance.warnings.append(note)
    return scans, skipped
