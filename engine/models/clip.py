"""`ClipModel`: one loaded CLIP-style model behind a small numpy-in, numpy-out API.

Design decisions
- open_clip builds and runs the network; this wrapper owns what the engine
  needs around it: the model's one preprocessing (engine.models.preprocess,
  from its checkpoint config; the same object training uses), batching,
  L2-normalised float32 outputs, a text
  embedding cache (label sets are embedded once per process), and the
  inference path (fp32 by default; engine.models.fastpath may swap in bf16,
  int8 or OpenVINO forwards, per batch-size class, after checking they keep
  the answer), and what the checkpoint knows of its own reliability
  (`trust`: calibrations and the OOD reference set of its "trust" block;
  `ModelTrust.none()` for checkpoints without one).
- `encode_image_tensor` keeps autograd available (heatmaps need gradients);
  the numpy encoders run under `torch.inference_mode`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from engine.models.preprocess import ImagePreprocess
from engine.trust.model import ModelTrust

TEXT_CACHE_SIZE = 4096


@dataclass
class InferencePath:
    """Which forward the encoders use, and why (shown to the user).

    `by_batch` maps a batch-size class to the path that runs it (engine.models.
    fastpath chooses per class: a 2D image goes alone, a volume's slices and
    an index run go in batches, and the fastest path differs between them).
    Empty means `name` runs every batch size."""

    name: str = "fp32"
    reason: str = "default"
    details: dict = field(default_factory=dict)
    by_batch: dict[int, str] = field(default_factory=dict)

    def name_for(self, n_images: int, batch_size: int = 16) -> str:
        """The path(s) that encode `n_images` images in chunks of `batch_size`, e.g. "openvino-bf16"."""
        if not self.by_batch or n_images < 1:
            return self.name
        from engine.models.fastpath import batch_class

        sizes = [min(batch_size, n_images - start) for start in range(0, n_images, batch_size)]
        names = [self.by_batch[batch_class(b, tuple(self.by_batch))] for b in sizes]
        return " + ".join(dict.fromkeys(names))


class ClipModel:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Callable,
        *,
        name: str,
        revision: str,
        embed_dim: int,
        preprocess: ImagePreprocess,
        config: dict | None = None,
        trust: ModelTrust | None = None,
    ):
        self.model = model.eval()
        self.trust = trust or ModelTrust.none()  # calibrations + OOD reference set from the checkpoint (engine.trust.model)
        self.tokenizer = tokenizer
        self.name = name
        self.revision = revision
        self.embed_dim = int(embed_dim)
        self.preprocess = preprocess
        self.config = config or {}
        self.path = InferencePath()
        self._image_forward: Callable[[torch.Tensor], torch.Tensor] = model.encode_image
        self._text_forward: Callable[[torch.Tensor], torch.Tensor] = model.encode_text
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    # --- properties --------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.preprocess.size

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp().clamp(max=100.0))

    @property
    def model_id(self) -> str:
        """Stable id for stored embeddings: embeddings of different ids never mix."""
        return f"{self.name}@{self.revision}"

    # --- inference path --------------------------------------------------------------
    def set_inference(
        self,
        path: InferencePath,
        image_forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
        text_forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.path = path
        self._image_forward = image_forward or self.model.encode_image
        self._text_forward = text_forward or self.model.encode_text
        self._text_cache.clear()

    # --- images --------------------------------------------------------------
    def image_tensor(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 (or 0-255 float) arrays, grey HxW or RGB HxWx3 -> normalised (N, 3, S, S)."""
        return self.preprocess(images)

    def encode_image_tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels -> L2-normalised embeddings (autograd kept, fp32 model)."""
        return torch.nn.functional.normalize(self.model.encode_image(pixels), dim=-1)

    def encode_images(self, images: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                pixels = self.image_tensor(images[start : start + batch_size])
                feats = self._image_forward(pixels).float()
                out.append(torch.nn.functional.normalize(feats, dim=-1).numpy())
        if not out:
            return np.zeros((0, self.embed_dim), np.float32)
        return np.concatenate(out).astype(np.float32)

    # --- text --------------------------------------------------------------
    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """L2-normalised text embeddings; repeated texts come from the cache."""
        texts = [str(t) for t in texts]
        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if missing:
            with torch.inference_mode():
                for start in range(0, len(missing), batch_size):
                    chunk = missing[start : start + batch_size]
                    tokens = self.tokenizer(chunk)
                    feats = torch.nn.functional.normalize(self._text_forward(tokens).float(), dim=-1).numpy()
                    with self._lock:
                        for text, vec in zip(chunk, feats):
                            self._text_cache[text] = vec.astype(np.float32)
                            while len(self._text_cache) > TEXT_CACHE_SIZE:
                                self._text_cache.popitem(last=False)
        return np.stack([self._text_cache[t] for t in texts]) if texts else np.zeros((0, self.embed_dim), np.float32)
