"""2D images (PNG, JPEG, TIFF, BMP) through Pillow.

Design decisions
- Grey images (8/16-bit, float) stay single-channel float32 with their real
  values; colour images become RGB float32 0..255 unless all three channels
  are equal, in which case they are grey (common for exported radiographs).
- Pillow's decompression-bomb guard is kept and backed by our own pixel cap.
- EXIF and text chunks are never read into the Scan (they can hold names).
- A multi-page TIFF gives its first page, with a warning.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

from engine.scan import Modality, Provenance, Scan, ScanError

MAX_PIXELS = 200_000_000
_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM", b"RIFF")


def looks_like_image(head: bytes, name: str) -> bool:
    return name.lower().endswith(_IMAGE_EXT) or head.startswith(_MAGIC)


def read_image(source, modality: Modality | None = None) -> Scan:
    from PIL import Image, ImageOps

    warn: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source.read()))
            if img.width * img.height > MAX_PIXELS:
                raise ScanError(f"{source.name}: image is {img.width}x{img.height} pixels, too large to load")
            n_frames = getattr(img, "n_frames", 1)
            if n_frames > 1:
                warn.append(f"multi-page image: first of {n_frames} pages shown")
            img.load()
            img = ImageOps.exif_transpose(img)  # camera/phone photos (dermoscopy, fundus) carry rotation in EXIF
    except ScanError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ScanError(f"{source.name}: image dimensions look like a decompression bomb; refused") from None
    except Exception as exc:
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ScanError(f"{source.name}: not a readable image ({text})") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F", "L", "1"):
        arr = np.asarray(img, dtype=np.float32)
    elif img.mode in ("LA", "La"):
        arr = np.asarray(img.getchannel(0), dtype=np.float32)
    else:
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
            arr = rgb[..., 0].copy()
        else:
            arr = rgb
    if arr.ndim < 2 or min(arr.shape[:2]) < 1:
        raise ScanError(f"{source.name}: image has no pixels")
    prov = Provenance(reader="image2d", n_files=1, warnings=warn)
    affine = np.eye(4)
    return Scan(arr, (1.0, 1.0), affine, modality or Modality.OTHER, {}, prov)
