"""Frozen-encoder tokens for every QA row, computed once and kept on disk.

Design decisions
- The image encoder is frozen, so its tokens are a pure function of the
  row's pixels and the preprocessing: computing them once turns a Q-Former
  epoch from minutes of ResNet-152 into seconds of table lookup. They are
  stored fp16 (the Q-Former normalises them first; fp16 keeps 3 significant
  digits of post-ReLU features) in one file per (kind, preprocessing), keyed
  by row id, and saved every few hundred rows so an interrupted run resumes.
- 2D rows go through the engine's own 2D path (`engine.ask.model.qformer_preprocess`:
  the 448 px model image resized as the CLIP models' preprocessing does) and
  volume crops through `volume_prep.prepare_volume`, so training sees the
  tokens inference computes.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Iterable

import torch

from engine.ask.model import FrozenEncoders, qformer_preprocess
from engine.models import volume_prep
from training.qa_data import QARow, load_image, load_volume_crop

SAVE_EVERY = 200


def cache_key(kind: str, prep: dict, image_size: int, encoder: dict | None = None) -> str:
    spec = json.dumps({"kind": kind, "prep": prep if kind == "volume" else None, "image_size": image_size if kind == "image" else None, "v": 1,
                       **({"encoder": encoder} if encoder and encoder.get("type") != "i3resnet152" else {})}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


class TokenCache:
    """id -> (fp16 tokens [N, C], grid) for one kind of row and one preprocessing."""

    def __init__(self, folder: str | Path, kind: str, prep: volume_prep.VolumePrep, image_size: int, encoder: dict | None = None):
        self.path = Path(folder) / f"tokens-{kind}-{cache_key(kind, prep.to_dict(), image_size, encoder)}.pt"
        self.kind, self.prep, self.image_size = kind, prep, image_size
        self.encoder_spec = encoder or {"type": "i3resnet152"}
        self._encoders: FrozenEncoders | None = None
        self.items: dict[str, tuple[torch.Tensor, tuple[int, int, int]]] = {}
        if self.path.is_file():
            self.items = torch.load(self.path, weights_only=True)
            self.items = {k: (v[0], tuple(v[1])) for k, v in self.items.items()}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        torch.save({k: (v[0], list(v[1])) for k, v in self.items.items()}, tmp)
        tmp.replace(self.path)

    def fill(self, rows: Iterable[QARow], root: str | Path, batch_size: int = 16, log=print) -> None:
        todo = [r for r in rows if r.kind == self.kind and r.id not in self.items]
        if not todo:
            return
        encoders = self._encoders = self._encoders or FrozenEncoders(self.encoder_spec)
        start, done = time.time(), 0
        step = batch_size if self.kind == "image" else 1
        for i in range(0, len(todo), step):
            chunk = todo[i:i + step]
            if self.kind == "image":
                pixels = qformer_preprocess({"image_size": self.image_size})([load_image(root, r, size=448) for r in chunk])
                tokens, grid = encoders.image_tokens(pixels)
            else:
                prepared = volume_prep.prepare_volume(load_volume_crop(root, chunk[0]), self.prep)
                tokens, grid = encoders.volume_tokens(prepared.tensor)
            for r, t in zip(chunk, tokens):
                self.items[r.id] = (t.to(torch.float16).clone(), tuple(int(g) for g in grid))
            done += len(chunk)
            if done % SAVE_EVERY < step or done == len(todo):
                self.save()
                log(f"tokens {self.kind}: {done}/{len(todo)} in {time.time() - start:.0f} s")
