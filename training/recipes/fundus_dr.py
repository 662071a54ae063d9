"""Colour fundus photographs with DR grade and maculopathy (10 source classes).

The source labels read "<n> - <grade> [with|without maculopathy]" (e.g.
"5 - Moderate DR with maculopathy", "8 - PDR without maculopathy") and
"10 - ADED" (advanced diabetic eye disease). They map to one grade of
`tasks.DR_GRADES`, plus "diabetic maculopathy" when the class says so;
ADED maps to ["advanced eye disease"] alone (no grade is given for it).
Subject = the source's patient id (both eyes of a patient share a split).
"""

from __future__ import annotations

import re
from pathlib import Path

from training.manifest import Row
from training.recipes._common import labelled_csv_rows
from training.tasks import DR_GRADES

FOLDER = "fundus/dr_maculopathy"
_GRADE_WORDS = {"no dr": 0, "mild dr": 1, "moderate dr": 2, "severe dr": 3, "pdr": 4, "proliferative dr": 4}
EYES = {"L": "left eye", "R": "right eye"}


def fundus_labels(label: str) -> list[str]:
    text = re.sub(r"^\s*\d+\s*-\s*", "", label).strip().lower()
    if text in ("aded", "advanced diabetic eye disease", "advanced eye disease"):
        return ["advanced eye disease"]
    base = re.sub(r"\s+with(out)?\s+maculopathy$", "", text).strip()
    if base not in _GRADE_WORDS:
        raise ValueError(f"fundus: unknown label {label!r}")
    labels = [DR_GRADES[_GRADE_WORDS[base]]]
    if re.search(r"\bwith maculopathy$", text):
        labels.append("diabetic maculopathy")
    return labels


def _fields(rec: dict[str, str]) -> dict:
    return {
        "subject": rec["patient_id"],
        "labels": fundus_labels(rec["label"]),
        "view": EYES.get((rec.get("eye") or "").strip().upper()),
        "body_part": "eye",
    }


def fundus_dr(root: Path) -> list[Row]:
    return labelled_csv_rows(root, FOLDER, "fundus_dr", "fundus", _fields)
