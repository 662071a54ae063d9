"""engine.pacs against a real Orthanc: search, retrieve through `dicomweb:` paths, and every failure as a clear error.

The server is started per module on a free loopback port with authentication
on (tests/_orthanc.py); skipped when Debian's orthanc is not installed,
required in CI (MEDLENS_REQUIRE_ORTHANC=1).
"""

from __future__ import annotations

import logging
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _orthanc import PASSWORD, PHI, PHI_STRINGS, USER, running_orthanc, save_series, synthetic_datasets, with_phi  # noqa: E402,F401

from engine.io import load  # noqa: E402
from engine.pacs import (  # noqa: E402
    NotAnImage,
    PacsAuthError,
    PacsClient,
    PacsNotFound,
    PacsUnreachable,
    PartialRetrieve,
    make_filter,
)


@pytest.fixture(scope="module")
def stored(orthanc, tmp_path_factory):
    """A synthetic CT series with made-up PHI, stored in Orthanc; (datasets, folder of the same files)."""
    folder = tmp_path_factory.mktemp("series")
    datasets = with_phi(synthetic_datasets(folder / "raw", 8))
    files = save_series(datasets, folder / "files")
    orthanc.store(datasets)
    return datasets, files


@pytest.fixture
def pacs_env(orthanc, monkeypatch):
    orthanc.env(monkeypatch)
    return orthanc


def _path(ds, series: bool = True) -> str:
    return f"dicomweb:{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}" if series else f"dicomweb:{ds.StudyInstanceUID}"


# --------------------------------------------------------------------------- search
@pytest.mark.parametrize(
    "filters",
    [
        {"patient_id": PHI["PatientID"]},
        {"accession": PHI["AccessionNumber"]},
        {"date": "20040101-20041231", "modality": "CT"},
        {"date": "2004-01-19"},
        {"study": "STUDY"},
    ],
)
def test_search_finds_the_study_and_its_series(pacs_env, stored, filters):
    datasets, _ = stored
    first = datasets[0]
    filters = {k: (first.StudyInstanceUID if v == "STUDY" else v) for k, v in filters.items()}
    with PacsClient() as pacs:
        studies = pacs.search(make_filter(**filters))
    match = [s for s in studies if s.study_uid == first.StudyInstanceUID]
    assert match, f"{filters} did not find the study"
    study = match[0]
    assert study.patient_id == PHI["PatientID"] and study.accession == PHI["AccessionNumber"]
    assert [r.series_uid for r in study.series] == [first.SeriesInstanceUID]
    assert study.series[0].n_instances == len(datasets) and study.series[0].modality == "CT"
    assert study.series[0].path == _path(first)


def test_search_by_another_patient_finds_nothing(pacs_env, stored):
    with PacsClient() as pacs:
        assert pacs.search(make_filter(patient_id="NOBODY123")) == []
        assert pacs.search(make_filter(modality="MR", study=stored[0][0].StudyInstanceUID)) == []


# --------------------------------------------------------------------------- retrieve
def test_a_pacs_series_is_a_path_read_like_its_files(pacs_env, stored):
    datasets, files = stored
    from_pacs = load([_path(datasets[0])]).scans
    from_disk = load([files]).scans
    assert len(from_pacs) == len(from_disk) == 1
    remote, local = from_pacs[0], from_disk[0]
    np.testing.assert_array_equal(remote.voxels, local.voxels)
    np.testing.assert_allclose(remote.affine, local.affine)
    assert remote.content_hash == local.content_hash
    assert remote.metadata == local.metadata  # the same de-identification, the same mapped UIDs
    assert remote.metadata["StudyInstanceUID"] != datasets[0].StudyInstanceUID
    text = str(remote.summary())
    assert not [s for s in PHI_STRINGS if s in text]
    # the identified context rides on the scan, for writing back only
    origin = remote.origin
    assert origin.study_uid == datasets[0].StudyInstanceUID and origin.server == pacs_env.dicomweb
    assert origin.header().PatientID == PHI["PatientID"]
    assert {i.sop_instance_uid for i in origin.instances} == {ds.SOPInstanceUID for ds in datasets}
    assert local.origin is None


def test_the_identified_context_is_never_serialised(pacs_env, stored):
    scan = load([_path(stored[0][0])]).scans[0]
    with pytest.raises(TypeError, match="never serialised"):
        pickle.dumps(scan.origin)
    with pytest.raises(TypeError):
        pickle.dumps(scan)
    assert "PHI" not in repr(scan.origin) and PHI["PatientID"] not in repr(scan.origin)


