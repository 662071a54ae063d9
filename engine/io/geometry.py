"""Patient geometry shared by the readers: DICOM LPS affines, RAS+ reorientation.

Every reader ends with `to_canonical`, so every Scan's voxel axes point
(closest to) Right, Anterior, Superior, exactly as nibabel's
`as_closest_canonical` would leave a NIfTI file.
"""

from __future__ import annotations

import numpy as np
from nibabel import orientations

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def dicom_affine(iop: np.ndarray, pixel_spacing: tuple[float, float], ipp0: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Affine from voxel (column, row, slice) to RAS+ mm.

    iop: ImageOrientationPatient (row direction cosines then column cosines);
    pixel_spacing: DICOM PixelSpacing (row spacing, column spacing);
    step: LPS vector from one slice's first pixel to the next one's.
    """
    row_dir, col_dir = np.asarray(iop[:3], float), np.asarray(iop[3:6], float)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * float(pixel_spacing[1])  # along a row = increasing column index
    lps[:3, 1] = col_dir * float(pixel_spacing[0])  # down a column = increasing row index
    lps[:3, 2] = step
    lps[:3, 3] = ipp0
    return LPS_TO_RAS @ lps


def slice_normal(iop: np.ndarray) -> np.ndarray:
    n = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:6], float))
    norm = np.linalg.norm(n)
    return n / norm if norm > 0 else n


def to_canonical(data_xyz: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip/transpose the first three axes to closest RAS+ (extra trailing axes untouched)."""
    ornt = orientations.io_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return data_xyz, affine
    data = orientations.apply_orientation(data_xyz, ornt)
    new_affine = affine @ orientations.inv_ornt_aff(ornt, data_xyz.shape[:3])
    return data, new_affine


def spacing_zyx(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size along array axes (z, y, x) from the affine's column norms."""
    norms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return float(norms[2]), float(norms[1]), float(norms[0])


def xyz_to_scan_order(data_xyz: np.ndarray) -> np.ndarray:
    """NIfTI order (x, y, z[, t]) -> Scan order (z, y, x) or (t, z, y, x)."""
    return np.ascontiguousarray(data_xyz.transpose(tuple(range(data_xyz.ndim))[::-1]))


def scan_order_to_xyz(voxels: np.ndarray) -> np.ndarray:
    return voxels.transpose(tuple(range(voxels.ndim))[::-1])
