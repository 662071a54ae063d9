"""Frozen-encoder tokens for every QA row, computed once and kept on disk.

Design decisions
- The image encoder is frozen, so its tokens are a pure function of the
  row's pixels and the preprocessing: computing them once turns a Q-Former
  epoch from minutes of ResNet-152 into seconds of table lookup. They are
  stored fp16 (the Q-Former normalises them first; fp16 keeps 3 significant
  digits of post-ReLU features) in one file per (kind, preprocessing), and
  saved every few hundred rows so an interrupted run resumes.
- Entries are keyed by the row's id AND what it points at (path, crop box,
  zoom, slice, volume index: `row_key`), never by id alone: a recipe change
  that moves crop007 elsewhere (another subject split, another crop count)
  keeps the id, and an id-keyed cache would hand back the old crop's tokens
  without a word. A changed row is simply a cache miss.
- 2D rows go through the engine's own 2D path (`engine.ask.model.qformer_preprocess`:
  the 448 px model image resized as the CLIP models' preprocessing does) and
  volume crops through `volume_prep.prepare_volume`, so training sees the
  tokens inference computes. Tokens are computed in fp32, as the engine
  computes them: bf16 on this AMX CPU was 1.9x faster (2D batch of 16 at
  128 px: 3.5 vs 6.6 s; a 128x128x32 crop 1.8 vs 3.9 s, busy machine) with
  per-sample cosine >= 0.9996, but training on tokens the engine never
  produces would break "training sees what inference computes" for a one-off
  saving of under an hour.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Iterable, NamedTuple

import torch

from engine.ask.model import AskModel, FrozenEncoders, load_ask_folder, qformer_preprocess
from engine.models import volume_prep
from training.qa_data import QARow, load_image, load_volume_crop

SAVE_EVERY = 200
FORMAT_VERSION = 2  # 2: entries keyed by row_key (id + what the row points at), was the id alone


class CachedTokens(NamedTuple):
    tokens: torch.Tensor  # fp16 [N, C]
    grid: tuple[int, int, int]


def cache_key(kind: str, prep: dict, image_size: int, encoder: dict | None = None) -> str:
    spec = json.dumps(
        {
            "kind": kind,
            "prep": prep if kind == "volume" else None,
            "image_size": image_size if kind == "image" else None,
            "v": FORMAT_VERSION,
            **({"encoder": encoder} if encoder and encoder.get("type") != "i3resnet152" else {}),
        },
        sort_keys=True,
    )
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def row_key(row: QARow) -> str:
    """The row's id plus a short hash of the pixels it points at (module docstring)."""
    if row.kind == "volume":
        what = {"path": row.path, "crop": row.crop, "zoom": row.zoom, "volume": (row.extra or {}).get("volume")}
    else:
        image = row.image_row or {}
        what = {"path": image.get("path"), "slice": image.get("slice"), "volume": (image.get("extra") or {}).get("volume")}
    return f"{row.id}#{hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]}"


class TokenCache:
    """row -> CachedTokens (fp16 tokens [N, C], grid) for one kind of row and one preprocessing."""

    def __init__(self, folder: str | Path, kind: str, prep: volume_prep.VolumePrep, image_size: int, encoder: dict | None = None):
        self.path = Path(folder) / f"tokens-{kind}-{cache_key(kind, prep.to_dict(), image_size, encoder)}.pt"
        self.kind, self.prep, self.image_size = kind, prep, image_size
        self.encoder_spec = encoder or {"type": "i3resnet152"}
        self._encoders: FrozenEncoders | None = None
        self.items: dict[str, CachedTokens] = {}
        if self.path.is_file():
            stored = torch.load(self.path, weights_only=True)
            self.items = {k: CachedTokens(v[0], tuple(v[1])) for k, v in stored.items()}

    def __contains__(self, row: QARow) -> bool:
        return row_key(row) in self.items

    def get(self, row: QARow) -> CachedTokens:
        return self.items[row_key(row)]

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)  # a new --cache folder (the trust step on an exported model)
        torch.save({k: (v.tokens, list(v.grid)) for k, v in self.items.items()}, tmp)
        tmp.replace(self.path)

    def _encode(self, chunk: list[QARow], root: str | Path) -> tuple[torch.Tensor, tuple[int, ...]]:
        encoders = self._encoders = self._encoders or FrozenEncoders(self.encoder_spec)
        if self.kind == "image":
            pixels = qformer_preprocess({"image_size": self.image_size})([load_image(root, r, size=448) for r in chunk])
            return encoders.image_tokens(pixels)
        prepared = volume_prep.prepare_volume(load_volume_crop(root, chunk[0]), self.prep)
        return encoders.volume_tokens(prepared.tensor)

    def fill(self, rows: Iterable[QARow], root: str | Path, batch_size: int = 16, log=print) -> None:
        todo = [r for r in rows if r.kind == self.kind and r not in self]
        if not todo:
            return
        start, done = time.time(), 0
        step = batch_size if self.kind == "image" else 1
        for i in range(0, len(todo), step):
            chunk = todo[i : i + step]
            tokens, grid = self._encode(chunk, root)
            for r, t in zip(chunk, tokens):
                self.items[row_key(r)] = CachedTokens(t.to(torch.float16).clone(), tuple(int(g) for g in grid))
            done += len(chunk)
            if done % SAVE_EVERY < step or done == len(todo):
                self.save()
                log(f"tokens {self.kind}: {done}/{len(todo)} in {time.time() - start:.0f} s")


def token_caches(folder: str | Path, prep: volume_prep.VolumePrep, image_size: int, encoder: dict | None) -> dict[str, TokenCache]:
    """The image and volume caches of one preprocessing and encoder: what a Q-Former run reads."""
    return {k: TokenCache(folder, k, prep, image_size, encoder) for k in ("image", "volume")}


def open_exported(model_folder: str | Path, cache_folder: str | Path, threads: int = 0) -> tuple[AskModel, dict[str, TokenCache]]:
    """An exported Q-Former folder and the token caches matching its own preprocessing and encoder.

    threads: torch's CPU threads (0 keeps torch's default)."""
    if threads:
        torch.set_num_threads(threads)
    model = load_ask_folder(model_folder)
    return model, token_caches(cache_folder, model.prep, model.image_size, model.config.get("encoder"))
