"""Nothing identifying reaches a Scan's metadata, its summary or the CLI's output.

For every DICOM file in deid-data (real-looking PHI, burned-in text) and in
pydicom's test data, the identifying values are collected from the raw
dataset, independently of engine.deid: person names (every PN element,
nested and private ones included), patient IDs, birth dates and every other
date and time, addresses, institution, station, device serial, accession and
procedure IDs, free-text comments and reasons, private text, and every
instance UID. None may appear in `json.dumps(scan.summary())`, in the
provenance, in `medlens info --json`, in a refusal message, or in the NIfTI
written by `medlens convert`.

Values too short or too generic to identify anyone ("1", "ANONYMOUS", a
4-digit number) are left out, as are values that also occur in a technical
attribute the viewer legitimately shows (e.g. a private tag repeating the
Manufacturer). Digit-only values (IDs, dates, UIDs) are matched with digit
boundaries so that a 39-digit mapped UID cannot match a date by accident;
other values case-insensitively as substrings.

Inputs are copied to a neutral name first: the user's own path is not PHI
that the engine leaked, and the CLI may echo it.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import shutil
import struct
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import keyword_for_tag
from pydicom.uid import UID_dictionary

import _mutate as mz

DEID_DIR = mz.deid_data_dir()
PYDICOM_DIR = mz.pydicom_data_dir()

# Keywords whose values identify a person, a place or an encounter (PS3.15 Table E.1-1, basic profile).
PHI_KEYWORDS = {
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientMotherBirthName",
    "OtherPatientIDs",
    "OtherPatientNames",
    "IssuerOfPatientID",
    "PatientAge",
    "PatientSex",
    "PatientSize",
    "PatientWeight",
    "MilitaryRank",
    "BranchOfService",
    "MedicalRecordLocator",
    "EthnicGroup",
    "Occupation",
    "AdditionalPatientHistory",
    "PatientComments",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord",
    "RequestingPhysician",
    "OperatorsName",
    "StationName",
    "DeviceSerialNumber",
    "AccessionNumber",
    "StudyID",
    "RequestedProcedureID",
    "ScheduledProcedureStepID",
    "PerformedProcedureStepID",
    "ReasonForStudy",
    "RequestingService",
    "CurrentPatientLocation",
    "ImageComments",
    "StudyComments",
    "ContentCreatorName",
    "NetworkID",
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "RequestedProcedureDescription",
    "PerformedProcedureStepDescription",
    "CommentsOnThePerformedProcedureStep",
    "AdmittingDiagnosesDescription",
    "PatientState",
    "ResponsibleOrganization",
    "ResponsiblePerson",
    "DerivationDescription",
}
# Keywords that must never be metadata keys at all (their values may be too short to search for).
NEVER_KEYS = PHI_KEYWORDS | {
    "SOPInstanceUID",
    "MediaStorageSOPInstanceUID",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "StudyTime",
    "SeriesTime",
    "AcquisitionTime",
    "ContentTime",
    "AcquisitionDateTime",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "PatientBirthName",
}
# Technical attributes a viewer may show; a candidate contained in one of their values is not evidence of a leak.
TECHNICAL = (
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "BodyPartExamined",
    "ImageType",
    "PhotometricInterpretation",
    "SOPClassUID",
    "ConvolutionKernel",
    "ScanningSequence",
    "SequenceVariant",
    "PatientPosition",
    "ViewPosition",
    "Laterality",
    "ImageLaterality",
    "RescaleType",
    "MRAcquisitionType",
)
GENERIC = {
    "ANONYMOUS",
    "ANONYMIZED",
    "ANONYMISED",
    "ANON",
    "UNKNOWN",
    "NONE",
    "NULL",
    "TEST",
    "PHANTOM",
    "REMOVED",
    "DELETED",
    "N/A",
    "DEFAULT",
    "NO NAME",
    "NONAME",
}
TEXT_VRS = {"LO", "SH", "ST", "LT", "UT", "PN", "AE", "UC"}
SC_PREFIX = "1.2.840.10008.5.1.4.1.1.7"


# --------------------------------------------------------------------------
# Which files, and what in them identifies someone
# --------------------------------------------------------------------------


def _datasets(path: Path) -> list:
    """The pydicom datasets in a file (or in a zip's members), headers only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path.suffix.lower() == ".zip":
            out = []
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    with zf.open(info) as fh:
                        head = fh.read(1 << 20)  # headers sit well inside the first MiB
                    try:
                        out.append(pydicom.dcmread(io.BytesIO(head), stop_before_pixels=True, force=True))
                    except Exception:
                        pass
            return out
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            return []
        # force=True makes a "dataset" out of any text file: keep only real DICOM
        return [ds] if any(k in ds for k in ("SOPClassUID", "PatientName", "PatientID", "StudyInstanceUID")) else []


def _corpus() -> list[tuple[str, Path]]:
    files = []
    if DEID_DIR and DEID_DIR.is_dir():
        files += [
            ("deid-data/" + str(p.relative_to(DEID_DIR)), p)
            for p in sorted(DEID_DIR.rglob("*"))
            if p.is_file() and p.suffix.lower() in (".dcm", ".zip")
        ]
    for sub in ("test_files", "charset_files", "palettes"):
        for p in sorted((PYDICOM_DIR / sub).rglob("*")):
            if p.is_file() and not p.name.endswith((".py", ".pyc", ".txt", ".json", ".md", ".dump", ".icc", ".gz")):
                files.append(("pydicom/" + str(p.relative_to(PYDICOM_DIR)), p))
    return [(name, p) for name, p in files if _datasets(p)]


CORPUS = _corpus()


def _walk(ds):
    """Every data element, nested sequences included."""
    for elem in ds:
        yield elem
        if elem.VR == "SQ" and elem.value:
            for item in elem.value:
                yield from _walk(item)


def _strings(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray)):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return []
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return [s for v in value for s in _strings(v)]
    return [str(value)]


