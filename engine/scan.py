"""The `Scan`: one study the user looks at, whatever file it came from.

Design decisions
- Voxels hold physical values where the modality has them (CT in
  Hounsfield units after the modality LUT), in array order (z, y, x) for a
  volume, (t, z, y, x) for a time series / multi-volume NIfTI, (y, x) for a
  grey 2D image and (y, x, 3) for colour.
- Their dtype is float32, or int16 when every value is an integer that fits
  (CT in HU, most MR, label maps): half the memory, and exactly the same
  values, so `np.asarray(part, np.float32)` of any part equals what float32
  storage would hold. Readers choose int16 from the headers (integral
  rescale, stored range inside int16). Consumers convert the part they use
  (a slice, a slab, a sample) to float32, never the whole volume;
  `engine.views.extract_slice` returns float32 slices; the content hash is
  computed over float32 values, so it does not depend on the storage.
- Every volume is stored in closest-canonical RAS+ order: array axis x
  increases towards the patient's Right, y towards Anterior, z towards
  Superior (nibabel's `as_closest_canonical`). Display code flips for the
  radiological convention; models see one consistent orientation.
- `affine` maps a voxel index (x, y, z, 1) -- NIfTI's index order, i.e. the
  array axes reversed -- to RAS+ millimetres, so `nibabel.Nifti1Image(
  voxels.T, affine)` is the volume on disk.
- `metadata` holds only de-identified values (see engine.deid); nothing
  identifying, not even the source file name, is kept on a Scan.
- `Provenance.redaction` says what burned-in text removal (engine.redact)
  did to the pixels: where it blanked them, with which OCR, or why it did
  not run. It never holds the text that was read.
- `origin` is the one exception, and only for scans read from a PACS: an
  engine.pacs.PacsOrigin (real UIDs, patient and study attributes), held in
  memory to write results back into that study on that PACS. It is not in
  `summary()`, refuses to be pickled, and nothing stores it (engine.pacs).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, NamedTuple

import numpy as np

from engine.errors import MedLensError


STORAGE_DTYPES = (np.dtype(np.float32), np.dtype(np.int16))  # see "Their dtype" above
_HASH_CHUNK = 1 << 22  # voxels converted to float32 at a time while hashing (16 MB)


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


class RedactedBox(NamedTuple):
    """A rectangle of pixels blanked because OCR read text there (never the text itself).

    2D scans: rows/cols of the image. Volumes and frame stacks: the box lies in
    the plane of the two array axes other than `axis` (in array order) and is
    blanked through every slice along `axis`, as burned-in text sits at the
    same place on every frame.
    """

    axis: int | None  # array axis the box extends through (None for a 2D image)
    row0: int
    col0: int
    row1: int  # exclusive
    col1: int  # exclusive

    def to_dict(self) -> dict[str, Any]:
        return {"axis": self.axis, "rows": [self.row0, self.row1], "cols": [self.col0, self.col1]}


# Redaction.status values
REDACTED = "redacted"
NO_TEXT_FOUND = "no text found"
NOT_CHECKED = "not checked"  # auto mode, and nothing about the scan suggests burned-in text
OCR_UNAVAILABLE = "not redacted: OCR unavailable"
REDACTION_OFF = "not redacted: turned off"
OCR_FAILED = "not redacted: OCR failed"


@dataclass
class Redaction:
    """What burned-in text removal did to the pixels, for the user and the CLI JSON."""

    status: str  # one of the status values above
    why: str = ""  # why the scan was checked (or not): a reason, never a value from the scan
    ocr: str | None = None  # OCR program and version, e.g. "tesseract 5.3.0"
    frames_read: int = 0  # 2D frames OCR read (sampled frames of a stack, slices of a volume)
    boxes: list[RedactedBox] = field(default_factory=list)
    blanked_fraction: float = 0.0  # share of the scan's pixels blanked

    @property
    def ran(self) -> bool:
        """OCR read the pixels (whether or not it found text)."""
        return self.status in (REDACTED, NO_TEXT_FOUND)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "why": self.why,
            "ocr": self.ocr,
            "frames_read": self.frames_read,
            "n_boxes": len(self.boxes),
            "blanked_fraction": round(self.blanked_fraction, 6),
            "boxes": [b.to_dict() for b in self.boxes],
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
    frames_as_stored: bool = False  # a stack of frames without patient geometry: axis-0 slices are the frames as acquired
    redaction: Redaction | None = None  # burned-in text removal on load (engine.redact)

    @property
    def unredacted_text_risk(self) -> bool:
        """The pixels may show burned-in text that no OCR has read and blanked."""
        return self.burned_in_text_risk and not (self.redaction is not None and self.redaction.ran)


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
        voxels = np.asarray(self.voxels)
        self.voxels = np.ascontiguousarray(voxels, dtype=voxels.dtype if voxels.dtype in STORAGE_DTYPES else np.float32)
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
            # Burned-in text removal: status, OCR, blanked boxes (never the text read).
            "redaction": self.provenance.redaction.to_dict() if self.provenance.redaction else None,
            "content_hash": self.content_hash,
            "metadata": dict(self.metadata),
            # Names of what de-identification dropped (never the values).
            "removed_attributes": list(self.provenance.removed_attributes),
        }


def hash_voxels(voxels: np.ndarray, affine: np.ndarray) -> str:
    """Content hash of pixels + geometry: the same image de-identified twice hashes the same."""
    h = hashlib.sha256()
    h.update(str(voxels.shape).encode())
    # float32 bytes of the values, in chunks: the same hash for int16 and float32 storage,
    # without a whole-volume copy (tobytes of a 2,000-slice CT would be 2 GB more)
    flat = np.ascontiguousarray(voxels).reshape(-1)
    for start in range(0, flat.size, _HASH_CHUNK):
        chunk = flat[start : start + _HASH_CHUNK]
        h.update(memoryview(chunk if chunk.dtype == np.float32 else chunk.astype(np.float32)))
    h.update(np.round(np.asarray(affine, dtype=np.float64), 4).tobytes())
    return h.hexdigest()
