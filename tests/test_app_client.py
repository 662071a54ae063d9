"""The Scan tab through its API: a real server in-process, driven by gradio_client.

The server runs with its own GRADIO_TEMP_DIR so the test can check that
nothing derived from an upload is left in Gradio's cache (served by URL to
anyone) once the upload has been read.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _app import LIBRARY_API, plain_value, running_app  # noqa: E402
from _series import ct_zip, decode_data_url_png, synthetic_ct_series, zip_files  # noqa: E402
from conftest import SHARED_DATA  # noqa: E402

# position of each output of /load_files in the API's answer; filled in by `server` (_load_files_positions)
OUT: dict[str, int] = {}
EXPECTED_API = {
    "/load_files",
    "/load_folder",
    "/select_series",
    "/render_axial",
    "/render_coronal",
    "/render_sagittal",
    "/select_volume",
    "/set_mip",
    "/set_mip_slab",
    "/set_window_center",
    "/set_window_width",
    "/set_preset",
    # zero-shot labels panel (app/labels_panel.py; tested in test_app_labels.py)
    "/label_preset",
    "/label_scan",
    "/model_view",
    "/show_evidence",
    "/set_evidence_label",
    "/evidence_slice",
    # Ask panel (app/ask_panel.py; tested in test_app_ask.py)
    "/ask_question",
    "/ask_suggested",
    "/ask_suggestions",
    "/ask_evidence",
    "/ask_goto_slice",
    # library tab (app/library_tab.py; tested in test_app_library.py)
    *LIBRARY_API,
    # sharing a library scan (issue 16; tested in test_app_auth.py)
    "/library_share",
    "/library_unshare",
    # PACS tab (app/pacs_panel.py; tested in test_app_pacs.py)
    "/pacs_status",
    "/pacs_status_on_open",
    "/pacs_search",
    "/pacs_select_row",
    "/pacs_open",
    "/pacs_send",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(url, cache_dir, demo): the app on a free localhost port with a private Gradio cache."""
    cache = tmp_path_factory.mktemp("gradio_cache")
    with running_app(cache) as (url, demo):
        OUT.update(_load_files_positions())
        yield url, cache, demo


def _load_files_positions() -> dict[str, int]:
    """app.scan_tab's order of load_files' outputs (SERIES_OUTPUTS, then the File) less the State and the layout
    blocks (a column or row only shown or hidden), which Gradio's API leaves out. Imported once the app runs:
    importing app reads GRADIO_TEMP_DIR, which must be the test's private cache by then."""
    from app.scan_tab import SERIES_OUTPUTS

    sent = [name for name in (*SERIES_OUTPUTS, "files") if name != "state" and not name.endswith(("_column", "_row"))]
    return {name: i for i, name in enumerate(sent)}


@pytest.fixture
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False, download_files=False)


def _cache_files(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file()]


def _image(update) -> np.ndarray:
    return decode_data_url_png(plain_value(update))


def test_every_event_has_an_explicit_api_name(server, client):
    api = client.view_api(return_format="dict", print_info=False)
    assert set(api["named_endpoints"]) == EXPECTED_API
    assert not api["unnamed_endpoints"]


def test_privacy_launch_settings(server):
    import app

    _, _, demo = server
    assert demo.run_history is False
    assert demo.delete_cache == app.DELETE_CACHE
    assert demo.max_file_size == 2 * 1024**3
    assert demo.show_error is False
    types = {c["type"] for c in demo.config["components"]}
    assert "image" not in types  # views never go through gr.Image (it writes PNGs into the cache)


def test_upload_zip_lists_series_views_and_metadata(server, client, tmp_path):
    from gradio_client import handle_file

    _, cache, _ = server
    shared = SHARED_DATA if SHARED_DATA.is_dir() else None
    archive, kind = ct_zip(tmp_path, shared)
    out = client.predict([handle_file(str(archive))], api_name="/load_files")

    series = out[OUT["series"]]
    assert len(series["choices"]) == 1
    label, index = series["choices"][0]
    assert label.startswith(("CT", "Series")) and "CT" in label and index == 0
    assert series["value"] == 0

    expected_slices = 20 if kind == "shared" else 8
    assert out[OUT["axial_slider"]]["maximum"] == expected_slices - 1
    assert out[OUT["axial_slider"]]["value"] == expected_slices // 2
    assert out[OUT["preset"]]["value"] == "CT abdomen"
    assert (out[OUT["center"]]["value"], out[OUT["width"]]["value"]) == (50, 400)
    assert out[OUT["volume"]]["visible"] is False

    for plane in ("axial", "coronal", "sagittal"):
        update = out[OUT[f"{plane}_view"]]
        assert update["visible"] is True
        assert f'data-plane="{plane}"' in update["value"]
        image = _image(update)
        assert image.shape == (512, 512, 3)
        assert image.std() > 10  # real content, not a blank frame

    metadata = out[OUT["metadata"]]
    assert metadata["series"]["modality"] == "CT"
    assert metadata["series"]["shape"][0] == expected_slices
    assert metadata["series"]["orientation"] == "RAS"
    assert metadata["skipped_files"] == []
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName"):
        assert keyword not in metadata["series"]["metadata"]  # (their keywords may be listed as removed)
    assert "CompressedSamples" not in json.dumps(metadata)  # the synthetic series' PatientName value
    assert out[OUT["files"]] is None  # the upload widget is cleared: its files are gone

    # nothing from the upload is left in Gradio's cache
    assert _cache_files(cache) == []


