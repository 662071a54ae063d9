"""Rendering: radiological orientation, physical aspect, letters, MIP, speed."""

from __future__ import annotations


import numpy as np
import pytest

from engine.scan import Modality, Scan, ScanError
from engine.views import canonical_volume, plane_sizes, render_view

RAS_VALUE, LPI_VALUE = 1000.0, 500.0  # marker at Right-Anterior-Superior, at Left-Posterior-Inferior
WINDOW = (500.0, 1000.0)  # 0 -> black, 500 -> mid-grey, 1000 -> white


def _marked_volume(shape=(10, 20, 30), block=2) -> np.ndarray:
    """(z, y, x) RAS+ volume: x to Right, y to Anterior, z to Superior; two corner markers."""
    vol = np.zeros(shape, dtype=np.float32)
    vol[-block:, -block:, -block:] = RAS_VALUE  # max z, y, x: Superior, Anterior, Right
    vol[:block, :block, :block] = LPI_VALUE  # min z, y, x: Inferior, Posterior, Left
    return vol


def _scan(vol, spacing=(1.0, 1.0, 1.0), modality=Modality.CT) -> Scan:
    sz, sy, sx = spacing
    return Scan(voxels=vol, spacing=spacing, affine=np.diag([sx, sy, sz, 1.0]), modality=modality)


def _quadrant(image: np.ndarray, value: int) -> tuple[str, str]:
    """('top'|'bottom', 'left'|'right') of the pixels of the grey `value` (+-20)."""
    grey = image[..., 0].astype(int)
    ys, xs = np.nonzero(np.abs(grey - value) <= 20)
    assert ys.size, f"no pixel near grey {value}"
    h, w = grey.shape
    return ("top" if ys.mean() < h / 2 else "bottom", "left" if xs.mean() < w / 2 else "right")


@pytest.mark.parametrize(
    "plane, ras_index, lpi_index, ras_where, lpi_where",
    [
        # axial from the feet: Right on screen left, Anterior at the top
        ("axial", -1, 0, ("top", "left"), ("bottom", "right")),
        # coronal from the front: Right on screen left, Superior at the top
        ("coronal", -1, 0, ("top", "left"), ("bottom", "right")),
        # sagittal: Anterior on screen left, Superior at the top
        ("sagittal", -1, 0, ("top", "left"), ("bottom", "right")),
    ],
)
def test_radiological_orientation(plane, ras_index, lpi_index, ras_where, lpi_where):
    scan = _scan(_marked_volume())
    n = plane_sizes(scan)[plane][0]
    ras = render_view(scan, plane, n - 1 if ras_index == -1 else ras_index, *WINDOW, letters=False)
    assert _quadrant(ras, 255) == ras_where
    lpi = render_view(scan, plane, lpi_index, *WINDOW, letters=False)
    assert _quadrant(lpi, 128) == lpi_where


def test_marker_pixel_is_the_corner_without_letterbox():
    vol = np.zeros((4, 8, 8), dtype=np.float32)
    vol[-1, -1, -1] = RAS_VALUE  # one voxel at the R-A-S corner
    image = render_view(_scan(vol), "axial", 3, *WINDOW, size=8, letters=False, square=False)
    assert image.shape == (8, 8, 3)
    assert image[0, 0, 0] == 255  # screen top-left
    assert image[..., 0].sum() == 255 * 1


def test_non_canonical_affine_is_reoriented():
    """An LPS-ordered array with a matching affine renders exactly like its RAS twin."""
    ras_vol = _marked_volume()
    lps_vol = ras_vol[:, ::-1, ::-1].copy()  # x to Left, y to Posterior
    lps = Scan(voxels=lps_vol, spacing=(1.0, 1.0, 1.0), affine=np.diag([-1.0, -1.0, 1.0, 1.0]), modality=Modality.CT)
    ras = _scan(ras_vol)
    assert lps.orientation == "LPS"
    vol, spacing = canonical_volume(lps)
    assert np.array_equal(vol, ras_vol) and spacing == (1.0, 1.0, 1.0)
    for plane in ("axial", "coronal", "sagittal"):
        assert np.array_equal(render_view(lps, plane, 1, *WINDOW), render_view(ras, plane, 1, *WINDOW))


