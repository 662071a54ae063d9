"""A real JPEG 2000 CT series and its TotalSegmentator label map line up.

../shared/data/volumes/totalsegmentator/ct_dicom_series holds 20 axial CT
slices (512 x 512, JPEG 2000 lossless, rescale intercept -1024, slice
spacing 2 mm although SliceThickness says 3 mm); example_seg_dicom.nii.gz is
TotalSegmentator's label map of that series ("total" task, labels in
class_names.json). If our geometry is right, the label map, brought to
RAS+, has exactly our scan's shape and affine, and the HU inside organs are
what anatomy says they are.

The 20 slices cover the upper abdomen (T11-T12, liver, spleen, ribs 6-12):
the label map holds no lung label, so air is checked outside the body and in
the gas-filled colon, and in the lungs of the TotalSegmentator CT volume whose
label map has lung lobes (example_ct_sm.nii.gz + example_seg.nii.gz).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

ATOL_MM = 1e-3
JPEG2000_UIDS = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}


@pytest.fixture(scope="module")
def totalseg_dir(request) -> Path:
    shared = request.getfixturevalue("shared_data")
    folder = shared / "volumes" / "totalsegmentator"
    if not (folder / "ct_dicom_series").is_dir():
        pytest.skip(f"{folder}/ct_dicom_series is absent")
    return folder


@pytest.fixture(scope="module")
def ct_scan(totalseg_dir):
    from engine.io import load

    result = load([str(totalseg_dir / "ct_dicom_series")])
    assert len(result.scans) == 1, f"expected one series, got {[s.label for s in result.scans]}; skipped {result.skipped}"
    return result.scans[0]


@pytest.fixture(scope="module")
def labels(totalseg_dir):
    """Label map in closest-canonical RAS+ as (x, y, z) int array, its affine, and name -> label id."""
    img = nib.as_closest_canonical(nib.load(totalseg_dir / "example_seg_dicom.nii.gz"))
    data = np.asarray(img.dataobj).astype(np.int32)
    names = json.loads((totalseg_dir / "class_names.json").read_text())["total"]
    by_name = {name: int(k) for k, name in names.items()}
    return data, np.asarray(img.affine, dtype=np.float64), by_name


def _hu_xyz(scan) -> np.ndarray:
    return np.asarray(scan.voxels).transpose(2, 1, 0)


def test_loads_as_20_slices_of_512_in_hu(ct_scan):
    assert ct_scan.modality.value == "CT"
    assert ct_scan.voxels.shape == (20, 512, 512)
    assert ct_scan.voxels.dtype == np.int16  # integral HU stored as int16 (engine.scan)
    assert np.allclose(ct_scan.spacing, (2.0, 0.9765625, 0.9765625), atol=ATOL_MM), (
        f"spacing {ct_scan.spacing}: slice spacing must come from positions (2 mm), not SliceThickness (3 mm)"
    )
    assert tuple(nib.aff2axcodes(ct_scan.affine)) == ("R", "A", "S")
    # stored 0 + intercept -1024: the corners (outside the body) are air in HU
    corners = ct_scan.voxels[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert np.all(corners == -1024.0), f"corner values {np.unique(corners)}: expected -1024 HU (air, rescale applied)"
    assert -1024.0 <= float(ct_scan.voxels.min()) and float(ct_scan.voxels.max()) < 3000.0


def test_transfer_syntax_is_jpeg2000(ct_scan):
    ts = str(ct_scan.provenance.transfer_syntax or "")
    assert "JPEG 2000" in ts or ts in JPEG2000_UIDS, f"transfer syntax reported as {ts!r}"


def test_label_map_lines_up(ct_scan, labels):
    data, affine, _ = labels
    assert data.shape == _hu_xyz(ct_scan).shape, f"label map {data.shape} vs scan (x,y,z) {_hu_xyz(ct_scan).shape}"
    if not np.allclose(affine, ct_scan.affine, atol=ATOL_MM, rtol=0):
        np.set_printoptions(precision=5, suppress=True)
        pytest.fail(
            f"label map affine (RAS+) differs from the scan's by {np.abs(affine - ct_scan.affine).max():.5g} mm\n"
            f"label map:\n{affine}\nscan:\n{np.asarray(ct_scan.affine)}"
        )


def _mean_hu(ct_scan, labels, names: list[str]) -> float:
    data, _, by_name = labels
    hu = _hu_xyz(ct_scan)
    mask = np.isin(data, [by_name[n] for n in names])
    assert mask.sum() > 500, f"labels {names} cover only {int(mask.sum())} voxels"
    return float(hu[mask].mean())


def test_liver_and_spleen_are_soft_tissue(ct_scan, labels):
    liver = _mean_hu(ct_scan, labels, ["liver"])
    spleen = _mean_hu(ct_scan, labels, ["spleen"])
    assert 0.0 < liver < 150.0, f"mean HU inside the liver label is {liver:.1f}, not soft tissue"
    assert 0.0 < spleen < 150.0, f"mean HU inside the spleen label is {spleen:.1f}, not soft tissue"


def test_vertebrae_and_ribs_are_bone(ct_scan, labels):
    # thin structures: a flip along any axis drops their mean to soft tissue
    # (measured: ribs 275 HU; flipped L-R 66, flipped S-I 82)
    for name in ("vertebrae_T11", "vertebrae_T12"):
        hu = _mean_hu(ct_scan, labels, [name])
        assert hu > 200.0, f"mean HU inside {name} is {hu:.1f}, not bone"
    _, _, by_name = labels
    ribs = [n for n in by_name if n.startswith("rib_")]
    hu = _mean_hu(ct_scan, labels, ribs)
    assert hu > 200.0, f"mean HU inside the rib labels is {hu:.1f}, not bone"


def test_air_outside_body_and_in_colon(ct_scan, labels):
    data, _, by_name = labels
    hu = _hu_xyz(ct_scan)
    background = hu[data == 0]
    assert np.median(background) < -950.0, f"median HU outside all labels {np.median(background):.1f}: expected air"
    colon = _mean_hu(ct_scan, labels, ["colon"])
    assert colon < -300.0, f"mean HU inside the colon label is {colon:.1f}: expected mostly gas"


def test_lungs_are_air(totalseg_dir):
    """The DICOM series' label map stops below the lungs, so the lung check uses the
    TotalSegmentator CT volume whose label map has lung lobes (example_ct_sm + example_seg):
    same reader contract (RAS+, HU), label map aligned by affine."""
    from engine.io import load

    scan = load([str(totalseg_dir / "example_ct_sm.nii.gz")]).scans[0]
    img = nib.as_closest_canonical(nib.load(totalseg_dir / "example_seg.nii.gz"))
    np.testing.assert_allclose(scan.affine, img.affine, atol=ATOL_MM)
    data = np.asarray(img.dataobj).astype(np.int32).transpose(2, 1, 0)
    assert data.shape == scan.voxels.shape
    names = json.loads((totalseg_dir / "class_names.json").read_text())["total"]
    lung_ids = [int(k) for k, name in names.items() if name.startswith("lung_")]
    liver_id = next(int(k) for k, name in names.items() if name == "liver")
    lungs = scan.voxels[np.isin(data, lung_ids)]
    assert lungs.size > 1000
    assert lungs.mean() < -600.0, f"mean HU inside the lung labels is {lungs.mean():.1f}: expected air"
    liver = scan.voxels[data == liver_id].mean()
    assert 0.0 < liver < 150.0, f"mean HU inside the liver is {liver:.1f}: expected soft tissue"
    assert scan.modality.value == "CT"  # guessed from the Hounsfield scale, with a warning
