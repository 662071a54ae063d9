"""A small real archive for the batch tests: package test files (pydicom, nibabel), ../shared/data when present, bad files."""

from __future__ import annotations

import json
import shutil
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

SHARED_SIEMENS = Path("dicom_reference") / "dcm_qa_nih" / "In" / "20180918Si"  # 4 Siemens mosaic EPI series, 1.5 MB
SHARED_NIH = Path("xray") / "nih_cxr14_1000" / "images"
SHARED_BUSI = Path("ultrasound") / "busi"


def real_tree(root: Path, shared: Path | None = None) -> Path:
    """Folders of real scans, a DICOM series split over two folders, a zip holding a series, and bad files."""
    from nibabel.testing import data_path
    from pydicom.data import get_testdata_file

    from _series import synthetic_ct_series

    root.mkdir(parents=True, exist_ok=True)
    (root / "dicom").mkdir()
    # bundled with pydicom (no download), one series each: CT, JPEG 2000 MR, RLE colour, and two that cannot be
    # labelled (a JPEG Extended 12-bit file no installed decoder reads, a structured report without pixels)
    for name in ("CT_small.dcm", "MR_small_jp2klossless.dcm", "SC_rgb_rle.dcm", "JPGExtended.dcm", "reportsi.dcm"):
        shutil.copy(get_testdata_file(name), root / "dicom" / name)
    series = synthetic_ct_series(root / "work" / "a", n_slices=5, marker=False)  # CT_small's pixels, stacked
    for i, file in enumerate(series):  # one series over two folders: still one unit
        folder = root / ("split_1" if i % 2 else "split_2")
        folder.mkdir(exist_ok=True)
        shutil.copy(file, folder / file.name)
    with zipfile.ZipFile(root / "archive.zip", "w") as zf:
        for file in synthetic_ct_series(root / "work" / "b", n_slices=3, marker=False):
            zf.write(file, f"series/{file.name}")
        zf.writestr("../escape.dcm", b"DICM")  # traversal name: refused, one error row
    shutil.rmtree(root / "work")
    (root / "nifti").mkdir()
    for name in ("example4d.nii.gz", "anatomical.nii"):
        shutil.copy(Path(data_path) / name, root / "nifti" / name)
    bad = root / "bad"
    bad.mkdir()
    (bad / "readme.txt").write_text("not a scan\n")
    (bad / "zeros.dcm").write_bytes(b"\0" * 400)
    (bad / "empty.png").write_bytes(b"")
    (bad / "truncated.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes()[:2000])
    (root / ".hidden").write_text("OS metadata: not a unit")
    if shared is not None:
        _shared(root / "shared", shared)
    return root


def _shared(dest: Path, shared: Path) -> None:
    if (shared / SHARED_SIEMENS).is_dir():
        shutil.copytree(shared / SHARED_SIEMENS, dest / "siemens", ignore=shutil.ignore_patterns("*.txt"))
    nih = sorted((shared / SHARED_NIH).glob("*.png"))[:4] if (shared / SHARED_NIH).is_dir() else []
    busi = sorted((shared / SHARED_BUSI).rglob("*.png"))[:2] if (shared / SHARED_BUSI).is_dir() else []
    for file in nih + busi:
        (dest / "images").mkdir(parents=True, exist_ok=True)
        shutil.copy(file, dest / "images" / file.name)


def png_tree(root: Path, n: int, shared: Path | None = None) -> Path:
    """`n` small grey PNGs (real NIH radiographs when ../shared/data is here, else random pixels)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    nih = sorted((shared / SHARED_NIH).glob("*.png"))[:n] if shared is not None and (shared / SHARED_NIH).is_dir() else []
    for i in range(n):
        if i < len(nih):
            shutil.copy(nih[i], root / f"img{i:04d}.png")
        else:
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (48, 48), dtype=np.uint8)).save(root / f"img{i:04d}.png")
    return root


def canonical(rows: list[dict]) -> list[str]:
    """Rows as sorted JSON strings: equal lists mean identical rows, order aside."""
    return sorted(json.dumps(row, sort_keys=True) for row in rows)


def assert_each_unit_once(rows: list[dict], planned_fingerprints: set[str]) -> None:
    """Every planned unit has exactly one row, and every content hash exactly one result (ok or error)."""
    per_unit = Counter(row["fingerprint"] for row in rows)
    assert set(per_unit) == planned_fingerprints, (len(per_unit), len(planned_fingerprints))
    assert max(per_unit.values()) == 1, [fp for fp, n in per_unit.items() if n > 1][:3]
    results = Counter(row["unit"] for row in rows if row["unit"] and row["status"] != "duplicate")
    assert not results or max(results.values()) == 1
