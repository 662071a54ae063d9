"""NIH ChestX-ray14 (1000-image subset): multi-label chest X-rays.

Design decisions
- Labels are NIH's finding names mapped through `tasks.NIH_FINDINGS`
  ("No Finding" -> ["normal"]); an unknown finding name is an error, not a
  silent drop, so a new labels file cannot lose classes unnoticed.
- Subject = NIH's pseudonymous patient number; split = the CSV's
  patient-disjoint `split`. Age and sex stay out of the rows.
"""

from __future__ import annotations

from pathlib import Path

from training.manifest import Row
from training.recipes._common import labelled_csv_rows
from training.tasks import NIH_FINDINGS

FOLDER = "xray/nih_cxr14_1000"


def nih_labels(findings: str) -> list[str]:
    names = [f.strip() for f in findings.split("|") if f.strip()]
    unknown = [f for f in names if f not in NIH_FINDINGS]
    if unknown:
        raise ValueError(f"unknown NIH finding(s) {unknown}")
    labels = sorted({NIH_FINDINGS[f] for f in names})
    if len(labels) > 1 and "normal" in labels:  # "No Finding" next to a finding: the finding wins
        labels.remove("normal")
    return labels or ["normal"]


def _fields(rec: dict[str, str]) -> dict:
    return {
        "subject": f"nih-{rec['patient_id']}",
        "labels": nih_labels(rec["findings"]),
        "view": (rec.get("view") or "").strip() or None,
        "body_part": "chest",
    }


def nih_cxr14(root: Path) -> list[Row]:
    return labelled_csv_rows(root, FOLDER, "nih_cxr14", "xray", _fields)
