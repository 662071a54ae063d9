"""The `medlens` command line: info, convert, and clean failures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from _cli import run_cli

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def test_info_json_is_one_object_per_series(capsys, tmp_path):
    code, out, err = run_cli(capsys, "info", "--json", str(PYDICOM_FILES / "CT_small.dcm"), str(NIBABEL_DATA / "example4d.nii.gz"))
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert {"modality", "shape", "spacing_mm", "orientation", "warnings", "series", "n_series"} <= set(row)
    assert sorted(r["n_volumes"] for r in rows) == [1, 2]


def test_info_text_names_the_essentials(capsys):
    code, out, _ = run_cli(capsys, "info", str(NIBABEL_DATA / "example4d.nii.gz"))
    assert code == 0 and "orientation  RAS" in out and "spacing (mm)" in out and "1 series found" in out


def test_convert_writes_ras_nifti_matching_the_input(capsys, tmp_path):
    out_path = tmp_path / "out.nii.gz"
    code, out, err = run_cli(capsys, "convert", str(NIBABEL_DATA / "example4d.nii.gz"), "-o", str(out_path))
    assert code == 0, err
    written = nib.load(out_path)
    reference = nib.as_closest_canonical(nib.load(NIBABEL_DATA / "example4d.nii.gz"))
    assert nib.aff2axcodes(written.affine) == ("R", "A", "S")
    np.testing.assert_allclose(written.affine, reference.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(reference.dataobj, dtype=np.float32))
    code, _, _ = run_cli(capsys, "convert", str(NIBABEL_DATA / "example4d.nii.gz"), "--volume", "1", "-o", str(tmp_path / "v1.nii"))
    assert code == 0 and nib.load(tmp_path / "v1.nii").shape == reference.shape[:3]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["info", "/no/such/file.dcm"], "no such file or folder"),
        (["convert", "/no/such/file.dcm", "-o", "x.nii.gz"], "no such file or folder"),
        (["convert", str(PYDICOM_FILES / "CT_small.dcm"), "-o", "out.png"], "must end in .nii"),
        (["convert", str(PYDICOM_FILES / "JPEG-lossy.dcm"), "-o", "x.nii"], "cannot be decoded"),
        (["info", str(PYDICOM_FILES / "rtplan.dcm")], "holds no image"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, argv, needle):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medlens: ") and needle in lines[0]
    assert "Traceback" not in err + out


def test_console_script_is_installed_and_fails_cleanly(tmp_path):
    exe = shutil.which("medlens", path=str(Path(sys.executable).parent))
    assert exe, "pip install -e . must install the medlens console script"
    proc = subprocess.run([exe, "info", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
