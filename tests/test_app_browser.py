"""The Scan tab in a real browser: Debian's chromium, headless, through Playwright.

`playwright install` cannot download browsers here, so the test drives
/usr/bin/chromium (apt-get install chromium). Without it the test skips,
unless MEDLENS_REQUIRE_BROWSER=1 (CI), where a missing browser is a failure.
A full-page screenshot is written to tmp_path (and to
$MEDLENS_SCREENSHOT_DIR when set) for a person to look at.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _app import running_app  # noqa: E402
from _browser import (  # noqa: E402
    THREE_VIEWS_SHOWN,
    collect_page_errors,
    image_shown,
    open_and_upload,
    require_browser,
    save_screenshot,
)
from _series import ct_zip  # noqa: E402
from conftest import SHARED_DATA  # noqa: E402

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app with the tiny random Q-Former as its Ask model (MEDLENS_ASK_MODEL, read when the UI is built)."""
    require_browser()
    from _ask import tiny_ask_folder

    cache = tmp_path_factory.mktemp("gradio_cache_browser")
    patch = pytest.MonkeyPatch()
    patch.setenv("MEDLENS_ASK_MODEL", f"local-dir:{tiny_ask_folder(tmp_path_factory.mktemp('tiny_ask') / 'model')}")
    try:
        with running_app(cache) as (url, _demo):
            yield url, cache
    finally:
        patch.undo()


def _view_state(page, plane: str) -> dict:
    return page.eval_on_selector(
        f"#ml-{plane}-view img.ml-img",
        "img => ({src: img.src.slice(0, 22), w: img.naturalWidth, h: img.naturalHeight, "
        "shown: img.getBoundingClientRect().width, caption: img.parentElement.innerText})",
    )


def test_upload_ct_zip_renders_three_views_and_metadata(server, page, tmp_path):
    url, cache = server
    archive, kind = ct_zip(tmp_path / "data", SHARED_DATA if SHARED_DATA.is_dir() else None)
    n_slices = 20 if kind == "shared" else 8
    errors = collect_page_errors(page)

    open_and_upload(page, url, archive)

    for plane in ("axial", "coronal", "sagittal"):
        page.wait_for_selector(f"#ml-{plane}-view img.ml-img", state="visible")
    page.wait_for_function(THREE_VIEWS_SHOWN)
    for plane in ("axial", "coronal", "sagittal"):
        state = _view_state(page, plane)
        assert state["src"] == "data:image/png;base64,"  # the data URL survived Gradio's HTML handling
        assert (state["w"], state["h"]) == (512, 512)
        assert state["shown"] > 150
        assert f"/{n_slices}" in state["caption"] or plane != "axial"

    page.locator("#ml-metadata-box").get_by_text("Scan information").first.click()  # collapsed by default
    metadata = page.locator("#ml-metadata")
    metadata.get_by_text("dicom-series").first.wait_for()
    assert "RAS" in metadata.inner_text()
    series = page.locator("#ml-series input").input_value()
    assert "CT" in series

    # scrolling through slices with the keyboard re-renders the axial view
    caption_js = "() => document.querySelector('#ml-axial-view .ml-caption').innerText"
    before = page.evaluate(caption_js)
    page.locator("#ml-axial-slider input[type=range]").focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_function(f"before => ({caption_js})() !== before", arg=before)
    after = page.evaluate(caption_js)
    assert after != before and f"slice {n_slices // 2 + 2}/{n_slices}" in after

    shot = save_screenshot(page, tmp_path / "scan_tab.png", full_page=True)
    assert shot.stat().st_size > 10_000

    assert not errors, errors
    assert [p for p in cache.rglob("*") if p.is_file()] == []  # the upload is gone from the cache


def test_unreadable_upload_shows_an_error_message(server, page, tmp_path):
    url, cache = server
    junk = tmp_path / "readme.txt"
    junk.write_text("not a scan\n")
    open_and_upload(page, url, junk)
    toast = page.locator(".toast-body", has_text="readme.txt").first
    toast.wait_for()
    assert "Traceback" not in page.locator("body").inner_text()
    # the error badge sits on the upload widget only, never over the views
    assert page.locator("#ml-axial-view .error").count() == 0
    assert [p for p in cache.rglob("*") if p.is_file()] == []  # deleted even though unreadable


def test_folder_upload_renders_the_series(server, page, tmp_path):
    from _series import synthetic_ct_series

    url, cache = server
    folder = tmp_path / "study"
    synthetic_ct_series(folder / "series1", n_slices=6, marker=False)
    open_and_upload(page, url, folder, widget="folder")
    page.wait_for_function(THREE_VIEWS_SHOWN)
    assert "slice 4/6" in page.locator("#ml-axial-view").inner_text()
    assert [p for p in cache.rglob("*") if p.is_file()] == []


