"""BUSI breast ultrasound (normal / benign / malignant), with a near-duplicate guard.

Design decisions
- Labels are the CSV's `label`. The CSV's templated `caption` is kept in
  `text` as the brief asks, but training/captions.py does not train on it:
  its sentences are the same templates the engine's BUSI prompts use, and
  evaluation must use prompts nobody trained on.
- BUSI publishes no patient ids, so subject = the file stem, and the CSV's
  split was drawn per image. But BUSI holds many frames of one lesion taken
  seconds apart. Looking at pairs (Pearson r of the 64x64 grey images),
  r >= 0.93 are consecutive frames of one lesion, 0.82-0.88 different
  women. Measured on the 780 images here: at r >= `NEAR_DUP` 315 images
  form 138 near-duplicate groups (largest 7), and 69 groups straddle the
  CSV's splits. So each group (connected components of r >= `NEAR_DUP`)
  becomes one subject ("busi-<first stem>") and moves whole to the split
  most of its images are in (ties: the more held-out one, test > val >
  train): 72 images change split (train 501, val 92, test 185 rows), the
  original split is kept in extra["source_split"].
- One image is stored twice with two labels ("benign (433)" in val =
  "malignant (145)" in test, r = 1.0); images with an exact twin of another
  class (r >= `EXACT_DUP`) are dropped: 778 rows. `busi_report` gives the counts.
- Everything is computed from the pixels at build time (about 2 s), so a
  re-labelled or extended BUSI copy is re-checked.
"""

from __future__ import annotations

import copy
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from training.manifest import Row
from training.recipes._common import image_row, norm_split, read_csv

FOLDER = "ultrasound/busi"
NEAR_DUP = 0.93  # r on 64x64 grey: consecutive frames of one lesion
EXACT_DUP = 0.999  # the same image (JPEG/PNG noise only)
_HELD_OUT = {"test": 0, "val": 1, "train": 2}


@lru_cache(maxsize=2)
def busi_images(root: str) -> tuple[tuple[dict, ...], tuple[Image.Image, ...]]:
    """CSV records and their grey PIL images (cached: BreastMNIST matching reuses them)."""
    recs = tuple(read_csv(Path(root) / FOLDER / "labels.csv"))
    images = []
    for rec in recs:
        with Image.open(Path(root) / FOLDER / rec["file"]) as im:
            images.append(im.convert("L"))
    return recs, tuple(images)


def zscore_rows(a: np.ndarray) -> np.ndarray:
    """Flatten each image and scale to zero mean, unit norm: a @ b.T is then Pearson's r."""
    a = a.reshape(len(a), -1).astype(np.float32)
    a = a - a.mean(axis=1, keepdims=True)
    return a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-9)


def _components(adj: np.ndarray) -> np.ndarray:
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    return connected_components(csr_matrix(adj), directed=False)[1]


def busi_report(root: Path) -> dict:
    return _busi(str(root))[1]


def busi(root: Path) -> list[Row]:
    return copy.deepcopy(_busi(str(root))[0])  # copies: callers may edit rows


@lru_cache(maxsize=2)
def _busi(root: str) -> tuple[list[Row], dict]:
    recs, images = busi_images(root)
    z = zscore_rows(np.stack([np.asarray(im.resize((64, 64), Image.Resampling.BILINEAR), np.float32) for im in images]))
    corr = z @ z.T
    np.fill_diagonal(corr, 0.0)
    labels = [r["label"].strip().lower() for r in recs]
    splits = [norm_split(r["split"]) or "train" for r in recs]
    stems = [Path(r["file"]).stem for r in recs]

    conflict = set()
    for i, j in zip(*np.nonzero(np.triu(corr >= EXACT_DUP))):
        if labels[i] != labels[j]:
            conflict.update((int(i), int(j)))

    group = _components(corr >= NEAR_DUP)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group):
        if i not in conflict:
            members.setdefault(int(g), []).append(i)
    rows, moved, straddling = [], 0, 0
    for idx in members.values():
        votes = Counter(splits[i] for i in idx)
        target = max(votes, key=lambda s: (votes[s], -_HELD_OUT[s]))
        if len(votes) > 1:
            straddling += 1
        subject = "busi-" + min(stems[i] for i in idx)
        for i in idx:
            moved += splits[i] != target
            rows.append(
                image_row(
                    "busi",
                    "us",
                    FOLDER,
                    recs[i]["file"],
                    split=target,
                    subject=subject,
                    labels=[labels[i]],
                    text=(recs[i].get("caption") or None),
                    body_part="breast",
                    extra={"source_split": splits[i]} if splits[i] != target else {},
                )
            )
    rows.sort(key=lambda r: r.id)
    report = {
        "images": len(recs),
        "dropped_label_conflicts": sorted(stems[i] for i in conflict),
        "near_duplicate_groups": sum(len(v) > 1 for v in members.values()),
        "images_in_groups": sum(len(v) for v in members.values() if len(v) > 1),
        "largest_group": max(len(v) for v in members.values()),
        "groups_straddling_splits": straddling,
        "images_moved": moved,
    }
    return rows, report
