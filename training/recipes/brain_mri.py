"""Brain MRI: the Colin27 T1 with the AAL atlas, and the dcm_qa_nih EPI series.

Design decisions
- Colin27 (ch2.nii.gz) and aal.nii.gz share one grid (checked). The 116 AAL
  regions merge into 12 structures (organs.aal_structure); a slice's labels
  are the structures covering >= 0.5 % of it, plus "brain". Every 3rd slice
  per plane among those with brain (non-zero atlas) in them. Subject
  "colin27", split train (a single brain: nothing to test on).
- The dcm_qa_nih EPI series (In/<vendor>/<series>) are 4D fMRI runs: rows
  use volume 0 (extra {"volume": 0}; PixelLoader passes it to model_image),
  every 2nd body slice per plane, labels ["brain"], split train. Subject =
  "<vendor folder>/<series folder>" (the series folders repeat across vendors).
"""

from __future__ import annotations

from pathlib import Path

from training.manifest import Row
from training.recipes._common import require
from training.recipes.organs import aal_structure
from training.recipes.slices import volume_rows

ATLAS = "volumes/mricron_atlas"
EPI = "dicom_reference/dcm_qa_nih/In"


def aal_names(root: Path) -> dict[int, str]:
    out = {}
    for line in require(Path(root) / ATLAS / "aal.nii.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            out[int(parts[0])] = aal_structure(parts[1])
    return out


def epi_series(root: Path) -> list[Path]:
    base = Path(root) / EPI
    return sorted(p for p in base.glob("*/*") if p.is_dir()) if base.is_dir() else []


def brain_mri(root: Path) -> list[Row]:
    root = Path(root)
    rows = volume_rows(
        root,
        dataset="brain_mri",
        modality="mr",
        subject="colin27",
        split="train",
        image=root / ATLAS / "ch2.nii.gz",
        seg=root / ATLAS / "aal.nii.gz",
        id_names=aal_names(root),
        step=3,
        body_from_labels=True,
        always=("brain",),
        body_part="brain",
    )
    for series in epi_series(root):
        subject = f"{series.parent.name}/{series.name}"
        rows += volume_rows(
            root,
            dataset="brain_mri",
            modality="mr",
            subject=subject,
            split="train",
            image=series,
            step=2,
            always=("brain",),
            body_part="brain",
            volume=0,
        )
    return rows
