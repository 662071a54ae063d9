"""Readers on real files that ship with pydicom and nibabel (run everywhere)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from engine.io import load, load_one
from engine.scan import Modality, ScanError

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def one(path) -> "object":
    result = load([path])
    assert len(result.scans) == 1, result.scans
    return result.scans[0]


@pytest.mark.parametrize(
    "variant",
    ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm"],
)
def test_compressed_and_other_syntaxes_decode_to_the_reference_pixels(variant):
    reference = one(PYDICOM_FILES / "MR_small.dcm")
    scan = one(PYDICOM_FILES / variant)
    assert scan.voxels.shape == reference.voxels.shape
    np.testing.assert_array_equal(scan.voxels, reference.voxels)


def test_ct_is_rescaled_to_hounsfield_units():
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    scan = one(PYDICOM_FILES / "CT_small.dcm")
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert scan.modality is Modality.CT
    np.testing.assert_allclose(scan.voxels, expected)


@pytest.mark.parametrize("name", ["SC_rgb_rle.dcm", "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_jpeg_gdcm.dcm", "examples_palette.dcm"])
def test_colour_dicom_becomes_rgb(name):
    scan = one(PYDICOM_FILES / name)
    assert scan.is_color and scan.voxels.shape[-1] == 3
    assert scan.provenance.burned_in_text_risk  # secondary captures / US may show names in pixels


def test_ybr_is_converted_to_rgb_like_the_rgb_original():
    plain = one(PYDICOM_FILES / "SC_rgb_dcmtk_+eb+cr.dcm")  # RGB
    ybr = one(PYDICOM_FILES / "SC_rgb_dcmtk_+eb+cy+np.dcm")  # same picture as YBR_FULL
    assert plain.voxels.shape == ybr.voxels.shape
    # YBR_FULL stores 8-bit rounded chroma: close to the RGB original on average, not exactly.
    assert np.abs(plain.voxels - ybr.voxels).mean() < 4.0
    assert np.abs(plain.voxels - ybr.voxels).mean() < np.abs(plain.voxels - plain.voxels[..., ::-1]).mean() / 10


def test_colour_cine_becomes_a_grey_stack_with_a_warning():
    scan = one(PYDICOM_FILES / "examples_ybr_color.dcm")
    assert scan.voxels.ndim == 3 and scan.voxels.shape[0] > 1
    assert any("greyscale" in w for w in scan.provenance.warnings)


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")
    normal = one(PYDICOM_FILES / "MR_small.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    path = tmp_path / "mono1.dcm"
    ds.save_as(path)
    inverted = one(path)
    lo, hi = normal.voxels.min(), normal.voxels.max()
    np.testing.assert_allclose(inverted.voxels, lo + hi - normal.voxels)


def test_multiframe_with_grid_offsets_is_a_volume():
    scan = one(PYDICOM_FILES / "rtdose.dcm")
    assert scan.voxels.ndim == 3 and scan.voxels.shape[0] > 1
    assert scan.orientation == "RAS"


def test_nifti_4d_keeps_every_volume_and_is_canonical():
    scan = one(NIBABEL_DATA / "example4d.nii.gz")
    img = nib.as_closest_canonical(nib.load(NIBABEL_DATA / "example4d.nii.gz"))
    assert scan.n_volumes == img.shape[3]
    np.testing.assert_allclose(scan.affine, img.affine)
    np.testing.assert_allclose(scan.volume(1).voxels, np.asarray(img.dataobj, dtype=np.float32)[..., 1].T)
    with pytest.raises(ScanError, match="volume 99 does not exist"):
        scan.volume(99)


def test_nifti2_and_reoriented_nifti_load_in_ras():
    for name in ("example_nifti2.nii.gz", "reoriented_anat_moved.nii"):
        scan = one(NIBABEL_DATA / name)
        assert scan.orientation == "RAS"


@pytest.mark.parametrize("mode,dtype", [("L", np.uint8), ("I;16", np.uint16)])
def test_grey_png_keeps_values(tmp_path, mode, dtype):
    arr = (np.arange(40 * 30).reshape(40, 30) % 250).astype(dtype) * (200 if dtype == np.uint16 else 1)
    path = tmp_path / "x.png"
    Image.fromarray(arr, mode=mode if mode != "I;16" else None).save(path)
    scan = one(path)
    assert scan.is_2d and not scan.is_color
    np.testing.assert_array_equal(scan.voxels, arr.astype(np.float32))


def test_colour_jpeg_and_multipage_tiff(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "c.jpg")
    assert one(tmp_path / "c.jpg").is_color
    pages = [Image.fromarray(np.full((10, 10), v, np.uint8)) for v in (10, 20)]
    pages[0].save(tmp_path / "m.tif", save_all=True, append_images=pages[1:])
    scan = one(tmp_path / "m.tif")
    assert any("first of 2 pages" in w for w in scan.provenance.warnings)


def _series_zip(tmp_path: Path) -> Path:
    """Two series in one zip: CT_small as a 4-slice series, MR_small as a single image."""
    path = tmp_path / "study.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for k in range(4):
            ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
            ds.ImagePositionPatient = [0, 0, 5.0 * k]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.SOPInstanceUID = f"1.2.3.4.{k}"
            ds.InstanceNumber = 4 - k
            name = tmp_path / f"ct{k}.dcm"
            ds.save_as(name)
            zf.write(name, f"study/ct/IM{(k * 7) % 4}.dcm")
        zf.write(PYDICOM_FILES / "MR_small.dcm", "study/mr/IM0")
        zf.writestr("study/notes.txt", "not an image")
    return path


def test_zip_with_two_series_lists_both_and_skips_junk(tmp_path):
    result = load([_series_zip(tmp_path)])
    shapes = sorted(s.voxels.shape for s in result.scans)
    assert shapes == [(4, 128, 128), (64, 64)]
    assert [s.name for s in result.skipped] == ["study.zip/study/notes.txt"]
    with pytest.raises(ScanError, match="2 series found, choose one with --series"):
        load_one([_series_zip(tmp_path)])
    scan, _ = load_one([_series_zip(tmp_path)], series=0)
    assert scan.voxels.ndim in (2, 3)


def test_a_bad_file_does_not_spoil_the_batch(tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + os.urandom(200))
    result = load([bad, PYDICOM_FILES / "CT_small.dcm", tmp_path / "missing.nii"])
    assert len(result.scans) == 1
    reasons = {s.name: s.reason for s in result.skipped}
    assert "no such file" in reasons[str(tmp_path / "missing.nii")]
    assert "bad.dcm" in reasons and reasons["bad.dcm"]


def test_nothing_loadable_is_one_clear_error(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(ScanError, match="not a DICOM, NIfTI or image file"):
        load([tmp_path / "a.txt"])
    (tmp_path / "d").mkdir()
    with pytest.raises(ScanError, match="empty"):
        load([tmp_path / "d"])


def test_content_hash_ignores_identifying_header(tmp_path):
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    ds.PatientName = "Someone^Else"
    ds.save_as(tmp_path / "renamed.dcm")
    assert one(tmp_path / "renamed.dcm").content_hash == one(PYDICOM_FILES / "CT_small.dcm").content_hash
