"""Driving Debian's chromium headless through Playwright (no browser download): what every browser test shares.

Without /usr/bin/chromium (or playwright) a browser test skips, unless
MEDLENS_REQUIRE_BROWSER=1 (CI), where it fails. The `page` fixture lives in
conftest.py; it opens a page for the requesting module's `server`.
"""

from __future__ import annotations

import os
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
