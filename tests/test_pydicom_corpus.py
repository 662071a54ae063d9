"""Every file in pydicom's own test data loads into a Scan or is refused with a specific ScanError.

The files are found by walking the installed package's data folders
(test_files, charset_files, palettes) with os.walk: pydicom's
`get_testdata_file(s)` may download external files and is never called.
Non-DICOM files that live there (README, JSON, ICC profile, a gzip) are part
of the walk: they, too, must be refused with the project's own error.

Per file: `load([path])` either returns at least one sane Scan (finite
voxels, positive spacing, JSON-ready summary) or raises ScanError whose
message names the file and says what is wrong. No other exception may
escape, and no exception raised by engine/ code itself may be hidden by a
catch-all handler (tests/_mutate.CatchAllProbe).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from engine.scan import STORAGE_DTYPES

import _mutate as mz

DATA = mz.pydicom_data_dir()
SUBFOLDERS = ("test_files", "charset_files", "palettes")


def corpus_files() -> list[Path]:
    files = []
    for sub in SUBFOLDERS:
        for dirpath, dirnames, filenames in os.walk(DATA / sub):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            files += [Path(dirpath) / f for f in sorted(filenames) if not f.endswith((".py", ".pyc"))]
    return files


FILES = corpus_files()
IDS = [str(p.relative_to(DATA)) for p in FILES]

# Valid images in transfer syntaxes and pixel pipelines the readers claim (README, "What is read, and how").
# Refusing one of these is a bug even when the message is good.
MUST_LOAD = {
    "test_files/CT_small.dcm": (128, 128),
    "test_files/MR_small.dcm": (64, 64),
    "test_files/MR_small_implicit.dcm": (64, 64),
    "test_files/MR_small_bigendian.dcm": (64, 64),
    "test_files/MR_small_expb.dcm": (64, 64),
    "test_files/MR_small_RLE.dcm": (64, 64),
    "test_files/MR_small_jp2klossless.dcm": (64, 64),
    "test_files/MR_small_jpeg_ls_lossless.dcm": (64, 64),
    "test_files/JPEG2000.dcm": (1024, 256),
    "test_files/JPEGLSNearLossless_16.dcm": (50, 10),
    "test_files/SC_rgb_jpeg_dcmtk.dcm": (100, 100, 3),  # JPEG baseline, YBR_FULL
    "test_files/SC_rgb_jpeg_gdcm.dcm": (100, 100, 3),  # JPEG lossless .70
    "test_files/SC_rgb_rle.dcm": (100, 100, 3),
    "test_files/SC_rgb_gdcm_KY.dcm": (100, 100, 3),  # JPEG 2000 colour
    "test_files/SC_ybr_full_422_uncompressed.dcm": (100, 100, 3),
    "test_files/examples_palette.dcm": (350, 800, 3),
    "test_files/examples_rgb_color.dcm": (240, 320, 3),
    "test_files/image_dfl.dcm": (512, 512),  # deflated
    "test_files/ExplVR_BigEnd.dcm": (60, 80, 3),
    "test_files/dicomdirtests/77654033/CR1/6154": (16, 16),  # MONOCHROME1
    "test_files/rtdose.dcm": None,  # 15-frame dose grid
    "test_files/examples_ybr_color.dcm": None,  # 30-frame JPEG ultrasound
}


def _load_probed(path: Path):
    from engine.io import load
    from engine.scan import ScanError

    with mz.CatchAllProbe() as probe, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result, error = load([path]), None
        except ScanError as exc:
            result, error = None, exc
        # anything else propagates: pytest reports it with its traceback
    return result, error, probe


def _check_scan(scan) -> None:
    from engine.scan import Modality

    assert scan.voxels.size > 0
    assert scan.voxels.dtype in STORAGE_DTYPES  # float32, or int16 holding the same integers (engine.scan)
    assert np.isfinite(scan.voxels).all(), "voxels hold NaN or inf"
    assert all(s > 0 and np.isfinite(s) for s in scan.spacing), scan.spacing
    assert np.isfinite(scan.affine).all() and abs(np.linalg.det(scan.affine[:3, :3])) > 0
    assert isinstance(scan.modality, Modality)
    assert scan.content_hash
    json.dumps(scan.summary())


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_corpus_file_loads_or_is_refused_specifically(path, record_property):
    result, error, probe = _load_probed(path)
    internal = probe.internal
    assert not internal, "engine code raised and a catch-all hid it:\n" + "\n".join(
        f"{s.type} at {s.origin}: {s.message}\n{s.traceback}" for s in internal
    )
    if error is None:
        assert result.scans, "load returned no scans and raised nothing"
        for scan in result.scans:
            _check_scan(scan)
        record_property("outcome", "loaded")
    else:
        problems = mz.message_problems(str(error), path.name)
        assert not problems, problems
        record_property("outcome", "refused")


@pytest.mark.parametrize("rel", sorted(MUST_LOAD), ids=sorted(MUST_LOAD))
def test_valid_image_in_supported_syntax_loads(rel):
    path = DATA / rel
    if not path.is_file():
        pytest.skip(f"{rel} is not shipped with this pydicom")
    result, error, _ = _load_probed(path)
    assert error is None, f"valid file refused: {error}"
    assert len(result.scans) == 1
    scan = result.scans[0]
    _check_scan(scan)
    expected = MUST_LOAD[rel]
    if expected is not None:
        assert scan.voxels.shape == expected


def test_corpus_counts(capsys):
    """Walk everything once more and print how many files load and how many are refused."""
    from engine.io import load
    from engine.scan import ScanError

    loaded, refused, reasons = 0, 0, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in FILES:
            try:
                load([path])
                loaded += 1
            except ScanError as exc:
                refused += 1
                reason = str(exc).split(": ", 1)[-1].split(" (", 1)[0]
                reasons[reason] = reasons.get(reason, 0) + 1
    with capsys.disabled():
        print(f"\npydicom corpus: {len(FILES)} files, {loaded} loaded, {refused} refused with ScanError")
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            print(f"  {n:4d}  {reason}")
    assert loaded + refused == len(FILES)
    assert loaded >= len([r for r in MUST_LOAD if (DATA / r).is_file()])


def test_whole_test_files_folder_in_one_batch():
    """A folder mixing images, non-image DICOM and junk: images load, the rest is skipped with reasons."""
    from engine.io import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = load([DATA / "test_files"])
    assert len(result.scans) >= 20
    skipped = {s.name: s.reason for s in result.skipped}
    readme = [r for n, r in skipped.items() if n.endswith("README.txt")]
    assert readme and readme[0].strip(), skipped
    for name, reason in skipped.items():
        assert len(reason.split()) >= 2, f"{name}: vague reason {reason!r}"
    for scan in result.scans:
        _check_scan(scan)
