"""What the model sees: the exact pixels a model receives for one slice or image, and how they were made.

A radiologist judging an answer needs to know what it was computed from: the
crop, the window and the resolution. This module reproduces a model's input
with the same calls the models use (engine.zeroshot.imaging.model_image for
the slice, windowed and letterboxed; the model's own ImagePreprocess resize,
or for a 3D Q-Former its volume preparation), so the preview cannot drift from
what inference does.

Design decisions
- The preview is the model's input *before* scaling and standardising
  (uint8 at the model's resolution): standardised values are not an image,
  and the scaling is arithmetic that changes nothing a person could see.
- A 3D model's preview is the axial slice of its prepared volume nearest the
  slice shown, at the encoder's voxel grid, in its 0..1 intensity mapping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.scan import Scan


@dataclass
class ModelInputPreview:
    pixels: np.ndarray  # uint8 (H, W, 3): the model's input at the model's resolution
    model: str  # the model's name
    resolution: tuple[int, int]  # (rows, cols) the model receives
    window: str  # how intensities were mapped, in words
    region: str  # which part of the scan, in words (slice, crop box)

    def caption(self) -> str:
        rows, cols = self.resolution
        return f"{self.model} sees {cols}x{rows} px: {self.region}; {self.window}"


def _window_words(scan: Scan, window: tuple[float, float] | None) -> str:
    from engine.windowing import default_window

    if scan.is_color:
        return "colour as stored"
    if window is None:
        center, width, name = default_window(scan)
        return f"window {name} (centre {center:g}, width {width:g})"
    return f"window centre {window[0]:g}, width {window[1]:g}"


def clip_input(
    scan: Scan, model: Any, plane: str = "axial", index: int | None = None, window: tuple[float, float] | None = None
) -> ModelInputPreview:
    """A 2D model's input for one slice (volumes) or the image (2D): model image, then the model's resize."""
    from engine.zeroshot.imaging import MODEL_IMAGE_SIZE, model_image

    image = model_image(scan, plane, index, window=window, size=MODEL_IMAGE_SIZE)
    pixels = model.preprocess.resize(image.pixels)
    top, left, height, width = image.box
    where = "the image" if scan.is_2d else f"{image.plane} slice {image.index + 1}"
    region = f"{where}, letterboxed ({width}x{height} of {MODEL_IMAGE_SIZE}x{MODEL_IMAGE_SIZE} before resizing)"
    return ModelInputPreview(pixels, getattr(model, "name", "model"), pixels.shape[:2], _window_words(scan, window), region)


def volume_input(scan: Scan, model: Any, index: int | None = None) -> ModelInputPreview:
    """A 3D Q-Former's input: its prepared volume (resampled, intensity-mapped), the axial slice nearest `index`."""
    from engine.models import volume_prep

    prepared = volume_prep.prepare_volume(scan.volume(0), model.prep)
    vol = prepared.tensor[0, 0].float().numpy()  # (X, Y, Z) in 0..1
    z_scan = scan.volume_shape[0]
    z = vol.shape[2] // 2 if index is None else int(round((index + 0.5) / max(z_scan, 1) * vol.shape[2] - 0.5))
    z = min(max(z, 0), vol.shape[2] - 1)
    axial = np.clip(vol[:, :, z].T[::-1, ::-1], 0.0, 1.0)  # (y, x) flipped as the viewer shows it: top anterior, left = right
    grey = (axial * 255).round().astype(np.uint8)
    spacing = "x".join(f"{s:.3g}" for s in prepared.spacing_mm)
    region = f"axial slice {z + 1} of {vol.shape[2]} of the whole volume resampled to {spacing} mm voxels"
    return ModelInputPreview(np.repeat(grey[..., None], 3, axis=2), getattr(model, "name", "model"), grey.shape, prepared.intensity, region)
