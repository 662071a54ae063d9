"""The `Scan`: one study the user looks at, whatever file it came from.

Design decisions
- Voxels are float32 in physical units where the modality has them (CT in
  Hounsfield units after the modality LUT), in array order (z, y, x) for a
  volume, (t, z, y, x) for a time series / multi-volume NIfTI, (y, x) for a
  grey 2D image and (y, x, 3) for colour.
- Every volume is stored in closest-canonical RAS+ order: array axis x
  increases towards the patient's Right, y towards Anterior, z towards
  Superior (nibabel's `as_closest_canonical`). Display code flips for the
  radiological convention; models see one consistent orientation.
- `affine` maps a voxel index (x, y, z, 1) -- NIfTI's index order, i.e. the
  array axes reversed -- to RAS+ millimetres, so `nibabel.Nifti1Image(
  voxels.T, affine)` is the volume on disk.
- `metadata` holds only de-identified values (see engine.deid); nothing
  identifying, not even the source file name, is kept on a Scan.
- `origin` is the one exception, and only for scans read from a PACS: an
  engine.pacs.PacsOrigin (real UIDs, patient and study attributes), held in
  memory to write results back into that study on that PACS. It is not in
  `summary()`, refuses to be pickled, and nothing stores it (engine.pacs).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import numpy as np

from engine.errors import MedLensError


class ScanError(MedLensError):
    """A scan could not be read; the message says what to do about it."""


class Modality(str, Enum):
    CT = "CT"
    MR = "MR"
    XRAY = "XRAY"  # CR, DX, MG, XA, RF
    US = "US"
    PATHOLOGY = "PATHOLOGY"
    FUNDUS = "FUNDUS"
    DERMOSCOPY = "DERMOSCOPY"
    OTHER = "OTHER"

    @classmethod
    def from_dicom(cls, code: str | None) -> "Modality":
        code = (code or "").upper().strip()
        return _DICOM_MODALITY.get(code, cls.OTHER)


_DICOM_MODALITY = {
    "CT": Modality.CT,
    "MR": Modality.MR,
    "CR": Modality.XRAY,
    "DX": Modality.XRAY,
    "MG": Modality.XRAY,
    "XA": Modality.XRAY,
    "RF": Modality.XRAY,
    "PX": Modality.XRAY,
    "IO": Modality.XRAY,
    "US": Modality.US,
    "SM": Modality.PATHOLOGY,
    "OP": Modality.FUNDUS,
}


@dataclass
class Provenance:
    """How a scan was read. Holds no identifying value (no paths, no names)."""

    reader: str  # e.g. "dicom-series", "dicom-multiframe", "dicom-mosaic", "nifti", "image2d"
    transfer_syntax: str | None = None  # DICOM transfer syntax name, if any
    n_files: int = 1
    warnings: list[str] = field(default_factory=list)
    removed_attributes: list[str] = field(default_factory=list)  # de-identification: keywords dropped
    burned_in_text_risk: bool = False  # pixels may show identifying text (US, secondary capture, ...)


@dataclass
class Scan:
    voxels: np.ndarray
    spacing: tuple[float, ...]  # mm per array axis of one volume: (z, y, x) or (y, x)
    affine: np.ndarray  # 4x4, voxel (x, y, z) -> RAS+ mm; for 2D the z column is a unit normal
    modality: Modality
    metadata: dict[str, Any] = field(default_factory=dict)
    provenance: Provenance = field(default_factory=lambda: Provenance(reader="unknown"))
    _content_hash: str = field(default="", repr=False)
    origin: Any = field(default=None, repr=False, compare=False)  # engine.pacs.PacsOrigin for PACS scans, else None

    def __post_init__(self) -> None:
        self.voxels = np.ascontiguousarray(self.voxels, dtype=np.float32)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        self.spacing = tuple(float(s) for s in self.spacing)

    @property
    def content_hash(self) -> str:
        """SHA-256 of pixels + geometry, computed on first use (hashing a big 4D series is not free)."""
        if not self._content_hash:
            self._content_hash = hash_voxels(self.voxels, self.affine)
        return self._content_hash

    # --- shape helpers ---------------------------------------------------
    @property
    def is_color(self) -> bool:
        return self.voxels.ndim == 3 and self.voxels.shape[-1] == 3 and len(self.spacing) == 2

    @property
    def is_2d(self) -> bool:
        return len(self.spacing) == 2

    @property
    def n_volumes(self) -> int:
        return self.voxels.shape[0] if self.voxels.ndim == 4 else 1

    @property
    def volume_shape(self) -> tuple[int, ...]:
        """Shape of one volume (z, y, x), or of the image (y, x[, 3])."""
        return tuple(self.voxels.shape[1:]) if self.voxels.ndim == 4 else tuple(self.voxels.shape)

    def volume(self, index: int = 0) -> "Scan":
        """One 3D volume of a multi-volume scan (the scan itself when it has one)."""
        if self.voxels.ndim != 4:
            if index not in (0, -1):
                raise ScanError(f"this scan has one volume; volume {index} does not exist")
            return self
        if not -self.n_volumes <= index < self.n_volumes:
            raise ScanError(f"volume {index} does not exist: this scan has {self.n_volumes} volumes (0-{self.n_volumes - 1})")
        return replace(self, voxels=self.voxels[index], _content_hash="")

    @property
    def orientation(self) -> str:
        """Axis codes of the voxel axes (x, y, z), e.g. 'RAS'."""
        import nibabel as nib

        if self.is_2d:
            return "2D"
        return "".join(nib.aff2axcodes(self.affine))

    @property
    def label(self) -> str:
        """A short, non-identifying description for series pickers."""
        parts = [self.modality.value]
        number = self.metadata.get("SeriesNumber")
        if number not in (None, ""):
            parts.insert(0, f"Series {number}")
        body = self.metadata.get("BodyPartExamined")
        if body:
            parts.append(str(body))
        parts.append("x".join(str(n) for n in self.voxels.shape))
        if not self.is_2d:
            parts.append("@ " + "x".join(f"{s:g}" for s in self.spacing) + " mm")
        return " · ".join(parts)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (what `medlens info --json` prints)."""
        return {
            "modality": self.modality.value,
            "shape": list(self.voxels.shape),
            "spacing_mm": [round(s, 6) for s in self.spacing],
            "orientation": self.orientation,
            "n_volumes": self.n_volumes,
            "reader": self.provenance.reader,
            "transfer_syntax": self.provenance.transfer_syntax,
            "n_files": self.provenance.n_files,
            "warnings": list(self.provenance.warnings),
            "burned_in_text_risk": self.provenance.burned_in_text_risk,
            "content_hash": self.content_hash,
            "metadata": dict(self.metadata),
            # Names of what de-identification dropped (never the values).
            "removed_attributes": list(self.provenance.removed_attributes),
        }


def hash_voxels(voxels: np.ndarray, affine: np.ndarray) -> str:
    """Content hash of pixels + geometry: the same image de-identified twice hashes the same."""
    h = hashlib.sha256()
    h.update(str(voxels.shape).encode())
    h.update(np.ascontiguousarray(voxels, dtype=np.float32).tobytes())
    h.update(np.round(np.asarray(affine, dtype=np.float64), 4).tobytes())
    return h.hexdigest()
