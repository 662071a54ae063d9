"""The Ask panel (and the Q-Former choice of the labels panel) through the app's API, with a tiny random Q-Former."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _app import plain_value, plotly_figure, running_app  # noqa: E402
from _ask import tiny_ask_folder  # noqa: E402
from _series import decode_data_url_png, synthetic_ct_series, zip_files  # noqa: E402

ASK_API = {"/ask_question", "/ask_suggested", "/ask_suggestions", "/ask_evidence", "/ask_goto_slice"}
CLOSED = "Is the liver visible?"
OPEN = "Which organs are in view?"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_ask):
    """(url, gradio cache dir, demo): the app with MEDLENS_ASK_MODEL pointing at the tiny Q-Former."""
    cache = tmp_path_factory.mktemp("gradio_cache_ask")
    patch = pytest.MonkeyPatch()
    patch.setenv("MEDLENS_ASK_MODEL", tiny_ask)
    try:
        with running_app(cache) as (url, demo):
            yield url, cache, demo
    finally:
        patch.undo()


@pytest.fixture
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False, download_files=False)  # a new client: a new session, no scan yet


_value, _plot = plain_value, plotly_figure  # shared helpers (tests/_app.py)


def _cache_files(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file()]


def _upload_ct(client, tmp_path, n_slices=8):
    from gradio_client import handle_file

    files = synthetic_ct_series(tmp_path / "s", n_slices=n_slices, marker=False)
    return client.predict([handle_file(str(zip_files(files, tmp_path / "s.zip")))], api_name="/load_files")


def _ask(client, model, question, axial=4, center=50, width=400):
    return client.predict(0, 0, model, question, axial, center, width, False, 20, api_name="/ask_question")


def test_ask_endpoints_are_named(server, client, tiny_ask):
    api = client.view_api(return_format="dict", print_info=False)
    assert ASK_API <= set(api["named_endpoints"])
    assert not api["unnamed_endpoints"]
    params = [p["parameter_name"] for p in api["named_endpoints"]["/ask_question"]["parameters"]]
    assert params == ["series", "volume", "model", "question", "axial", "center", "width", "mip", "mip_mm"]
    components = {c.get("props", {}).get("elem_id"): c["props"] for c in server[2].config["components"]}
    assert components["ml-ask-model"]["value"] == tiny_ask  # MEDLENS_ASK_MODEL
    assert any("(3D, Q-Former)" in label for label, _ in components["ml-lp-model"]["choices"])


def test_ask_a_volume(server, client, tiny_ask, tmp_path):
    _upload_ct(client, tmp_path)
    # the scan changed: questions suggested for a CT, nothing answered yet
    suggested, answer, candidates, slices, evidence_view, result = client.predict(0, tiny_ask, api_name="/ask_suggestions")
    from engine.ask.questions import suggested_questions

    assert [c[0] for c in suggested["choices"]] == suggested_questions("CT") and suggested["choices"]
    assert answer == "" and result is None and candidates["visible"] is False and "ask a question" in evidence_view

    answer, candidates, slices, evidence_view, result = _ask(client, tiny_ask, CLOSED)
    assert result["closed"] is True and result["answer"] in ("yes", "no") and result["family"] == "organ_presence"
    shown = "**Answer: uncertain** (best guess " if result["uncertain"] else "**Answer:** "
    assert f"{shown}{result['answer']}" in answer and "%" in answer and "not calibrated" in answer
    # the random tiny model reads the CT's modality as something else: the warning comes first, as the JSON says
    assert answer.startswith("⚠️ **Out of distribution") == bool(result["out_of_distribution"])
    bars = _plot(candidates)["data"][0]
    assert candidates["visible"] is True and bars["type"] == "bar"
    assert bars["y"][::-1] == [c["answer"] for c in result["candidates"]]  # best on top
    # which slices the queries attended to: one bar per axial slice, the attention sums to 100 %
    assert slices["visible"] is True
    per_slice = _plot(slices)["data"][0]
    assert per_slice["x"] == list(range(1, 9)) and sum(per_slice["y"]) == pytest.approx(100, abs=1e-3)
    top = result["most_attended_axial_slice"]
    assert 0 <= top < 8 and per_slice["y"][top] == max(per_slice["y"])
    # the evidence drawn on the current axial slice
    assert "slice 5/8" in evidence_view and "where the model looked" in evidence_view
    plain = decode_data_url_png(client.predict(0, 0, 4, 50, 400, False, 20, api_name="/render_axial"))
    shown = decode_data_url_png(evidence_view)
    assert shown.shape == plain.shape == (512, 512, 3)
    assert np.abs(shown.astype(int) - plain.astype(int)).max() > 30  # the heat map is blended in
    # moving the axial slider redraws the evidence there (no model call); going to the most attended slice moves the viewer
    assert "slice 7/8" in _value(client.predict(0, 0, 6, 50, 400, False, 20, api_name="/ask_evidence"))
    slider, axial_view, evidence_view = client.predict(0, 0, 50, 400, False, 20, api_name="/ask_goto_slice")
    assert _value(slider) == top and f"slice {top + 1}/8" in axial_view and "(the most attended slice)" in evidence_view

    # an open question: a generated answer, no candidates; the encoding is reused
    answer, candidates, slices, _, result = _ask(client, tiny_ask, OPEN)
    assert result["closed"] is False and result["candidates"] == [] and candidates["visible"] is False
    assert "Open question" in answer and slices["visible"] is True
    # non-English: accepted, answered as an open question
    result = _ask(client, tiny_ask, "¿Se ve el hígado?")[-1]
    assert result["closed"] is False and isinstance(result["answer"], str)
    assert _cache_files(server[1]) == []  # nothing patient-derived in Gradio's cache


def test_pick_a_suggested_question(server, client, tiny_ask, tmp_path):
    _upload_ct(client, tmp_path, n_slices=4)
    [suggestion, *_] = [c[0] for c in client.predict(0, tiny_ask, api_name="/ask_suggestions")[0]["choices"]]
    question, answer, _, _, _, result = client.predict(0, 0, tiny_ask, suggestion, 2, 50, 400, False, 20, api_name="/ask_suggested")
    assert question == suggestion and result["question"] == suggestion and "**Answer:**" in answer


def test_ask_a_2d_image(server, client, tiny_ask, tmp_path):
    from gradio_client import handle_file
    from PIL import Image

    png = tmp_path / "image.png"
    Image.fromarray((np.arange(64 * 80) % 251).astype(np.uint8).reshape(64, 80)).save(png)
    client.predict([handle_file(str(png))], api_name="/load_files")
    answer, candidates, slices, evidence_view, result = _ask(
        client, tiny_ask, "What is the imaging modality?", axial=0, center=125, width=250
    )
    assert result["closed"] is True and result["most_attended_axial_slice"] is None
    assert slices["visible"] is False and candidates["visible"] is True  # no per-slice chart for an image
    image = decode_data_url_png(evidence_view)
    assert image.shape[1] == 1024 and image.shape[0] == pytest.approx(1024 * 64 / 80, abs=2)
    assert "most attended" not in answer


def test_errors_are_clear_messages(server, client, tiny_ask, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="Upload a scan first"):
        client.predict(None, 0, tiny_ask, CLOSED, 0, 50, 400, False, 20, api_name="/ask_question")
    junk = tmp_path / "notes.txt"
    junk.write_text("not a scan\n")
    with pytest.raises(AppError, match="notes.txt"):  # a scan that fails to load ...
        client.predict([handle_file(str(junk))], api_name="/load_files")
    with pytest.raises(AppError, match="Upload a scan first"):  # ... leaves nothing to ask about
        client.predict(None, 0, tiny_ask, CLOSED, 0, 50, 400, False, 20, api_name="/ask_question")
    _upload_ct(client, tmp_path, n_slices=6)
    with pytest.raises(AppError, match="the question is empty"):
        _ask(client, tiny_ask, "   ")
    with pytest.raises(AppError, match="the limit is 500 characters") as info:
        _ask(client, tiny_ask, "x" * 10_000)
    assert len(str(info.value)) < 1000 and "Traceback" not in str(info.value)
    with pytest.raises(AppError, match="not in the list of choices"):
        _ask(client, "local-dir:/etc", CLOSED)  # never loaded: not one of the offered models (the handler checks too)
    with pytest.raises(AppError, match="No question-answering model chosen"):
        _ask(client, None, CLOSED)
    with pytest.raises(AppError, match="Ask a question about the scan shown first"):
        client.predict(0, 0, 50, 400, False, 20, api_name="/ask_goto_slice")


# --------------------------------------------------------------------------- the labels panel's Q-Former choice
def test_qformer_labels_in_the_labels_panel(server, client, tiny_ask, tmp_path):
    from gradio_client.exceptions import AppError

    _upload_ct(client, tmp_path, n_slices=6)
    model = "qformer:" + tiny_ask
    bar, slices, result, evidence_label, status = client.predict(
        0, 0, model, "auto", "liver\nlung\nbrain", "softmax", "mean", ["axial"], 6, api_name="/label_scan"
    )
    assert result["scope"] == "volume" and result["aggregation"] is None and result["n_slices"] == 0 and result["per_slice"] == []
    assert sorted(r["label"] for r in result["labels"]) == ["brain", "liver", "lung"]
    assert sum(r["probability"] for r in result["labels"]) == pytest.approx(1.0, abs=1e-5)
    shown = [r["reported_probability"] for r in result["labels"]]  # ranked by the reported probability
    assert shown == sorted(shown, reverse=True)
    figure = _plot(bar)
    assert "whole volume (3D Q-Former)" in figure["layout"]["title"]["text"]
    assert figure["data"][0]["y"][::-1] == [r["label"] for r in result["labels"]]
    assert slices["visible"] is False and evidence_label["choices"] == []
    assert "whole volume" in status and "no per-slice chart" in status
    with pytest.raises(AppError, match="softmax"):
        client.predict(0, 0, model, "auto", "liver, lung", "present-absent", "mean", ["axial"], 6, api_name="/label_scan")
    with pytest.raises(AppError, match="need a CLIP model"):
        client.predict(0, 0, 3, 50, 400, False, 20, model, "auto", "liver", True, api_name="/show_evidence")
    assert client.predict(0, 0, 3, 50, 400, False, 20, model, "auto", None, True, api_name="/evidence_slice") is not None


# --------------------------------------------------------------------------- handlers and engine helpers (no server)
def _image_scan():
    from engine.scan import Modality, Scan

    return Scan(np.tile(np.arange(32, dtype=np.float32), (32, 1)), (1.0, 1.0), np.eye(4), Modality.XRAY)


def test_2d_image_to_a_3d_only_model(tmp_path):
    import gradio as gr

    from app.ask_panel import make_ask
    from app.handlers import ScanSession

    source = f"local-dir:{tiny_ask_folder(tmp_path / 'model3d', supports_2d=False)}"
    with pytest.raises(gr.Error, match="3D volumes only"):
        make_ask({source})(ScanSession(scans=[_image_scan()]), 0, 0, source, CLOSED, 0, 128, 256, False, 20)


def test_model_not_installed_and_no_model(installed_models):
    import gradio as gr

    from app.ask_panel import NO_ASK_MODEL_MESSAGE, ask_model_choices, make_ask
    from app.handlers import ScanSession

    installed_models({})
    session = ScanSession(scans=[_image_scan()])
    with pytest.raises(gr.Error, match="'medlens-qformer' is not installed"):
        make_ask({"medlens-qformer"})(session, 0, 0, "medlens-qformer", CLOSED, 0, 128, 256, False, 20)
    choices, value = ask_model_choices(None)
    assert choices == [] and value is None
    with pytest.raises(gr.Error, match="No question-answering model chosen"):
        make_ask(set())(session, 0, 0, None, CLOSED, 0, 128, 256, False, 20)
    with pytest.raises(gr.Error, match="Choose a question-answering model from the list"):
        make_ask({"medlens-qformer"})(session, 0, 0, "local-dir:/etc", CLOSED, 0, 128, 256, False, 20)
    assert "MEDLENS_ASK_MODEL" in NO_ASK_MODEL_MESSAGE


def test_the_app_without_an_ask_model_says_so(monkeypatch, installed_models):
    import app

    monkeypatch.delenv("MEDLENS_ASK_MODEL", raising=False)
    installed_models({})
    demo = app.build_demo()
    props = {c.get("props", {}).get("elem_id"): c["props"] for c in demo.config["components"]}
    assert "No question-answering model installed" in props["ml-ask-answer"]["value"]
    assert props["ml-ask-model"]["choices"] == [] and not any("Q-Former" in label for label, _ in props["ml-lp-model"]["choices"])


def test_evidence_view_follows_the_views_orientation():
    """A map peaked at one voxel lands where the axial view shows that voxel (engine.views.extract_slice)."""
    from types import SimpleNamespace

    from engine.ask.api import evidence_view
    from engine.scan import Modality, Scan
    from engine.views import extract_slice

    voxels = np.zeros((5, 40, 60), np.float32)
    scan = Scan(voxels, (2.0, 1.0, 1.0), np.diag([1.0, 1.0, 2.0, 1.0]), Modality.CT)
    heat = np.zeros_like(voxels)
    heat[3, 5, 50] = 1.0  # slice 3, row 5, column 50 of the array
    view = evidence_view(scan, SimpleNamespace(volume_map=heat))
    assert view.n_slices == 5 and view.top_slice == 3 and view.slice_weights.sum() == pytest.approx(1.0)
    expected = extract_slice(Scan(heat, scan.spacing, scan.affine, Modality.CT), "axial", 3)[0]
    assert np.unravel_index(view.overlay(3).argmax(), view.overlay(3).shape) == np.unravel_index(expected.argmax(), expected.shape)
    assert view.overlay(99).shape == view.overlay(4).shape  # clamped, never an IndexError
    big = Scan(np.zeros((2, 512, 400), np.float32), (1.0, 1.0, 1.0), np.eye(4), Modality.CT)
    small = evidence_view(big, SimpleNamespace(volume_map=np.ones((2, 512, 400), np.float32)))
    assert small.axial.shape == (2, 128, 100) and small.axial.dtype == np.float16  # kept small per user


def test_label_volume_has_the_label_result_shape(tiny_ask):
    from engine.ask.api import label_volume
    from engine.scan import Modality, Scan
    from engine.zeroshot import PromptError, load_prompt_set

    scan = Scan(np.random.default_rng(0).normal(size=(6, 32, 32)).astype(np.float32), (3.0, 1.0, 1.0), np.eye(4), Modality.CT)
    result = label_volume(scan, None, tiny_ask)  # None: the CT preset
    assert {"labels", "mode", "aggregation", "model", "inference_path", "prompt_set", "logit_scale", "modality", "n_slices"} <= set(result)
    assert sorted(r["label"] for r in result["labels"]) == sorted(load_prompt_set("ct").default_labels)
    assert result["prompt_set"] == "ct" and result["scope"] == "volume" and result["mode"] == "softmax"
    assert result["per_slice"] == [] and result["n_slices"] == 0 and result["aggregation"] is None
    from engine.ask.api import volume_labels
    from engine.zeroshot import LabelResult

    typed = volume_labels(scan, None, tiny_ask)  # the typed result the dict comes from
    assert isinstance(typed, LabelResult) and typed.scope == "volume" and typed.to_dict() == result
    assert typed.top.label == result["labels"][0]["label"]
    with pytest.raises(PromptError, match="at least two labels"):
        label_volume(scan, "liver", tiny_ask)