def test_slice_window_and_mip_endpoints(server, client, tmp_path):
    from gradio_client import handle_file

    files = synthetic_ct_series(tmp_path / "s")
    client.predict([handle_file(str(zip_files(files, tmp_path / "s.zip")))], api_name="/load_files")

    html = client.predict(0, 0, 7, 50, 400, False, 20, api_name="/render_axial")
    assert "slice 8/8" in html
    center, width, *views = client.predict(0, "CT lung", 0, 4, 64, 64, False, 20, api_name="/set_preset")
    assert (center, width) == (-600, 1500)
    assert len(views) == 3 and all("data:image/png;base64," in v for v in views)
    preset, *views = client.predict(0, 0, 4, 64, 64, 100, 200, False, 20, api_name="/set_window_center")
    assert preset == "Custom"
    views = client.predict(0, 0, 4, 64, 64, 50, 400, True, 10, api_name="/set_mip")
    assert all("MIP 10 mm" in v for v in views)


def test_orientation_end_to_end(server, client, tmp_path):
    """A marker at the patient's Right-Anterior-Superior corner shows top-left in all three views."""
    from gradio_client import handle_file

    files = synthetic_ct_series(tmp_path / "marked", n_slices=8, marker=True)
    out = client.predict([handle_file(str(zip_files(files, tmp_path / "m.zip")))], api_name="/load_files")
    n = {p: out[OUT[f"{p}_slider"]]["maximum"] for p in ("axial", "coronal", "sagittal")}
    assert n == {"axial": 7, "coronal": 127, "sagittal": 127}

    def white_centroid(html: str) -> tuple[float, float]:
        image = _image(html) if isinstance(html, dict) else decode_data_url_png(html)
        ys, xs = np.nonzero(np.all(image >= 250, axis=-1))
        assert ys.size, "marker not visible"
        return ys.mean() / image.shape[0], xs.mean() / image.shape[1]

    # the most superior axial slice, the most anterior coronal, the most right sagittal
    axial = client.predict(0, 0, 7, 50, 400, False, 20, api_name="/render_axial")
    coronal = client.predict(0, 0, 127, 50, 400, False, 20, api_name="/render_coronal")
    sagittal = client.predict(0, 0, 127, 50, 400, False, 20, api_name="/render_sagittal")
    # axial: the marker fills the screen's top-left corner (12 of 128 pixels = 48 of 512)
    image = decode_data_url_png(axial)
    assert np.all(image[2:44, 2:44] >= 250)
    assert not np.all(image[2:44, -44:-2] >= 250)  # not mirrored
    bottom = decode_data_url_png(client.predict(0, 0, 0, 50, 400, False, 20, api_name="/render_axial"))
    assert not np.all(bottom[2:44, 2:44] >= 250)  # only the superior slice has it
    # coronal and sagittal slices at the marker contain little else: its centroid is top-left
    for name, html in (("coronal", coronal), ("sagittal", sagittal)):
        y, x = white_centroid(html)
        assert y < 0.5 and x < 0.5, f"{name}: marker at ({y:.2f}, {x:.2f}) of the view, expected top-left"


def test_two_series_are_listed_and_selectable(server, client, tmp_path):
    from gradio_client import handle_file

    a = synthetic_ct_series(tmp_path / "a", n_slices=4, marker=False)
    b = synthetic_ct_series(tmp_path / "b", n_slices=6, marker=False)
    archive = tmp_path / "two.zip"
    import zipfile

    with zipfile.ZipFile(archive, "w") as zf:
        for f in a:
            zf.write(f, f"a/{f.name}")
        for f in b:
            zf.write(f, f"b/{f.name}")
    out = client.predict([handle_file(str(archive))], api_name="/load_files")
    choices = out[OUT["series"]]["choices"]
    assert len(choices) == 2 and out[OUT["series"]]["interactive"] is True
    labels = [label for label, _ in choices]
    assert len(set(labels)) == 2  # repeated labels are made unique
    sizes = {out[OUT["axial_slider"]]["maximum"] + 1}
    other = client.predict(1, api_name="/select_series")
    sizes.add(other[OUT["axial_slider"]]["maximum"] + 1)
    assert sizes == {4, 6}
    assert "data:image/png;base64," in other[OUT["axial_view"]]["value"]


