"""What every DICOM object MedLens writes says about itself: codes, the research-use notice, the algorithm.

Design decisions
- Labels, questions and answers are free text, which DICOM codes cannot
  name; they become concepts of a private coding scheme, "99MEDLENS" (the
  "99" prefix is DICOM's convention for local schemes, PS3.16 8.2), whose
  code value is a hash of the text (stable across runs and machines) and
  whose meaning is the text itself (cut to 64 characters, DICOM's limit; the
  JSON result keeps it whole). The scheme is declared in each SR's Coding
  Scheme Identification Sequence.
- Standard codes where they exist: DCM 122157 "Probability", UCUM "1",
  SNOMED Present / Absent / Indeterminate, DCM 130401 "Visual explanation"
  with 130403 "Gradient-weighted class activation" or 130404 "Saliency" for
  the evidence SEG.
- The research-use notice is in every series description (the first thing
  a PACS viewer lists) and burned into the secondary capture's pixels. The
  algorithm (model name + revision) is in the SR's algorithm identification,
  the SEG's segment algorithm identification, and the equipment attributes
  and Contributing Equipment Sequence of every object.
"""

from __future__ import annotations

import hashlib

from engine.results.schema import NOTICE, SOFTWARE, ModelRef, software_version

SCHEME = "99MEDLENS"
SCHEME_NAME = "MedLens free-text labels, questions and answers"
SERIES_DESCRIPTIONS = {
    "sr": "MedLens findings - research use, not for diagnosis",
    "seg": "MedLens evidence - research use, not for diagnosis",
    "sc": "MedLens overlay - research use, not for diagnosis",
}
SERIES_NUMBERS = {"sr": 9701, "seg": 9702, "sc": 9703}
DEIDENTIFICATION_METHOD = "MedLens: PS3.15 basic profile; UIDs mapped by salted HMAC"  # LO: at most 64


def instance_header(kind: str, series_uid: str, sop_uid: str) -> dict[str, object]:
    """The identity keywords every MedLens object ("sr", "seg", "sc") gives its highdicom constructor:
    its own series (fixed number per kind), one instance in it, MedLens as manufacturer."""
    return {
        "series_instance_uid": series_uid,
        "series_number": SERIES_NUMBERS[kind],
        "sop_instance_uid": sop_uid,
        "instance_number": 1,
        "manufacturer": "MedLens",
    }


def text_concept(text: str, kind: str):
    """A 99MEDLENS concept for a label (kind "L"), question ("Q") or answer ("A")."""
    from highdicom.sr import CodedConcept

    clean = " ".join(str(text).split())
    value = kind + hashlib.sha256(clean.lower().encode("utf-8")).hexdigest()[:15].upper()
    meaning = clean if len(clean) <= 64 else clean[:61] + "..."
    return CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning)


def scheme_identification():
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = SOFTWARE
    return item


def parameters(**values) -> list[str]:
    """Algorithm parameters as 'key=value' words (empty values left out)."""
    return [f"{k}={v}" for k, v in values.items() if v not in (None, "")]


def derived_uid(*parts: str) -> str:
    """A UID derived from other UIDs (stable: the identified and the exported copy of a report line up)."""
    digest = hashlib.sha256("|".join(parts).encode("ascii")).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def stamp(ds, models: list[ModelRef], kind: str, deidentified: bool) -> None:
    """Series description (research use), equipment (MedLens + model and revision), de-identification flags."""
    from highdicom import ContributingEquipment
    from pydicom.sr.codedict import codes

    ds.SeriesDescription = SERIES_DESCRIPTIONS[kind]
    ds.Manufacturer = SOFTWARE
    ds.ManufacturerModelName = (" + ".join(m.name for m in models) or SOFTWARE)[:64]
    ds.SoftwareVersions = [software_version()[:64]] + [m.id[:64] for m in models]
    ds.ContributingEquipmentSequence = [
        ContributingEquipment(
            manufacturer=SOFTWARE,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=m.name[:64],
            software_versions=(m.revision or "unrecorded")[:64],
            contribution_description=f"{m.id} ({NOTICE})"[:1024],
        )
        for m in models
    ]
    if deidentified:
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = DEIDENTIFICATION_METHOD
