"""One preprocessing per model: training and inference feed the model the same tensor for the same file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.models.preprocess import ImagePreprocess

ASTRA_LIKE = ImagePreprocess(96, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
OPENAI_LIKE = ImagePreprocess(64, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def _real_files() -> list[tuple[str, str]]:
    from pydicom.data import get_testdata_file

    return [(get_testdata_file("CT_small.dcm"), "ct"), (get_testdata_file("MR_small.dcm"), "mr")]


def _training_tensor(path: str, modality: str, preprocess: ImagePreprocess) -> torch.Tensor:
    """What training.clip feeds the image tower: PixelLoader's image, scaled, standardised."""
    from training.manifest import PixelLoader, Row

    row = Row(id="r", dataset="d", modality=modality, path=path, split="train", subject="s")
    loader = PixelLoader(Path(path).parent, preprocess)
    return preprocess.standardise(preprocess.scale(loader(row)[None]))


def _inference_tensor(path: str, model) -> torch.Tensor:
    """What the engine feeds it when a user drops the same file in."""
    from engine.io import load_one
    from engine.zeroshot.imaging import model_image

    scan, _ = load_one([path])
    return model.image_tensor([model_image(scan).pixels])


@pytest.mark.parametrize("path,modality", _real_files())
def test_clip_training_and_inference_tensors_are_identical(tmp_path_factory, path, modality):
    from _models import tiny_clip_folder

    from engine.models import load_model

    model = load_model(f"local-dir:{tiny_clip_folder(tmp_path_factory.mktemp('tiny') / 'm')}", fast=False)
    train = _training_tensor(path, modality, model.preprocess)
    assert torch.equal(train, _inference_tensor(path, model))


def test_shipped_clip_is_fed_what_it_was_trained_on():
    from engine.models import catalog

    if "medlens-clip" not in catalog.shipped(catalog.CLIP):
        pytest.skip("the shipped CLIP is not installed")
    from engine.models import load_model

    model = load_model("medlens-clip", fast=False)
    assert catalog.shipped()["medlens-clip"].config["preprocess_cfg"] == model.preprocess.to_config()  # stored whole
    path, modality = _real_files()[0]
    assert torch.equal(_training_tensor(path, modality, model.preprocess), _inference_tensor(path, model))


def test_qformer_token_cache_and_ask_model_share_the_preprocessing():
    from engine.ask.model import qformer_preprocess

    config = {"image_size": 96}
    assert qformer_preprocess(config) == ASTRA_LIKE  # 0..1 pixels for the frozen Astra encoder
    image = np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8)
    expected = torch.from_numpy(np.array(ASTRA_LIKE.resize(image))).permute(2, 0, 1)[None].float() / 255
    assert torch.equal(qformer_preprocess(config)([image]), expected)


def test_matches_open_clip_eval_transform_bit_for_bit():
    """The engine used open_clip's transform before; the preprocessing object must not change a single value."""
    from open_clip.transform import image_transform
    from PIL import Image

    rng = np.random.default_rng(1)
    for shape in [(448, 448, 3), (300, 500, 3), (448, 448)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        reference = image_transform(OPENAI_LIKE.size, is_train=False, mean=OPENAI_LIKE.mean, std=OPENAI_LIKE.std)
        rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
        assert torch.equal(reference(Image.fromarray(rgb))[None], OPENAI_LIKE([image]))


def test_batched_call_equals_the_separate_steps():
    """__call__ does scale + standardise in numpy (speed); training calls the torch steps: same bits."""
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (300, 200), dtype=np.uint8),
        rng.integers(0, 256, (90, 120, 3), dtype=np.uint8),
        np.full((64, 64), 17, np.uint8),
        rng.uniform(-20, 300, (64, 64)).astype(np.float32),
    ]
    for preprocess in (OPENAI_LIKE, ASTRA_LIKE):
        got = preprocess(images)
        expected = preprocess.standardise(preprocess.scale(np.stack([preprocess.resize(im) for im in images])))
        assert got.dtype == torch.float32 and got.is_contiguous() and torch.equal(got, expected)


def test_config_round_trip_and_defaults():
    assert ImagePreprocess.from_config(OPENAI_LIKE.to_config()) == OPENAI_LIKE
    # an older checkpoint: mean/std only, size from the architecture, like open_clip reads it
    old = ImagePreprocess.from_config({"mean": [0, 0, 0], "std": [1, 1, 1]}, size=96)
    assert old == ASTRA_LIKE
    with pytest.raises(ValueError):
        ImagePreprocess(0)
