"""The real 2D images the model benchmarks run on: the first files of each ../shared/data modality folder."""

from __future__ import annotations

import os
from pathlib import Path

SHARED = Path(os.environ.get("MEDLENS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
# (folder under SHARED, file pattern): x-ray, ultrasound, histology, dermoscopy, fundus
IMAGE_FOLDERS = (
    ("xray/nih_cxr14_1000/images", "*.png"),
    ("ultrasound/busi/images", "*/*.png"),
    ("pathology/lc25000_lung/images", "*.jpeg"),
    ("dermatology/ham10000/images", "*.jpg"),
    ("fundus/dr_maculopathy", "**/*.jpg"),
)


def real_image_files(n: int, folders=IMAGE_FOLDERS) -> list[Path]:
    """Up to ceil(n / folders) files of each folder, in name order, masks left out (may be more than n)."""
    per = max(1, -(-n // len(folders)))
    files: list[Path] = []
    for folder, pattern in folders:
        files += [f for f in sorted((SHARED / folder).glob(pattern)) if "mask" not in f.name][:per]
    return files
