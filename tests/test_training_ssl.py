"""Self-supervised pretraining (training/ssl.py) and the decoded-image cache (training/image_cache.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from training.image_cache import build_cache, cache_key, load_cache
from training.manifest import PixelLoader, Row, read_manifest, write_manifest
from training.ssl import SSLConfig, augment_batch, load_trunk, nt_xent, train, trunk_state_for_open_clip

TINY_TOWER = "test_convnext"  # timm's own test-size ConvNeXt (0.2 M parameters)


def test_nt_xent_matches_hand_computation():
    # Two images; views a=e1, b=e2 and c=(1,1)/sqrt2, d=(1,-1)/sqrt2; positives (a,c) and (b,d).
    s, t = 1 / math.sqrt(2), 0.5
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[3.0, 3.0], [2.0, -2.0]])  # unnormalised on purpose: the loss normalises
    e = lambda v: math.exp(v / t)  # noqa: E731
    per_view = [
        -math.log(e(s) / (e(0) + e(s) + e(s))),  # a: others b=0, c=s (pos), d=s
        -math.log(e(-s) / (e(0) + e(s) + e(-s))),  # b: others a=0, c=s, d=-s (pos)
        -math.log(e(s) / (e(s) + e(s) + e(0))),  # c: others a=s (pos), b=s, d=0
        -math.log(e(-s) / (e(s) + e(-s) + e(0))),  # d: others a=s, b=-s (pos), c=0
    ]
    assert float(nt_xent(z1, z2, t)) == pytest.approx(sum(per_view) / 4, abs=1e-6)
    # identical views of orthogonal images: log(1 + 2 e^{-1/T})
    eye = torch.eye(2)
    assert float(nt_xent(eye, eye, 1.0)) == pytest.approx(math.log(1 + 2 / math.e), abs=1e-6)


def _fake_manifest(tmp_path, n=10, size=32):
    rng = np.random.default_rng(0)
    rows = []
    (tmp_path / "img").mkdir()
    for i in range(n):
        if i % 2:
            arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)  # a colour image
        else:
            arr = np.repeat(rng.integers(0, 255, (size, size, 1), dtype=np.uint8), 3, axis=2)  # grey
        Image.fromarray(arr).save(tmp_path / "img" / f"{i}.png")
        split = "val" if i == n - 1 else "train"  # one held-out row SSL must never read
        rows.append(
            Row(
                id=f"fake/{i}", dataset="fake", modality="pathology" if i % 2 else "xray", path=f"img/{i}.png", split=split, subject=f"s{i}"
            )
        )
    path = tmp_path / "manifest.jsonl"
    write_manifest(rows, path)
    return path


def test_image_cache_round_trip_and_rebuild(tmp_path):
    manifest = _fake_manifest(tmp_path, n=5)
    rows = read_manifest(manifest)
    cache = tmp_path / "cache" / "img.npy"
    arr = build_cache(rows, tmp_path, 24, cache, progress=False)
    loader = PixelLoader(tmp_path, 24)
    assert arr.shape == (5, 24, 24, 3) and arr.dtype == np.uint8
    for i, row in enumerate(rows):
        assert np.array_equal(arr[i], loader(row))
    assert np.array_equal(load_cache(cache, rows, 24), arr)
    stamp = cache.stat().st_mtime_ns
    again = build_cache(rows, tmp_path, 24, cache, progress=False)  # same rows and size: reused
    assert cache.stat().st_mtime_ns == stamp and np.array_equal(again, arr)

    assert load_cache(cache, rows[:4], 24) is None  # a changed manifest is stale...
    fewer = build_cache(rows[:4], tmp_path, 24, cache, progress=False)  # ...and rebuilds
    assert fewer.shape[0] == 4 and np.array_equal(fewer, arr[:4])
    assert load_cache(cache, rows[::-1][1:], 24) is None  # order is part of the key
    assert cache_key(rows, 24) != cache_key(rows, 25)
    assert load_cache(tmp_path / "missing.npy") is None


def test_augment_batch_shapes_and_grey_stays_grey():
    imgs = torch.from_numpy(np.repeat(np.random.default_rng(1).integers(0, 255, (6, 37, 37, 1), dtype=np.uint8), 3, 3))
    g = torch.Generator().manual_seed(0)
    out = augment_batch(imgs, 32, g)
    assert out.shape == (6, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    # no colour jitter can tint a grey image
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-6) and torch.allclose(out[:, 1], out[:, 2], atol=1e-6)
    again = augment_batch(imgs, 32, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # reproducible from the generator


def _cfg(tmp_path, manifest, **kw):
    base = dict(
        manifest=str(manifest),
        data_root=str(tmp_path),
        out=str(tmp_path / "ssl"),
        tower=TINY_TOWER,
        image_size=32,
        epochs=3,
        batch_size=4,
        lr=1e-3,
        seed=3,
        save_every=1,
        progress=False,
        threads=1,
    )
    base.update(kw)
    return SSLConfig(**base)


def test_ssl_two_steps_resume_and_export(tmp_path):
    manifest = _fake_manifest(tmp_path)
    first = train(_cfg(tmp_path, manifest, max_steps=2))
    assert first["steps"] == 2 and first["images"] == 9  # the val row is not used
    assert len(first["loss_curve"]) == 2 and all(math.isfinite(v) for v in first["loss_curve"])
    out = tmp_path / "ssl"
    assert (out / "trunk.safetensors").is_file() and (out / "last.pt").is_file()
    written = json.loads((out / "ssl_config.json").read_text())
    assert written["tower"] == TINY_TOWER and written["image_size"] == 32 and written["cpu"]

    # Resume continues from the saved step with the same batches a straight run would see.
    resumed = train(_cfg(tmp_path, manifest, max_steps=3))
    assert resumed["steps"] == 3 and resumed["loss_curve"][:2] == first["loss_curve"]
    # (NHWC here: the memory format changes kernels, not results)
    straight = train(_cfg(tmp_path, manifest, max_steps=3, out=str(tmp_path / "straight"), channels_last=True))
    assert straight["channels_last"] and not resumed["channels_last"]
    assert straight["loss_curve"] == pytest.approx(resumed["loss_curve"], abs=1e-3)

    # A different run must not silently resume from this checkpoint.
    with pytest.raises(SystemExit):
        train(_cfg(tmp_path, manifest, max_steps=3, seed=4))

    trunk = load_trunk(out)
    assert not trunk.training
    state = trunk_state_for_open_clip(trunk)
    assert state and all(k.startswith("visual.trunk.") for k in state)
    with torch.inference_mode():
        feats = trunk(torch.zeros(2, 3, 32, 32))
    assert feats.shape == (2, trunk.num_features)


def test_flips_only_where_the_modality_allows():
    from training.ssl import AugmentConfig

    img = np.zeros((2, 37, 37, 3), np.uint8)
    img[:, :, :18] = 255  # left half bright
    cfg = AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0, vflip=0.0, rotate=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    out = augment_batch(torch.from_numpy(img), 32, torch.Generator().manual_seed(0), cfg, flip_ok=torch.tensor([False, True]))
    left, right = out[:, 0, :, :8].mean((1, 2)), out[:, 0, :, -8:].mean((1, 2))
    assert left[0] > 0.9 and right[0] < 0.1  # an X-ray keeps its sides
    assert left[1] < 0.1 and right[1] > 0.9  # a pathology tile may be mirrored
