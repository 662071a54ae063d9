"""Batch augmentation on tensors, decided for the whole global batch at once.

Design decisions
- One affine warp per image (zoom, shift, small rotation, flips where they
  keep the meaning) applied with a single `grid_sample` over the batch: on a
  2-core CPU a per-image PIL pipeline costs more than the network.
- Parameters are drawn for the *global* batch from a generator seeded by
  (seed, step); each rank takes its own rows. So a run on N processes sees
  exactly the images a single process sees with the same global batch, and a
  resumed run continues with the same augmentations (the DDP test relies on
  this).
- Flips only where the left-right meaning does not matter: pathology tiles
  and dermoscopy (both axes). Never on X-ray (heart side), CT/MR slices
  ("left kidney"), fundus (left/right eye, disc position) or ultrasound.
- Zoom stays near 1 (0.8-1.25 of the image side): inference resizes the
  whole letterboxed image, so training must mostly see whole images too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FLIP_OK = {"pathology", "dermoscopy"}


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1))


def draw_params(n: int, flip_ok: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> dict[str, torch.Tensor]:
    """Augmentation parameters for `n` images (the global batch). flip_ok: bool (n,)."""
    u = torch.rand(n, 8, generator=gen)
    zoom = torch.exp((u[:, 0] * 2 - 1) * math.log(1.25) * strength)  # >1 zooms in
    angle = (u[:, 1] * 2 - 1) * math.radians(10) * strength
    shift = (u[:, 2:4] * 2 - 1) * 0.08 * strength
    flip_x = (u[:, 4] < 0.5) & flip_ok
    flip_y = (u[:, 5] < 0.5) & flip_ok
    contrast = 1 + (u[:, 6] * 2 - 1) * 0.25 * strength
    brightness = (u[:, 7] * 2 - 1) * 0.1 * strength
    return {
        "zoom": zoom,
        "angle": angle,
        "shift": shift,
        "flip_x": flip_x,
        "flip_y": flip_y,
        "contrast": contrast,
        "brightness": brightness,
    }


def apply(images: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """images: float (B, 3, S, S) in 0..1 -> augmented, same shape; p sliced to this batch."""
    b = images.shape[0]
    cos, sin = torch.cos(p["angle"]), torch.sin(p["angle"])
    sx = torch.where(p["flip_x"], -1.0, 1.0) / p["zoom"]
    sy = torch.where(p["flip_y"], -1.0, 1.0) / p["zoom"]
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = cos * sx, -sin * sy, p["shift"][:, 0]
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sin * sx, cos * sy, p["shift"][:, 1]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * p["contrast"].view(b, 1, 1, 1) + mean + p["brightness"].view(b, 1, 1, 1)
    return out.clamp(0.0, 1.0)


def take(p: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in p.items()}
