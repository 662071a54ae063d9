"""2D images (PNG, JPEG, TIFF, BMP) through Pillow.

Design decisions
- Grey images (8/16-bit, float) stay single-channel with their real values
  (int16 when they are integers that fit, else float32; engine.scan); colour
  images become RGB float32 0..255 unless all three channels are equal, in
  which case they are grey (common for exported radiographs).
- Pillow's decompression-bomb guard is kept and backed by our own pixel cap
  and by the memory bounds (engine.memory), checked from the declared size
  before the image is decoded.
- EXIF and text chunks are never read into the Scan (they can hold names).
- A multi-page TIFF gives its first page, with a warning.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

from engine.memory import LoadGuard, SeriesSize
from engine.scan import Modality, Provenance, Scan, ScanError

MAX_PIXELS = 200_000_000
_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM", b"RIFF")


def looks_like_image(head: bytes, name: str) -> bool:
    return name.lower().endswith(_IMAGE_EXT) or head.startswith(_MAGIC)


_GREY_MODES = ("I;16", "I;16B", "I;16L", "I", "F", "L", "1", "LA", "La")


def _open(source, warn: list[str]):
    """Pillow's lazy open: the size is known, nothing decoded yet."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source.read()))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ScanError(f"{source.name}: image dimensions look like a decompression bomb; refused") from None
    except Exception as exc:
        raise ScanError(f"{source.name}: not a readable image ({_short(exc)})") from None
    if img.width * img.height > MAX_PIXELS:
        raise ScanError(f"{source.name}: image is {img.width}x{img.height} pixels, too large to load")
    n_frames = getattr(img, "n_frames", 1)
    if n_frames > 1:
        warn.append(f"multi-page image: first of {n_frames} pages shown")
    return img


def _decode(img, name: str):
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            return ImageOps.exif_transpose(img)  # camera/phone photos (dermoscopy, fundus) carry rotation in EXIF
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ScanError(f"{name}: image dimensions look like a decompression bomb; refused") from None
    except Exception as exc:
        raise ScanError(f"{name}: not a readable image ({_short(exc)})") from None


def _grey(values: np.ndarray) -> np.ndarray:
    """Grey values as int16 when they are integers that fit (8-bit, most 16-bit), else float32 (engine.scan)."""
    if values.dtype.kind in "iub" and values.size and -32768 <= int(values.min()) and int(values.max()) <= 32767:
        return values.astype(np.int16)
    return values.astype(np.float32)


def _pixels(img) -> np.ndarray:
    if img.mode in ("LA", "La"):
        return _grey(np.asarray(img.getchannel(0)))
    if img.mode in _GREY_MODES:
        return _grey(np.asarray(img))
    rgb = np.asarray(img.convert("RGB"))
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
        return _grey(rgb[..., 0])
    return rgb.astype(np.float32)


def read_image(source, modality: Modality | None = None, guard: LoadGuard | None = None) -> Scan:
    """One 2D image -> Scan; its size is checked against the memory bounds (engine.memory) before decoding."""
    guard = guard or LoadGuard()
    warn: list[str] = []
    img = _open(source, warn)
    size = SeriesSize(1, img.height, img.width, samples=1 if img.mode in _GREY_MODES else 3, unit="images")
    transient = 3 * img.width * img.height * max(len(img.getbands()), 1) * 4
    with guard.admit(size, np.float32, transient_bytes=transient, what="image") as r:
        arr = r.track(_pixels(_decode(img, source.name)))
    if arr.ndim < 2 or min(arr.shape[:2]) < 1:
        raise ScanError(f"{source.name}: image has no pixels")
    prov = Provenance(reader="image2d", n_files=1, warnings=warn)
    return Scan(arr, (1.0, 1.0), np.eye(4), modality or Modality.OTHER, {}, prov)


def _short(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
