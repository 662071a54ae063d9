"""The round trip against a real Orthanc: STOW a CT series with made-up patient data, search it, label and ask through
`dicomweb:`, push SR + SEG + overlay into its study, find them there, validate them, and check that no patient data
reached the library, its WAL, the logs or the exported files.

Uses the 20-slice CT of ../shared/data when present (the issue's round trip), else a synthetic CT series.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _dciodvfy import dciodvfy_errors  # noqa: E402
from _orthanc import (  # noqa: E402,F401
    PHI,
    PHI_STRINGS,
    running_orthanc,
    save_series,
    shared_ct_datasets,
    synthetic_datasets,
    with_phi,
)
from conftest import SHARED_DATA  # noqa: E402

from engine.cli import main  # noqa: E402

RESEARCH = "research use, not for diagnosis"


@pytest.fixture(scope="module")
def study(orthanc, tmp_path_factory):
    """The CT series with made-up PHI, STOWed; returns its datasets and a folder with the same files."""
    from _series import CT_SERIES_REL

    folder = tmp_path_factory.mktemp("ct")
    if (SHARED_DATA / CT_SERIES_REL).is_dir():
        datasets = with_phi(shared_ct_datasets(SHARED_DATA))
    else:
        datasets = with_phi(synthetic_datasets(folder / "raw", 8))
    files = save_series(datasets, folder / "files")
    orthanc.store(datasets)
    return datasets, files


@pytest.fixture
def env(orthanc, monkeypatch, tmp_path):
    orthanc.env(monkeypatch)
    monkeypatch.setenv("MEDLENS_LIBRARY", str(tmp_path / "library.db"))
    return orthanc


def _path(ds) -> str:
    return f"dicomweb:{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}"


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _our_series(orthanc, study_uid: str) -> dict[str, dict]:
    """Series of the study written by MedLens, by modality."""
    out = {}
    for item in orthanc.series_of(study_uid):
        description = (item.get("0008103E", {}).get("Value") or [""])[0]
        if description.startswith("MedLens"):
            out[item["00080060"]["Value"][0]] = item
    return out


def _retrieve(orthanc, study_uid: str, series_uid: str) -> list:
    return orthanc.client().retrieve_series(study_uid, series_uid, media_types=(("application/dicom", "*"),))


def test_round_trip_search_label_push_find_and_validate(env, study, tiny, tmp_path, capsys, caplog):
    datasets, _files = study
    first = datasets[0]
    with caplog.at_level(logging.DEBUG):
        # search: the study and its series, as the PACS lists them to this user
        assert main(["pacs", "search", "--patient-id", PHI["PatientID"], "--json"]) == 0
        rows = _json_lines(capsys.readouterr().out)
        series = [r for r in rows if r["level"] == "series"]
        assert [r["path"] for r in series] == [_path(first)]
        # label through dicomweb:, export de-identified, push identified
        out = tmp_path / "export"
        code = main(
            [
                "label",
                series[0]["path"],
                "--labels",
                "liver",
                "lung",
                "kidney",
                "--model",
                tiny,
                "--slices",
                "4",
                "--export",
                str(out),
                "--push",
                "--json",
            ]
        )
        captured = capsys.readouterr()
    assert code == 0, captured.err
    [row] = _json_lines(captured.out)
    assert row["push"]["objects"] == ["SR", "SEG", "SC"] and row["push"]["stored"] == 3
    assert row["export"]["objects"] == ["SR", "SEG", "SC"]

    # found with QIDO in the same study, each saying research use
    ours = _our_series(env, first.StudyInstanceUID)
    assert set(ours) == {"SR", "SEG", "OT"}
    assert all(RESEARCH in item["0008103E"]["Value"][0] for item in ours.values())

    # the pushed SR, read back with highdicom: its findings and probabilities are the CLI's JSON
    from engine.results.sr import read_findings

    [pushed_sr] = _retrieve(env, first.StudyInstanceUID, ours["SR"]["0020000E"]["Value"][0])
    findings = read_findings(pushed_sr)
    assert [f["finding"] for f in findings] == [x["label"] for x in row["labels"]]
    assert [f["probability"] for f in findings] == pytest.approx(
        [x["reported_probability"] for x in row["labels"]], abs=1e-6
    )  # what is reported
    assert findings[0]["algorithm"].startswith("local-dir:") and findings[0]["version"]
    # written back into the patient's study: the real study and patient, only there
    assert pushed_sr.StudyInstanceUID == first.StudyInstanceUID and pushed_sr.PatientID == PHI["PatientID"]
    referenced = {
        i.ReferencedSOPInstanceUID
        for s in pushed_sr.CurrentRequestedProcedureEvidenceSequence
        for se in s.ReferencedSeriesSequence
        for i in se.ReferencedSOPSequence
    }
    assert referenced == {ds.SOPInstanceUID for ds in datasets}
    [pushed_seg] = _retrieve(env, first.StudyInstanceUID, ours["SEG"]["0020000E"]["Value"][0])
    source_uids = {ds.SOPInstanceUID for ds in datasets}
    assert {i.ReferencedSOPInstanceUID for i in pushed_seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} <= source_uids

    # dciodvfy: no error on any object written, pushed or exported
    pushed = [pushed_sr, pushed_seg, *_retrieve(env, first.StudyInstanceUID, ours["OT"]["0020000E"]["Value"][0])]
    for n, ds in enumerate(pushed):
        ds.save_as(tmp_path / f"pushed-{n}.dcm", enforce_file_format=True)
        assert dciodvfy_errors(tmp_path / f"pushed-{n}.dcm") == [], ds.Modality
    folder = Path(row["export"]["folder"])
    for name in ("sr.dcm", "seg.dcm", "sc.dcm"):
        assert dciodvfy_errors(folder / name) == [], name

    # the exported copy is de-identified: no patient data, no real UID; its SR says the same as the pushed one
    for name in ("sr.dcm", "seg.dcm", "sc.dcm", "result.json"):
        raw = (folder / name).read_bytes().decode("latin-1")
        assert not [s for s in PHI_STRINGS if s in raw], name
        assert first.StudyInstanceUID not in raw and first.SeriesInstanceUID not in raw, name
    assert read_findings(folder / "sr.dcm") == findings
    exported = json.loads((folder / "result.json").read_text())
    assert exported["source"]["kind"] == "dicomweb" and exported["notice"].startswith("Research use only")

    # nothing identifying in the logs or on stderr
    logged = "\n".join(r.getMessage() for r in caplog.records) + captured.err
    assert not [s for s in PHI_STRINGS if s in logged]


def test_ask_exports_and_pushes_answers(env, study, tmp_path, capsys):
    from _ask import tiny_ask_folder

    first = study[0][0]
    model = f"local-dir:{tiny_ask_folder(tmp_path / 'qformer')}"
    code = main(["ask", _path(first), "Is the liver visible?", "--model", model, "--export", str(tmp_path / "out"), "--push", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = _json_lines(captured.out)
    assert rows[-1]["push"]["objects"][0] == "SR" and "SEG" in rows[-1]["push"]["objects"]
    data = json.loads((Path(rows[-1]["export"]["folder"]) / "result.json").read_text())
    assert data["answers"][0]["question"] == "Is the liver visible?" and data["answers"][0]["answer"] == rows[0]["answer"]
    from engine.results.sr import read_findings

    findings = read_findings(Path(rows[-1]["export"]["folder"]) / "sr.dcm")
    expected = (
        "Not assessed: the model abstained"
        if rows[0]["out_of_distribution"]
        else ("Indeterminate" if rows[0]["uncertain"] else rows[0]["answer"])
    )  # the SR says what the JSON's verdict says
    assert findings[0]["finding"] == "Is the liver visible?" and findings[0]["value"] == expected


def test_library_holds_no_patient_data_and_reopens_the_pacs_source(env, study, tiny, tmp_path, capsys):
    import sqlite3

    datasets, _ = study
    first = datasets[0]
    library = tmp_path / "library.db"
    assert main(["index", _path(first), "--model", tiny, "--library", str(library), "--quiet"]) == 0
    # keep a second connection open so the WAL file is still there to be read
    holder = sqlite3.connect(library)
    holder.execute("SELECT count(*) FROM scans").fetchone()
    wal = library.with_name(library.name + "-wal")
    stored = library.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    text = stored.decode("latin-1")
    leaked = [s for s in PHI_STRINGS if s in text]
    leaked += [u for u in (first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID) if u in text]
    holder.close()
    assert not leaked, f"the library holds {leaked}"
    capsys.readouterr()
    assert main(["search", "liver", "--model", tiny, "--library", str(library), "--json"]) == 0
    [hit] = _json_lines(capsys.readouterr().out)
    assert hit["source"].startswith("dicomweb:sealed:")
    assert main(["info", hit["source"], "--json"]) == 0  # the stored source opens again, from the PACS
    [info] = _json_lines(capsys.readouterr().out)
    assert info["shape"][0] == len(datasets)


def test_push_refuses_a_scan_from_files(env, study, tiny, capsys):
    _datasets, files = study
    code = main(["label", str(files), "--labels", "liver", "lung", "--model", tiny, "--slices", "2", "--push"])
    err = capsys.readouterr().err
    assert code == 2 and "only a scan read from the PACS" in err


def test_push_only_to_the_pacs_the_scan_came_from(env, study, tmp_path):
    from engine.io import load
    from engine.pacs import PacsClient
    from engine.results import ExportError, push_scan, record_for

    scan = load([_path(study[0][0])]).scans[0]
    record = record_for(scan, labels={"labels": [{"label": "a", "probability": 0.6}, {"label": "b", "probability": 0.4}]})
    with running_orthanc(tmp_path / "other") as other:
        from engine.pacs.config import PacsConfig

        with PacsClient(PacsConfig(url=other.dicomweb, user="medlens-test", password="correct-horse-battery")) as client:
            with pytest.raises(ExportError, match="written back only there"):
                push_scan(client, scan, record, [])


def test_cli_errors_are_one_line(env, study, monkeypatch, capsys):
    monkeypatch.setenv("MEDLENS_PACS_PASSWORD", "wrong")
    assert main(["pacs", "search", "--modality", "CT"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused the credentials" in err[0] and "wrong" not in err[0]
    monkeypatch.delenv("MEDLENS_PACS_URL")
    assert main(["pacs", "status"]) == 2
    assert "MEDLENS_PACS_URL" in capsys.readouterr().err
