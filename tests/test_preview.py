"""engine.preview: the model's input as shown to the user is the tensor the model receives."""

from __future__ import annotations

import numpy as np
import torch

from engine.preview import clip_input, volume_input
from engine.scan import Modality, Scan


def _ct(z=10, y=40, x=50) -> Scan:
    rng = np.random.default_rng(0)
    vol = rng.normal(40, 200, (z, y, x)).astype(np.float32)
    return Scan(vol, (3.0, 1.0, 1.0), np.diag([1.0, 1.0, 3.0, 1.0]), Modality.CT)


def test_clip_preview_is_the_models_input(tiny):
    from engine.models import load_model
    from engine.zeroshot.imaging import model_image

    model = load_model(tiny, fast=False)
    scan = _ct()
    shown = clip_input(scan, model, "axial", 4)
    assert shown.pixels.shape == (model.image_size, model.image_size, 3) and shown.pixels.dtype == np.uint8
    fed = model.image_tensor([model_image(scan, "axial", 4).pixels])
    assert torch.equal(model.preprocess.standardise(model.preprocess.scale(shown.pixels[None])), fed)
    assert f"sees {model.image_size}x{model.image_size} px" in shown.caption() and "axial slice 5" in shown.caption()
    assert "window" in shown.caption()


def test_volume_preview_is_a_slice_of_the_prepared_volume(tiny_ask):
    from engine.ask.api import resolve_ask_model
    from engine.models import volume_prep

    model = resolve_ask_model(tiny_ask)
    scan = _ct()
    shown = volume_input(scan, model, index=None)
    prepared = volume_prep.prepare_volume(scan, model.prep).tensor[0, 0].numpy()
    x, y, z = prepared.shape
    assert shown.pixels.shape == (y, x, 3)
    middle = np.clip(prepared[:, :, z // 2].T[::-1, ::-1], 0, 1)
    assert np.array_equal(shown.pixels[..., 0], (middle * 255).round().astype(np.uint8))
    assert "resampled" in shown.caption()
