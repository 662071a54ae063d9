"""LC25000 lung histopathology tiles (adenocarcinoma / benign / squamous cell carcinoma).

Design decision: subject = the CSV's `group` (the rotated/flipped copies of
one original tile), so augmented copies of one tile never straddle splits.
"""

from __future__ import annotations

from pathlib import Path

from training.manifest import Row
from training.recipes._common import labelled_csv_rows
from training.tasks import LC25000

FOLDER = "pathology/lc25000_lung"


def _fields(rec: dict[str, str]) -> dict:
    label = " ".join(rec["label"].replace("_", " ").split()).lower()
    if label not in LC25000:
        raise ValueError(f"LC25000: unknown label {rec['label']!r}")
    return {"subject": rec["group"], "labels": [LC25000[label]], "body_part": "lung"}


def lc25000_lung(root: Path) -> list[Row]:
    return labelled_csv_rows(root, FOLDER, "lc25000_lung", "pathology", _fields)
