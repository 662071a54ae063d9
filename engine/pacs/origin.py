"""What a scan read from a PACS remembers about where it came from: in memory only.

Design decisions
- Writing results back into the patient's study needs the study's real
  UIDs, the source instances' real UIDs and geometry, and the patient and
  study attributes that every object in that study must repeat (DICOM
  Patient and General Study modules). `PacsOrigin` holds exactly those,
  bound to the server they came from, and rides on the Scan
  (`Scan.origin`), never in its metadata or summary, so the library, the
  caches and the JSON results never see it.
- Only the attributes highdicom copies into new objects are kept (`HEADER`);
  everything else of the source header is dropped at retrieval.
- It refuses to be pickled (`__reduce__` raises), so it cannot be written to
  disk by accident (a cache, a multiprocessing queue); a copy of a Scan
  shares the same origin rather than duplicating it.
- `InstanceRef` (identifiers + geometry of one source instance) is shared
  with results written from files (engine.results.subject), where its UIDs
  are the de-identified ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Patient + General Study attributes a derived object repeats (highdicom copies these from its source images).
HEADER = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


@dataclass(frozen=True)
class InstanceRef:
    """One source image instance: what a derived object needs to reference it and to sit on its grid."""

    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    frame_of_reference_uid: str | None
    modality: str
    rows: int
    cols: int
    n_frames: int = 1
    position: tuple[float, ...] | None = None  # ImagePositionPatient (LPS mm)
    orientation: tuple[float, ...] | None = None  # ImageOrientationPatient (row, column direction cosines)
    pixel_spacing: tuple[float, ...] | None = None  # (between rows, between columns) mm
    slice_thickness: float | None = None
    extra: tuple[tuple[str, Any], ...] = ()  # PatientOrientation / Laterality when present (2D images)

    @classmethod
    def from_dataset(cls, ds) -> "InstanceRef":
        meta = getattr(ds, "file_meta", None)
        sop_class = str(ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else "") or "")
        sop_instance = str(ds.get("SOPInstanceUID") or (meta.get("MediaStorageSOPInstanceUID") if meta else "") or "")
        thickness = ds.get("SliceThickness")
        try:
            thickness = float(thickness) if thickness not in (None, "") else None
        except (TypeError, ValueError):
            thickness = None
        extra = tuple((k, ds.get(k)) for k in ("PatientOrientation", "Laterality", "ImageLaterality") if ds.get(k) not in (None, ""))
        return cls(
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            series_uid=str(ds.get("SeriesInstanceUID") or ""),
            frame_of_reference_uid=str(ds.get("FrameOfReferenceUID") or "") or None,
            modality=str(ds.get("Modality") or "OT"),
            rows=int(ds.get("Rows") or 0),
            cols=int(ds.get("Columns") or 0),
            n_frames=int(ds.get("NumberOfFrames") or 1),
            position=_floats(ds.get("ImagePositionPatient") or [], 3),
            orientation=_floats(ds.get("ImageOrientationPatient") or [], 6),
            pixel_spacing=_floats(ds.get("PixelSpacing") or [], 2),
            slice_thickness=thickness,
            extra=extra,
        )


def header_of(ds):
    """A new pydicom Dataset holding only the HEADER attributes of `ds` (its other attributes never leave retrieval)."""
    from pydicom.dataset import Dataset

    out = Dataset()
    for keyword in HEADER:
        if keyword in ds:
            out[keyword] = ds[keyword]
    return out


@dataclass(frozen=True, eq=False)
class PacsOrigin:
    """Identified context of a scan retrieved from a PACS; used only to write results back to that PACS."""

    server: str  # PacsConfig.identity of the PACS it came from
    study_uid: str
    series_uid: str
    _header: Any = field(repr=False)  # pydicom Dataset with the HEADER attributes (real patient data)
    instances: tuple[InstanceRef, ...] = field(default=(), repr=False)

    def header(self):
        """A copy of the patient and study attributes (callers may add to it)."""
        from copy import deepcopy

        return deepcopy(self._header)

    def __repr__(self) -> str:
        return f"PacsOrigin(server={self.server!r}, {len(self.instances)} instances, identified: memory only)"

    def __reduce__(self):
        raise TypeError("a PacsOrigin holds identified patient data and is never serialised (kept in memory only)")

    def __copy__(self) -> "PacsOrigin":
        return self

    def __deepcopy__(self, memo) -> "PacsOrigin":
        return self
