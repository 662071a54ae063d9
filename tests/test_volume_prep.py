"""Volume / image preprocessing for the volume encoders (engine.models.volume_prep). Synthetic scans only,
except one skip-if-absent check on the real CT series and brain MRI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.models.volume_prep import (
    DEFAULT_SIZE,
    DEFAULT_SPACING_MM,
    VolumePrep,
    VoxelMapping,
    prepare_image,
    prepare_volume,
)
from engine.scan import Modality, Scan, ScanError


def volume_scan(voxels, spacing_zyx=(3.0, 3.0, 3.0), modality=Modality.CT, affine=None) -> Scan:
    voxels = np.asarray(voxels, dtype=np.float32)
    if affine is None:
        affine = np.diag([spacing_zyx[2], spacing_zyx[1], spacing_zyx[0], 1.0])  # RAS, voxel (x, y, z)
    return Scan(voxels=voxels, spacing=spacing_zyx, affine=affine, modality=modality)


def same_grid(shape_zyx, **kw) -> VolumePrep:
    """No resampling, the tensor exactly the volume's size."""
    z, y, x = shape_zyx
    return VolumePrep(spacing_mm=(3.0, 3.0, 3.0), size=(x, y, z), **kw)


# --------------------------------------------------------------------------- the recipe as data
def test_prep_round_trips_through_json_and_rejects_typos():
    prep = VolumePrep(spacing_mm=(1.5, 1.5, 3), size=(224, 224, 160), pad_to_size=False)
    again = VolumePrep.from_dict(json.loads(json.dumps(prep.to_dict())))
    assert again == prep and again.spacing_mm == (1.5, 1.5, 3.0)
    assert VolumePrep.from_dict({}) == VolumePrep() and VolumePrep().size == DEFAULT_SIZE
    assert VolumePrep().spacing_mm == DEFAULT_SPACING_MM
    with pytest.raises(ValueError, match="unknown volume_prep keys"):
        VolumePrep.from_dict({"spacing": [1, 1, 1]})
    with pytest.raises(ValueError):
        VolumePrep(size=(128, 128))
    with pytest.raises(ValueError):
        VolumePrep(spacing_mm=(0, 1, 1))
    with pytest.raises(ValueError):
        VolumePrep(mr_percentiles=(99, 1))


# --------------------------------------------------------------------------- intensities
def test_ct_clip_and_scale_exact():
    rng = np.random.default_rng(0)
    vol = rng.uniform(-1000, 1000, (4, 5, 6)).astype(np.float32)
    cases = {
        (0, 0, 0): (-3024.0, 0.0),
        (1, 1, 1): (-1000.0, 0.0),
        (2, 2, 2): (-500.0, 0.25),
        (3, 3, 3): (0.0, 0.5),
        (0, 4, 4): (500.0, 0.75),
        (1, 0, 5): (1000.0, 1.0),
        (3, 4, 5): (2500.0, 1.0),
    }
    for (z, y, x), (hu, _) in cases.items():
        vol[z, y, x] = hu
    pv = prepare_volume(volume_scan(vol), same_grid(vol.shape))
    t = pv.tensor[0, 0]
    assert pv.tensor.shape == (1, 1, 6, 5, 4) and pv.tensor.dtype == torch.float32
    for (z, y, x), (_, expected) in cases.items():
        assert t[x, y, z].item() == pytest.approx(expected, abs=1e-7)
    np.testing.assert_allclose(t.numpy(), np.clip((vol.transpose(2, 1, 0) + 1000) / 2000, 0, 1), atol=1e-7)
    assert "HU clipped to [-1000, 1000]" in pv.intensity


