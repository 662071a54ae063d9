"""NIfTI reader (.nii, .nii.gz; NIfTI-1 and -2; 3D and 4D).

Design decisions
- nibabel does the format work; we bring every volume to closest-canonical
  RAS+ (`as_closest_canonical`) and keep all volumes of a 4D file so the user
  can choose one (`Scan.volume(t)`).
- Header text fields (descrip, aux_file, intent_name, db_name) may hold
  anything a converter put there, so none of them is carried into a Scan.
- Headers are untrusted: the voxel count is checked before any data is read,
  and zip members are decompressed with a hard size cap.
- Modality is not stored in NIfTI. It is guessed from intensities (CT when
  values sit on the Hounsfield scale, air near -1000) and the guess is
  stated as a warning; callers may override it.
"""

from __future__ import annotations

import gzip
import io
import warnings

import numpy as np

from engine.io.dicom import MAX_VOXELS
from engine.io.geometry import spacing_zyx, xyz_to_scan_order
from engine.io.sources import Source
from engine.scan import Modality, Provenance, Scan, ScanError


def looks_like_nifti(head: bytes, name: str) -> bool:
    lower = name.lower()
    if lower.endswith((".nii", ".nii.gz")):
        return True
    if len(head) >= 348 + 4:
        for order in ("<", ">"):
            size = int(np.frombuffer(head[:4], dtype=order + "i4")[0])
            if size == 348 and head[344:347] in (b"n+1", b"ni1"):
                return True
            if size == 540 and head[4:7] in (b"n+2", b"ni2"):
                return True
    return False


def _gunzip_capped(data: bytes, cap: int, name: str) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as gz:
        while True:
            chunk = gz.read(1 << 20)
            if not chunk:
                break
            out.write(chunk)
            if out.tell() > cap:
                raise ScanError(f"{name}: compressed NIfTI unpacks to more than {cap / 2**30:.1f} GiB; refused")
    return out.getvalue()


def _load_image(source: Source):
    import nibabel as nib

    if source.path:
        return nib.load(source.path)
    data = source.read()
    if data[:2] == b"\x1f\x8b":
        data = _gunzip_capped(data, MAX_VOXELS * 8, source.name)
    for klass in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            return klass.from_bytes(data)
        except Exception:
            continue
    raise ScanError(f"{source.name}: not a valid NIfTI-1 or NIfTI-2 file")


def guess_modality(voxels: np.ndarray) -> tuple[Modality, str | None]:
    sample = voxels.ravel()[:: max(1, voxels.size // 200_000)]
    lo, p50 = float(np.percentile(sample, 1)), float(np.percentile(sample, 50))
    # Air at about -1000 HU; scanners pad outside the field of view with down to -3024.
    if -1300 <= lo <= -850 and float(np.min(sample)) >= -3100 and p50 < 400:
        return Modality.CT, "modality guessed as CT from Hounsfield-like intensities (NIfTI stores no modality)"
    return Modality.OTHER, "modality unknown (NIfTI stores none): choose it if it matters"


def read_nifti(source: Source, modality: Modality | None = None) -> Scan:
    import nibabel as nib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            img = _load_image(source)
        except ScanError:
            raise
        except Exception as exc:
            raise ScanError(f"{source.name}: not a readable NIfTI file ({_short(exc)})") from None
        shape = tuple(int(s) for s in img.shape)
        if len(shape) < 2 or any(s <= 0 for s in shape):
            raise ScanError(f"{source.name}: NIfTI header gives an empty image shape {shape}")
        if len(shape) > 4:
            squeezed = tuple(s for i, s in enumerate(shape) if i < 3 or s > 1)
            if len(squeezed) > 4:
                raise ScanError(f"{source.name}: {len(shape)}-D NIfTI (shape {shape}) is not supported; 2D, 3D and 4D are")
        if int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
            raise ScanError(f"{source.name}: NIfTI claims {np.prod(shape, dtype=np.int64):,} voxels, too large to load")
        affine = img.affine
        if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise ScanError(f"{source.name}: NIfTI affine is missing or degenerate; cannot place the volume in space")
        try:
            canonical = nib.as_closest_canonical(img)
            data = np.asarray(canonical.dataobj, dtype=np.float32)
        except Exception as exc:
            raise ScanError(f"{source.name}: NIfTI data is truncated or corrupt ({_short(exc)})") from None
    if data.ndim > 4:
        data = data.reshape(data.shape[:3] + (-1,))
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if not np.all(np.isfinite(data)):
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
        warn_nonfinite = ["non-finite voxel values (NaN/inf) replaced by 0"]
    else:
        warn_nonfinite = []
    affine = canonical.affine
    voxels = xyz_to_scan_order(data)
    warn = list(warn_nonfinite)
    if modality is None:
        modality, note = guess_modality(voxels)
        if note:
            warn.append(note)
    prov = Provenance(reader="nifti", n_files=1, warnings=warn)
    return Scan(voxels, spacing_zyx(affine), affine, modality, {}, prov)


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]
