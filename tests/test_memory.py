"""Memory bounds (engine.memory): the per-series cap checked from headers before decoding, the budget
ledger, and int16 storage that every consumer reads exactly as float32."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _big_series import write_ct_series  # noqa: E402

from engine import memory  # noqa: E402
from engine.io import load  # noqa: E402
from engine.memory import LoadGuard, MemoryBudget, MemoryLimitError, SeriesSize  # noqa: E402
from engine.scan import Modality, Scan, ScanError  # noqa: E402

CAP_ENV = "MEDLENS_MAX_SERIES_VOXELS"


@pytest.fixture
def decode_calls(monkeypatch):
    """Every pixel decode of the DICOM reader, recorded (engine.io.dicom calls dicom_pixels.decode through this name)."""
    import engine.io.dicom as dicom

    calls: list[str] = []
    real = dicom.decode

    def spy(ds, header, name):
        calls.append(name)
        return real(ds, header, name)

    monkeypatch.setattr(dicom, "decode", spy)
    return calls


# --------------------------------------------------------------------------- the cap
@pytest.mark.parametrize("pixels,rle", [("truncated", False), ("garbage", True)])
def test_a_series_over_the_cap_is_refused_before_any_pixel_is_decoded(tmp_path, monkeypatch, decode_calls, pixels, rle):
    write_ct_series(tmp_path / "s", 12, 64, 64, pixels=pixels, rle=rle)  # valid headers, undecodable pixels
    monkeypatch.setenv(CAP_ENV, str(10 * 64 * 64))
    with pytest.raises(ScanError) as refused:
        load([tmp_path / "s"])
    message = str(refused.value)
    assert "this series has 12 slices of 64x64 = 0.049 M voxels; the limit is 0.041 M voxels (MEDLENS_MAX_SERIES_VOXELS)" in message
    assert "truncated" not in message and "decode" not in message
    assert decode_calls == [], "pixels were decoded before the cap was checked"
    # control: under the cap the same files reach the decoder and fail there
    monkeypatch.setenv(CAP_ENV, str(13 * 64 * 64))
    with pytest.raises(ScanError, match="truncated|cannot be decoded"):
        load([tmp_path / "s"])
    assert len(decode_calls) == 12


def test_the_header_pass_of_a_zipped_series_does_not_inflate_the_pixels(tmp_path, monkeypatch):
    from engine.io import sources

    zipped = write_ct_series(tmp_path / "w", 4, 512, 512, pixels="phantom", zip_path=tmp_path / "series.zip")
    read: list[int] = []
    real = sources._BoundedReader.readinto

    def counting(self, b):
        n = real(self, b)
        read.append(n)
        return n

    monkeypatch.setattr(sources._BoundedReader, "readinto", counting)
    monkeypatch.setenv(CAP_ENV, str(3 * 512 * 512))
    with pytest.raises(ScanError, match="4 slices of 512x512"):
        load([zipped])
    per_member = 512 * 512 * 2
    assert 0 < sum(read) < 4 * per_member / 2, f"read {sum(read):,} bytes of {4 * per_member:,} to check the headers"


def test_one_multiframe_file_over_the_cap_names_its_size(monkeypatch, decode_calls):
    from pydicom.data import get_testdata_file

    monkeypatch.setenv(CAP_ENV, "50000")
    with pytest.raises(ScanError, match=r"this file has 2 frames of 100x100 x 3 colour channels = 0\.06 M voxels; the limit is 0\.05 M"):
        load([get_testdata_file("SC_rgb_rle_2frame.dcm")])
    assert decode_calls == []


def test_nifti_over_the_cap_is_refused_from_its_header(tmp_path, monkeypatch):
    import nibabel as nib

    path = tmp_path / "big.nii"
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 40), np.int16), np.eye(4)), str(path))
    with open(path, "r+b") as fh:  # cut the data: only a reader that reads voxels notices
        fh.truncate(352 + 100)
    monkeypatch.setenv(CAP_ENV, str(64 * 64 * 39))
    with pytest.raises(ScanError, match=r"this NIfTI volume has 40 slices of 64x64 = 0\.16 M voxels; the limit is"):
        load([path])
    monkeypatch.setenv(CAP_ENV, str(64 * 64 * 40))
    with pytest.raises(ScanError, match="truncated or corrupt"):
        load([path])


def test_an_image_over_the_cap_is_refused_from_its_declared_size(tmp_path, monkeypatch):
    from PIL import Image

    Image.new("RGB", (300, 200), (10, 20, 30)).save(tmp_path / "photo.png")
    monkeypatch.setenv(CAP_ENV, str(300 * 200 * 3 - 1))
    with pytest.raises(ScanError, match=r"this image has one image of 200x300 x 3 colour channels"):
        load([tmp_path / "photo.png"])


def test_a_malformed_cap_names_the_variable(monkeypatch):
    from engine.settings import SettingsError

    monkeypatch.setenv(CAP_ENV, "lots")
    with pytest.raises(SettingsError, match=CAP_ENV):
        memory.max_series_voxels()


# --------------------------------------------------------------------------- the budget
def test_the_budget_refuses_what_does_not_fit_and_frees_what_is_collected():
    ledger = MemoryBudget(1000)
    with ledger.reserve(600) as r:
        kept = r.track(np.zeros(100, np.int16))  # 200 bytes move from the reservation to the array
        assert (ledger.tracked, ledger.in_use) == (200, 600)
        with pytest.raises(MemoryLimitError, match=r"MEDLENS_MEMORY_BUDGET_MB"):
            ledger.reserve(401)
    assert (ledger.tracked, ledger.in_use, ledger.live_arrays) == (200, 200, 1)
    ledger.reserve(800).release()
    del kept
    gc.collect()
    assert (ledger.tracked, ledger.in_use, ledger.live_arrays) == (0, 0, 0)


def test_loaded_scans_are_charged_until_they_are_freed(tmp_path):
    write_ct_series(tmp_path / "s", 10, 64, 64)
    ledger = MemoryBudget(100 << 20)
    result = load([tmp_path / "s"], budget=ledger)
    scan = result.scans[0]
    assert scan.voxels.dtype == np.int16 and ledger.tracked == scan.voxels.nbytes == 10 * 64 * 64 * 2
    assert ledger.in_use == ledger.tracked  # the decode reservation is given back
    view = scan.volume(0).voxels
    del result, scan
    gc.collect()
    assert ledger.tracked > 0, "a view of the voxels keeps them alive, and charged"
    del view
    gc.collect()
    assert ledger.tracked == 0


def test_a_full_budget_refuses_a_new_load_with_the_figures(tmp_path):
    write_ct_series(tmp_path / "a", 10, 64, 64)
    ledger = MemoryBudget(170_000)  # one series fits (and half of it), two do not
    first = load([tmp_path / "a"], budget=ledger)  # 81,920 bytes
    with pytest.raises(
        ScanError,
        match=r"loading this series \(10 slices of 64x64\) needs 0.094 MB, but the server's memory budget has 0.084 MB free of 0.16 MB \(MEDLENS_MEMORY_BUDGET_MB",
    ):
        load([tmp_path / "a"], budget=ledger)
    del first
    gc.collect()
    assert load([tmp_path / "a"], budget=ledger).scans


def test_one_upload_may_hold_at_most_half_the_budget(tmp_path):
    write_ct_series(tmp_path / "up" / "a", 10, 64, 64)
    write_ct_series(tmp_path / "up" / "b", 10, 64, 64)
    ledger = MemoryBudget(4 * 10 * 64 * 64 * 2 - 1)  # two series would be just over half
    result = load([tmp_path / "up"], budget=ledger)
    assert len(result.scans) == 1
    assert any("one upload may hold at most" in s.reason for s in result.skipped)


def test_series_size_describes_itself(monkeypatch):
    assert SeriesSize(3000, 512, 512).describe() == "3,000 slices of 512x512"
    assert SeriesSize(3000, 512, 512).voxels == 786_432_000
    assert SeriesSize(1, 10, 20, samples=3, unit="images").describe() == "one image of 10x20 x 3 colour channels"
    assert SeriesSize(40, 8, 8, volumes=5).describe() == "40 slices of 8x8 x 5 volumes"
    monkeypatch.setenv(CAP_ENV, "400000000")
    with pytest.raises(
        MemoryLimitError, match=r"3,000 slices of 512x512 = 786 M voxels; the limit is 400 M voxels \(MEDLENS_MAX_SERIES_VOXELS\)"
    ):
        memory.check_series(SeriesSize(3000, 512, 512))


def test_the_default_budget_is_a_quarter_of_memory(monkeypatch):
    monkeypatch.delenv("MEDLENS_MEMORY_BUDGET_MB", raising=False)
    assert memory.budget_limit_bytes() == max(memory.MIN_DEFAULT_BUDGET, memory.available_memory() // 4)
    monkeypatch.setenv("MEDLENS_MEMORY_BUDGET_MB", "300")
    assert memory.budget().limit == 300 << 20
    assert LoadGuard().ledger is memory.budget()


# --------------------------------------------------------------------------- int16 storage
def test_ct_is_stored_as_int16_with_its_exact_hounsfield_units(tmp_path):
    from _big_series import phantom_slice

    write_ct_series(tmp_path / "s", 6, 48, 40)
    scan = load([tmp_path / "s"]).scans[0]
    assert scan.voxels.dtype == np.int16
    expected = np.stack([phantom_slice(k, 6, 48, 40).astype(np.int32) - 1024 for k in range(6)])
    # RAS+: rows run Posterior->Anterior and columns Left->Right after the flips of LPS
    np.testing.assert_array_equal(scan.voxels, expected[:, ::-1, ::-1])


def test_values_beyond_int16_fall_back_to_float32(tmp_path):
    import pydicom

    files = write_ct_series(tmp_path / "s", 4, 16, 16)
    for path in files:  # signed 16-bit with padding -32768: -33792 HU after the intercept
        ds = pydicom.dcmread(path)
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
        values = np.zeros((16, 16), np.int16)
        values[0, 0] = -32768
        ds.PixelData = values.tobytes()
        ds.save_as(path, enforce_file_format=True)
    scan = load([tmp_path / "s"]).scans[0]
    assert scan.voxels.dtype == np.float32
    assert scan.voxels.min() == -33792 and scan.voxels.max() == -1024


def _pair(values: np.ndarray, modality=Modality.CT) -> tuple[Scan, Scan]:
    affine = np.diag([0.7, 0.8, 2.0, 1.0])
    spacing = (2.0, 0.8, 0.7)
    return (Scan(values.astype(np.int16), spacing, affine, modality), Scan(values.astype(np.float32), spacing, affine, modality))


def test_every_consumer_reads_int16_storage_as_float32(tmp_path):
    from engine.export import save_nifti
    from engine.library.store import thumbnail_png
    from engine.models.volume_prep import prepare_volume
    from engine.views import extract_slice, render_view
    from engine.windowing import default_window, slider_range
    from engine.zeroshot.imaging import model_image, sample_indices

    rng = np.random.default_rng(0)
    values = rng.integers(-1024, 2000, size=(12, 40, 36))
    small, exact = _pair(values)
    assert small.voxels.dtype == np.int16 and small.voxels.nbytes * 2 == exact.voxels.nbytes
    assert small.content_hash == exact.content_hash
    assert default_window(small) == default_window(exact) and slider_range(small) == slider_range(exact)
    for plane in ("axial", "coronal", "sagittal"):
        a, b = extract_slice(small, plane, 5, mip_mm=4.0)[0], extract_slice(exact, plane, 5, mip_mm=4.0)[0]
        assert a.dtype == np.float32 and np.array_equal(a, b)
        assert np.array_equal(render_view(small, plane, 5, 40, 400), render_view(exact, plane, 5, 40, 400))
        assert np.array_equal(model_image(small, plane, 5).pixels, model_image(exact, plane, 5).pixels)
    assert sample_indices(small, "axial", 4) == sample_indices(exact, "axial", 4)
    assert np.array_equal(thumbnail_png(small)[0], thumbnail_png(exact)[0])
    assert torch_equal(prepare_volume(small).tensor, prepare_volume(exact).tensor)
    import nibabel as nib

    a, b = nib.load(str(save_nifti(small, tmp_path / "a.nii"))), nib.load(str(save_nifti(exact, tmp_path / "b.nii")))
    assert np.array_equal(a.get_fdata(), b.get_fdata())


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_nifti_storage_follows_its_values(tmp_path):
    import nibabel as nib

    cases = {
        "ct_int16.nii.gz": (np.arange(-1000, 1000, dtype=np.int16).reshape(10, 20, 10), None, np.int16),
        "labels_uint8.nii": (np.arange(200, dtype=np.uint8).reshape(5, 8, 5), None, np.int16),
        "mr_uint16_small.nii": (np.arange(400, dtype=np.uint16).reshape(5, 8, 10), None, np.int16),
        "mr_uint16_full.nii": (np.array([0, 65535] * 100, dtype=np.uint16).reshape(5, 8, 5), None, np.float32),
        "scaled.nii": (np.arange(200, dtype=np.int16).reshape(5, 8, 5), (0.5, 0.0), np.float32),
        "float.nii": (np.linspace(0, 1, 200, dtype=np.float32).reshape(5, 8, 5), None, np.float32),
    }
    affine = np.array([[-0.8, 0, 0, 10], [0, 0.9, 0, -5], [0, 0, 2.0, 3], [0, 0, 0, 1]])  # x flipped: reoriented on load
    for name, (data, scaling, dtype) in cases.items():
        img = nib.Nifti1Image(data, affine)
        if scaling:
            img.header.set_slope_inter(*scaling)
        nib.save(img, str(tmp_path / name))
        scan = load([tmp_path / name]).scans[0]
        assert scan.voxels.dtype == dtype, name
        expected = np.asarray(nib.as_closest_canonical(nib.load(str(tmp_path / name))).get_fdata(), np.float64).T
        np.testing.assert_array_equal(scan.voxels.astype(np.float64), expected, err_msg=name)
