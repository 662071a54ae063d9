"""The Library tab through the app's API (gradio_client), with a tiny CLIP and a library in tmp.

Each test points MEDLENS_LIBRARY at its own file: the server runs in this
process and the handlers read the variable on every event.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _app import LIBRARY_API, plain_value  # noqa: E402

CAPTION = re.compile(r"^(⚠ out of distribution · )?-?\d+\.\d{4} · [A-Z]+ · #\d+$")


@pytest.fixture
def client(server, library):
    from gradio_client import Client

    return Client(server[0], verbose=False, download_files=False)


def _png(path: Path, seed: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, 64 * 64).reshape(64, 64) * (seed % 3 + 1) / 3
    Image.fromarray(np.clip(base + rng.normal(0, 40, (64, 64)), 0, 255).astype(np.uint8)).save(path)
    return path


def _chest_dicom(path: Path) -> Path:
    """pydicom's CT_small.dcm with BodyPartExamined = CHEST (a CT with a body part to filter on)."""
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.BodyPartExamined = "CHEST"
    ds.save_as(path, enforce_file_format=True)
    return path


def _upload(client, path: Path):
    from gradio_client import handle_file

    return client.predict([handle_file(str(path))], api_name="/load_files")


def _search(client, tiny, query="a chest radiograph", like=False, modality="any", body_part="any", label="any", k=12):
    series = 0 if like else None  # the series picker has no choices before an upload
    gallery, hits, status, _parts, _labels = client.predict(
        query, like, series, tiny, modality, body_part, label, k, api_name="/library_search"
    )
    return gallery, hits, status


def _choices(update) -> list[str]:
    return [c[0] if isinstance(c, (list, tuple)) else c for c in update["choices"]]


def _index(folder: Path, tiny: str):
    """Index `folder` with the engine (as `medlens index` would): scans with a source path."""
    from engine.library import index_paths
    from engine.zeroshot import resolve_model

    report = index_paths([folder], None, resolve_model(tiny))
    assert not report.failed
    return report


def _cache_files(server) -> list[Path]:
    return [p for p in server[1].rglob("*") if p.is_file()]


def test_library_endpoints_are_named(server, client):
    api = client.view_api(return_format="dict", print_info=False)
    assert LIBRARY_API <= set(api["named_endpoints"])
    assert not api["unnamed_endpoints"]
    params = [p["parameter_name"] for p in api["named_endpoints"]["/library_search"]["parameters"]]
    assert params == ["query", "like", "series", "model", "modality", "body_part", "label", "k"]


def test_add_search_filter_and_open(server, client, tiny, tmp_path, library):
    folder = tmp_path / "cases"
    folder.mkdir()
    pngs = [_png(folder / f"img{i}.png", seed=i) for i in range(3)]
    _chest_dicom(folder / "chest.dcm")
    # an empty library: a search says so and creates no file
    gallery, hits, status = _search(client, tiny)
    assert gallery == [] and "library is empty" in status and not library.exists()
    report = _index(folder, tiny)
    assert report.added == 4

    gallery, hits, status = _search(client, tiny)
    assert len(gallery) == len(hits) == 4 and "4 hits" in status and "cosine similarity" in status
    assert all(CAPTION.match(item["caption"]) for item in gallery)
    # a hit flagged out of distribution says so in its caption and in the status (the random tiny model misreads the DICOM)
    flagged = {h["scan_id"] for h in hits if h["out_of_distribution"]}
    assert {int(item["caption"].rsplit("#", 1)[1]) for item in gallery if item["caption"].startswith("⚠")} == flagged
    assert ("out of distribution" in status) == bool(flagged)
    assert all(item["image"]["url"].startswith("data:image/png;base64,") and item["image"]["path"] is None for item in gallery)
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    assert all("source" not in h for h in hits)  # server paths are not shown
    by_modality = {h["modality"]: h["scan_id"] for h in hits}
    ct_id = by_modality["CT"]
    assert gallery[[h["scan_id"] for h in hits].index(ct_id)]["caption"].endswith(f"· CT · #{ct_id}")

    # filters
    assert [h["scan_id"] for h in _search(client, tiny, modality="CT")[1]] == [ct_id]
    assert [h["scan_id"] for h in _search(client, tiny, body_part="chest")[1]] == [ct_id]
    gallery, hits, status = _search(client, tiny, modality="MR")
    assert hits == [] and "No match" in status
    assert len(_search(client, tiny, k=2)[1]) == 2

    # like the current scan: one already in the library is left out of its own results
    _upload(client, pngs[0])
    hits = _search(client, tiny, query="", like=True)[1]
    png_ids = {h["scan_id"] for h in hits if h["modality"] == "OTHER"}
    assert len(hits) == 3 and ct_id in {h["scan_id"] for h in hits} and len(png_ids) == 2
    # text + like together: fused by rank
    assert _search(client, tiny, query="lung", like=True)[1][0]["ranking"] == "rrf"
    # a scan that is not in the library is embedded on the fly
    _upload(client, _png(tmp_path / "new.png", seed=7))
    assert len(_search(client, tiny, query="", like=True)[1]) == 4

    # open by id: read again from its source, shown in the Scan tab
    out = client.predict(ct_id, api_name="/library_open")
    metadata = next(v for v in out if isinstance(v, dict) and "series" in v)
    assert metadata["series"]["modality"] == "CT" and metadata["series"]["shape"] == [128, 128]
    assert any(isinstance(v, str) and f"Opened scan #{ct_id}" in v for v in out)
    assert any(isinstance(plain_value(v), str) and "data:image/png;base64," in plain_value(v) for v in out)  # a view
    # its source gone: a clear message
    gone = next(h["scan_id"] for h in hits if h["modality"] == "OTHER")
    from engine.library import connect, get_scan

    with connect() as db:
        Path(get_scan(db, gone)["source"]).unlink()
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="no longer there"):
        client.predict(gone, api_name="/library_open")
    with pytest.raises(AppError, match="no scan #999"):
        client.predict(999, api_name="/library_open")
    assert _cache_files(server) == []  # thumbnails travel as data: URLs, never through Gradio's cache


