"""QIDO-RS searches: typed filters in, typed study and series rows out.

Design decisions
- Filters are exact matches on identifiers, dates and modality: patient ID,
  accession number, study date (a day or a range), modality and UIDs.
  Debian's Orthanc 1.10 does not decode percent-encoded QIDO values (a `^`
  in a name, a space in a description), so values that would need encoding
  are refused with a message instead of silently matching nothing; names
  and descriptions are shown, never searched.
- One text form for the command line and the app: `key=value` words, e.g.
  "modality=CT date=20240101-20240131 patient-id=12345". Keys: patient-id,
  accession, date, modality, study, series.
- Rows hold what the PACS returns to this user, names included: they are
  shown to that user and never stored, cached or logged (engine.pacs
  docstring). `SeriesRow.path` is the `dicomweb:` path that opens it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable

from engine.pacs.errors import PacsError
from engine.pacs.locator import Locator, check_uid

_SAFE_VALUE = re.compile(r"^[A-Za-z0-9._\-]+$")
_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")
# Modalities that hold no image MedLens can read: reports, segmentations, presentation states, ...
NON_IMAGE_MODALITIES = frozenset(
    {"SR", "SEG", "PR", "KO", "DOC", "RTSTRUCT", "RTPLAN", "RTRECORD", "REG", "FID", "AU", "ECG", "HD", "PLAN", "RWV", "OT_REPORT"}
)
KEYS = ("patient-id", "accession", "date", "modality", "study", "series")


class QueryError(PacsError):
    """A search filter cannot be sent as it is; the message says how to write it."""


@dataclass(frozen=True)
class QueryFilter:
    """Exact-match QIDO filters; None means "any"."""

    patient_id: str | None = None
    accession: str | None = None
    date_from: str | None = None  # YYYYMMDD
    date_to: str | None = None  # YYYYMMDD (same as date_from for one day)
    modality: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None

    def is_empty(self) -> bool:
        return not any(asdict(self).values())

    @property
    def study_date(self) -> str | None:
        """The StudyDate match: one day, or a DICOM range (open at either end); None without dates."""
        if not (self.date_from or self.date_to):
            return None
        lo, hi = self.date_from or "", self.date_to or ""
        return lo if lo == hi else f"{lo}-{hi}"

    def study_params(self) -> dict[str, str]:
        return self._params(_STUDY_KEYS)

    def series_params(self) -> dict[str, str]:
        return self._params(_SERIES_KEYS)

    def _params(self, keys: tuple[tuple[str, str], ...]) -> dict[str, str]:
        """DICOM keyword -> value for each field the user filled in, in the order of `keys`."""
        values = {keyword: getattr(self, name) for name, keyword in keys}
        return {keyword: value for keyword, value in values.items() if value}


# (QueryFilter field or property, the DICOM keyword it matches) at each level, in the order the request lists them
_STUDY_KEYS = (
    ("patient_id", "PatientID"),
    ("accession", "AccessionNumber"),
    ("study_date", "StudyDate"),
    ("modality", "ModalitiesInStudy"),
    ("study_uid", "StudyInstanceUID"),
)
_SERIES_KEYS = (("modality", "Modality"), ("series_uid", "SeriesInstanceUID"))


def _safe(key: str, value: str) -> str:
    value = value.strip()
    if not _SAFE_VALUE.match(value):
        raise QueryError(
            f"{key}={value!r}: only letters, digits, '.', '-' and '_' can be searched (Debian's Orthanc ignores "
            "percent-encoded values, so names and free text are not searchable; search by patient ID, accession, date or UID)"
        )
    return value


def _date(value: str) -> str:
    match = _DATE.match(value.strip())
    if not match:
        raise QueryError(f"date {value!r}: write YYYYMMDD or YYYY-MM-DD (a range: FROM-TO, e.g. 20240101-20240131)")
    return "".join(match.groups())


def parse_dates(text: str) -> tuple[str | None, str | None]:
    """'20240105' -> (d, d); '20240101-20240131' or '2024-01-01..2024-01-31' -> (from, to); open ends allowed ('20240101-')."""
    text = text.strip()
    if ".." in text:
        lo, hi = text.split("..", 1)
    elif re.fullmatch(r"\d{8}-\d{0,8}|-\d{8}", text):
        lo, hi = text.split("-", 1)
    else:
        day = _date(text)
        return day, day
    lo_d, hi_d = (_date(lo) if lo.strip() else None), (_date(hi) if hi.strip() else None)
    if lo_d and hi_d and lo_d > hi_d:
        raise QueryError(f"date range {text!r} ends before it starts")
    return lo_d, hi_d


def make_filter(
    patient_id: str | None = None,
    accession: str | None = None,
    date: str | None = None,
    modality: str | None = None,
    study: str | None = None,
    series: str | None = None,
) -> QueryFilter:
    """A checked QueryFilter from plain strings (blank = any)."""

    def blank(v: str | None) -> bool:
        return v is None or not str(v).strip()

    lo, hi = parse_dates(date) if not blank(date) else (None, None)
    return QueryFilter(
        patient_id=None if blank(patient_id) else _safe("patient-id", str(patient_id)),
        accession=None if blank(accession) else _safe("accession", str(accession)),
        date_from=lo,
        date_to=hi,
        modality=None if blank(modality) else _safe("modality", str(modality)).upper(),
        study_uid=None if blank(study) else check_uid(str(study), "study"),
        series_uid=None if blank(series) else check_uid(str(series), "series"),
    )


def parse_query(text: str | Iterable[str]) -> QueryFilter:
    """'modality=CT date=20240101-20240131 patient-id=123' (or its words as a list) -> QueryFilter."""
    words = text.split() if isinstance(text, str) else [w for part in text for w in str(part).split()]
    values: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        key = key.strip().lower().replace("_", "-")
        if not sep or key not in KEYS:
            raise QueryError(f"query word {word!r}: write key=value with key one of {', '.join(KEYS)}")
        values[key] = value
    query = make_filter(
        values.get("patient-id"),
        values.get("accession"),
        values.get("date"),
        values.get("modality"),
        values.get("study"),
        values.get("series"),
    )
    if query.is_empty():
        raise QueryError("an empty query would list the whole PACS: give at least one of " + ", ".join(f"{k}=..." for k in KEYS))
    return query


# --------------------------------------------------------------------------- results
def _value(item: dict[str, Any], tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def _values(item: dict[str, Any], tag: str) -> list[Any]:
    return list((item.get(tag) or {}).get("Value") or [])


def _name(item: dict[str, Any], tag: str) -> str:
    value = _value(item, tag)
    if isinstance(value, dict):
        return str(value.get("Alphabetic") or "")
    return "" if value is None else str(value)


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


@dataclass
class SeriesRow:
    """One series as the PACS lists it."""

    study_uid: str
    series_uid: str
    modality: str
    series_number: int | None
    description: str
    n_instances: int | None
    body_part: str = ""

    @property
    def path(self) -> str:
        return Locator(self.study_uid, self.series_uid).text

    @property
    def is_image(self) -> bool:
        return self.modality.upper() not in NON_IMAGE_MODALITIES

    def to_dict(self) -> dict[str, Any]:
        return {"level": "series", "path": self.path, **asdict(self), "is_image": self.is_image}


@dataclass
class StudyRow:
    """One study as the PACS lists it (patient name and ID included: shown to this user only)."""

    study_uid: str
    date: str
    patient_name: str
    patient_id: str
    accession: str
    description: str
    modalities: list[str]
    n_series: int | None
    n_instances: int | None
    series: list[SeriesRow] = field(default_factory=list)

    @property
    def path(self) -> str:
        return Locator(self.study_uid, None).text

    def to_dict(self) -> dict[str, Any]:
        out = {"level": "study", "path": self.path, **asdict(self)}
        out.pop("series")
        return out


STUDY_FIELDS = ("StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
SERIES_FIELDS = ("SeriesDescription", "BodyPartExamined", "NumberOfSeriesRelatedInstances", "SeriesNumber", "Modality")


def study_row(item: dict[str, Any]) -> StudyRow:
    return StudyRow(
        study_uid=str(_value(item, "0020000D") or ""),
        date=str(_value(item, "00080020") or ""),
        patient_name=_name(item, "00100010"),
        patient_id=str(_value(item, "00100020") or ""),
        accession=str(_value(item, "00080050") or ""),
        description=str(_value(item, "00081030") or ""),
        modalities=[str(m) for m in _values(item, "00080061")],
        n_series=_int(_value(item, "00201206")),
        n_instances=_int(_value(item, "00201208")),
    )


def series_row(item: dict[str, Any], study_uid: str) -> SeriesRow:
    return SeriesRow(
        study_uid=str(_value(item, "0020000D") or study_uid),
        series_uid=str(_value(item, "0020000E") or ""),
        modality=str(_value(item, "00080060") or ""),
        series_number=_int(_value(item, "00200011")),
        description=str(_value(item, "0008103E") or ""),
        n_instances=_int(_value(item, "00201209")),
        body_part=str(_value(item, "00180015") or ""),
    )


def without_series(row: StudyRow) -> StudyRow:
    return replace(row, series=[])