def test_transposed_axes_are_reoriented_with_their_spacing():
    """Array axes stored as (x, y, z)-permuted still render with the right plane and spacing."""
    ras_vol = _marked_volume(shape=(10, 20, 30))
    # store as (z, x, y): swap the y and x array axes; the affine says so
    swapped = np.ascontiguousarray(ras_vol.transpose(0, 2, 1))
    affine = np.zeros((4, 4))
    affine[0, 1] = 0.5  # index axis 1 (array axis -2, size 30) is x, 0.5 mm
    affine[1, 0] = 2.0  # index axis 0 (array axis -1, size 20) is y, 2 mm
    affine[2, 2] = 3.0
    affine[3, 3] = 1.0
    scan = Scan(voxels=swapped, spacing=(3.0, 0.5, 2.0), affine=affine, modality=Modality.CT)
    vol, spacing = canonical_volume(scan)
    assert np.array_equal(vol, ras_vol)
    assert spacing == (3.0, 2.0, 0.5)
    assert plane_sizes(scan) == {"axial": (10, 5), "coronal": (20, 10), "sagittal": (30, 15)}


def test_plane_sizes_and_middles():
    scan = _scan(np.zeros((10, 20, 31), dtype=np.float32))
    assert plane_sizes(scan) == {"axial": (10, 5), "coronal": (20, 10), "sagittal": (31, 15)}
    image2d = Scan(voxels=np.zeros((5, 6), dtype=np.float32), spacing=(1, 1), affine=np.eye(4), modality=Modality.XRAY)
    assert plane_sizes(image2d) == {"image": (1, 0)}


def test_physical_aspect_with_anisotropic_spacing():
    # 0.7 x 0.7 mm pixels, 5 mm slices: 40 slices = 200 mm tall, 100 px = 70 mm wide
    scan = _scan(np.zeros((40, 100, 100), dtype=np.float32), spacing=(5.0, 0.7, 0.7))
    axial = render_view(scan, "axial", 20, 0, 100, letters=False, square=False)
    assert axial.shape == (512, 512, 3)
    for plane in ("coronal", "sagittal"):
        image = render_view(scan, plane, 50, 0, 100, letters=False, square=False)
        h, w = image.shape[:2]
        assert h == 512
        assert w == pytest.approx(512 * 70 / 200, abs=1)


def test_letterboxed_view_keeps_the_aspect_of_its_content():
    scan = _scan(np.full((40, 100, 100), 1000, dtype=np.float32), spacing=(5.0, 0.7, 0.7))
    image = render_view(scan, "coronal", 50, *WINDOW, letters=False)  # square viewport
    assert image.shape == (512, 512, 3)
    ys, xs = np.nonzero(image[..., 0] > 0)
    assert ys.max() - ys.min() + 1 == 512
    assert xs.max() - xs.min() + 1 == pytest.approx(512 * 70 / 200, abs=2)


def test_thin_reformat_gets_a_square_viewport():
    scan = _scan(np.zeros((20, 512, 512), dtype=np.float32), spacing=(2.0, 0.98, 0.98))
    assert render_view(scan, "coronal", 256, 0, 100).shape == (512, 512, 3)
    assert render_view(scan, "coronal", 256, 0, 100, square=False).shape[0] < 60


