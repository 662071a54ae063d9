"""Image-caption sets (ROCO / PMC-OA style CSVs): rows with `text`.

Design decisions
- Columns are found by name: image path (`image`, `path`, `file`,
  `filename`, `image_path`), caption (`caption`, `text`), optional `split`,
  `modality`, `subject` (or `patient_id`). Image paths are relative to the
  CSV's folder (ROCO's layout), or to `image_root` when given.
- Split: the `split` column, else a train/valid/test folder in the image
  path (ROCO), else a stable hash of the subject (90/5/5), so the same
  subject always lands in the same split.
- Modality: the `modality` column when it names one of ours, else words in
  the caption ("CT", "MRI", "ultrasound", "radiograph", "H&E", ...). Rows
  whose modality stays unknown are dropped (counted in `last_report`):
  Row.modality must be one of manifest.MODALITIES.
- Captions are kept verbatim (stripped, whitespace collapsed); labels stay
  empty: captions.py trains on the text itself.
"""

from __future__ import annotations

import re
from pathlib import Path

from training.manifest import Row
from training.recipes._common import hashed_split, norm_split, read_csv, rel, split_from_path

IMAGE_COLS = ("image", "path", "file", "filename", "image_path", "image_id", "name")
CAPTION_COLS = ("caption", "text", "report")
SUBJECT_COLS = ("subject", "patient_id", "patient")

_MODALITY_NAMES = {
    "ct": "ct",
    "computed tomography": "ct",
    "mri": "mr",
    "mr": "mr",
    "magnetic resonance": "mr",
    "x-ray": "xray",
    "xray": "xray",
    "radiograph": "xray",
    "cr": "xray",
    "dx": "xray",
    "us": "us",
    "ultrasound": "us",
    "sonography": "us",
    "pathology": "pathology",
    "histology": "pathology",
    "histopathology": "pathology",
    "fundus": "fundus",
    "dermoscopy": "dermoscopy",
}
_CAPTION_WORDS = (  # checked in order; the first hit names the modality
    ("ct", r"\bCT\b|computed tomograph|\bCTA\b"),
    ("mr", r"\bMRI?\b|magnetic resonance|\bT[12]-weighted|\bFLAIR\b|diffusion-weighted"),
    ("us", r"ultraso|sonogra|doppler|echograph"),
    ("xray", r"radiograph|x-ray|\bX ray\b|chest film|mammogra"),
    ("pathology", r"\bH&E\b|haematoxylin|hematoxylin|histolog|histopatholog|microscop|immunohisto"),
    ("fundus", r"fundus|retinal photograph"),
    ("dermoscopy", r"dermoscop|dermatoscop"),
)

last_report: dict = {}


def _col(fields: list[str], wanted: tuple[str, ...]) -> str | None:
    lower = {f.lower().strip(): f for f in fields}
    return next((lower[w] for w in wanted if w in lower), None)


def guess_modality(value: str | None, caption: str) -> str | None:
    if value:
        m = _MODALITY_NAMES.get(value.strip().lower())
        if m:
            return m
    for modality, pattern in _CAPTION_WORDS:
        if re.search(pattern, caption, flags=re.IGNORECASE if modality not in ("ct", "mr") else 0):
            return modality
    return None


def caption_csv(
    root: Path, csv: str | Path = "captions.csv", dataset: str | None = None, image_root: str | Path | None = None
) -> list[Row]:
    root = Path(root)
    csv_path = Path(csv) if Path(csv).is_absolute() else root / csv
    dataset = dataset or csv_path.stem
    base = Path(image_root) if image_root else csv_path.parent
    base = base if base.is_absolute() else (root / base if image_root else base)
    rows, dropped, seen = [], 0, set()
    records = list(read_csv(csv_path))
    fields = list(records[0]) if records else []
    img_col, cap_col = _col(fields, IMAGE_COLS), _col(fields, CAPTION_COLS)
    if records and (img_col is None or cap_col is None):
        raise ValueError(f"{csv_path}: needs an image column {IMAGE_COLS} and a caption column {CAPTION_COLS}")
    split_col, mod_col, subj_col = _col(fields, ("split",)), _col(fields, ("modality",)), _col(fields, SUBJECT_COLS)
    for rec in records:
        image = (rec[img_col] or "").strip()
        caption = " ".join((rec[cap_col] or "").split())
        if not image or not caption:
            dropped += 1
            continue
        modality = guess_modality(rec.get(mod_col) if mod_col else None, caption)
        if modality is None:
            dropped += 1
            continue
        subject = (rec.get(subj_col) or "").strip() if subj_col else ""
        subject = subject or Path(image).stem
        split = (norm_split(rec.get(split_col)) if split_col else None) or split_from_path(image) or hashed_split(subject)
        rid = f"{dataset}/{Path(image).with_suffix('').as_posix()}"
        if rid in seen:  # one image with several captions: keep the first, ids stay unique
            dropped += 1
            continue
        seen.add(rid)
        rows.append(
            Row(
                id=rid,
                dataset=dataset,
                modality=modality,
                path=rel(base / image, root),
                split=split,
                subject=f"{dataset}/{subject}",
                text=caption,
                extra={"caption_source": True},
            )
        )
    last_report.clear()
    last_report.update({"csv": str(csv_path), "rows": len(rows), "dropped": dropped})
    return rows