def test_add_current_scan_and_open_it(server, client, tiny, tmp_path, library):
    from gradio_client.exceptions import AppError

    _upload(client, _png(tmp_path / "a.png", seed=11))
    status, scan_id, _parts, _labels = client.predict(0, tiny, api_name="/library_add")
    assert f"Added as scan #{scan_id}" in status and "1 searchable with model" in status
    status, again, _, _ = client.predict(0, tiny, api_name="/library_add")
    assert again == scan_id and "Already in the library" in status
    gallery, hits, _ = _search(client, tiny, query="an image")
    assert [h["scan_id"] for h in hits] == [scan_id] and gallery[0]["caption"].endswith(f"· OTHER · #{scan_id}")
    with pytest.raises(AppError, match="added from an upload"):
        client.predict(scan_id, api_name="/library_open")
    status, parts, labels = client.predict(api_name="/library_refresh")
    assert "Library: 1 scan" in status
    assert _cache_files(server) == []


def test_teach_a_label_and_filter_by_it(server, client, tiny, tmp_path, library):
    ids = {}
    for i, positive in enumerate((True, True, False, False)):
        _upload(client, _png(tmp_path / f"t{i}.png", seed=20 + i))
        api = "/library_tag_positive" if positive else "/library_tag_negative"
        status, tags, scan_id, _parts, labels = client.predict(0, tiny, "  Pleural   Effusion ", api_name=api)
        ids[scan_id] = positive
        assert "pleural effusion" in status and ("positive" if positive else "negative") in status
    assert tags == {
        "label": "pleural effusion",
        "positive_ids": [k for k, v in ids.items() if v],
        "negative_ids": [k for k, v in ids.items() if not v],
    }
    assert "Fit" in status and "pleural effusion" in _choices(labels)
    status, summary, _parts, labels = client.predict(0, tiny, "pleural effusion", api_name="/library_teach")
    assert summary["n_pos"] == 2 and summary["n_neg"] == 2 and summary["metrics"]["cv_folds"] == 2
    assert 0 <= summary["p_current_scan"] <= 1 and "Taught 'pleural effusion'" in status
    assert "pleural effusion" in _choices(labels)
    found = {h["scan_id"] for h in _search(client, tiny, query="x", label="pleural effusion")[1]}
    positives = {k for k, v in ids.items() if v}
    assert positives <= found and not found & {k for k, v in ids.items() if not v}  # tags override the probe


def test_bad_inputs_give_clear_errors(server, client, tiny, tmp_path, library):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="Nothing to search for"):
        client.predict("   ", False, None, tiny, "any", "any", "any", 10, api_name="/library_search")
    with pytest.raises(AppError, match="Load a scan on the Scan tab first"):
        client.predict("", True, None, tiny, "any", "any", "any", 10, api_name="/library_search")
    with pytest.raises(AppError, match="Load a scan on the Scan tab first"):
        client.predict(None, tiny, api_name="/library_add")
    _upload(client, _png(tmp_path / "b.png", seed=3))
    with pytest.raises(AppError, match="Type the label"):
        client.predict(0, tiny, "  ", api_name="/library_tag_positive")
    client.predict(0, tiny, "nodule", api_name="/library_tag_positive")
    with pytest.raises(AppError, match="at least 2 positive and 2 negative"):
        client.predict(0, tiny, "nodule", api_name="/library_teach")
    with pytest.raises(AppError, match="not in the list of choices"):  # refused by the picker: never loaded
        client.predict(0, "local-dir:/etc", api_name="/library_add")
    with pytest.raises(AppError, match="no scan is tagged 'effusion'"):
        client.predict("x", False, None, tiny, "any", "any", "effusion", 10, api_name="/library_search")
    with pytest.raises(AppError, match="whole number"):
        client.predict(None, api_name="/library_open")


def test_clicking_a_thumbnail_opens_it(tmp_path, library, tiny):
    """The gallery's select handler (gr.SelectData cannot be sent through gradio_client)."""
    import gradio as gr

    from app.library_tab import library_select

    folder = tmp_path / "cases"
    folder.mkdir()
    _chest_dicom(folder / "chest.dcm")
    scan_id = _index(folder, tiny).scan_ids[0]
    out = library_select([scan_id], SimpleNamespace(index=0))
    assert out["open_id"] == scan_id and out["metadata"]["series"]["modality"] == "CT"
    assert len(out["state"].scans) == 1
    with pytest.raises(gr.Error, match="Search first"):
        library_select([scan_id], SimpleNamespace(index=3))


def test_a_qformer_picked_for_labels_gets_told_the_library_needs_clip():
    import gradio as gr

    from app.ask_panel import QFORMER_PREFIX
    from app.library_tab import _model

    with pytest.raises(gr.Error, match="searches with a CLIP model.*Q-Former"):
        _model(QFORMER_PREFIX + "shipped:medlens-qformer", {"shipped:medlens-clip"})
    with pytest.raises(gr.Error, match="Choose a model from the list"):
        _model("local-dir:/elsewhere", {"shipped:medlens-clip"})
