"""The zero-shot labels panel through the app's API (gradio_client), with a tiny CLIP."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _app import plain_value, plotly_figure  # noqa: E402
from _series import decode_data_url_png, synthetic_ct_series, zip_files  # noqa: E402

LABEL_API = {"/label_preset", "/label_scan", "/show_evidence", "/set_evidence_label", "/evidence_slice"}


@pytest.fixture
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False, download_files=False)


def _label(
    client, tiny, labels="liver\nlung\nbrain", *, mode="softmax", aggregation="mean", planes=("axial",), n_slices=6, prompt_set="auto"
):
    return client.predict(0, 0, tiny, prompt_set, labels, mode, aggregation, list(planes), n_slices, api_name="/label_scan")


_value, _plot = plain_value, plotly_figure  # shared helpers (tests/_app.py)


def _upload_ct(client, tmp_path, n_slices=8):
    from gradio_client import handle_file

    files = synthetic_ct_series(tmp_path / "s", n_slices=n_slices, marker=False)
    return client.predict([handle_file(str(zip_files(files, tmp_path / "s.zip")))], api_name="/load_files")


def test_label_endpoints_are_named(server, client):
    api = client.view_api(return_format="dict", print_info=False)
    assert LABEL_API <= set(api["named_endpoints"])
    assert not api["unnamed_endpoints"]
    params = [p["parameter_name"] for p in api["named_endpoints"]["/label_scan"]["parameters"]]
    assert params == ["series", "volume", "model", "prompt_set", "labels", "mode", "aggregation", "planes", "n_slices"]


def test_label_a_volume(server, client, tiny, tmp_path):
    _upload_ct(client, tmp_path)
    bar, slices, result, evidence_label, status = _label(client, tiny)
    assert sum(r["probability"] for r in result["labels"]) == pytest.approx(1.0, abs=1e-5)
    assert result["aggregation"] == "mean" and result["n_slices"] == 6 and result["prompt_set"] == "ct"
    names = [r["label"] for r in result["labels"]]
    assert sorted(names) == ["brain", "liver", "lung"]
    figure = _plot(bar)
    assert figure["data"][0]["type"] == "bar" and figure["data"][0]["y"][::-1] == names  # best on top
    assert slices["visible"] is True
    per_slice = _plot(slices)
    assert {trace["name"] for trace in per_slice["data"]} == set(names)
    assert len(per_slice["data"][0]["x"]) == 6
    assert evidence_label["value"] == names[0] and [c[0] for c in evidence_label["choices"]] == names
    assert names[0] in status and "mean over 6 slices" in status
    # deterministic: the same request gives the same answer
    again = _label(client, tiny)[2]
    assert again == result
    # max aggregation is reported as such
    assert _label(client, tiny, aggregation="max")[2]["aggregation"] == "max"
    # nothing patient-derived in Gradio's cache
    assert [p for p in server[1].rglob("*") if p.is_file()] == []


def test_present_absent_and_preset(server, client, tiny, tmp_path):
    _upload_ct(client, tmp_path, n_slices=4)
    labels, prompt_set = client.predict("xray/chest findings", api_name="/label_preset")
    assert prompt_set == "xray" and "pneumonia" in labels.splitlines()
    result = _label(client, tiny, labels="ascites\nkidney stone", mode="present-absent", prompt_set="ct")[2]
    assert result["mode"] == "present-absent"
    assert all(0 < r["probability"] < 1 and "absent_score" in r for r in result["labels"])
    preset = _label(client, tiny, labels="")[2]  # empty box: the modality's preset
    from engine.zeroshot import load_prompt_set

    assert sorted(r["label"] for r in preset["labels"]) == sorted(load_prompt_set("ct").default_labels)


def test_evidence_overlay_on_the_axial_view(server, client, tiny, tmp_path):
    out = _upload_ct(client, tmp_path)
    pytest.importorskip("engine.heatmap")
    _label(client, tiny)
    args = (0, 0, 4, 50, 400, False, 20, tiny, "auto", "liver")
    plain = client.predict(*args, False, api_name="/show_evidence")
    shown = client.predict(*args, True, api_name="/show_evidence")
    assert "evidence for" in shown and "evidence for" not in plain
    assert decode_data_url_png(shown).shape == decode_data_url_png(plain).shape == (512, 512, 3)
    assert "slice 5/8" in shown
    moved = client.predict(0, 0, 6, 50, 400, False, 20, tiny, "auto", "liver", True, api_name="/evidence_slice")
    assert "slice 7/8" in _value(moved) and "evidence for" in _value(moved)
    other = client.predict(*args[:-1], "brain", True, api_name="/set_evidence_label")
    assert "evidence for &#x27;brain&#x27;" in other or "evidence for 'brain'" in other
    assert [p for p in server[1].rglob("*") if p.is_file()] == []
    del out


def test_2d_image(server, client, tiny, tmp_path):
    from gradio_client import handle_file
    from PIL import Image

    png = tmp_path / "image.png"
    Image.fromarray((np.arange(64 * 80) % 251).astype(np.uint8).reshape(64, 80)).save(png)
    client.predict([handle_file(str(png))], api_name="/load_files")
    bar, slices, result, _, _ = _label(client, tiny, labels="normal, pneumonia", prompt_set="xray")
    assert result["aggregation"] is None and result["prompt_set"] == "xray"
    assert slices["visible"] is False
    assert sum(r["probability"] for r in result["labels"]) == pytest.approx(1.0, abs=1e-5)
    pytest.importorskip("engine.heatmap")
    shown = client.predict(0, 0, 0, 125, 250, False, 20, tiny, "xray", "pneumonia", True, api_name="/show_evidence")
    assert "evidence for" in shown and decode_data_url_png(shown).shape[1] == 1024


def test_errors_are_clear(server, client, tiny, tmp_path):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="Upload a scan first"):
        client.predict(None, 0, tiny, "auto", "a, b", "softmax", "mean", ["axial"], 6, api_name="/label_scan")
    _upload_ct(client, tmp_path, n_slices=4)
    with pytest.raises(AppError, match="no labels given"):
        _label(client, tiny, labels=" , ;")
    with pytest.raises(AppError, match="at least two labels"):
        _label(client, tiny, labels="liver")
    with pytest.raises(AppError):  # not one of the offered models: never loaded
        _label(client, "local-dir:/etc")
    with pytest.raises(AppError, match="Label the scan first"):
        client.predict(0, 0, 2, 50, 400, False, 20, tiny, "auto", None, True, api_name="/show_evidence")


# --------------------------------------------------------------------------- no model
def test_app_without_a_model_starts_and_says_so(monkeypatch, installed_models):
    import gradio as gr

    import app
    from app.labels_panel import NO_MODEL_MESSAGE, make_label_scan, model_choices

    installed_models({})
    choices, value = model_choices(None)
    assert value is None and all(not v.startswith("local-dir:") for _, v in choices)
    demo = app.build_demo()
    markdown = [c for c in demo.config["components"] if c.get("props", {}).get("elem_id") == "ml-lp-status"]
    assert markdown and "No model installed" in markdown[0]["props"]["value"]
    from engine.scan import Modality, Scan
    from app.handlers import ScanSession

    session = ScanSession(scans=[Scan(np.zeros((8, 8), np.float32), (1.0, 1.0), np.eye(4), Modality.XRAY)])
    with pytest.raises(gr.Error, match="No model chosen"):
        make_label_scan({v for _, v in choices})(session, 0, 0, None, "auto", "a, b", "softmax", "mean", ["axial"], 12)
    assert "MEDLENS_MODEL" in NO_MODEL_MESSAGE


def test_a_model_that_fails_to_load_is_a_clear_error(tmp_path):
    import gradio as gr

    from app.handlers import ScanSession
    from app.labels_panel import make_label_scan
    from engine.scan import Modality, Scan

    broken = f"local-dir:{tmp_path}"  # an empty folder
    session = ScanSession(scans=[Scan(np.zeros((8, 8), np.float32), (1.0, 1.0), np.eye(4), Modality.XRAY)])
    with pytest.raises(gr.Error, match="holds no model"):
        make_label_scan({broken})(session, 0, 0, broken, "auto", "a, b", "softmax", "mean", ["axial"], 12)


# --------------------------------------------------------------------------- real data
def test_real_files_through_the_app(server, client, tiny, shared_data, tmp_path):
    from gradio_client import handle_file

    series = shared_data / "volumes" / "totalsegmentator" / "ct_dicom_series"
    archive = zip_files(sorted(series.iterdir()), tmp_path / "ct.zip")
    out = client.predict([handle_file(str(archive))], api_name="/load_files")
    assert out[-3]["series"]["shape"][0] == 20  # metadata: the 20-slice series
    bar, slices, result, _, _ = _label(client, tiny, labels="", n_slices=8)
    assert result["modality"] == "CT" and result["aggregation"] == "mean" and result["n_slices"] == 8
    assert sum(r["probability"] for r in result["labels"]) == pytest.approx(1.0, abs=1e-5)
    xray = sorted((shared_data / "xray" / "nih_cxr14_1000" / "images").glob("*.png"))[0]
    client.predict([handle_file(str(xray))], api_name="/load_files")
    result = _label(client, tiny, labels="normal\npneumonia\ncardiomegaly", prompt_set="xray")[2]
    assert result["aggregation"] is None and len(result["labels"]) == 3
    assert [p for p in server[1].rglob("*") if p.is_file()] == []
