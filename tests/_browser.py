"""Driving Debian's chromium headless through Playwright (no browser download): what every browser test shares.

Without /usr/bin/chromium (or playwright) a browser test skips, unless
MEDLENS_REQUIRE_BROWSER=1 (CI), where it fails. The `page` fixture lives in
conftest.py; it opens a page for the requesting module's `server`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("MEDLENS_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
TIMEOUT_MS = 60_000


def require_browser() -> None:
    required = os.environ.get("MEDLENS_REQUIRE_BROWSER") == "1"
    problem = None
    if not CHROMIUM.exists():
        problem = f"{CHROMIUM} is missing (apt-get install -y chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "playwright is not installed (pip install playwright; no browser download needed)"
    if problem:
        if required:
            pytest.fail(f"MEDLENS_REQUIRE_BROWSER=1 but {problem}")
        pytest.skip(problem)


# every view of a volume (axial, coronal, sagittal) shows a decoded image
THREE_VIEWS_SHOWN = "() => [...document.querySelectorAll('.ml-view img.ml-img')].filter(i => i.complete && i.naturalWidth > 0).length === 3"


def image_shown(selector: str) -> str:
    """A page function: true once the image inside `selector` is decoded."""
    return f"() => {{ const i = document.querySelector('{selector} img.ml-img'); return i && i.complete && i.naturalWidth > 0; }}"


def collect_page_errors(page) -> list[str]:
    """The page's uncaught JavaScript errors, gathered from now on into the returned list."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return errors


def open_and_upload(page, url: str, path, widget: str = "files") -> None:
    """Open the app and give `path` to the Scan tab's upload widget: `files` (files, archives) or `folder`."""
    page.goto(url)
    page.wait_for_selector(f"#ml-{widget} input[type=file]", state="attached")
    page.set_input_files(f"#ml-{widget} input[type=file]", str(path))


def save_screenshot(target, path: Path, **options) -> Path:
    """Screenshot `target` (a page or a locator) into `path`, and copy it into $MEDLENS_SCREENSHOT_DIR when that is
    set, for a person to look at."""
    target.screenshot(path=str(path), **options)
    if os.environ.get("MEDLENS_SCREENSHOT_DIR"):
        out = Path(os.environ["MEDLENS_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / path.name)
    return path