def _trivial(s: str) -> bool:
    core = s.strip().strip("^= ")
    if len(core) < 4 or core.upper() in GENERIC or len(set(core)) == 1:
        return True
    if core.isdigit() and len(core) < 6:
        return True
    if not re.search(r"[A-Za-z0-9]", core) and not re.search(r"[^\x00-\x7f]", core):
        return True
    return False


def identifying_values(datasets) -> dict[str, str]:
    """value -> where it came from, for every meaningful identifying value."""
    found: dict[str, str] = {}
    technical: list[str] = []

    def add(value: str, origin: str) -> None:
        value = value.strip().rstrip("^= ").strip()
        if not _trivial(value):
            found.setdefault(value, origin)

    for ds in datasets:
        meta = getattr(ds, "file_meta", None)
        if meta is not None and meta.get("MediaStorageSOPInstanceUID"):
            add(str(meta.MediaStorageSOPInstanceUID), "MediaStorageSOPInstanceUID")
        for kw in TECHNICAL:
            technical += _strings(ds.get(kw)) if kw in ds else []
        for elem in _walk(ds):
            kw = elem.keyword or (keyword_for_tag(elem.tag) if not elem.tag.is_private else "") or str(elem.tag)
            vr = elem.VR
            try:
                values = _strings(elem.value)
            except Exception:
                continue
            for v in values:
                if vr == "PN" or kw in PHI_KEYWORDS:
                    add(v, kw)
                    for part in re.split(r"[\^=]", v):  # family / given / ideographic / phonetic parts
                        add(part, kw + " component")
                elif vr in ("DA", "DT"):
                    add(v, kw)
                elif vr == "TM":
                    add(v, kw)
                    add(v.split(".")[0], kw)
                elif vr == "UI" and v.strip() and v.strip() not in UID_dictionary:
                    add(v, kw)  # instance UIDs; registered (standard) UIDs are not identifying
                elif elem.tag.is_private and vr in TEXT_VRS and len(v.strip()) >= 6:
                    add(v, f"private {elem.tag}")
    tech_text = " ".join(technical).upper()
    return {v: o for v, o in found.items() if v.upper() not in tech_text}


def leaks(values: dict[str, str], text: str) -> list[str]:
    out = []
    lower = text.lower()
    for value, origin in values.items():
        if re.fullmatch(r"[0-9.]+", value):
            if re.search(r"(?<![0-9])" + re.escape(value) + r"(?![0-9])", text):
                out.append(f"{origin}={value!r}")
        elif value.lower() in lower:
            out.append(f"{origin}={value!r}")
    return out


def _neutral_copy(path: Path, folder: Path) -> Path:
    dest = folder / ("input.zip" if path.suffix.lower() == ".zip" else "input.dcm")
    shutil.copyfile(path, dest)
    return dest


def _run_cli(argv, capsys) -> tuple[int, str, str]:
    from engine.cli import main

    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _dump(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, default=str)


# --------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------


def test_identifier_collection_finds_real_phi():
    """Guard against a collector that finds nothing (and so proves nothing)."""
    if DEID_DIR is None:
        pytest.skip("deid-data is not installed")
    values = identifying_values(_datasets(DEID_DIR / "ultrasounds" / "GREYSCALE_IMAGE.dcm"))
    for expected in (
        "ZZZ TEST PATIENTFIVE",
        "2020202020202",
        "19510829",
        "CCHS CLEVELAND CLINIC CANADA",
        "104111149",
        "MCTOUUS01",
        "392075967",
        "KILLEEN",
        "E20202020202",
        "1.2.840.113663.1500.1.392075967.2.1.20170302.172449.399",
    ):
        assert expected in values, expected
    cookie = identifying_values(_datasets(DEID_DIR / "dicom-cookies" / "image1.dcm"))
    assert {"nameless waterfall", "cookie-47", "STANFORD", "Dr. dry breeze", "20131210"} <= set(cookie)