def test_mr_percentiles_and_other_min_max():
    rng = np.random.default_rng(1)
    vol = rng.gamma(2.0, 100.0, (6, 7, 8)).astype(np.float32)
    pv = prepare_volume(volume_scan(vol, modality=Modality.MR), same_grid(vol.shape))
    lo, hi = np.percentile(vol, [0.5, 99.5])
    ref = np.clip((vol - lo) / (hi - lo), 0, 1).transpose(2, 1, 0)
    np.testing.assert_allclose(pv.tensor[0, 0].numpy(), ref, atol=1e-6)
    assert pv.tensor.min() == 0 and pv.tensor.max() == 1 and "percentiles 0.5 / 99.5" in pv.intensity
    pv = prepare_volume(volume_scan(vol, modality=Modality.MR), same_grid(vol.shape, mr_percentiles=(2, 98)))
    lo, hi = np.percentile(vol, [2, 98])
    np.testing.assert_allclose(pv.tensor[0, 0].numpy(), np.clip((vol - lo) / (hi - lo), 0, 1).transpose(2, 1, 0), atol=1e-6)
    pv = prepare_volume(volume_scan(vol, modality=Modality.OTHER), same_grid(vol.shape))
    ref = ((vol - vol.min()) / (vol.max() - vol.min())).transpose(2, 1, 0)
    np.testing.assert_allclose(pv.tensor[0, 0].numpy(), ref, atol=1e-6)
    # a "CT" in raw stored values (not HU) is not clipped at +-1000 HU into a blank image
    pv = prepare_volume(volume_scan(vol + 5000, modality=Modality.CT), same_grid(vol.shape))
    assert "not in HU" in pv.intensity and 0.1 < float(pv.tensor.mean()) < 0.9


# --------------------------------------------------------------------------- orientation and geometry
def test_ras_transpose_puts_a_marker_where_expected():
    vol = np.full((4, 5, 6), -1000.0, np.float32)
    vol[1, 2, 3] = 1000.0  # (z, y, x)
    pv = prepare_volume(volume_scan(vol), same_grid(vol.shape))
    t = pv.tensor[0, 0]
    assert tuple(t.shape) == (6, 5, 4)  # (X, Y, Z)
    assert tuple(np.argwhere(t.numpy() == 1.0)[0]) == (3, 2, 1)
    assert pv.mapping.axes == (2, 1, 0)
    assert pv.mapping.tensor_to_scan((3, 2, 1)) == pytest.approx((1, 2, 3))
    assert pv.mapping.scan_to_tensor((1, 2, 3)) == pytest.approx((3, 2, 1))


def test_a_non_ras_affine_is_reoriented_and_mapped_back():
    vol = np.full((4, 5, 6), -1000.0, np.float32)
    vol[1, 2, 3] = 1000.0
    # voxel x runs towards the patient's Left, y towards Posterior (LPS-like): both flipped in RAS
    affine = np.diag([-3.0, -3.0, 3.0, 1.0])
    pv = prepare_volume(volume_scan(vol, affine=affine), same_grid(vol.shape))
    t = pv.tensor[0, 0].numpy()
    assert tuple(np.argwhere(t == 1.0)[0]) == (6 - 1 - 3, 5 - 1 - 2, 1)
    assert pv.mapping.tensor_to_scan((2, 2, 1)) == pytest.approx((1, 2, 3))
    # axes permuted too: voxel axes (i, j, k) = (A, R, S)
    affine = np.array([[0, 3.0, 0, 0], [3.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]])
    pv = prepare_volume(volume_scan(vol, affine=affine), VolumePrep(size=(5, 6, 4)))
    t = pv.tensor[0, 0].numpy()
    hit = tuple(int(i) for i in np.argwhere(t == 1.0)[0])
    assert hit == (2, 3, 1)  # R index = voxel j = y index 2, A index = voxel i = x index 3
    assert pv.mapping.tensor_to_scan(hit) == pytest.approx((1, 2, 3))


