"""The PACS tab in a real browser (Debian's chromium through Playwright) against a real Orthanc:
open the tab, search by patient ID, open the series, and see it in the Scan tab's views.

Skips without chromium (MEDLENS_REQUIRE_BROWSER=1 makes that a failure) or without Orthanc
(MEDLENS_REQUIRE_ORTHANC=1 makes that a failure).
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
from _orthanc import PHI, PHI_STRINGS, running_orthanc, synthetic_datasets, with_phi  # noqa: E402
from _browser import THREE_VIEWS_SHOWN, collect_page_errors, require_browser, save_screenshot  # noqa: E402

pytestmark = pytest.mark.browser
N_SLICES = 6


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_browser()
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as pacs:
        datasets = with_phi(synthetic_datasets(tmp_path_factory.mktemp("ct"), N_SLICES))
        pacs.store(datasets)
        patch = pytest.MonkeyPatch()
        pacs.env(patch)
        cache = tmp_path_factory.mktemp("gradio_cache_pacs_browser")
        try:
            with running_app(cache) as (url, _demo):
                yield url, cache, pacs
        finally:
            patch.undo()


def test_search_the_pacs_and_open_a_series_in_the_viewer(server, page, tmp_path):
    url, cache, pacs = server
    errors = collect_page_errors(page)
    page.goto(url)
    page.get_by_role("tab", name="PACS").click()
    status = page.locator("#ml-pacs-status")
    status.get_by_text("Connected to the PACS").wait_for()
    assert pacs.dicomweb in status.inner_text()

    page.locator("#ml-pacs-patient-id textarea, #ml-pacs-patient-id input").first.fill(PHI["PatientID"])
    page.locator("#ml-pacs-search").click()
    status.get_by_text("1 study, 1 image series").wait_for()
    table = page.locator("#ml-pacs-results")
    table.get_by_text(PHI["PatientID"]).filter(visible=True).first.wait_for()  # what the PACS returns, shown to this user
    assert "CT" in table.inner_text()
    page.locator("#ml-pacs-tab").screenshot(path=str(tmp_path / "pacs_tab.png"))

    page.locator("#ml-pacs-open").click()
    page.wait_for_function(THREE_VIEWS_SHOWN)
    assert page.get_by_role("tab", name="Scan", exact=True).get_attribute("aria-selected") == "true"
    assert f"/{N_SLICES}" in page.locator("#ml-axial-view").inner_text()
    page.locator("#ml-metadata-box").get_by_text("Scan information").first.click()  # collapsed by default
    page.locator("#ml-metadata").get_by_text("dicom-series").first.wait_for()
    metadata = page.locator("#ml-metadata").inner_text()
    assert "dicom-series" in metadata and not [s for s in PHI_STRINGS if s in metadata]

    save_screenshot(page, tmp_path / "pacs_open.png", full_page=True)
    assert "Traceback" not in page.locator("body").inner_text()
    assert not errors, errors
    assert [p for p in cache.rglob("*") if p.is_file()] == []  # nothing from the PACS was written into Gradio's cache
