"""Write small synthetic DICOM series with pydicom, for geometry tests.

Design decisions
- Every stored pixel value is unique within a series (slice * 800 + row *
  columns + column), so any flip, transpose or slice permutation a reader
  makes changes the array and cannot hide behind symmetry.
- Geometry is built the way scanners write it: ImageOrientationPatient holds
  the row direction (the direction of increasing column index) then the
  column direction; ImagePositionPatient of slice k is origin + k * spacing *
  normal, the normal being row x column (no gantry tilt). PixelSpacing is
  (spacing between rows, spacing between columns) and defaults to unequal
  values (0.8, 0.6) so a swap is visible.
- Files are written in a shuffled order under random names, so neither
  directory order nor file names tell the slice order.
- Nothing here depends on engine/: the reference for what the files mean is
  dcm2niix (tests/test_geometry_dcm2niix.py), not our own reader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
CORONAL = ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0))
SAGITTAL = ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0))


def rotation(axis: str, degrees: float) -> np.ndarray:
    """3x3 rotation matrix about the LPS axis 'x', 'y' or 'z'."""
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    if axis == "z":
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    raise ValueError(axis)


def rotate(orientation, matrix: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Apply a rotation to both ImageOrientationPatient vectors."""
    row, col = (matrix @ np.asarray(v, dtype=float) for v in orientation)
    return tuple(float(x) for x in row), tuple(float(x) for x in col)


@dataclass
class SeriesSpec:
    """What to write. Defaults: a 24 x 32 (rows x columns) axial MR series of 12 slices."""

    orientation: tuple = AXIAL  # (row direction, column direction), LPS
    rows: int = 24
    columns: int = 32
    n_slices: int = 12
    pixel_spacing: tuple[float, float] = (0.8, 0.6)  # (between rows, between columns)
    slice_spacing: float = 2.5  # along the normal row x column
    origin: tuple[float, float, float] = (-10.0, -20.0, 30.0)  # IPP of the first slice in space
    descending: bool = False  # instance numbers run against the slice normal
    modality: str = "MR"  # "MR" or "CT"
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    series_number: int = 1
    protocol_name: str = "synthetic"
    skip_slices: tuple[int, ...] = ()  # spatial slice indices left out (a gap)
    seed: int = 0
    series_uid: str | None = None  # share one to put several specs in one series
    study_uid: str | None = None
    instance_offset: int = 0  # added to InstanceNumber (several specs in one series)
    name_prefix: str = ""
    per_slice_intercepts: tuple[float, ...] | None = None  # RescaleIntercept per spatial slice (CT)
    iop_jitter: float = 0.0  # +- this added to ImageOrientationPatient, alternating between slices
    unsigned: bool = False  # PixelRepresentation 0 (uint16); stored values shifted by value_offset
    value_offset: int = 0  # added to every stored value


@dataclass
class WrittenSeries:
    folder: Path
    files: list[Path] = field(default_factory=list)
    stored: np.ndarray | None = None  # (slice, row, column) in spatial slice order, int16
    positions: np.ndarray | None = None  # (slice, 3) IPP in LPS, spatial order
    normal: np.ndarray | None = None


def stored_pixels(spec: SeriesSpec) -> np.ndarray:
    """The int16 pixel data, (slice, row, column), unique value per voxel."""
    assert spec.rows * spec.columns <= 800 and spec.n_slices <= 40
    k, r, c = np.meshgrid(np.arange(spec.n_slices), np.arange(spec.rows), np.arange(spec.columns), indexing="ij")
    values = k * 800 + r * spec.columns + c + spec.value_offset
    return values.astype(np.uint16 if spec.unsigned else np.int16)


