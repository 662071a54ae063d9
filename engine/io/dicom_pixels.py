"""DICOM pixel decoding, with the header checked against the data first.

Design decisions
- Native decoders are C/C++ and trust the header: GDCM aborts the whole
  process (SIGABRT) when Rows/Columns/SamplesPerPixel/bit depth disagree with
  the JPEG or JPEG 2000 codestream, and one hostile upload must not take the
  app server down. So before decoding we check the header for internal
  consistency and against the codestream's own header (JPEG SOF, JPEG-LS
  SOF55, JPEG 2000 SIZ), and refuse with a specific message on mismatch.
- Decoder routing, explicit: JPEG 2000 -> pylibjpeg-openjpeg, JPEG-LS ->
  pyjpegls, JPEG baseline/extended/lossless -> python-gdcm (then Pillow), RLE
  -> pydicom; falling back to pydicom's own order if a plugin is missing.
- Uncompressed little-endian data (most CT/MR series) skip the decoder
  machinery: `np.frombuffer` on the element's bytes is a zero-copy view, and
  the float conversion happens once, when the slice is written into the
  volume (engine.io.dicom).
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass

import numpy as np

from engine.memory import SeriesSize, check_series
from engine.scan import ScanError

_NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
_JPEG = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"}
_JPEG_LS = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
_J2K = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}
_PLUGIN = {**{uid: "pylibjpeg" for uid in _J2K}, **{uid: "pyjpegls" for uid in _JPEG_LS}, **{uid: "gdcm" for uid in _JPEG}}
_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422"}


@dataclass
class PixelHeader:
    rows: int
    cols: int
    frames: int
    samples: int
    photometric: str
    bits_allocated: int
    bits_stored: int
    signed: bool
    transfer_syntax: str


def _int(ds, keyword: str, default: int | None = None) -> int | None:
    try:
        value = ds.get(keyword)
    except Exception:
        return default
    if value in (None, ""):
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ScanError(f"header attribute {keyword} has an invalid value {str(value)[:20]!r}") from None


def pixel_header(ds, name: str) -> PixelHeader:
    """The attributes that size the pixel data, checked for internal consistency."""
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    frames = _int(ds, "NumberOfFrames", 1) or 1
    samples = _int(ds, "SamplesPerPixel", 1) or 1
    bits_allocated = _int(ds, "BitsAllocated", 0) or 0
    bits_stored = _int(ds, "BitsStored", bits_allocated) or bits_allocated
    signed = (_int(ds, "PixelRepresentation", 0) or 0) == 1
    try:
        photometric = str(ds.get("PhotometricInterpretation", "") or "").upper().strip()
    except Exception:
        photometric = ""
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "1.2.840.10008.1.2")
    if rows <= 0 or cols <= 0:
        raise ScanError(f"image has no rows/columns (Rows={rows}, Columns={cols})")
    if frames <= 0:
        raise ScanError(f"NumberOfFrames is {frames}")
    if samples not in (1, 3):
        raise ScanError(f"SamplesPerPixel is {samples}; only 1 (grey) or 3 (colour) exist in images")
    if photometric in _COLOUR and samples != 3:
        raise ScanError(f"PhotometricInterpretation {photometric} needs 3 samples per pixel, header says {samples}")
    if photometric.startswith("MONOCHROME") and samples != 1:
        raise ScanError(f"PhotometricInterpretation {photometric} needs 1 sample per pixel, header says {samples}")
    if bits_allocated not in (1, 8, 16, 32, 64) or not 1 <= bits_stored <= bits_allocated:
        raise ScanError(f"bit depth is inconsistent (BitsAllocated={bits_allocated}, BitsStored={bits_stored})")
    # one file over the per-series cap is over it as part of any series (engine.memory)
    check_series(SeriesSize(frames, rows, cols, samples, unit="frames"), what="file")
    return PixelHeader(rows, cols, frames, samples, photometric, bits_allocated, bits_stored, signed, ts)


# --------------------------------------------------------------------------- codestream checks
def _j2k_siz(frame: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, components, max precision) from a JPEG 2000 SIZ marker (raw or JP2)."""
    at = frame.find(b"\xff\x4f\xff\x51", 0, 4096)
    if at < 0:
        return None
    siz = frame[at + 4 :]
    if len(siz) < 38:
        return None
    xsiz, ysiz, xo, yo = struct.unpack(">IIII", siz[4:20])
    csiz = struct.unpack(">H", siz[36:38])[0]
    depths = [(siz[38 + 3 * i] & 0x7F) + 1 for i in range(min(csiz, (len(siz) - 38) // 3))]
    return xsiz - xo, ysiz - yo, csiz, max(depths or [0])


def check_codestream(ds, header: PixelHeader) -> None:
    """Refuse compressed data whose own header disagrees with the DICOM header."""
    ts = header.transfer_syntax
    if ts not in _JPEG and ts not in _JPEG_LS and ts not in _J2K:
        return
    from pydicom.encaps import generate_frames
    from pydicom.pixels.utils import _get_jpg_parameters

    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=header.frames))
    except Exception:
        raise ScanError("compressed pixel data has no readable first frame (broken encapsulation)") from None
    if ts in _J2K:
        siz = _j2k_siz(frame)
        if siz is None:
            raise ScanError("JPEG 2000 pixel data has no SIZ header: corrupt")
        width, height, components, precision = siz
    else:
        params = _get_jpg_parameters(frame)
        if not params:
            raise ScanError("JPEG pixel data has no frame header (SOF): corrupt")
        width, height, components, precision = params["width"], params["height"], params["components"], params["precision"]
    if (width, height) != (header.cols, header.rows):
        raise ScanError(f"header says {header.cols}x{header.rows} pixels but the compressed image is {width}x{height}")
    if components != header.samples:
        raise ScanError(f"header says {header.samples} sample(s) per pixel but the compressed image has {components} component(s)")
    if header.bits_allocated not in (8, 16) or precision > header.bits_allocated:
        raise ScanError(f"compressed {precision}-bit samples do not fit BitsAllocated={header.bits_allocated}")
    if header.bits_stored < min(precision, 8):
        raise ScanError(f"BitsStored={header.bits_stored} is below the compressed data's {precision}-bit precision")


# --------------------------------------------------------------------------- decoding
def decode(ds, header: PixelHeader, name: str) -> np.ndarray:
    """Pixels as stored (no rescale): (frames, rows, cols[, 3]) if multi-frame else (rows, cols[, 3])."""
    fast = _native_view(ds, header)
    if fast is not None:
        return fast
    check_codestream(ds, header)
    if header.transfer_syntax in _NATIVE_LE or header.transfer_syntax == "1.2.840.10008.1.2.2":
        _check_native_length(ds, header)
    plugin = _PLUGIN.get(header.transfer_syntax, "")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = _pixel_array(ds, plugin)
    except (NotImplementedError, RuntimeError) as exc:
        ts_name = getattr(getattr(ds.file_meta, "TransferSyntaxUID", None), "name", header.transfer_syntax)
        reasons = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        detail = "; ".join(reasons)[:300] if reasons else _short(exc)
        raise ScanError(f"pixel data compressed as {ts_name} cannot be decoded by the installed decoders ({detail})") from None
    except ScanError:
        raise
    except Exception as exc:  # truncated / corrupt data: decoders raise many types
        raise ScanError(f"pixel data is corrupt or truncated ({_short(exc)})") from None
    if header.photometric == "PALETTE COLOR":
        arr = _palette(arr, ds)
    return arr


def _pixel_array(ds, plugin: str) -> np.ndarray:
    from pydicom.pixels import pixel_array

    if plugin:
        try:
            return pixel_array(ds, decoding_plugin=plugin)
        except (ValueError, NotImplementedError, RuntimeError) as exc:
            if "not available" not in str(exc) and "no plugin" not in str(exc).lower() and "unknown" not in str(exc).lower():
                raise
    return ds.pixel_array


def _palette(arr: np.ndarray, ds) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    try:
        rgb = apply_color_lut(arr, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    except Exception as exc:
        raise ScanError(f"palette colour lookup table is unusable ({_short(exc)})") from None
    # 16-bit LUT entries -> the 0-255 range every other colour image uses.
    return (rgb / 257.0).astype(np.float32) if bits == 16 else rgb


def _check_native_length(ds, header: PixelHeader) -> None:
    data = ds.get("PixelData")
    if data is None or not isinstance(data, (bytes, bytearray)):
        return
    samples = {"YBR_FULL_422": 2, "YBR_PARTIAL_422": 2, "YBR_PARTIAL_420": 1.5}.get(header.photometric, header.samples)
    expected = int(header.rows * header.cols * header.frames * samples * header.bits_allocated // 8)
    if header.bits_allocated == 1:
        expected = (header.rows * header.cols * header.frames + 7) // 8
    if len(data) < expected:
        raise ScanError(
            f"pixel data holds {len(data):,} bytes but the header implies {expected:,} "
            f"({header.rows}x{header.cols}x{header.frames} frames x {header.bits_allocated} bits): truncated or wrong header"
        )


def _native_view(ds, header: PixelHeader) -> np.ndarray | None:
    """Zero-copy pixels for plain little-endian grey data (the common CT/MR case), else None."""
    if header.transfer_syntax not in _NATIVE_LE or header.samples != 1 or header.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return None
    if header.bits_allocated not in (8, 16, 32):
        return None
    try:
        data = ds.get("PixelData")
    except Exception:
        return None
    if not isinstance(data, (bytes, bytearray)):
        return None
    _check_native_length(ds, header)
    dtype = np.dtype(f"<{'i' if header.signed else 'u'}{header.bits_allocated // 8}")
    n = header.rows * header.cols * header.frames
    arr = np.frombuffer(data, dtype=dtype, count=n)
    if header.bits_stored < header.bits_allocated:
        # Values must already lie in the BitsStored range; otherwise the unused high bits hold
        # overlays (unsigned) or the sign is not extended (signed): pydicom's decoder handles those.
        lo, hi = (
            (-(1 << (header.bits_stored - 1)), (1 << (header.bits_stored - 1)) - 1) if header.signed else (0, (1 << header.bits_stored) - 1)
        )
        if arr.size and (int(arr.min()) < lo or int(arr.max()) > hi):
            return None
    return arr.reshape((header.frames, header.rows, header.cols) if header.frames > 1 else (header.rows, header.cols))


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text[:200] if text else f"{type(exc).__name__} in the decoder"
