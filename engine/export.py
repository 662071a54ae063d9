"""Writing scans out: NIfTI in RAS+ (what `medlens convert` produces)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.io.geometry import scan_order_to_xyz
from engine.scan import Scan, ScanError


def save_nifti(scan: Scan, out_path: str | Path) -> Path:
    """Write a volume (3D or 4D) or grey 2D image as NIfTI-1, voxel axes RAS+.

    The header carries geometry and units only: no description or other
    text, so nothing identifying can end up in the file.
    """
    import nibabel as nib

    out = Path(out_path)
    if not out.name.lower().endswith((".nii", ".nii.gz")):
        raise ScanError(f"{out.name}: output name must end in .nii or .nii.gz")
    if scan.is_color:
        raise ScanError("this is a colour 2D image: NIfTI export is for grey images and volumes; save it as PNG instead")
    data = scan_order_to_xyz(scan.voxels).astype(np.float32)
    img = nib.Nifti1Image(data, scan.affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(scan.affine, code=1)  # scanner anatomical
    img.set_sform(scan.affine, code=1)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(out))
    except OSError as exc:
        raise ScanError(f"{out}: cannot write ({exc.strerror or exc})") from None
    return out
