"""Write synthetic CT series of any size with pydicom, for the memory tests and bench/memory.py.

Nothing is committed: callers write into a temporary folder (or zip) and
delete it. Pixel content:
- "phantom": a water cylinder (0 HU) in air (-1000 HU) with a bone ring
  (+700 HU), drawn per slice with a radius that changes along z, stored as
  unsigned 12-bit with intercept -1024 (the common CT layout);
- "zeros": all stored values 0 (compresses to almost nothing under RLE or a
  zip's deflate, the "small upload, huge series" case);
- "garbage": random bytes of the right length (RLE: undecodable);
- "truncated": a quarter of the bytes the header promises.
The headers are valid in every case, so only a reader that decodes pixels
can tell garbage from a scan.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def phantom_slice(k: int, n: int, rows: int, cols: int) -> np.ndarray:
    """Stored values (uint16, HU + 1024) of slice k of n."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    r = np.hypot(yy - rows / 2, xx - cols / 2)
    radius = 0.35 * min(rows, cols) * (0.6 + 0.4 * np.sin(np.pi * (k + 0.5) / n))
    hu = np.full((rows, cols), -1000, np.int32)
    hu[r < radius] = 0
    hu[(r >= 0.85 * radius) & (r < radius)] = 700
    return (hu + 1024).astype(np.uint16)


def _template(rows: int, cols: int, transfer_syntax: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.SeriesNumber = "CT", 1
    ds.PatientName, ds.PatientID = "Synthetic^Memory", "MEM0001"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 0.6
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    return ds


def _pixel_bytes(kind: str, k: int, n: int, rows: int, cols: int, rle: bool) -> bytes:
    if kind == "phantom":
        raw = phantom_slice(k, n, rows, cols).tobytes()
    elif kind == "zeros":
        raw = bytes(rows * cols * 2)
    elif kind == "garbage":
        if rle:
            from pydicom.encaps import encapsulate

            return encapsulate([os.urandom(rows * cols // 4)])
        return os.urandom(rows * cols * 2)
    elif kind == "truncated":
        return os.urandom(rows * cols * 2 // 4)
    else:
        raise ValueError(f"unknown pixel kind {kind!r}")
    if rle:
        from pydicom.encaps import encapsulate
        from pydicom.pixels.encoders.base import RLELosslessEncoder

        encoded = RLELosslessEncoder.encode(
            np.frombuffer(raw, np.uint16).reshape(rows, cols),
            rows=rows,
            columns=cols,
            samples_per_pixel=1,
            bits_allocated=16,
            bits_stored=12,
            pixel_representation=0,
            photometric_interpretation="MONOCHROME2",
            number_of_frames=1,
        )
        return encapsulate([encoded])
    return raw


def write_ct_series(
    folder: Path,
    n_slices: int,
    rows: int = 512,
    cols: int = 512,
    *,
    pixels: str = "phantom",
    rle: bool = False,
    zip_path: Path | None = None,
) -> list[Path] | Path:
    """Write n_slices CT files (0.6 mm apart) into folder, or straight into zip_path (then return it)."""
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

    ds = _template(rows, cols, RLELossless if rle else ExplicitVRLittleEndian)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    zf = zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) if zip_path else None
    zero_rle = _pixel_bytes("zeros", 0, 1, rows, cols, True) if (rle and pixels == "zeros") else None
    paths: list[Path] = []
    try:
        for k in range(n_slices):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [-179.2, -179.2, 0.6 * k]
            ds.SliceLocation = 0.6 * k
            ds.PixelData = zero_rle if zero_rle is not None else _pixel_bytes(pixels, k, n_slices, rows, cols, rle)
            if rle:
                ds["PixelData"].VR = "OB"
            path = folder / f"s{(k * 7919) % 100003:06d}.dcm"  # names unrelated to slice order
            ds.save_as(path, enforce_file_format=True)
            if zf is not None:
                zf.write(path, f"series/{path.name}")
                path.unlink()
            else:
                paths.append(path)
    finally:
        if zf is not None:
            zf.close()
    return zip_path if zip_path else paths