def test_spacing_resample_shape_and_actual_spacing():
    vol = np.zeros((10, 64, 48), np.float32)
    prep = VolumePrep(spacing_mm=(3, 3, 3), size=(512, 512, 512), pad_to_size=False, pad_multiple=(1, 1, 1))
    pv = prepare_volume(volume_scan(vol, spacing_zyx=(2.0, 0.75, 1.0), modality=Modality.MR), prep)
    assert tuple(pv.tensor.shape[2:]) == (16, 16, 7)  # x 48 * 1 / 3, y 64 * .75 / 3, z 10 * 2 / 3 = 6.7
    assert pv.spacing_mm == pytest.approx((3.0, 3.0, 20 / 7))
    # padding to the encoder stride only
    prep = VolumePrep(spacing_mm=(3, 3, 3), size=(128, 128, 64), pad_to_size=False)
    pv = prepare_volume(volume_scan(vol, spacing_zyx=(2.0, 0.75, 1.0), modality=Modality.MR), prep)
    assert tuple(pv.tensor.shape[2:]) == (32, 32, 16)
    pv = prepare_volume(volume_scan(vol, spacing_zyx=(2.0, 0.75, 1.0), modality=Modality.MR), VolumePrep())
    assert tuple(pv.tensor.shape[2:]) == DEFAULT_SIZE


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_mapping_maps_a_tensor_voxel_back_to_the_scan_voxel(axis):
    # A linear ramp along one scan axis survives trilinear resampling exactly: the tensor's value
    # says which scan coordinate each tensor voxel came from, so the mapping can be checked everywhere.
    shape = (23, 40, 31)  # (z, y, x)
    ramp = np.indices(shape, dtype=np.float32)[axis]
    scan = volume_scan(ramp, spacing_zyx=(2.0, 1.25, 1.6), modality=Modality.OTHER)
    prep = VolumePrep(spacing_mm=(3.0, 2.2, 2.5), size=(12, 30, 24))  # x crop 17 -> 12, y pad 23 -> 30, z pad 18 -> 24
    pv = prepare_volume(scan, prep)
    m = pv.mapping
    t = pv.tensor[0, 0].numpy() * (shape[axis] - 1)  # min-max undone
    checked = 0
    for X in range(*m.content[0]):
        for Y in range(*m.content[1]):
            for Z in range(*m.content[2]):
                s = m.tensor_to_scan((X, Y, Z))
                if all(0 <= s[a] <= shape[a] - 1 for a in range(3)):  # inside: no edge clamping
                    assert t[X, Y, Z] == pytest.approx(s[axis], abs=2e-3)
                    checked += 1
    assert checked > 1000
    # padding is zero and lies outside the content box
    assert m.content[1] == (3, 26) and m.content[2] == (3, 21)
    assert pv.tensor[0, 0, :, :3].abs().max() == 0 and pv.tensor[0, 0, :, :, 21:].abs().max() == 0
    # round trip
    for point in [(0.0, 0.0, 0.0), (5.5, 11.0, 7.25)]:
        assert m.scan_to_tensor(m.tensor_to_scan(point)) == pytest.approx(point)


def test_crop_keeps_the_body_and_cuts_air_first():
    vol = np.full((20, 100, 100), -1000.0, np.float32)  # 3 mm voxels: 300 x 300 x 60 mm
    z, y, x = np.ogrid[:20, :100, :100]
    body = ((y - 70) / 20.0) ** 2 + ((x - 75) / 18.0) ** 2 <= 1.0  # off-centre: y 50..90, x 57..93
    vol[np.broadcast_to(body, vol.shape)] = 40.0
    vol[:, 5, 5] = 500  # a lone bright voxel column: too small to count as body
    pv = prepare_volume(volume_scan(vol), VolumePrep(size=(48, 48, 32)))
    t = pv.tensor[0, 0].numpy()
    assert (t > 0.4).sum() == body.sum() * 20  # every body voxel kept
    assert pv.mapping.content[2] == (6, 26)  # 20 slices padded to 32, centred
    # the body is centred in the cropped plane
    xs, ys = np.nonzero((t > 0.4).any(axis=2))
    assert abs((xs.min() + xs.max()) / 2 - 23.5) <= 1 and abs((ys.min() + ys.max()) / 2 - 23.5) <= 1
    # a body wider than the input loses both sides equally, and says so
    pv = prepare_volume(volume_scan(vol), VolumePrep(size=(24, 48, 32)))
    xs = np.nonzero((pv.tensor[0, 0].numpy() > 0.4).any(axis=(1, 2)))[0]
    assert (xs.min(), xs.max()) == (0, 23)
    s0, s1 = pv.mapping.tensor_to_scan((0, 0, 0))[2], pv.mapping.tensor_to_scan((23, 0, 0))[2]
    assert abs((s0 - 57) - (93 - s1)) <= 1
    assert any("cropped" in n for n in pv.notes)


def test_grid_to_scan_puts_token_values_back_on_the_voxels():
    vol = np.zeros((20, 40, 64), np.float32)
    vol[2:18, 4:36, 4:60] = 500.0
    scan = volume_scan(vol, spacing_zyx=(3.0, 2.0, 2.0))
    pv = prepare_volume(scan, VolumePrep(size=(64, 64, 32)))
    grid = (2, 2, 2)  # (Z', X', Y') as an encoder with strides (16, 32, 32) gives for 64 x 64 x 32
    values = np.arange(8, dtype=np.float32)  # token n = (z * X' + x) * Y' + y
    heat = pv.mapping.grid_to_scan(values, grid)
    assert heat.shape == vol.shape
    for z in range(2):
        for xx in range(2):
            for y in range(2):
                s = np.round(pv.mapping.token_to_scan((z, xx, y), grid)).astype(int)
                if all(0 <= s[a] < vol.shape[a] for a in range(3)):
                    assert heat[tuple(s)] == pytest.approx((z * 2 + xx) * 2 + y, abs=0.35)