def test_2d_image_takes_the_whole_row(server, page, tmp_path):
    import numpy as np
    from PIL import Image

    url, _ = server
    png = tmp_path / "chest.png"
    yy, xx = np.mgrid[0:300, 0:400]
    Image.fromarray(((xx + yy) % 256).astype(np.uint8)).save(png)
    open_and_upload(page, url, png)
    page.wait_for_function(image_shown("#ml-axial-view"))
    state = _view_state(page, "axial")
    assert state["w"] / state["h"] == pytest.approx(400 / 300, rel=0.01)
    assert page.locator("#ml-coronal-view").is_hidden() and page.locator("#ml-sagittal-view").is_hidden()
    assert page.locator("#ml-axial-slider").is_hidden()
    save_screenshot(page, tmp_path / "scan_tab_2d.png", full_page=True)


def test_ask_a_question_about_the_scan(server, page, tmp_path):
    from _series import synthetic_ct_series, zip_files

    url, cache = server
    archive = zip_files(synthetic_ct_series(tmp_path / "s", n_slices=6, marker=False), tmp_path / "s.zip")
    errors = collect_page_errors(page)
    open_and_upload(page, url, archive)
    page.wait_for_function(image_shown("#ml-axial-view"))

    page.get_by_role("tab", name="Ask the scan").click()  # the second of the two main panels
    question = page.locator("#ml-ask-question textarea, #ml-ask-question input").first
    question.fill("Is the liver visible?")
    question.press("Enter")  # Enter asks (the Ask button does the same)
    answer = page.locator("#ml-ask-answer")
    answer.get_by_text("Answer:").wait_for()
    text = answer.inner_text()
    assert "confidence" in text and ("yes" in text or "no" in text)
    # trust, as a user sees it (issue 14): the tiny model has no calibration and says so; a flagged scan is warned about first
    assert "not calibrated" in text
    assert ("Out of distribution" in text) == text.lstrip().startswith("⚠")
    # the evidence: the current axial slice with the heat map, and the per-slice chart
    page.wait_for_function(
        "() => { const i = document.querySelector('#ml-ask-evidence img.ml-img'); return i && i.complete && i.naturalWidth === 512; }"
    )
    assert "where the model looked" in page.locator("#ml-ask-evidence").inner_text()
    page.locator("#ml-ask-slices .js-plotly-plot").wait_for()
    # the scan's suggested questions reached the dropdown (metadata.change -> ask_suggestions); picking one asks it
    page.locator("#ml-ask-suggested input").click()
    options = page.locator("#ml-ask-suggested [role=option]")
    options.first.wait_for()
    assert options.count() >= 2
    page.locator("#ml-ask-suggested [role=option][aria-label='What is the imaging modality?']").click()
    answer.get_by_text("Closed question (modality)").wait_for()
    assert question.input_value() == "What is the imaging modality?"

    save_screenshot(page.locator("#ml-ask"), tmp_path / "ask_panel.png")
    assert "Traceback" not in page.locator("body").inner_text()
    assert not errors, errors
    assert [p for p in cache.rglob("*") if p.is_file()] == []


def test_workstation_screen_shows_views_and_labels_before_metadata(server, page, tmp_path):
    """At 1,366x768 (a common hospital workstation) the views and the label result come first; metadata is collapsed."""
    url, cache = server
    archive, _kind = ct_zip(tmp_path / "data", SHARED_DATA if SHARED_DATA.is_dir() else None)
    errors = collect_page_errors(page)
    page.set_viewport_size({"width": 1366, "height": 768})
    open_and_upload(page, url, archive)
    page.wait_for_function(THREE_VIEWS_SHOWN)
    page.locator("#ml-lp-run").click()
    page.locator("#ml-lp-bar .js-plotly-plot").wait_for()
    page.wait_for_function(image_shown("#ml-model-view"))
    assert "sees" in page.locator("#ml-model-view").inner_text()  # what the model received: resolution, crop, window
    page.evaluate("() => window.scrollTo(0, 0)")

    def box(selector: str) -> dict:
        return page.eval_on_selector(
            selector, "e => { const r = e.getBoundingClientRect(); return {top: r.top, bottom: r.bottom, left: r.left}; }"
        )

    for plane in ("axial", "coronal", "sagittal"):
        assert box(f"#ml-{plane}-view img.ml-img")["bottom"] <= 768, f"{plane} view below the first screen"
    assert page.locator("#ml-metadata").is_hidden()  # raw JSON collapsed by default
    labels = box("#ml-lp-bar")
    metadata = box("#ml-metadata-box")
    # the label result is reached without scrolling past the metadata: it starts on the first screen, and the
    # (collapsed) metadata is not above it in the same column
    assert labels["top"] < 768, f"label result starts at {labels['top']:.0f} px"
    assert metadata["left"] < labels["left"] or metadata["top"] > labels["top"]
    shot = save_screenshot(page, tmp_path / "scan_tab_1366x768.png")  # the first screen only, as the user sees it
    assert shot.stat().st_size > 10_000
    assert not errors, errors
