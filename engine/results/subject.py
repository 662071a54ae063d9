"""The study a result belongs to and its source instances: identified (to write back to the PACS) or de-identified.

Design decisions
- A `Subject` is what every DICOM object derived from a scan must repeat
  (patient and general study attributes) and refer to (the source instances
  with their geometry). highdicom builds objects from source *datasets*, so
  `source_datasets()` makes small stand-ins holding only those attributes:
  the pixels and the rest of the source header are never needed again.
- Identified subjects come only from a PacsOrigin (engine.pacs.origin) and
  are used only to write back to that PACS (engine.results.push).
- `deidentified()` is what any export to files uses: every UID (study,
  series, instance, frame of reference) replaced by the library's mapping
  (engine.deid.map_uid), patient and study attributes left empty. A scan
  read from files gets a de-identified subject straight away: its files'
  headers are read again (no pixels) and mapped on the spot.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, replace
from typing import Any, Iterable

from engine.pacs.origin import HEADER, InstanceRef

# Type 2 attributes of the Patient and General Study modules: present, empty when de-identified.
_EMPTY_WHEN_DEIDENTIFIED = tuple(k for k in HEADER if k not in ("SpecificCharacterSet", "StudyInstanceUID", "IssuerOfPatientID"))
_HEADER_TAGS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "PatientOrientation",
    "Laterality",
    "ImageLaterality",
)


@dataclass(frozen=True)
class Subject:
    header: Any  # pydicom Dataset: patient + general study attributes (empty values when de-identified)
    study_uid: str
    instances: tuple[InstanceRef, ...]
    identified: bool
    server: str | None = None  # the PACS an identified subject came from (results may be written back there only)

    @classmethod
    def from_origin(cls, origin) -> "Subject":
        return cls(origin.header(), origin.study_uid, tuple(origin.instances), identified=True, server=origin.server)

    def deidentified(self) -> "Subject":
        if not self.identified:
            return self
        return Subject(_blank_header(self.study_uid), _map(self.study_uid), tuple(_map_ref(r) for r in self.instances), identified=False)

    def source_dataset(self, ref: InstanceRef):
        """A stand-in source image for highdicom: this subject's header plus `ref`'s identifiers and geometry."""
        from copy import deepcopy

        ds = deepcopy(self.header)
        for keyword in _EMPTY_WHEN_DEIDENTIFIED:  # type 2: present even when the source lacks them (highdicom reads them)
            if keyword not in ds:
                setattr(ds, keyword, "")
        ds.StudyInstanceUID = self.study_uid
        ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = ref.sop_class_uid, ref.sop_instance_uid, ref.series_uid
        ds.Modality, ds.Rows, ds.Columns = ref.modality, ref.rows, ref.cols
        if ref.frame_of_reference_uid:
            ds.FrameOfReferenceUID = ref.frame_of_reference_uid
        if ref.position is not None and ref.orientation is not None:
            ds.ImagePositionPatient = [_ds(v) for v in ref.position]
            ds.ImageOrientationPatient = [_ds(v) for v in ref.orientation]
        if ref.pixel_spacing is not None:
            ds.PixelSpacing = [_ds(v) for v in ref.pixel_spacing]
        if ref.slice_thickness:
            ds.SliceThickness = _ds(ref.slice_thickness)
        if ref.n_frames > 1:
            ds.NumberOfFrames = ref.n_frames
        for keyword, value in ref.extra:
            setattr(ds, keyword, value)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        return ds

    def source_datasets(self, refs: Iterable[InstanceRef] | None = None) -> list:
        return [self.source_dataset(r) for r in (self.instances if refs is None else refs)]


def _ds(value: float) -> str:
    """A decimal string (DS holds at most 16 characters)."""
    text = f"{float(value):.10g}"
    return text if len(text) <= 16 else f"{float(value):.6g}"


def _map(uid: str | None) -> str | None:
    from engine.deid import map_uid

    return map_uid(uid) if uid else uid


def _map_ref(ref: InstanceRef) -> InstanceRef:
    return replace(
        ref,
        sop_instance_uid=_map(ref.sop_instance_uid),
        series_uid=_map(ref.series_uid),
        frame_of_reference_uid=_map(ref.frame_of_reference_uid),
    )


def _blank_header(study_uid: str):
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword in _EMPTY_WHEN_DEIDENTIFIED:
        setattr(ds, keyword, "")
    ds.StudyInstanceUID = _map(study_uid)
    return ds


def _read_header(source):
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target = source.path if source.path else io.BytesIO(source.read())
        return pydicom.dcmread(target, stop_before_pixels=True, force=True, specific_tags=list(_HEADER_TAGS))


def subject_from_files(paths: Iterable[str | os.PathLike], scan) -> Subject | None:
    """The de-identified subject of a scan read from DICOM files (None: not DICOM, or the files lack UIDs).

    The files' headers are read again without pixels; instances of the scan's series (matched by the mapped
    SeriesInstanceUID, as engine.deid put it on the scan) are kept, their UIDs mapped at once.
    """
    from engine.deid import map_uid
    from engine.io.dicom import looks_like_dicom
    from engine.io.sources import gather_sources
    from engine.pacs.locator import is_locator

    series = scan.metadata.get("SeriesInstanceUID")
    if not series:
        return None
    sources, _ = gather_sources([p for p in paths if not is_locator(p)])
    refs: list[InstanceRef] = []
    study = None
    for source in sources:
        try:
            if not looks_like_dicom(source.head(352), source.name):
                continue
            ds = _read_header(source)
        except Exception:  # noqa: BLE001 - a file the reader skipped; it cannot be referenced either
            continue
        if not ds.get("SeriesInstanceUID") or map_uid(str(ds.SeriesInstanceUID)) != series:
            continue
        if not ds.get("SOPInstanceUID") or not ds.get("StudyInstanceUID"):
            continue
        study = study or str(ds.StudyInstanceUID)
        refs.append(InstanceRef.from_dataset(ds))
    if not refs or study is None:
        return None
    return Subject(_blank_header(study), _map(study), tuple(_map_ref(r) for r in refs), identified=False)


def subject_for(scan, paths: Iterable[str | os.PathLike] = ()) -> Subject | None:
    """Identified subject of a PACS scan; de-identified subject of a scan from DICOM files; else None."""
    if scan.origin is not None:
        return Subject.from_origin(scan.origin)
    return subject_from_files(list(paths), scan)
