"""engine.models.calibration: the probe's real images, from the caller, the user's folder, or the bundled test files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.models import calibration


def test_bundled_images_are_real_scans_as_the_engine_sends_them():
    files = calibration.bundled_files()
    names = {f.name for f in files}
    assert {"CT_small.dcm", "MR_small.dcm", "anatomical.nii"} <= names
    import nibabel
    import pydicom

    own = [Path(pydicom.__file__).resolve().parent, Path(nibabel.__file__).resolve().parent]
    assert all(any(f.resolve().is_relative_to(p) for p in own) for f in files)  # files bundled inside pydicom and nibabel only
    first, second = calibration.calibration_set(), calibration.calibration_set()
    assert len(first.images) >= 16 and "bundled" in first.source
    assert all(im.dtype == np.uint8 and im.shape == (448, 448, 3) for im in first.images)
    assert first.fingerprint() == second.fingerprint()  # deterministic: the same int8 calibration every time
    assert len({im.tobytes()[:4096] for im in first.images}) > len(first.images) // 2  # not one image repeated


def test_users_folder_wins_and_bad_files_are_skipped(tmp_path, monkeypatch):
    for sub, value in (("xray", 60), ("us", 120), ("derm", 200)):
        (tmp_path / sub).mkdir()
        for i in range(3):
            Image.fromarray(np.full((64, 80), value + i, np.uint8)).save(tmp_path / sub / f"{i}.png")
    (tmp_path / "xray" / "broken.dcm").write_bytes(b"not a dicom")
    monkeypatch.setenv("MEDLENS_CALIBRATION_IMAGES", str(tmp_path))
    chosen = calibration.folder_files(tmp_path, 4)
    assert [p.parent.name for p in chosen][:3] == ["derm", "us", "xray"]  # round-robin over sub-folders
    got = calibration.calibration_set(n=6)
    assert got.source == "6 images from MEDLENS_CALIBRATION_IMAGES" and len(got.images) == 6
    given = calibration.calibration_set([np.zeros((32, 32), np.uint8)] * 3)
    assert given.source == "3 images given by the caller"
    monkeypatch.setenv("MEDLENS_CALIBRATION_IMAGES", str(tmp_path / "absent"))
    assert "bundled" in calibration.calibration_set().source


def test_example_inputs_for_the_encoder_probe():
    from engine.models.volume_prep import VolumePrep

    volume = calibration.example_volume(VolumePrep(pad_to_size=False))
    assert volume.ndim == 5 and volume.shape[:2] == (1, 1) and all(s >= m for s, m in zip(volume.shape[2:], (64, 64, 32)))
    assert 0.0 <= float(volume.min()) and float(volume.max()) <= 1.0 and float(volume.std()) > 0.05  # a brain, not zeros
    image = calibration.example_image()
    assert image.shape == (448, 448, 3) and image.dtype == np.uint8 and image.std() > 10
    assert isinstance(volume, torch.Tensor)
