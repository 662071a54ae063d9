"""De-identification on ingest (DICOM PS3.15 Annex E, basic profile).

Design decisions
- An allow-list, not a deny-list. The basic profile lists what to remove;
  we instead keep only technical attributes that the profile leaves alone
  (and that the viewer and models need), so a vendor's private tag or an
  unexpected free-text field can never slip through. Everything else is
  dropped and its keyword recorded in `removed` (names only, never values).
- UIDs the library needs for grouping (Study/Series/Frame of Reference) are
  replaced consistently (the profile's "U" action): an HMAC of the original
  with a secret salt, turned into a `2.25.` UID. The salt lives in the user's
  config folder (or MEDLENS_UID_SALT), so the same series maps to the same
  UID across runs on one machine and cannot be reversed without the salt.
- Dates, times, ages, sex, names, IDs, institutions, device serials,
  descriptions and comments are all removed (the basic profile removes or
  blanks each of them; no retain options are applied).
- Pixels are not altered here; scans whose pixels may carry burned-in text
  are flagged, and engine.redact (run by engine.io.load) reads those pixels
  with OCR and blanks the text before anything shows or stores them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from typing import Any

from engine import settings

# Technical attributes kept (not in Annex E Table E.1-1, or kept by it).
# Values are converted to plain JSON types.
KEEP = (
    "Modality",
    "SOPClassUID",  # a standard (non-instance) UID naming the IOD
    "SeriesNumber",
    "BodyPartExamined",
    "Manufacturer",
    "ManufacturerModelName",
    "ImageType",
    "PhotometricInterpretation",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "PatientPosition",  # HFS etc.: orientation, not identity
    "ViewPosition",
    "Laterality",
    "ImageLaterality",
    "KVP",
    "ConvolutionKernel",
    "MagneticFieldStrength",
    "MRAcquisitionType",
    "ScanningSequence",
    "SequenceVariant",
    "RepetitionTime",
    "EchoTime",
    "InversionTime",
    "FlipAngle",
    "EchoTrainLength",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
    "BurnedInAnnotation",
)

# UIDs replaced consistently ("U" in the basic profile).
MAP_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")

# SOP classes whose pixels are often screenshots (Secondary Capture family).
_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
# Modalities whose images usually carry burned-in annotations (XA and RF: fluoroscopy
# and angiography runs are often exported with the patient's name drawn in).
_BURN_IN_MODALITIES = {"US", "OT", "SC", "ES", "XC", "DOC", "GM", "SM", "XA", "RF"}

_STRUCTURAL = {"PixelData", "FloatPixelData", "DoubleFloatPixelData"}


@dataclass
class DeidResult:
    metadata: dict[str, Any]
    removed: list[str] = field(default_factory=list)
    burned_in_text_risk: bool = False
    burned_in_reasons: list[str] = field(default_factory=list)


_salt_cache: bytes | None = None


def _salt() -> bytes:
    """Secret salt for UID mapping: env var, else a per-user file, else per process."""
    global _salt_cache
    if _salt_cache is not None:
        return _salt_cache
    env = settings.UID_SALT.get()
    if env:
        _salt_cache = env.encode()
        return _salt_cache
    base = settings.user_config_dir()
    path = base / "uid_salt"
    try:
        if path.is_file():
            _salt_cache = path.read_bytes()
        else:
            base.mkdir(parents=True, exist_ok=True)
            value = secrets.token_hex(32).encode()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(value)
            _salt_cache = value
    except OSError:
        _salt_cache = secrets.token_hex(32).encode()  # read-only home: consistent within this process
    return _salt_cache


def map_uid(uid: str) -> str:
    """Consistent, irreversible replacement UID (2.25 form, <= 64 chars)."""
    digest = hmac.new(_salt(), str(uid).strip().encode(), hashlib.sha256).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def derived_key(context: bytes) -> bytes:
    """A 64-byte secret for another purpose (`context` names it), derived from the same salt (HMAC-SHA512).

    engine.pacs.locator seals dicomweb: paths with it: one secret guards both the UID mapping and the sealed paths.
    """
    return hmac.new(_salt(), context, hashlib.sha512).digest()


def _plain(value: Any) -> Any:
    """pydicom value -> JSON-friendly value."""
    from pydicom.multival import MultiValue
    from pydicom.valuerep import DSfloat, IS

    if isinstance(value, (MultiValue, list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (DSfloat, float)):
        return float(value)
    if isinstance(value, (IS, int)):
        return int(value)
    if isinstance(value, bytes):
        return None
    return str(value)


def _safe(ds, keyword: str):
    try:
        return ds.get(keyword)
    except Exception:
        return None


def burned_in_text_risk(ds) -> list[str]:
    """Reasons the pixels may show identifying text (empty list: none known)."""
    reasons = []
    if str(_safe(ds, "BurnedInAnnotation") or "").upper() == "YES":
        reasons.append("BurnedInAnnotation is YES")
    modality = str(_safe(ds, "Modality") or "").upper()
    if modality in _BURN_IN_MODALITIES:
        reasons.append(f"modality {modality} images often carry burned-in text")
    if str(_safe(ds, "SOPClassUID") or "").startswith(_SECONDARY_CAPTURE_PREFIX):
        reasons.append("secondary capture (a screenshot-like image)")
    image_type = _safe(ds, "ImageType") or []
    image_type = [str(v).upper() for v in ([image_type] if isinstance(image_type, str) else image_type)]
    if "SECONDARY" in image_type and "SCREEN" in " ".join(image_type):
        reasons.append("ImageType marks a screen capture")
    return reasons


def deidentify(ds) -> DeidResult:
    """De-identified metadata of a pydicom Dataset (the dataset is not modified)."""
    metadata: dict[str, Any] = {}
    for keyword in KEEP:
        try:
            value = ds.get(keyword)
        except Exception:  # a malformed value must not stop ingestion
            continue
        if value is None or value == "":
            continue
        plain = _plain(value)
        if plain not in (None, "", []):
            metadata[keyword] = plain
    for keyword in MAP_UIDS:
        try:
            value = ds.get(keyword)
        except Exception:
            continue
        if value:
            metadata[keyword] = map_uid(str(value))
    kept = set(KEEP) | set(MAP_UIDS) | _STRUCTURAL
    removed = set()
    n_private = 0
    # Tags only: reading values would make pydicom convert them, and a malformed
    # value in an attribute we drop anyway must not stop ingestion.
    from pydicom.datadict import keyword_for_tag

    for tag in list(ds.keys()):
        if tag.is_private:
            n_private += 1
            continue
        if tag.element == 0:  # group length
            continue
        keyword = keyword_for_tag(tag) or str(tag)
        if keyword not in kept:
            removed.add(keyword)
    removed_list = sorted(removed)
    if n_private:
        removed_list.append(f"private attributes ({n_private})")
    reasons = burned_in_text_risk(ds)
    return DeidResult(metadata, removed_list, bool(reasons), reasons)
