"""HAM10000 / ISIC 2018 dermoscopy subset (7 diagnoses).

Design decisions
- Subject = HAM's lesion id (several images of one lesion share it); split =
  the CSV's lesion-disjoint `split`. The 823 images from the ISIC 2018 test
  set carry no lesion id (nor age/sex/site): each is its own subject, named
  by its image id, as ISIC publishes nothing to group them by.
- The anatomical `site` becomes `body_part` text ("lower extremity");
  blank/"unknown" sites become None. Age and sex are dropped.
"""

from __future__ import annotations

from pathlib import Path

from training.manifest import Row
from training.recipes._common import labelled_csv_rows
from training.tasks import HAM_DX

FOLDER = "dermatology/ham10000"


def _fields(rec: dict[str, str]) -> dict:
    dx = rec["dx"].strip().lower()
    if dx not in HAM_DX:
        raise ValueError(f"HAM10000: unknown dx {rec['dx']!r}")
    site = (rec.get("site") or "").strip().lower()
    return {
        "subject": (rec.get("lesion_id") or "").strip() or f"image-{Path(rec['file']).stem}",
        "labels": [HAM_DX[dx]],
        "body_part": site if site and site != "unknown" else None,
    }


def ham10000(root: Path) -> list[Row]:
    return labelled_csv_rows(root, FOLDER, "ham10000", "dermoscopy", _fields)
