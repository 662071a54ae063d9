"""dciodvfy (Debian `dicom3tools`): the reference validator of DICOM objects.

Skipped with a notice when it is not installed, required in CI
(MEDLENS_REQUIRE_ORTHANC=1, whose apt line installs dicom3tools too).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def require_dciodvfy() -> str:
    found = shutil.which("dciodvfy")
    if found is None:
        if os.environ.get("MEDLENS_REQUIRE_ORTHANC") == "1":
            pytest.fail("MEDLENS_REQUIRE_ORTHANC=1 but dciodvfy is missing (apt-get install -y dicom3tools)")
        pytest.skip("dciodvfy is missing (apt-get install -y dicom3tools)")
    return found


def dciodvfy_errors(path: str | Path) -> list[str]:
    """The "Error" lines dciodvfy reports for one file (warnings are not errors)."""
    result = subprocess.run([require_dciodvfy(), str(path)], capture_output=True, text=True, timeout=120)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]
