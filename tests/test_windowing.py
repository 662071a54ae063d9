"""Display windows: presets, the linear mapping, automatic and default windows."""

from __future__ import annotations

import numpy as np
import pytest

from engine.scan import Modality, Scan
from engine.windowing import (
    AUTO,
    CT_DEFAULT,
    FULL_RANGE,
    PRESETS,
    apply_window,
    auto_window,
    default_window,
    presets_for,
    resolve_window,
    slider_range,
    window_names,
)


def _scan(voxels, modality=Modality.CT, spacing=(2.0, 1.0, 1.0)):
    affine = np.diag([spacing[-1], spacing[-2], spacing[0] if len(spacing) == 3 else 1.0, 1.0])
    return Scan(voxels=voxels, spacing=spacing, affine=affine, modality=modality)


@pytest.mark.parametrize(
    "name, center, width",
    [
        ("CT brain", 40, 80),
        ("CT subdural", 75, 215),
        ("CT stroke", 40, 40),
        ("CT lung", -600, 1500),
        ("CT mediastinum", 50, 350),
        ("CT abdomen", 50, 400),
        ("CT liver", 60, 150),
        ("CT bone", 400, 1800),
    ],
)
def test_ct_preset_values(name, center, width):
    preset = PRESETS[name]
    assert (preset.center, preset.width) == (center, width)
    assert Modality.CT in preset.modalities


def test_presets_per_modality():
    assert {p.name for p in presets_for(Modality.CT)} == set(PRESETS)
    for modality in (Modality.MR, Modality.XRAY, Modality.US, Modality.OTHER):
        assert presets_for(modality) == []
        assert window_names(modality) == [AUTO, FULL_RANGE]
    assert window_names("CT")[: len(PRESETS)] == [p.name for p in presets_for(Modality.CT)]


def test_apply_window_endpoints_and_midpoint():
    values = np.array([-1000, -150, -149.99, 50, 249.99, 250, 3000], dtype=np.float32)
    out = apply_window(values, 50, 400)  # [-150, 250]
    assert out.dtype == np.uint8
    assert out[0] == 0 and out[1] == 0
    assert out[2] == 0  # 0.01 HU above the bottom rounds to 0
    assert out[3] in (127, 128)
    assert out[4] == 255 and out[5] == 255 and out[6] == 255


def test_apply_window_is_monotonic_and_keeps_shape():
    values = np.linspace(-2000, 2000, 4001, dtype=np.float32).reshape(1, 4001)
    out = apply_window(values, 40, 80)
    assert out.shape == values.shape
    assert np.all(np.diff(out.astype(int)) >= 0)
    assert out.min() == 0 and out.max() == 255


def test_apply_window_zero_width_does_not_divide_by_zero():
    out = apply_window(np.array([-1.0, 0.0, 1.0], dtype=np.float32), 0.0, 0.0)
    assert out[0] == 0 and out[2] == 255


def test_auto_window_ignores_zero_background():
    rng = np.random.default_rng(0)
    vol = np.zeros((20, 64, 64), dtype=np.float32)
    vol[5:15, 16:48, 16:48] = rng.uniform(500, 1500, size=(10, 32, 32))  # 12% foreground
    center, width = auto_window(vol)
    low, high = center - width / 2, center + width / 2
    assert 500 <= low < 520 and 1480 < high <= 1500


def test_auto_window_uses_percentiles():
    vol = np.arange(100_000, dtype=np.float32).reshape(10, 100, 100) + 1  # no zeros
    vol.flat[0] = -1e6  # an outlier must not stretch the window
    center, width = auto_window(vol)
    low, high = center - width / 2, center + width / 2
    assert low == pytest.approx(500, abs=200) and high == pytest.approx(99_500, abs=200)


def test_auto_window_on_a_flat_image():
    center, width = auto_window(np.full((4, 4), 7.0, dtype=np.float32))
    assert center == pytest.approx(7.0) and width > 0


def test_default_window_ct_is_soft_tissue():
    vol = np.random.default_rng(1).normal(0, 400, (8, 32, 32)).astype(np.float32) - 200
    center, width, name = default_window(_scan(vol))
    assert name == CT_DEFAULT == "CT abdomen"
    assert (center, width) == (50, 400)


def test_default_window_ct_not_in_hu_falls_back_to_auto():
    vol = np.random.default_rng(2).uniform(20_000, 30_000, (8, 32, 32)).astype(np.float32)
    _, _, name = default_window(_scan(vol))
    assert name == AUTO


@pytest.mark.parametrize("modality", [Modality.MR, Modality.XRAY, Modality.US, Modality.OTHER])
def test_default_window_other_modalities_is_auto(modality):
    vol = np.random.default_rng(3).uniform(0, 800, (8, 32, 32)).astype(np.float32)
    center, width, name = default_window(_scan(vol, modality))
    assert name == AUTO
    assert 0 < center - width / 2 < 20 and 780 < center + width / 2 < 800


def test_default_window_colour_image_is_untouched():
    rgb = np.random.default_rng(4).integers(0, 256, (16, 16, 3)).astype(np.float32)
    rgb[0, 0] = (0, 0, 0)
    rgb[0, 1] = (255, 255, 255)
    scan = Scan(voxels=rgb, spacing=(1.0, 1.0), affine=np.eye(4), modality=Modality.DERMOSCOPY)
    center, width, name = default_window(scan)
    assert name == FULL_RANGE
    assert np.array_equal(apply_window(rgb, center, width), rgb.astype(np.uint8))


def test_resolve_window_and_unknown_name():
    scan = _scan(np.zeros((2, 4, 4), dtype=np.float32) + 10)
    assert resolve_window(scan, "CT lung") == (-600, 1500)
    with pytest.raises(ValueError, match="unknown window"):
        resolve_window(scan, "no such window")


def test_slider_range_covers_every_ct_preset():
    scan = _scan(np.random.default_rng(5).normal(0, 100, (4, 16, 16)).astype(np.float32))
    lo, hi, step = slider_range(scan)
    for preset in presets_for(Modality.CT):
        assert lo <= preset.center <= hi
        assert preset.width <= hi - lo
    assert 0 < step <= (hi - lo) / 500