def test_2d_image_shows_a_single_view(server, client, tmp_path):
    from gradio_client import handle_file
    from PIL import Image

    png = tmp_path / "xray.png"
    Image.fromarray((np.arange(64 * 96) % 251).astype(np.uint8).reshape(64, 96)).save(png)
    out = client.predict([handle_file(str(png))], api_name="/load_files")
    assert out[OUT["axial_view"]]["visible"] is True
    assert out[OUT["coronal_view"]]["visible"] is False and out[OUT["sagittal_view"]]["visible"] is False
    assert out[OUT["axial_slider"]]["visible"] is False
    image = _image(out[OUT["axial_view"]])
    assert image.shape[1] / image.shape[0] == pytest.approx(96 / 64, rel=0.02)
    assert out[OUT["metadata"]]["series"]["shape"] == [64, 96]
    assert _cache_files(server[1]) == []


def test_unreadable_upload_is_a_clear_error_and_is_deleted(server, client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    junk = tmp_path / "notes.txt"
    junk.write_text("this is not a scan\n" * 10)
    with pytest.raises(AppError) as info:
        client.predict([handle_file(str(junk))], api_name="/load_files")
    message = str(info.value)
    assert "notes.txt" in message and "Traceback" not in message
    assert _cache_files(server[1]) == []


def test_render_before_upload_shows_placeholders(server, client):
    html = client.predict(None, 0, 0, 50, 400, False, 20, api_name="/render_axial")
    assert "no scan loaded" in html


def test_multi_volume_nifti_has_a_volume_slider(server, client, tmp_path):
    import nibabel as nib
    from gradio_client import handle_file

    data = np.zeros((16, 12, 10, 3), dtype=np.float32)  # x, y, z, t
    for t in range(3):
        data[..., t] = 100.0 * (t + 1)
    data[0, 0, 0, :] = 0.0  # a little contrast so the window is not flat
    path = tmp_path / "fmri.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), path)
    out = client.predict([handle_file(str(path))], api_name="/load_files")
    volume = out[OUT["volume"]]
    assert volume["visible"] is True and volume["maximum"] == 2
    assert out[OUT["metadata"]]["series"]["n_volumes"] == 3
    center, width = out[OUT["center"]]["value"], out[OUT["width"]]["value"]
    views = client.predict(0, 2, 5, 6, 8, center, width, False, 20, api_name="/select_volume")
    assert all("volume 3/3" in v for v in views)
    first = client.predict(0, 0, 5, 6, 8, center, width, False, 20, api_name="/select_volume")
    assert decode_data_url_png(first[0]).mean() < decode_data_url_png(views[0]).mean()


# --- handler units (no server) -------------------------------------------------------
def test_warnings_cover_burned_in_text_and_skipped_files():
    from app.handlers import scan_warnings, warnings_markdown
    from engine.scan import Modality, Provenance, Scan

    scan = Scan(
        voxels=np.zeros((8, 8), dtype=np.float32),
        spacing=(1.0, 1.0),
        affine=np.eye(4),
        modality=Modality.US,
        provenance=Provenance(reader="dicom", warnings=["slice spacing is inconsistent (2.0-2.5 mm)"], burned_in_text_risk=True),
    )
    messages = scan_warnings(scan, ["<b>x</b>.dcm: not DICOM"])
    assert messages[0].startswith("slice spacing is inconsistent")
    assert any("burned-in text" in m for m in messages)
    assert any("1 file could not be read" in m for m in messages)
    markdown = warnings_markdown(["<script>alert(1)</script>"])
    assert "<script>" not in markdown and "&lt;script&gt;" in markdown
    assert warnings_markdown([]) == ""


def test_private_copies_take_only_uploads_and_delete_them(tmp_path, monkeypatch):
    from app.uploads import private_copies

    cache = tmp_path / "cache"
    upload = cache / ("ab" * 16) / "upload.zip"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"x")
    outside = tmp_path / "elsewhere.dcm"
    outside.write_bytes(b"y")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    with private_copies([(str(upload), "my scan.zip"), (str(outside), None), (str(cache / ".." / "elsewhere.dcm"), None)]) as paths:
        assert [Path(p).name for p in paths] == ["my scan.zip"] and Path(paths[0]).read_bytes() == b"x"
        assert cache not in Path(paths[0]).parents  # never a path Gradio serves
        assert not upload.exists() and not upload.parent.exists()  # file and its per-upload folder, at once
    assert not Path(paths[0]).exists()
    assert cache.exists() and outside.exists()


def test_guarded_turns_errors_into_clear_messages(caplog):
    import gradio as gr

    from app.handlers import GENERIC_ERROR, guarded
    from engine.scan import ScanError

    @guarded
    def user_problem():
        raise ScanError("<i>a.dcm</i>: truncated file; upload it again")

    path = "/home/someone/" + "Doe" + "^John.dcm"  # built at run time: not in the traceback's source lines

    @guarded
    def bug():
        raise KeyError(path)

    with pytest.raises(gr.Error) as info:
        user_problem()
    assert info.value.message == "&lt;i&gt;a.dcm&lt;/i&gt;: truncated file; upload it again"
    with pytest.raises(gr.Error) as info:
        bug()
    assert info.value.message == GENERIC_ERROR
    assert "Doe^John" not in caplog.text and "KeyError" in caplog.text