@pytest.mark.parametrize("name,path", CORPUS, ids=[n for n, _ in CORPUS])
def test_no_identifying_value_leaves_the_engine(name, path, tmp_path, capsys, caplog):
    from engine.io import load
    from engine.scan import ScanError

    values = identifying_values(_datasets(path))
    src = _neutral_copy(path, tmp_path)
    caplog.set_level("DEBUG")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result, refusal = load([src]), None
        except ScanError as exc:
            result, refusal = None, str(exc)

    rc, out, err = _run_cli(["info", "--json", src], capsys)
    engine_logs = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(("engine", "medlens")))
    problems = []
    if refusal is not None:
        assert rc == 2, f"CLI exit status {rc} for a file load() refuses"
        problems += [f"refusal message: {x}" for x in leaks(values, refusal)]
        problems += [f"CLI stderr: {x}" for x in leaks(values, err)]
    else:
        assert rc == 0, err
        for scan in result.scans:
            summary = scan.summary()
            problems += [f"summary: {x}" for x in leaks(values, _dump(summary))]
            problems += [f"provenance: {x}" for x in leaks(values, _dump(asdict(scan.provenance)))]
            problems += [f"label: {x}" for x in leaks(values, scan.label)]
            bad_keys = sorted(set(scan.metadata) & NEVER_KEYS)
            assert not bad_keys, f"identifying attributes kept in metadata: {bad_keys}"
        # The app's metadata panel and warnings for every series, as the handler builds them.
        from app.handlers import ScanSession, show_series

        session = ScanSession(scans=list(result.scans), skipped=[f"{s.name}: {s.reason}" for s in result.skipped])
        for i in range(len(result.scans)):
            shown = show_series(session, i)
            problems += [f"app metadata panel: {x}" for x in leaks(values, _dump(shown["metadata"]))]
            problems += [f"app warnings: {x}" for x in leaks(values, str(shown["warnings"]))]
        lines = [json.loads(line) for line in out.splitlines() if line.strip()]
        assert len(lines) == len(result.scans)
        problems += [f"CLI JSON: {x}" for x in leaks(values, _dump([{k: v for k, v in d.items() if k != "path"} for d in lines]))]
        problems += [f"CLI stderr: {x}" for x in leaks(values, err)]
        for skipped in result.skipped:
            problems += [f"skip reason: {x}" for x in leaks(values, skipped.reason)]
    problems += [f"engine log: {x}" for x in leaks(values, engine_logs)]
    assert not problems, f"{len(values)} identifying values checked; leaked: " + "; ".join(sorted(set(problems)))


# --------------------------------------------------------------------------
# Burned-in text
# --------------------------------------------------------------------------


def _burn_in_expected(ds) -> str | None:
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        return "BurnedInAnnotation=YES"
    if str(ds.get("Modality", "")).upper() == "US":
        return "ultrasound"
    if str(ds.get("SOPClassUID", "")).startswith(SC_PREFIX):
        return "secondary capture"
    return None


BURN_IN = [(n, p) for n, p in CORPUS if any(_burn_in_expected(ds) for ds in _datasets(p))]


def test_burn_in_examples_exist():
    kinds = {_burn_in_expected(ds) for _, p in BURN_IN for ds in _datasets(p)}
    assert {"BurnedInAnnotation=YES", "ultrasound", "secondary capture"} <= kinds, kinds


