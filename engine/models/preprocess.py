"""One image preprocessing per model, stored in its checkpoint, used by inference, training and evaluation.

The path from a scan to a 2D model's input has two halves:
1. Scan -> model image: engine.zeroshot.imaging.model_image (the slice,
   windowed, letterboxed into a 448 px uint8 RGB square). The same for every
   model; training reads its images through it too (training.manifest.PixelLoader).
2. Model image -> tensor: `ImagePreprocess`, per model: resize to the
   model's input size (short side, PIL bicubic, then a centre crop, as
   open_clip's eval transform does), scale to 0..1, standardise with the
   model's mean/std. The CLIP models, the Q-Former's 2D path and the
   trainers all call this one object, so what a model is trained on is what
   it sees in the app (tests/test_preprocess.py checks it, tensor for tensor).

Design decisions
- The three steps are separate methods (`resize`, `scale`, `standardise`)
  because training augments between them: augmentations act on 0..1 pixels
  of the model's size, and standardising comes last, on the device.
- Stored in the checkpoint's config as `preprocess_cfg` (open_clip's name
  for the same thing: mean, std, size, resize mode, interpolation). Older
  checkpoints without `size` take the architecture's image size.
- torchvision's Resize/CenterCrop on a PIL image, then the arithmetic of
  torchvision's ToTensor and Normalize, written out so it runs on batches:
  bit-identical to the open_clip transform the engine used before.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch

IDENTITY_MEAN = (0.0, 0.0, 0.0)
IDENTITY_STD = (1.0, 1.0, 1.0)
RESIZE_MODES = ("shortest",)  # short side to `size`, then a centre crop to size x size (open_clip's eval transform)
INTERPOLATIONS = ("bicubic",)


@dataclass(frozen=True)
class ImagePreprocess:
    """A model image (uint8, grey or RGB) -> the model's input tensor."""

    size: int  # the model's input side in pixels
    mean: tuple[float, float, float] = IDENTITY_MEAN  # per channel, on 0..1 pixels
    std: tuple[float, float, float] = IDENTITY_STD
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if int(self.size) < 1:
            raise ValueError(f"preprocess size must be positive, got {self.size}")
        if self.resize_mode not in RESIZE_MODES or self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unsupported preprocessing {self.resize_mode}/{self.interpolation}")
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    # --- the steps -----------------------------------------------------------------
    def resize(self, image: np.ndarray) -> np.ndarray:
        """uint8 (or 0-255 float) grey HxW or RGB HxWx3 -> uint8 RGB (size, size, 3)."""
        from PIL import Image
        from torchvision.transforms import CenterCrop, InterpolationMode, Resize

        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        pil = Image.fromarray(np.ascontiguousarray(arr[..., :3]))
        if pil.size == (self.size, self.size):
            return np.asarray(pil)
        if pil.width == pil.height:  # the engine's model images: what Resize does to a square, minus its overhead
            return np.asarray(pil.resize((self.size, self.size), Image.Resampling.BICUBIC))
        pil = Resize(self.size, interpolation=InterpolationMode.BICUBIC)(pil)
        return np.asarray(CenterCrop(self.size)(pil))

    @staticmethod
    def scale(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) uint8 -> float (B, 3, S, S) in 0..1 (torchvision ToTensor's arithmetic)."""
        t = torch.from_numpy(np.array(images_uint8)) if isinstance(images_uint8, np.ndarray) else images_uint8
        return t.permute(0, 3, 1, 2).contiguous().float().div_(255.0)

    def standardise(self, pixels: torch.Tensor) -> torch.Tensor:
        """0..1 pixels (B, 3, S, S) -> (x - mean) / std, on the pixels' device."""
        mean = torch.tensor(self.mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Model images -> the model's input batch (B, 3, size, size).

        `standardise(scale(...))` bit for bit (tests/test_preprocess.py), as a per-channel table of the
        256 values those float32 operations give a uint8, gathered straight into (B, 3, S, S): torch's
        per-operator thread pool made the arithmetic cost ~20 ms per op on a busy 2-core machine, and
        computing it in numpy still took 2.3 ms/img at 224 px; the table takes a fraction of that."""
        resized = np.stack([self.resize(img) for img in images])
        table = self._table()
        out = np.empty((len(resized), 3, self.size, self.size), np.float32)
        channels = resized.transpose(0, 3, 1, 2)
        for c in range(3):
            out[:, c] = table[c][channels[:, c]]
        return torch.from_numpy(out)

    def _table(self) -> np.ndarray:
        """(3, 256) float32: ((k / 255) - mean[c]) / std[c], in float32 as scale + standardise compute it."""
        table = self.__dict__.get("_lut")
        if table is None:
            levels = np.arange(256, dtype=np.float32)[None, :]
            mean = np.asarray(self.mean, np.float32)[:, None]
            std = np.asarray(self.std, np.float32)[:, None]
            table = (levels / np.float32(255.0) - mean) / std
            object.__setattr__(self, "_lut", table)  # frozen dataclass: a cache, not a field
        return table

    # --- config --------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_config(
        cls,
        cfg: dict[str, Any] | None,
        *,
        size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> "ImagePreprocess":
        """From a checkpoint's `preprocess_cfg`; what it lacks comes from the arguments (e.g. the
        architecture's image size), then open_clip's defaults (OpenAI mean/std), as open_clip reads it."""
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        cfg = dict(cfg or {})
        chosen = cfg.get("size", size)
        if chosen is None:
            raise ValueError("preprocess_cfg has no size and none was given")
        return cls(
            size=int(chosen[0] if isinstance(chosen, (list, tuple)) else chosen),
            mean=tuple(cfg.get("mean", mean if mean is not None else OPENAI_DATASET_MEAN)),
            std=tuple(cfg.get("std", std if std is not None else OPENAI_DATASET_STD)),
            resize_mode=str(cfg.get("resize_mode", "shortest")),
            interpolation=str(cfg.get("interpolation", "bicubic")),
        )
