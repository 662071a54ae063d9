"""NIfTI reader (.nii, .nii.gz; NIfTI-1 and -2; 3D and 4D).

Design decisions
- nibabel does the format work; we bring every volume to closest-canonical
  RAS+ (`as_closest_canonical`) and keep all volumes of a 4D file so the user
  can choose one (`Scan.volume(t)`).
- Header text fields (descrip, aux_file, intent_name, db_name) may hold
  anything a converter put there, so none of them is carried into a Scan.
- Headers are untrusted: the voxel count is checked against the per-series
  cap (engine.memory) before any data is read, and a zipped .nii.gz is only
  inflated as far as that checked header says.
- Voxels are written plane by plane into the final RAS+ array (int16 when the
  scaled values are integers that fit, else float32; engine.scan), from a
  memory map of an uncompressed file: no float64 copy, no reorientation copy.
- Modality is not stored in NIfTI. It is guessed from intensities (CT when
  values sit on the Hounsfield scale, air near -1000) and the guess is
  stated as a warning; callers may override it.
"""

from __future__ import annotations

import gzip
import io
import warnings

import numpy as np

from engine.io.geometry import spacing_zyx
from engine.io.sources import Source
from engine.memory import LoadGuard, SeriesSize, check_series
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


def _load_image(source: Source):
    """A nibabel image whose data are not read yet (a path is memory-mapped; a zip member's
    .nii.gz is inflated only as far as its header says, when the data are read)."""
    import nibabel as nib

    if source.path:
        return nib.load(source.path)
    data = source.read()
    for klass in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            stream = gzip.GzipFile(fileobj=io.BytesIO(data)) if data[:2] == b"\x1f\x8b" else io.BytesIO(data)
            return klass.from_stream(stream)
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


def _shape(img, name: str) -> tuple[int, ...]:
    """The header's shape as (x, y, z[, t]), checked before any voxel is read."""
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 2 or any(s <= 0 for s in shape):
        raise ScanError(f"{name}: NIfTI header gives an empty image shape {shape}")
    if len(shape) > 4:
        squeezed = tuple(s for i, s in enumerate(shape) if i < 3 or s > 1)
        if len(squeezed) > 4:
            raise ScanError(f"{name}: {len(shape)}-D NIfTI (shape {shape}) is not supported; 2D, 3D and 4D are")
        shape = shape[:3] + (int(np.prod(shape[3:], dtype=np.int64)),)
    if len(shape) == 2:
        shape = shape + (1,)
    return shape


def _raw_and_scaling(img) -> tuple[np.ndarray, float, float]:
    """(stored values (x, y, z[, t]) -- a memory map for an uncompressed file --, slope, intercept)."""
    proxy = img.dataobj
    if hasattr(proxy, "get_unscaled"):
        raw = proxy.get_unscaled()
        slope, inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
    else:
        raw, slope, inter = np.asarray(proxy), 1.0, 0.0
    slope = 1.0 if not np.isfinite(slope) or slope == 0 else slope
    inter = 0.0 if not np.isfinite(inter) else inter
    return raw, slope, inter


def _storage_dtype(raw: np.ndarray, slope: float, inter: float) -> np.dtype:
    """int16 when the scaled values are integers that fit (CT in HU, label maps), else float32 (engine.scan)."""
    if raw.dtype.kind not in "iub" or raw.size == 0 or abs(slope - round(slope)) > 1e-9 or abs(inter - round(inter)) > 1e-9:
        return np.dtype(np.float32)
    lo, hi = sorted((int(raw.min()) * slope + inter, int(raw.max()) * slope + inter))
    return np.dtype(np.int16) if -32768 <= lo and hi <= 32767 else np.dtype(np.float32)


def _fill(view: np.ndarray, raw: np.ndarray, slope: float, inter: float) -> bool:
    """Write raw * slope + inter plane by plane into `view` (x, y, z, t); True when non-finite values became 0."""
    from engine.io.dicom_assembly import place

    raw4 = raw.reshape(view.shape, order="F") if raw.ndim != 4 else raw
    nonfinite = False
    for t in range(view.shape[3]):
        for k in range(view.shape[2]):
            target = view[:, :, k, t]
            place(target, raw4[:, :, k, t], slope, inter)
            if target.dtype.kind == "f" and not np.isfinite(target).all():
                np.copyto(target, np.nan_to_num(target, nan=0.0, posinf=0.0, neginf=0.0))
                nonfinite = True
    return nonfinite


def read_nifti(source: Source, modality: Modality | None = None, guard: LoadGuard | None = None) -> Scan:
    """One NIfTI file -> a RAS+ Scan, its size checked against the memory bounds before any voxel is read."""
    from engine.io.dicom_assembly import canonical_target

    guard = guard or LoadGuard()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            img = _load_image(source)
        except ScanError:
            raise
        except Exception as exc:
            raise ScanError(f"{source.name}: not a readable NIfTI file ({_short(exc)})") from None
        shape = _shape(img, source.name)
        size = SeriesSize(shape[2], shape[1], shape[0], volumes=shape[3] if len(shape) > 3 else 1)
        check_series(size, "NIfTI volume")
        affine = img.affine
        if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise ScanError(f"{source.name}: NIfTI affine is missing or degenerate; cannot place the volume in space")
        n_t = shape[3] if len(shape) > 3 else 1
        transient = 0 if source.path and not source.path.lower().endswith(".gz") else size.voxels * img.get_data_dtype().itemsize
        try:
            raw, slope, inter = _raw_and_scaling(img)
            dtype = _storage_dtype(raw, slope, inter)
            with guard.admit(size, dtype, transient_bytes=transient, what="NIfTI volume") as r:
                final, view, affine = canonical_target(np.asarray(affine, dtype=float), (shape[0], shape[1], shape[2], n_t), dtype)
                r.track(final)
                nonfinite = _fill(view, raw, slope, inter)
        except ScanError:
            raise
        except Exception as exc:
            raise ScanError(f"{source.name}: NIfTI data is truncated or corrupt ({_short(exc)})") from None
        del raw
    warn = ["non-finite voxel values (NaN/inf) replaced by 0"] if nonfinite else []
    if modality is None:
        modality, note = guess_modality(final)
        if note:
            warn.append(note)
    prov = Provenance(reader="nifti", n_files=1, warnings=warn)
    return Scan(final, spacing_zyx(affine), affine, modality, {}, prov)


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]
