"""BreastMNIST, re-split through the BUSI images it was made from.

BreastMNIST frames are BUSI images at 28x28, but MedMNIST drew its own 7:1:2
split, so a BUSI test image can sit in BreastMNIST's train under another
name. Each frame is therefore matched to its BUSI source and takes that
image's split and subject (busi.py's, near-duplicate groups included).

How frames are matched (measured on the 780 frames and 780 BUSI PNGs here)
- MedMNIST centre-cropped each original to a square before resizing, while
  the BUSI PNGs here were squashed whole to 256x256, so a plain resize of
  the PNG matches poorly. Best Pearson r per frame, plain 28x28 resize:
  median 0.948 with PIL bilinear, 0.941 bicubic, 0.939 box, 0.937 lanczos,
  0.889 nearest (one-to-one: 175 frames below 0.9).
- So each PNG is tried with symmetric crops (`CROPS`: cut from left and
  right, and a few from top and bottom for tall originals) of an 84x84 copy,
  each resized to 28x28 with PIL bilinear (still the best resampler with the
  crop search: median r 0.99989 bilinear, 0.99882 bicubic, 0.99719 box at
  full resolution); a frame's similarity to a PNG is its best r over crops.
- Frames and PNGs are paired one-to-one (Hungarian assignment on -r; both
  sets hold the same 780 images).
- Result: median r 0.99980, minimum 0.99711 (every frame >= 0.997).
  BreastMNIST's label agrees with BUSI's (malignant vs normal/benign) for
  778 of 780 frames; the other two are BUSI's image stored twice with two
  labels, which busi.py drops.
- A frame is kept when r >= `MIN_R`, its label agrees with the matched BUSI
  image, that image is among the BUSI rows, and no other BUSI image within
  `AMBIGUITY` of its r lies in another split. Kept 778, dropped 2 (the
  two-label twin). 372 of the 778 frames end up in a different split than
  MedMNIST's: its split is per image and unrelated to BUSI's.
- Matching costs about 5 s on 2 CPU cores; `breastmnist_report` gives the figures.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from training.manifest import Row
from training.recipes._common import rel, require
from training.recipes.busi import _busi, busi_images, zscore_rows

NPZ = "ultrasound/breastmnist.npz"
WORK = 84  # side of the copy the crops are taken from (3 x 28: fast, and r stays >= 0.997)
CROPS = tuple(range(-WORK // 4, WORK * 7 // 16))  # pixels cut from each side; < 0 cuts top and bottom
MIN_R = 0.99
AMBIGUITY = 0.001
SPLIT_KEYS = ("train", "val", "test")


def crop_resized(images, work: int = WORK, crops=CROPS) -> np.ndarray:
    """(n_crops, n_images, 28, 28) float32: each image's symmetric crops resized to 28x28."""
    small = [im.resize((work, work), Image.Resampling.BILINEAR) for im in images]
    out = np.empty((len(crops), len(small), 28, 28), np.float32)
    for k, c in enumerate(crops):
        box = (c, 0, work - c, work) if c >= 0 else (0, -c, work, work + c)
        for i, im in enumerate(small):
            out[k, i] = np.asarray(im.crop(box).resize((28, 28), Image.Resampling.BILINEAR), np.float32)
    return out


def match_frames(frames: np.ndarray, images) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source index per frame, r per frame, r matrix images x frames) by best crop and 1:1 assignment."""
    from scipy.optimize import linear_sum_assignment

    zf = zscore_rows(frames.astype(np.float32))
    best = np.full((len(images), len(frames)), -2.0, np.float32)
    for crops in crop_resized(images):
        np.maximum(best, zscore_rows(crops) @ zf.T, out=best)
    src, dst = linear_sum_assignment(-best)
    match = np.full(len(frames), -1)
    match[dst] = src
    r = np.where(match >= 0, best[np.maximum(match, 0), np.arange(len(frames))], -1.0)
    return match, r, best


def breastmnist(root: Path) -> list[Row]:
    return copy.deepcopy(_breastmnist(str(root))[0])  # copies: callers may edit rows


def breastmnist_report(root: Path) -> dict:
    return _breastmnist(str(root))[1]


@lru_cache(maxsize=2)
def _breastmnist(root: str) -> tuple[list[Row], dict]:
    npz = require(Path(root) / NPZ)
    with np.load(npz) as data:
        parts = [
            (s, i, data[f"{s}_images"][i], int(np.ravel(data[f"{s}_labels"])[i]))
            for s in SPLIT_KEYS
            if f"{s}_images" in data
            for i in range(len(data[f"{s}_images"]))
        ]
    recs, images = busi_images(root)
    busi_rows = {r.id: r for r in _busi(root)[0]}
    stems = [Path(r["file"]).stem for r in recs]
    src_rows = [busi_rows.get(f"busi/{s}") for s in stems]
    match, r, best = match_frames(np.stack([p[2] for p in parts]), images)

    rows, dropped = [], {"low_r": 0, "label": 0, "busi_dropped": 0, "ambiguous": 0}
    for k, (split, i, _frame, label) in enumerate(parts):
        j = int(match[k])
        if j < 0 or r[k] < MIN_R:
            dropped["low_r"] += 1
            continue
        busi_label = recs[j]["label"].strip().lower()
        if (busi_label == "malignant") != (label == 0):
            dropped["label"] += 1
            continue
        src = src_rows[j]
        if src is None:
            dropped["busi_dropped"] += 1
            continue
        rivals = np.nonzero(best[:, k] >= r[k] - AMBIGUITY)[0]
        if any(src_rows[x] is None or src_rows[x].split != src.split for x in rivals):
            dropped["ambiguous"] += 1
            continue
        rows.append(
            Row(
                id=f"breastmnist/{split}/{i}",
                dataset="breastmnist",
                modality="us",
                path=rel(npz, Path(root)),
                split=src.split,
                subject=src.subject,
                labels=["malignant" if label == 0 else "non-malignant"],
                array={"key": f"{split}_images", "index": i},
                body_part="breast",
                extra={"busi": src.path, "match_r": round(float(r[k]), 5), "source_split": split},
            )
        )
    report = {
        "frames": len(parts),
        "kept": len(rows),
        "dropped": dropped,
        "median_r": float(np.median(r)),
        "min_r": float(r.min()),
        "moved_split": sum(row.split != row.extra["source_split"] for row in rows),
    }
    return rows, report