# --------------------------------------------------------------------------- 2D images
def test_prepare_image_matches_the_clip_model_image_and_maps_back():
    from engine.zeroshot.imaging import model_image

    rng = np.random.default_rng(2)
    grey = rng.uniform(0, 4000, (50, 100)).astype(np.float32)
    scan = Scan(voxels=grey, spacing=(1.0, 1.0), affine=np.eye(4), modality=Modality.XRAY)
    pv = prepare_image(scan, size=64)
    assert pv.tensor.shape == (1, 3, 64, 64) and 0 <= pv.tensor.min() and pv.tensor.max() <= 1
    assert torch.equal(pv.tensor[0, 0], pv.tensor[0, 2])  # grey replicated
    expected = torch.from_numpy(np.array(model_image(scan, size=64).pixels)).permute(2, 0, 1).float() / 255
    assert torch.equal(pv.tensor[0], expected)
    m = pv.mapping
    assert m.content == ((16, 48), (0, 64))  # letterboxed: 32 rows in the middle
    assert m.tensor_to_scan((16 - 0.5, -0.5)) == pytest.approx((-0.5, -0.5))  # outer pixel edges line up
    assert m.tensor_to_scan((48 - 0.5, 64 - 0.5)) == pytest.approx((49.5, 99.5))
    assert m.grid_axes == (-1, 0, 1)
    heat = m.grid_to_scan(np.arange(4.0), (1, 2, 2))
    assert heat.shape == (50, 100)
    for h in range(2):
        for w in range(2):
            r, c = np.round(m.token_to_scan((0, h, w), (1, 2, 2))).astype(int)
            r, c = min(max(r, 0), 49), min(max(c, 0), 99)  # token centres of the letterbox's padding rows lie off the image
            assert heat[r, c] == pytest.approx(h * 2 + w, abs=0.1)
    colour = rng.integers(0, 255, (40, 40, 3)).astype(np.float32)
    pv = prepare_image(Scan(voxels=colour, spacing=(1.0, 1.0), affine=np.eye(4), modality=Modality.DERMOSCOPY), size=40)
    np.testing.assert_allclose(pv.tensor[0].permute(1, 2, 0).numpy() * 255, colour, atol=1e-3)  # colour kept


def test_2d_and_3d_entry_points_reject_each_other():
    vol = volume_scan(np.zeros((4, 4, 4)))
    img = Scan(voxels=np.zeros((8, 8)), spacing=(1.0, 1.0), affine=np.eye(4), modality=Modality.XRAY)
    with pytest.raises(ScanError, match="prepare_volume"):
        prepare_image(vol)
    with pytest.raises(ScanError, match="prepare_image"):
        prepare_volume(img)


def test_mapping_serialises():
    m = prepare_volume(volume_scan(np.zeros((4, 5, 6))), same_grid((4, 5, 6))).mapping
    d = json.loads(json.dumps(m.to_dict()))
    assert VoxelMapping(**{k: tuple(tuple(x) if isinstance(x, list) else x for x in v) for k, v in d.items()}) == m


# --------------------------------------------------------------------------- real scans (skip when absent)
def test_real_ct_series_and_brain_mri_keep_the_body(shared_data):
    from engine.io import load_one

    ct, _ = load_one(shared_data / "volumes" / "totalsegmentator" / "ct_dicom_series")
    mri, _ = load_one(shared_data / "volumes" / "mricron_atlas" / "ch2.nii.gz")
    for scan, body_level in ((ct, -500.0), (mri, 0.1 * float(mri.voxels.max()))):
        pv = prepare_volume(scan)
        assert tuple(pv.tensor.shape) == (1, 1, *DEFAULT_SIZE)
        # fraction of the scan's body voxels whose position lands inside the tensor
        zz, yy, xx = np.nonzero(scan.voxels[:, ::4, ::4] > body_level)
        pts = np.stack([zz, yy * 4, xx * 4], axis=1)
        inside = 0
        for p in pts[:: max(1, len(pts) // 4000)]:
            t = pv.mapping.scan_to_tensor(p)
            inside += all(-0.5 < t[a] < DEFAULT_SIZE[a] - 0.5 for a in range(3))
        assert inside / len(pts[:: max(1, len(pts) // 4000)]) > 0.85
