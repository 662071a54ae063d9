"""Build DICOM series zips for the app tests (never downloads anything).

`ct_zip` zips the real 20-slice CT of ../shared/data when this machine has it
and otherwise a synthetic series built from pydicom's CT_small.dcm, so the
app tests run everywhere. `synthetic_ct_series` can also burn a bright marker
into the patient's Right-Anterior-Superior corner, to check orientation end
to end (loader + renderer + browser).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

CT_SERIES_REL = Path("volumes") / "totalsegmentator" / "ct_dicom_series"
MARKER_VALUE = 3000  # stored value; HU = value - 1024 (CT_small's intercept): bright in any window
MARKER_PX = 12  # marker side in pixels


def synthetic_ct_series(dest: Path, n_slices: int = 8, marker: bool = True) -> list[Path]:
    """`n_slices` copies of CT_small.dcm (128x128, 0.66 mm) stacked 5 mm apart along z.

    Each copy gets its own ImagePositionPatient (z), InstanceNumber and
    SOPInstanceUID; all share one new SeriesInstanceUID. Files are written in
    reverse slice order with meaningless names, so a reader that sorts by
    file name or trusts file order gets them wrong. With `marker`, the top
    (most superior) slice gets a bright square in its first rows/columns:
    with IOP (1,0,0)/(0,1,0) that is the patient's Right-Anterior corner
    (DICOM LPS: columns run to the Left, rows to Posterior).
    """
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    dest.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series_uid = generate_uid()
    x0, y0, z0 = (float(v) for v in template.ImagePositionPatient)
    pixels = template.pixel_array.copy()
    paths = []
    for i in range(n_slices):
        ds = template.copy()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [x0, y0, z0 + 5.0 * i]
        ds.SliceLocation = z0 + 5.0 * i
        ds.SliceThickness = 5.0
        slice_pixels = pixels.copy()
        if marker and i == n_slices - 1:
            slice_pixels[:MARKER_PX, :MARKER_PX] = MARKER_VALUE
        ds.PixelData = slice_pixels.astype(pixels.dtype).tobytes()
        path = dest / f"img{n_slices - i:04d}"  # reverse order, no extension
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def zip_files(files: list[Path], zip_path: Path, folder: str = "series") -> Path:
    """Zip `files` under `folder/` inside the archive."""
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(files):
            zf.write(f, f"{folder}/{Path(f).name}")
    return zip_path


def ct_zip(tmp_dir: Path, shared_data: Path | None) -> tuple[Path, str]:
    """(zip of a CT series, "shared" or "synthetic")."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    if shared_data is not None and (shared_data / CT_SERIES_REL).is_dir():
        files = sorted(p for p in (shared_data / CT_SERIES_REL).iterdir() if p.is_file())
        if files:
            return zip_files(files, tmp_dir / "ct_series.zip"), "shared"
    files = synthetic_ct_series(tmp_dir / "synthetic_ct")
    return zip_files(files, tmp_dir / "ct_series.zip"), "synthetic"


def decode_data_url_png(html: str) -> np.ndarray:
    """The first PNG data URL in an HTML snippet, decoded to an RGB array."""
    import base64
    import io
    import re

    from PIL import Image

    match = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    if match is None:
        raise AssertionError("no PNG data URL in the view HTML")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(match.group(1)))).convert("RGB"))
