"""CT and MR organ slices from the TotalSegmentator reference volumes.

Design decisions
- Subjects: "ts-ct-a" = example_ct_sm.nii.gz + example_seg.nii.gz (train);
  "ts-ct-b" = the DICOM series ct_dicom_series/ + example_seg_dicom.nii.gz
  (test: a subject never trained on, so the ct_organs task measures
  generalisation, not memory). example_ct.nii.gz is subject A's full-size
  CT with no label map on its grid: every 2nd body slice per plane, labels
  [] and extra {"unlabelled": true} (self-supervised pretraining only).
  "ts-mr-a" = example_mr_sm.nii.gz + example_seg_mr.nii.gz (test: the only
  abdominal MR subject; MR training data come from brain_mri).
- Label ids map to names through class_names.json (`total` for CT,
  `total_mr` for MR) and organs.ts_organ_name; rows keep the mask path and
  the present ids (extra["mask"], extra["mask_ids"]) for the pointing game.
- Every body slice of the small volumes is used; the 512x512 DICOM series
  is thinned to slices.MAX_PER_PLANE per plane.
"""

from __future__ import annotations

import json
from pathlib import Path

from training.manifest import Row
from training.recipes._common import require
from training.recipes.organs import body_region, ts_organ_name
from training.recipes.slices import volume_rows

FOLDER = "volumes/totalsegmentator"


def id_names(root: Path, key: str) -> dict[int, str]:
    names = json.loads(require(Path(root) / FOLDER / "class_names.json").read_text())[key]
    return {int(i): ts_organ_name(n) for i, n in names.items()}


def ct_organs(root: Path) -> list[Row]:
    root = Path(root)
    d = root / FOLDER
    ct = dict(dataset="ct_organs", modality="ct")
    labelled = dict(ct, id_names=id_names(root, "total"), body_part=body_region)
    rows = volume_rows(root, subject="ts-ct-a", split="train", image=d / "example_ct_sm.nii.gz", seg=d / "example_seg.nii.gz", **labelled)
    rows += volume_rows(root, subject="ts-ct-b", split="test", image=d / "ct_dicom_series", seg=d / "example_seg_dicom.nii.gz", **labelled)
    unlabelled = volume_rows(
        root, subject="ts-ct-a", split="train", image=d / "example_ct.nii.gz", step=2, extra={"unlabelled": True}, **ct
    )
    for r in unlabelled:  # the same subject and planes as example_ct_sm: keep ids distinct
        r.id = r.id.replace("ts-ct-a/", "ts-ct-a/full/", 1)
    return rows + unlabelled


def mr_organs(root: Path) -> list[Row]:
    root = Path(root)
    d = root / FOLDER
    mr = dict(dataset="mr_organs", modality="mr", id_names=id_names(root, "total_mr"), body_part=body_region)
    return volume_rows(root, subject="ts-mr-a", split="test", image=d / "example_mr_sm.nii.gz", seg=d / "example_seg_mr.nii.gz", **mr)
