"""The PACS tab through the app's API (gradio_client), against a real Orthanc: status, search, open in the viewer,
label, send results back; and nothing of the study's patient data in Gradio's cache afterwards."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _app import plain_value, running_app  # noqa: E402
from _orthanc import PHI, PHI_STRINGS, running_orthanc, synthetic_datasets, with_phi  # noqa: E402

PACS_API = {"/pacs_status", "/pacs_status_on_open", "/pacs_search", "/pacs_select_row", "/pacs_open", "/pacs_send"}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc holding one synthetic CT study with made-up patient data; MEDLENS_PACS_* point at it for the module."""
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        datasets = with_phi(synthetic_datasets(tmp_path_factory.mktemp("ct"), 8))
        server.store(datasets)
        patch = pytest.MonkeyPatch()
        server.env(patch)
        try:
            yield server, datasets
        finally:
            patch.undo()


@pytest.fixture(scope="module")
def app_server(pacs, tmp_path_factory, tiny):
    cache = tmp_path_factory.mktemp("gradio_cache_pacs")
    with running_app(cache, model=tiny) as (url, demo):
        yield url, cache


@pytest.fixture
def client(app_server):
    from gradio_client import Client

    return Client(app_server[0], verbose=False, download_files=False)


def test_pacs_endpoints_are_named(client):
    api = client.view_api(return_format="dict", print_info=False)
    assert PACS_API <= set(api["named_endpoints"])
    assert not api["unnamed_endpoints"]
    params = [p["parameter_name"] for p in api["named_endpoints"]["/pacs_search"]["parameters"]]
    assert params == ["patient_id", "accession", "date", "modality"]


def test_status_names_the_server_and_never_the_password(client, pacs):
    status = client.predict(api_name="/pacs_status")
    assert pacs[0].dicomweb in status and "medlens-test" in status
    assert "correct-horse" not in status


def test_search_open_label_and_send_back(client, pacs, app_server, tiny):
    server, datasets = pacs
    table, pick, status = client.predict(PHI["PatientID"], "", "", "CT", api_name="/pacs_search")
    rows = plain_value(table)["data"]
    assert len(rows) == 1 and rows[0][1] == PHI["PatientID"] and rows[0][4] == "CT"  # what the PACS returns to this user
    assert "1 study" in status
    outputs = client.predict(0, api_name="/pacs_open")
    metadata = next(o for o in outputs if isinstance(o, dict) and "series" in o)
    assert metadata["series"]["shape"][0] == len(datasets)
    text = str(metadata)
    assert not [s for s in PHI_STRINGS if s in text] and datasets[0].StudyInstanceUID not in text
    client.predict(0, 0, tiny, "auto", "liver\nlung", "softmax", "mean", ["axial"], 3, api_name="/label_scan")
    sent = client.predict(0, api_name="/pacs_send")
    assert "Stored SR, SEG, SC" in sent and server.dicomweb in sent
    ours = [
        s for s in server.series_of(datasets[0].StudyInstanceUID) if (s.get("0008103E", {}).get("Value") or [""])[0].startswith("MedLens")
    ]
    assert sorted(s["00080060"]["Value"][0] for s in ours) == ["OT", "SEG", "SR"]
    # nothing of the study's patient data, nor its real UIDs, was written into Gradio's cache
    cache = app_server[1]
    leaked = []
    for path in cache.rglob("*"):
        if path.is_file():
            raw = path.read_bytes().decode("latin-1")
            leaked += [f"{path.name}: {s}" for s in (*PHI_STRINGS, datasets[0].StudyInstanceUID) if s in raw]
    assert not leaked


def test_send_needs_a_scan_from_the_pacs(client, tmp_path):
    from gradio_client import handle_file

    from _series import synthetic_ct_series, zip_files

    files = synthetic_ct_series(tmp_path / "s", n_slices=4, marker=False)
    client.predict([handle_file(str(zip_files(files, tmp_path / "s.zip")))], api_name="/load_files")
    with pytest.raises(Exception, match="Open a series from the PACS first"):
        client.predict(0, api_name="/pacs_send")


def test_without_a_pacs_the_tab_says_what_to_set(client, monkeypatch):
    monkeypatch.delenv("MEDLENS_PACS_URL")
    assert "MEDLENS_PACS_URL" in client.predict(api_name="/pacs_status")
    with pytest.raises(Exception, match="No PACS configured"):
        client.predict("X1", "", "", "any", api_name="/pacs_search")