@pytest.mark.parametrize(
    "plane, letters",
    [("axial", "R L A P"), ("coronal", "R L S I"), ("sagittal", "A P S I")],
)
def test_orientation_letters_are_drawn_at_the_edges(plane, letters):
    scan = _scan(np.zeros((64, 64, 64), dtype=np.float32))
    plain = render_view(scan, plane, 32, 0, 100, letters=False)
    lettered = render_view(scan, plane, 32, 0, 100)
    changed = np.any(plain != lettered, axis=-1)
    h, w = changed.shape
    band = 40  # letters sit within 40 px of the middle of each edge
    assert changed[h // 2 - band : h // 2 + band, :band].any()  # left
    assert changed[h // 2 - band : h // 2 + band, -band:].any()  # right
    assert changed[:band, w // 2 - band : w // 2 + band].any()  # top
    assert changed[-band:, w // 2 - band : w // 2 + band].any()  # bottom
    assert not changed[band:-band, band:-band].any()  # nothing in the middle
    amber = (lettered[..., 0] > 200) & (lettered[..., 1] > 150) & (lettered[..., 2] < 80)
    assert amber.any()


def test_letters_differ_per_plane():
    scan = _scan(np.zeros((64, 64, 64), dtype=np.float32))
    axial = render_view(scan, "axial", 32, 0, 100)
    coronal = render_view(scan, "coronal", 32, 0, 100)
    sagittal = render_view(scan, "sagittal", 32, 0, 100)
    top = slice(0, 40), slice(236, 276)  # "A" vs "S": different glyphs at the top
    left = slice(236, 276), slice(0, 40)  # "R" vs "A" on the left
    assert not np.array_equal(axial[top], coronal[top])
    assert np.array_equal(axial[left], coronal[left])  # both R
    assert not np.array_equal(coronal[left], sagittal[left])


def test_mip_picks_the_maximum_of_the_slab():
    vol = np.zeros((20, 32, 32), dtype=np.float32)
    vol[12, 10, 10] = 1000.0  # 2 slices (4 mm) above slice 10
    vol[11, 20, 20] = 400.0
    scan = _scan(vol, spacing=(2.0, 1.0, 1.0))
    kw = dict(size=32, letters=False, square=False)
    assert render_view(scan, "axial", 10, *WINDOW, **kw).max() == 0  # plain slice: nothing
    mip = render_view(scan, "axial", 10, *WINDOW, mip_mm=10, **kw)  # 5 slices: 8..12
    # screen = flipped rows and columns
    assert mip[31 - 10, 31 - 10, 0] == 255  # the maximum itself, not a mean
    assert mip[31 - 20, 31 - 20, 0] == 102  # 400 in a 0..1000 window
    thin = render_view(scan, "axial", 10, *WINDOW, mip_mm=2, **kw)  # 1 slice
    assert thin.max() == 0


def test_mip_on_coronal_and_sagittal():
    vol = np.zeros((16, 16, 16), dtype=np.float32)
    vol[8, 2, 5] = 1000.0
    scan = _scan(vol)
    kw = dict(size=16, letters=False, square=False)
    assert render_view(scan, "coronal", 8, *WINDOW, mip_mm=8, **kw).max() == 0  # y=2 is outside 4..11
    assert render_view(scan, "coronal", 8, *WINDOW, mip_mm=14, **kw).max() == 255  # 14 slices: 1..14
    assert render_view(scan, "sagittal", 8, *WINDOW, mip_mm=4, **kw).max() == 0  # x=5 outside 6..9
    assert render_view(scan, "sagittal", 8, *WINDOW, mip_mm=8, **kw).max() == 255  # 4..11


def test_multi_volume_selects_the_volume():
    vols = np.zeros((3, 4, 8, 8), dtype=np.float32)
    vols[1] = 1000.0
    scan = _scan(vols)
    assert scan.n_volumes == 3
    assert render_view(scan, "axial", 2, *WINDOW, volume=0, letters=False).max() == 0
    assert render_view(scan, "axial", 2, *WINDOW, volume=1, letters=False).min() == 255
    with pytest.raises(ScanError, match="volume 3"):
        render_view(scan, "axial", 2, *WINDOW, volume=3)


def test_2d_grey_and_colour():
    grey = Scan(voxels=np.tile(np.arange(64, dtype=np.float32), (32, 1)), spacing=(1.0, 1.0), affine=np.eye(4), modality=Modality.XRAY)
    image = render_view(grey, "image", 0, 31.5, 64, size=64)
    assert image.shape == (32, 64, 3) and image.dtype == np.uint8
    assert image[0, 0, 0] < image[0, -1, 0]  # stored orientation: column 0 on the left
    rgb = np.zeros((10, 20, 3), dtype=np.float32)
    rgb[..., 0] = 255
    colour = Scan(voxels=rgb, spacing=(1.0, 1.0), affine=np.eye(4), modality=Modality.PATHOLOGY)
    out = render_view(colour, "image", 0, 127.5, 255, size=20)
    assert out.shape == (10, 20, 3)
    assert np.all(out[..., 0] == 255) and np.all(out[..., 1:] == 0)
    # anisotropic pixels: 2 mm rows, 1 mm columns -> twice as tall on screen
    tall = Scan(voxels=np.zeros((10, 10), dtype=np.float32), spacing=(2.0, 1.0), affine=np.eye(4), modality=Modality.US)
    assert render_view(tall, "image", 0, 0, 1, size=40).shape[:2] == (40, 20)


def test_bad_plane_and_index_are_user_errors():
    scan = _scan(np.zeros((4, 4, 4), dtype=np.float32))
    with pytest.raises(ScanError, match="plane"):
        render_view(scan, "oblique", 0, 0, 1)
    with pytest.raises(ScanError, match="slice 4"):
        render_view(scan, "axial", 4, 0, 1)