def _report_for(source):
    """A one-finding TID 1500 report in `source`'s study: a series that is no image."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="note"),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.DCM.Finding, codes.SCT.Absent)],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(),
            procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
            imaging_measurements=[group],
        ),
        series_instance_uid=generate_uid(),
        series_number=900,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )


def test_a_study_path_reads_every_image_series_and_skips_reports(pacs_env, stored, tmp_path):
    datasets, _ = stored
    study = datasets[0].StudyInstanceUID
    second = with_phi(synthetic_datasets(tmp_path / "second", 4), study_uid=study)
    pacs_env.store(second + [_report_for(second[0])])
    scans = load([f"dicomweb:{study}"]).scans
    assert sorted(s.voxels.shape[0] for s in scans) == [4, 8]


def test_non_image_series_is_refused_before_download(pacs_env, stored):
    from engine.pacs.locator import Locator
    from engine.pacs.retrieve import read_locator

    source = stored[0][0]
    report = _report_for(source)
    pacs_env.store([report])
    with PacsClient() as pacs:
        with pytest.raises(NotAnImage, match="structured report"):
            read_locator(pacs, Locator(source.StudyInstanceUID, report.SeriesInstanceUID))


def test_partial_retrieve_is_an_error_not_a_volume_with_holes(pacs_env, stored, monkeypatch):
    from engine.pacs.client import PacsClient as Client

    real = Client.iter_series
    monkeypatch.setattr(Client, "iter_series", lambda self, st, se: iter(list(real(self, st, se))[:-1]))  # one lost in transit
    with pytest.raises(Exception) as info:
        load([_path(stored[0][0])])
    assert "only 7 of the 8 instances" in str(info.value)
    with PacsClient() as pacs:
        from engine.pacs.locator import parse
        from engine.pacs.retrieve import read_locator

        with pytest.raises(PartialRetrieve):
            read_locator(pacs, parse(_path(stored[0][0])))


# --------------------------------------------------------------------------- failures
def test_wrong_password_is_a_clear_error(pacs_env, stored, monkeypatch):
    monkeypatch.setenv("MEDLENS_PACS_PASSWORD", "wrong-password")
    with pytest.raises(PacsAuthError, match="refused the credentials.*MEDLENS_PACS_PASSWORD") as info:
        with PacsClient() as pacs:
            pacs.check()
    assert "wrong-password" not in str(info.value)
    from engine.cli import main

    assert main(["info", _path(stored[0][0])]) == 2


def test_deleted_study_is_a_clear_error(pacs_env, tmp_path):
    datasets = with_phi(synthetic_datasets(tmp_path / "gone", 3))
    pacs_env.store(datasets)
    path = _path(datasets[0])
    assert load([path]).scans  # there
    pacs_env.delete_study(datasets[0].StudyInstanceUID)
    with pytest.raises(PacsNotFound, match="not on the PACS"):
        with PacsClient() as pacs:
            from engine.pacs.locator import parse
            from engine.pacs.retrieve import read_locator

            read_locator(pacs, parse(path))
    with pytest.raises(Exception, match="not on the PACS"):
        load([path])


def test_stopped_server_is_a_clear_error(tmp_path, monkeypatch):
    with running_orthanc(tmp_path / "short-lived") as server:
        server.env(monkeypatch)
        with PacsClient() as pacs:
            pacs.check()
    # the context has stopped it
    with pytest.raises(PacsUnreachable, match="cannot reach the PACS at http://127.0.0.1:.*check MEDLENS_PACS_URL"):
        with PacsClient() as pacs:
            pacs.check()


def test_credentials_and_identifiers_never_reach_the_logs(pacs_env, stored, caplog):
    datasets, _ = stored
    with caplog.at_level(logging.DEBUG):
        with PacsClient() as pacs:
            pacs.search(make_filter(patient_id=PHI["PatientID"]))
        load([_path(datasets[0])])
    text = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (PASSWORD, USER + ":", datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID, *PHI_STRINGS):
        assert secret not in text


def test_the_example_orthanc_configuration_runs_with_authentication_on(tmp_path):
    """examples/orthanc/orthanc.json, as the README points hospital IT to it: DICOMweb answers, only with credentials."""
    import json

    import requests
    from _orthanc import Orthanc, free_port, require_orthanc

    require_orthanc()
    base = json.loads((Path(__file__).resolve().parents[1] / "examples" / "orthanc" / "orthanc.json").read_text())
    assert base["AuthenticationEnabled"] is True and base["RemoteAccessAllowed"] is False and base["DicomServerEnabled"] is False
    [(user, password)] = base["RegisteredUsers"].items()
    server = Orthanc(tmp_path, free_port(), base=base)
    server.start()
    try:
        url = f"{server.dicomweb}/studies"
        assert requests.get(url, timeout=10).status_code == 401
        assert requests.get(url, auth=(user, "wrong"), timeout=10).status_code == 401
        assert requests.get(url, auth=(user, password), timeout=10).json() == []
    finally:
        server.stop()
