"""LC25000 lung histopathology tiles (adenocarcinoma / benign / squamous cell carcinoma).

Design decision: subject = the CSV's `group` (the rotated/flipped copies of
one original tile), so augmented copies of one tile never straddle splits.
"""

from __future__ import annotations

from pathlib import Path

from training.manifest import Row
from training.recipes._common import norm_split, read_csv
from training.tasks import LC25000

FOLDER = "pathology/lc25000_lung"


def lc25000_lung(root: Path) -> list[Row]:
    rows = []
    for rec in read_csv(Path(root) / FOLDER / "labels.csv"):
        label = " ".join(rec["label"].replace("_", " ").split()).lower()
        if label not in LC25000:
            raise ValueError(f"LC25000: unknown label {rec['label']!r}")
        rows.append(
            Row(
                id=f"lc25000_lung/{Path(rec['file']).stem}",
                dataset="lc25000_lung",
                modality="pathology",
                path=f"{FOLDER}/{rec['file']}",
                split=norm_split(rec["split"]) or "train",
                subject=rec["group"],
                labels=[LC25000[label]],
                body_part="lung",
            )
        )
    return rows
