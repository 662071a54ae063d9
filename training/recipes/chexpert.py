"""CheXpert-style chest X-ray CSVs (Path, Sex, Age, Frontal/Lateral, AP/PA, 14 findings).

Design decisions
- Findings: 1 = positive, 0 or blank = negative/unmentioned, -1 =
  uncertain, resolved by the `uncertain` policy: "ones" (U-Ones: count as
  positive) or "zeros" (U-Zeros: count as negative), as in the CheXpert
  paper. "No Finding" = 1 with no positive finding gives ["normal"];
  "Support Devices" is kept as a label ("support devices").
- Subject = the patient folder in the path ("patient00001"); split = the
  `split` column, else the train/valid/test folder in the path.
- View: "lateral" for lateral images, else the AP/PA column ("AP", "PA").
- Sex and Age are never read into rows.
- Paths in the CSV start at the dataset folder's parent
  ("CheXpert-v1.0-small/train/..."); `image_root` is that parent, relative
  to the data root (default: the CSV's folder's parent when the CSV sits
  inside the dataset folder, else the data root).
"""

from __future__ import annotations

import re
from pathlib import Path

from training.manifest import Row
from training.recipes._common import norm_split, read_csv, rel, split_from_path

FINDINGS = {
    "Enlarged Cardiomediastinum": "enlarged cardiomediastinum",
    "Cardiomegaly": "cardiomegaly",
    "Lung Opacity": "lung opacity",
    "Lung Lesion": "lung lesion",
    "Edema": "edema",
    "Consolidation": "consolidation",
    "Pneumonia": "pneumonia",
    "Atelectasis": "atelectasis",
    "Pneumothorax": "pneumothorax",
    "Pleural Effusion": "pleural effusion",
    "Pleural Other": "other pleural abnormality",
    "Fracture": "fracture",
    "Support Devices": "support devices",
}
POLICIES = ("ones", "zeros")


def _value(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else 0.0
    except ValueError:
        return 0.0


def chexpert_labels(rec: dict[str, str], uncertain: str = "ones") -> list[str]:
    if uncertain not in POLICIES:
        raise ValueError(f"uncertain policy must be one of {POLICIES}")
    labels = []
    for col, name in FINDINGS.items():
        v = _value(rec.get(col))
        if v == 1 or (v == -1 and uncertain == "ones"):
            labels.append(name)
    if not labels and _value(rec.get("No Finding")) == 1:
        labels = ["normal"]
    return sorted(labels)


def chexpert_csv(
    root: Path,
    csv: str | Path = "CheXpert-v1.0-small/train.csv",
    uncertain: str = "ones",
    image_root: str | Path | None = None,
    dataset: str = "chexpert",
) -> list[Row]:
    root = Path(root)
    csv_path = Path(csv) if Path(csv).is_absolute() else root / csv
    if image_root is None:
        image_base = csv_path.parent.parent if csv_path.parent != root else root
    else:
        image_base = Path(image_root) if Path(image_root).is_absolute() else root / image_root
    rows = []
    for rec in read_csv(csv_path):
        path = rec["Path"].strip()
        m = re.search(r"(patient\d+)", path)
        subject = m.group(1) if m else Path(path).parent.parent.name
        study = re.search(r"(study\d+)", path)
        split = norm_split(rec.get("split")) or split_from_path(path) or "train"
        lateral = (rec.get("Frontal/Lateral") or "").strip().lower() == "lateral"
        view = "lateral" if lateral else ((rec.get("AP/PA") or "").strip().upper() or None)
        stem = f"{subject}/{study.group(1) if study else Path(path).parent.name}/{Path(path).stem}"
        rows.append(
            Row(
                id=f"{dataset}/{split}/{stem}",
                dataset=dataset,
                modality="xray",
                path=rel(image_base / path, root),
                split=split,
                subject=f"{dataset}/{subject}",
                labels=chexpert_labels(rec, uncertain),
                view=view,
                body_part="chest",
                extra={"uncertain_policy": uncertain},
            )
        )
    return rows
