"""Domain randomisation (training.randomise) and the K-view feature cache (training.view_cache)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from training import randomise as rz


def _image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((448, 448, 3), np.uint8)
    img[:, :] = (rng.random((448, 448, 1)) * 200 + 30).astype(np.uint8)  # grey content to the edges
    return img


def test_views_are_reproducible_and_change_the_image():
    img = _image()
    a = rz.randomise(img, np.random.default_rng([0, 5, 1]), modality="us", p=1.0)
    b = rz.randomise(img, np.random.default_rng([0, 5, 1]), modality="us", p=1.0)
    assert a.shape == img.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - img).mean() > 5
    c = rz.randomise(img, np.random.default_rng([0, 5, 2]), modality="us", p=1.0)
    assert not np.array_equal(a, c)


def test_no_family_leaves_the_image_alone_and_each_family_acts():
    img = _image()
    np.testing.assert_array_equal(rz.randomise(img, np.random.default_rng(0), families=()), img)
    for family in rz.FAMILIES:
        out = rz.randomise(img, np.random.default_rng(3), families=[family], p=1.0, modality="us")
        assert not np.array_equal(out, img), family


def test_doppler_overlay_adds_colour_to_a_grey_ultrasound():
    img = _image()
    out = np.asarray(rz._doppler(Image.fromarray(img), np.random.default_rng(1))).astype(int)
    saturation = out.max(axis=2) - out.min(axis=2)
    assert (saturation > 100).sum() > 200, "red/blue flow pixels"
    assert (img.max(axis=2).astype(int) - img.min(axis=2)).max() == 0


def test_resolution_family_can_bring_a_full_image_down_to_thumbnail_detail():
    img = _image()
    sides = []
    for s in range(40):
        rng = np.random.default_rng(s)
        side = int(round(np.exp(rng.uniform(np.log(28), np.log(448)))))
        sides.append(side)
    assert min(sides) < 48 and max(sides) > 300
    out = rz.resolution(Image.fromarray(img), np.random.default_rng(0))
    assert out.size == (448, 448)


def test_unknown_family_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown augmentation family"):
        rz.randomise(_image(), np.random.default_rng(0), families=["sepia"])


class _TinyTrunk(torch.nn.Module):
    def forward(self, x):  # (B, 3, S, S) -> (B, 6): per-channel mean and std
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_view_cache_holds_the_clean_view_first_and_reuses_its_file(tmp_path):
    from engine.models.preprocess import ImagePreprocess
    from training.manifest import PixelLoader, Row
    from training.view_cache import build_view_features

    rows = []
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((60, 50)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(Row(id=f"t/{i}", dataset="busi", modality="us", path=f"{i}.png", split="train", subject=str(i)))
    pre = ImagePreprocess(32)
    feats = build_view_features(rows, tmp_path, pre, _TinyTrunk(), tmp_path / "c" / "v.npy", views=3, p=1.0, seed=0, batch=4)
    assert feats.shape == (3, 3, 6) and feats.dtype == np.float32
    clean = _TinyTrunk()(pre.standardise(pre.scale(np.stack([PixelLoader(tmp_path, pre)(r) for r in rows])))).numpy()
    np.testing.assert_allclose(np.asarray(feats[0], np.float32), clean, atol=1e-5)
    assert np.abs(np.asarray(feats[1], np.float32) - clean).max() > 1e-2, "randomised views differ from the clean one"
    mtime = (tmp_path / "c" / "v.npy").stat().st_mtime_ns
    again = build_view_features(rows, tmp_path, pre, _TinyTrunk(), tmp_path / "c" / "v.npy", views=3, p=1.0, seed=0, batch=4)
    np.testing.assert_array_equal(again, feats)
    assert (tmp_path / "c" / "v.npy").stat().st_mtime_ns == mtime, "same key: reused, not rebuilt"
    build_view_features(rows, tmp_path, pre, _TinyTrunk(), tmp_path / "c" / "v.npy", views=3, p=1.0, seed=1, batch=4)
    assert (tmp_path / "c" / "v.npy").stat().st_mtime_ns != mtime, "another seed: rebuilt"


def test_ablation_replays_which_families_fired_on_each_cached_view():
    from training.ablation import condition_features, fired

    img = _image()
    fire = fired(3, 3, p=0.5, seed=7)
    assert not fire[:, 0].any(), "view 0 is the clean one"
    for i in range(3):
        for k in (1, 2):
            for f, family in enumerate(rz.FAMILIES):
                out = rz.randomise(img, np.random.default_rng([7, i, k]), families=[family], p=0.5, modality="us")
                assert np.array_equal(out, img) == (not fire[i, k, f]), (i, k, family)
    feats = torch.arange(3 * 3, dtype=torch.float32).view(3, 3, 1)  # (views, rows, F)
    no_geo = condition_features(feats, fire, "no-geometry")
    g = rz.FAMILIES.index("geometry")
    for k in (1, 2):
        for i in range(3):
            assert float(no_geo[k, i]) == float(feats[0, i] if fire[i, k, g] else feats[k, i])
    assert condition_features(feats, fire, "none").shape[0] == 1