@pytest.mark.parametrize("name,path", BURN_IN, ids=[n for n, _ in BURN_IN])
def test_burned_in_text_risk_is_flagged(name, path, tmp_path, capsys):
    from engine.io import load
    from engine.scan import ScanError

    src = _neutral_copy(path, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = load([src])
        except ScanError:
            pytest.skip("not loadable as an image (refusal is checked elsewhere)")
    reason = next(r for r in map(_burn_in_expected, _datasets(path)) if r)
    for scan in result.scans:
        assert scan.provenance.burned_in_text_risk, f"{reason}: not flagged"
        assert scan.summary()["burned_in_text_risk"] is True
    rc, out, _ = _run_cli(["info", "--json", src], capsys)
    assert rc == 0 and all(json.loads(line)["burned_in_text_risk"] for line in out.splitlines() if line.strip())


@pytest.mark.parametrize("rel", ["test_files/CT_small.dcm", "test_files/MR_small.dcm"])
def test_plain_ct_mr_not_flagged(rel):
    from engine.io import load

    scan = load([PYDICOM_DIR / rel]).scans[0]
    assert scan.provenance.burned_in_text_risk is False


def test_burned_in_annotation_no_is_not_flagged():
    if DEID_DIR is None:
        pytest.skip("deid-data is not installed")
    from engine.io import load

    path = DEID_DIR / "animals" / "cat.dcm"  # DX, BurnedInAnnotation NO
    assert str(pydicom.dcmread(path, stop_before_pixels=True).BurnedInAnnotation) == "NO"
    assert load([path]).scans[0].provenance.burned_in_text_risk is False


# --------------------------------------------------------------------------
# UID mapping
# --------------------------------------------------------------------------

UID_RE = re.compile(r"^2\.25\.(0|[1-9][0-9]*)$")


def _mapped(path) -> dict:
    from engine.io import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = load([path]).scans[0].metadata
    return {k: meta.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")}


def test_uids_are_mapped_consistently_and_never_kept(monkeypatch, tmp_path, capsys):
    import engine.deid as deid

    path = PYDICOM_DIR / "test_files" / "CT_small.dcm"
    raw = pydicom.dcmread(path, stop_before_pixels=True)
    first = _mapped(path)
    assert first["SeriesInstanceUID"] and first["StudyInstanceUID"]
    for key, value in first.items():
        if value is None:
            continue
        assert value != str(raw.get(key)), f"{key} kept as is"
        assert UID_RE.match(value) and len(value) <= 64, f"{key}={value!r} is not a valid UID"
    # same salt, fresh process state: same UIDs
    monkeypatch.setattr(deid, "_salt_cache", None)
    assert _mapped(path) == first
    # the CLI reports the same mapped UIDs
    rc, out, _ = _run_cli(["info", "--json", path], capsys)
    assert rc == 0 and json.loads(out.splitlines()[0])["metadata"]["SeriesInstanceUID"] == first["SeriesInstanceUID"]
    # another salt, other UIDs: the mapping is keyed, not a plain hash anyone can recompute
    monkeypatch.setenv("MEDLENS_UID_SALT", "another-salt")
    monkeypatch.setattr(deid, "_salt_cache", None)
    other = _mapped(path)
    assert other["SeriesInstanceUID"] != first["SeriesInstanceUID"]


def test_series_keep_distinct_mapped_uids(tmp_path):
    from engine.io import load

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    mz.write_series(a, 3)
    mz.write_series(b, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = load([a, b])
        again = load([a])
    assert len(result.scans) == 2
    uids = {s.metadata["SeriesInstanceUID"] for s in result.scans}
    assert len(uids) == 2
    assert again.scans[0].metadata["SeriesInstanceUID"] in uids
    original = str(pydicom.dcmread(next(a.iterdir()), stop_before_pixels=True).SeriesInstanceUID)
    assert original not in uids


# --------------------------------------------------------------------------
# File names and exported files
# --------------------------------------------------------------------------


def test_source_file_name_is_not_kept(tmp_path, capsys):
    """Users name files after patients; the Scan keeps no file name (scan.py's promise)."""
    from engine.io import load

    src = tmp_path / "Doe_Archibald_MRN7765403.dcm"
    shutil.copyfile(PYDICOM_DIR / "test_files" / "CT_small.dcm", src)
    scan = load([src]).scans[0]
    text = _dump(scan.summary()) + _dump(asdict(scan.provenance)) + scan.label
    assert "Archibald" not in text and "7765403" not in text


def _nifti_text(path: Path) -> str:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    header = data[:352]  # NIfTI-1 header + extension flag
    ext_end = int(struct.unpack_from("<f", data, 108)[0])  # vox_offset: header + extensions end here
    return (header + data[352:ext_end]).decode("latin-1")


CONVERT = [
    "deid-data/ultrasounds/GREYSCALE_IMAGE.dcm",
    "deid-data/humans/ctbrain1.dcm",
    "pydicom/test_files/CT_small.dcm",
    "pydicom/test_files/rtdose.dcm",
    "pydicom/test_files/dicomdirtests/77654033/CR1/6154",
]


@pytest.mark.parametrize("name", CONVERT)
def test_converted_nifti_carries_no_identifying_text(name, tmp_path, capsys):
    paths = dict(CORPUS)
    if name not in paths:
        pytest.skip(f"{name} not available")
    values = identifying_values(_datasets(paths[name]))
    src = _neutral_copy(paths[name], tmp_path)
    out = tmp_path / "out.nii.gz"
    rc, stdout, err = _run_cli(["convert", src, "-o", out], capsys)
    if rc == 2 and "colour" in err:
        pytest.skip("colour 2D images are not written as NIfTI")
    assert rc == 0, err
    text = _nifti_text(out)
    assert not leaks(values, text), leaks(values, text)
    assert not leaks(values, stdout + err)
