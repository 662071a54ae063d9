"""Frozen-trunk features of K views per image: view 0 the clean model image, views 1..K-1 domain-randomised.

    feats = build_view_features(rows, data_root, preprocess, trunk, "runs/clip/cache/train_views.npy", views=3)
    feats[k, i]  # float32 (F,): trunk features of view k of rows[i]

Design decisions
- Each row is decoded once (PixelLoader.pixels448, the engine's 448 px model
  image), randomised K-1 times (training.randomise, generator seeded by
  (seed, row index, view)), resized by the model's own ImagePreprocess and
  run through the frozen trunk. Only the pooled features are kept (F=2048
  for the ResNet-152), float32 (so view 0 of a 1-view cache is exactly the
  fp32 features the shipped recipe trained on): 12k images x 3 views is
  ~300 MB, not the GBs a pixel cache of 448 px views would be.
- The trunk runs in bf16 autocast where the CPU computes bf16 natively (AMX):
  3-4x faster than fp32 there, with features at cosine >= 0.998 to fp32
  (bench/clip_trunk.py measures both); fp32 elsewhere.
- A sidecar JSON holds a key over everything that changes the features (row
  ids, views, families, p, seed, preprocessing, trunk name, bf16); a cache
  is reused only when the key matches, and is written under a temporary
  name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from engine.models.preprocess import ImagePreprocess
from training.manifest import PixelLoader, Row
from training.randomise import FAMILIES, check_families, randomise

VERSION = 1  # bump when training.randomise changes what a view looks like


def views_key(
    rows: Sequence[Row], preprocess: ImagePreprocess, views: int, families: Sequence[str], p: float, seed: int, trunk_name: str, bf16: bool
) -> str:
    h = hashlib.sha256(
        json.dumps(
            {
                "v": VERSION,
                "pre": preprocess.to_config(),
                "views": views,
                "families": list(families),
                "p": p,
                "seed": seed,
                "trunk": trunk_name,
                "bf16": bf16,
            },
            sort_keys=True,
        ).encode()
    )
    for row in rows:
        h.update(row.id.encode() + b"\n")
    return h.hexdigest()


def view_images(
    pixels448: np.ndarray, row_index: int, modality: str, views: int, families: Sequence[str], p: float, seed: int
) -> list[np.ndarray]:
    """The K model images of one row: the clean one, then K-1 randomised ones (uint8 448 px)."""
    out = [pixels448]
    for k in range(1, views):
        out.append(randomise(pixels448, np.random.default_rng([seed, row_index, k]), modality=modality, families=families, p=p))
    return out


class _Batcher:
    """Collects (view, row, preprocessed image) and runs the trunk on full batches."""

    def __init__(self, trunk: torch.nn.Module, preprocess: ImagePreprocess, out: np.ndarray, batch: int, bf16: bool):
        self.trunk, self.preprocess, self.out, self.batch, self.bf16 = trunk, preprocess, out, batch, bf16
        self.items: list[tuple[int, int, np.ndarray]] = []

    def add(self, view: int, row: int, image: np.ndarray) -> None:
        self.items.append((view, row, self.preprocess.resize(image)))
        if len(self.items) >= self.batch:
            self.flush()

    @torch.inference_mode()
    def flush(self) -> None:
        if not self.items:
            return
        x = self.preprocess.standardise(self.preprocess.scale(np.stack([im for _, _, im in self.items])))
        if self.bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                f = self.trunk(x).float()
        else:
            f = self.trunk(x).float()
        for (v, r, _), vec in zip(self.items, f.numpy()):
            self.out[v, r] = vec
        self.items = []


def build_view_features(
    rows: Sequence[Row],
    data_root: str | Path,
    preprocess: ImagePreprocess,
    trunk: torch.nn.Module,
    path: str | Path,
    *,
    views: int = 1,
    families: Sequence[str] = FAMILIES,
    p: float = 0.5,
    seed: int = 0,
    trunk_name: str = "trunk",
    bf16: bool = False,
    batch: int = 64,
    log: Callable[[str], None] | None = None,
) -> np.ndarray:
    """(views, N, F) float32 features (memory-mapped, read-only); built once per key."""
    path = Path(path)
    families = check_families(families)
    key = views_key(rows, preprocess, views, families, p, seed, trunk_name, bf16)
    meta = path.with_name(path.name + ".json")
    if path.is_file() and meta.is_file() and json.loads(meta.read_text()).get("key") == key:
        return np.load(path, mmap_mode="r")
    trunk.eval()
    with torch.inference_mode():
        dim = int(trunk(preprocess.standardise(preprocess.scale(np.zeros((1, preprocess.size, preprocess.size, 3), np.uint8)))).shape[-1])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(views, len(rows), dim))
    loader = PixelLoader(data_root, preprocess)
    batcher = _Batcher(trunk, preprocess, out, batch, bf16)
    order = sorted(range(len(rows)), key=lambda i: rows[i].path)  # slices of a volume together (PixelLoader keeps it open)
    for n, i in enumerate(order):
        for v, image in enumerate(view_images(loader.pixels448(rows[i]), i, rows[i].modality, views, families, p, seed)):
            batcher.add(v, i, image)
        if log and (n + 1) % 500 == 0:
            log(f"view features: {n + 1}/{len(rows)} images x {views} views")
    batcher.flush()
    out.flush()
    del out
    meta.unlink(missing_ok=True)
    os.replace(tmp, path)
    meta.write_text(json.dumps({"key": key, "views": views, "n": len(rows), "families": list(families), "p": p, "seed": seed}, indent=1))
    return np.load(path, mmap_mode="r")