def write_series(folder: str | Path, spec: SeriesSpec) -> WrittenSeries:
    """Write one series (or a part of one when spec.series_uid is shared) into folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    row = np.asarray(spec.orientation[0], dtype=float)
    col = np.asarray(spec.orientation[1], dtype=float)
    normal = np.cross(row, col)
    origin = np.asarray(spec.origin, dtype=float)
    pixels = stored_pixels(spec)
    positions = np.array([origin + k * spec.slice_spacing * normal for k in range(spec.n_slices)])

    study_uid = spec.study_uid or generate_uid()
    series_uid = spec.series_uid or generate_uid()
    frame_uid = generate_uid()
    sop_class = CT_IMAGE_STORAGE if spec.modality == "CT" else MR_IMAGE_STORAGE

    kept = [k for k in range(spec.n_slices) if k not in spec.skip_slices]
    written = WrittenSeries(folder=folder, stored=pixels, positions=positions, normal=normal)
    order = rng.permutation(len(kept))  # write order, unrelated to space
    for idx in order:
        k = kept[idx]
        instance = (spec.n_slices - k) if spec.descending else (k + 1)
        instance += spec.instance_offset
        ds = _slice_dataset(spec, sop_class, study_uid, series_uid, frame_uid, positions[k], instance, pixels[k], k)
        name = f"{spec.name_prefix}{rng.integers(0, 2**40):010x}.dcm"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        written.files.append(path)
    return written


def _fmt(x: float) -> str:
    """A DICOM DS string (at most 16 characters) that round-trips well."""
    s = f"{x:.10g}"
    if len(s) > 16:
        s = f"{x:.8g}"
    return "0" if s in ("-0", "0") else s


def slice_intercept(spec: SeriesSpec, k: int) -> float:
    return spec.per_slice_intercepts[k] if spec.per_slice_intercepts else spec.rescale_intercept


def physical_values(spec: SeriesSpec) -> np.ndarray:
    """What a reader should return, (slice, row, column) in spatial order, float64."""
    stored = stored_pixels(spec).astype(np.float64)
    intercepts = np.array([slice_intercept(spec, k) for k in range(spec.n_slices)])
    return stored * spec.rescale_slope + intercepts[:, None, None]


def _slice_dataset(spec, sop_class, study_uid, series_uid, frame_uid, position, instance, pixels, k=0) -> Dataset:
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if spec.modality == "CT" else "M", "NONE"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20240101"
    ds.SeriesDate = "20240101"
    ds.AcquisitionDate = "20240101"
    ds.StudyTime = "120000"
    ds.SeriesTime = "120000"
    ds.AcquisitionTime = "120000"
    ds.Modality = spec.modality
    ds.Manufacturer = "MedLensSynth"
    ds.PatientName = "Synthetic^Phantom"
    ds.PatientID = "SYNTH0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = spec.series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance
    ds.SeriesDescription = spec.protocol_name
    ds.ProtocolName = spec.protocol_name
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.ImagePositionPatient = [_fmt(v) for v in position]
    jitter = spec.iop_jitter * (1 if k % 2 else -1)
    ds.ImageOrientationPatient = [_fmt(v + jitter) for v in (*spec.orientation[0], *spec.orientation[1])]
    ds.SliceThickness = _fmt(spec.slice_spacing)
    ds.SpacingBetweenSlices = _fmt(spec.slice_spacing)
    normal = np.cross(np.asarray(spec.orientation[0], float), np.asarray(spec.orientation[1], float))
    ds.SliceLocation = _fmt(float(np.dot(position, normal)))
    ds.PixelSpacing = [_fmt(v) for v in spec.pixel_spacing]
    if spec.modality == "CT":
        ds.KVP = "120"
        ds.RescaleSlope = _fmt(spec.rescale_slope)
        ds.RescaleIntercept = _fmt(slice_intercept(spec, k))
        ds.RescaleType = "HU"
    else:
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "NONE"
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "500"
        ds.EchoTime = "10"
        ds.EchoNumbers = 1
        ds.MagneticFieldStrength = "3"
        if spec.rescale_slope != 1.0 or spec.rescale_intercept != 0.0:
            ds.RescaleSlope = _fmt(spec.rescale_slope)
            ds.RescaleIntercept = _fmt(spec.rescale_intercept)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0 if spec.unsigned else 1
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2" if spec.unsigned else "<i2").tobytes()
    return ds


def _item(**elements) -> Dataset:
    """A dataset holding the given keyword=value elements: a sequence item written as one expression."""
    ds = Dataset()
    ds.update(elements)
    return ds


def lps_affine(spec: SeriesSpec) -> np.ndarray:
    """Affine from (column, row, slice) index to LPS mm, for spatial slice order (independent check)."""
    row = np.asarray(spec.orientation[0], float)
    col = np.asarray(spec.orientation[1], float)
    normal = np.cross(row, col)
    aff = np.eye(4)
    aff[:3, 0] = row * spec.pixel_spacing[1]
    aff[:3, 1] = col * spec.pixel_spacing[0]
    aff[:3, 2] = normal * spec.slice_spacing
    aff[:3, 3] = spec.origin
    return aff


ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"


def write_enhanced(path: str | Path, spec: SeriesSpec, shuffle_frames: bool = False) -> Path:
    """The series of `spec` as one Enhanced MR multi-frame file (per-frame positions).

    Frames are acquired ascending along the normal (descending with
    spec.descending); InStackPositionNumber and DimensionIndexValues number
    them in acquisition order. They are stored in that order, as scanners
    write them, or shuffled (shuffle_frames). dcm2niix (v1.0.20260724) takes
    the wrong origin and slice direction from shuffled frames, so only
    unshuffled files are compared with it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    row = np.asarray(spec.orientation[0], dtype=float)
    col = np.asarray(spec.orientation[1], dtype=float)
    normal = np.cross(row, col)
    pixels = stored_pixels(spec)
    positions = [np.asarray(spec.origin) + k * spec.slice_spacing * normal for k in range(spec.n_slices)]
    acquisition = np.arange(spec.n_slices)[::-1] if spec.descending else np.arange(spec.n_slices)
    in_stack = {int(k): n + 1 for n, k in enumerate(acquisition)}  # spatial slice -> InStackPositionNumber
    order = rng.permutation(spec.n_slices) if shuffle_frames else acquisition  # storage order

    ds = _slice_dataset(spec, ENHANCED_MR_IMAGE_STORAGE, generate_uid(), generate_uid(), generate_uid(), positions[0], 1, pixels[0])
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    ds.SOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    for kw in (
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "SliceThickness",
        "SpacingBetweenSlices",
        "SliceLocation",
        "EchoTime",
        "RepetitionTime",
        "ScanningSequence",
        "SequenceVariant",
        "EchoNumbers",
        "RescaleSlope",
        "RescaleIntercept",
    ):
        if kw in ds:
            delattr(ds, kw)
    ds.NumberOfFrames = spec.n_slices
    ds.ContentQualification = "PRODUCT"
    ds.AcquisitionContrast = "T1"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.BurnedInAnnotation = "NO"

    organisation = generate_uid()
    ds.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=organisation)]
    ds.DimensionIndexSequence = [
        _item(
            DimensionIndexPointer=pydicom.tag.Tag(pointer),
            FunctionalGroupPointer=pydicom.tag.Tag("FrameContentSequence"),
            DimensionOrganizationUID=organisation,
        )
        for pointer in ("StackID", "InStackPositionNumber")
    ]

    shared = _item(
        PixelMeasuresSequence=[
            _item(
                PixelSpacing=[_fmt(v) for v in spec.pixel_spacing],
                SliceThickness=_fmt(spec.slice_spacing),
                SpacingBetweenSlices=_fmt(spec.slice_spacing),
            )
        ],
        PlaneOrientationSequence=[_item(ImageOrientationPatient=[_fmt(v) for v in (*spec.orientation[0], *spec.orientation[1])])],
        PixelValueTransformationSequence=[
            _item(RescaleSlope=_fmt(spec.rescale_slope), RescaleIntercept=_fmt(spec.rescale_intercept), RescaleType="US")
        ],
        MRTimingAndRelatedParametersSequence=[_item(RepetitionTime=500.0, FlipAngle=15.0)],
        MREchoSequence=[_item(EffectiveEchoTime=10.0)],
    )
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = [
        _item(
            FrameContentSequence=[
                _item(
                    StackID="1",
                    InStackPositionNumber=in_stack[int(k)],
                    DimensionIndexValues=[1, in_stack[int(k)]],
                    FrameAcquisitionNumber=1,
                )
            ],
            PlanePositionSequence=[_item(ImagePositionPatient=[_fmt(v) for v in positions[k]])],
        )
        for k in order
    ]
    ds.PixelData = np.ascontiguousarray(pixels[order], dtype="<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
