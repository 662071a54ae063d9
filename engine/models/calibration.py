"""Real images for the fast-path probe: int8 calibration, parity and timing.

The fast-path chooser (engine.models.fastpath) calibrates int8 paths and
checks that every path keeps the answer on *real* medical images, as the
engine sends them to a model (engine.zeroshot.imaging: windowed, letterboxed
448 px RGB; volumes as evenly spaced axial slices).

Where they come from, first match wins:
1. images passed by the caller (benchmarks pass ../shared/data images);
2. MEDLENS_CALIBRATION_IMAGES: a folder of the user's own scans (DICOM,
   NIfTI, PNG/JPEG/TIFF; read with engine.io), sampled across its
   sub-folders; a hospital can calibrate on its own modalities;
3. the test images bundled with pydicom (CT, MR, CT liver, ultrasound) and
   nibabel (a T1 brain, an EPI series): installed with the engine's own
   dependencies, so the probe works offline on every machine.

Design decisions
- Deterministic: fixed files, fixed order, evenly spaced slices; the same
  set gives the same quantisation, and `fingerprint` keys cached int8
  models by the exact pixels.
- A file that cannot be read is skipped (logged), never fatal: calibration
  must not stop a model from loading.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from engine import settings

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

N_IMAGES = 24
SLICES_PER_VOLUME = 6
PYDICOM_FILES = ("CT_small.dcm", "MR_small.dcm", "liver_1frame.dcm", "examples_rgb_color.dcm", "examples_palette.dcm", "JPEG2000.dcm")
NIBABEL_FILES = ("anatomical.nii", "example4d.nii.gz", "functional.nii")
EXAMPLE_MIN_XYZ = (64, 64, 32)
IMAGE_SUFFIXES = (".dcm", ".nii", ".gz", ".png", ".jpg", ".jpeg", ".tif", ".tiff", "")


@dataclass
class CalibrationSet:
    images: list[np.ndarray]  # uint8 RGB (S, S, 3), as the engine sends images to a 2D model
    source: str  # where they came from, in words

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for image in self.images:
            digest.update(str(image.shape).encode())
            digest.update(np.ascontiguousarray(image).tobytes())
        return digest.hexdigest()[:16]


def bundled_files() -> list[Path]:
    """The pydicom and nibabel test images used when nothing else is given (those installed)."""
    files: list[Path] = []
    try:
        from pydicom.data import get_testdata_file

        for name in PYDICOM_FILES:
            found = get_testdata_file(name, download=False)
            if found:
                files.append(Path(found))
    except Exception as exc:  # an old pydicom without download=False, or no pydicom data
        log.info("pydicom test images unavailable for calibration: %s", exc)
    try:
        import nibabel

        folder = Path(nibabel.__file__).parent / "tests" / "data"
        files += [folder / name for name in NIBABEL_FILES if (folder / name).is_file()]
    except Exception as exc:
        log.info("nibabel test images unavailable for calibration: %s", exc)
    return files


def folder_files(folder: Path, n: int) -> list[Path]:
    """Up to n files from `folder`, taken round-robin over its sub-folders (sorted), so every modality shows."""
    groups: dict[Path, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            group = groups.setdefault(path.parent, [])
            if len(group) < n:
                group.append(path)
    out: list[Path] = []
    lists = list(groups.values())
    for i in range(n):
        for group in lists:
            if i < len(group) and len(out) < n:
                out.append(group[i])
    return out


def images_of(files: Sequence[Path], n: int = N_IMAGES) -> list[np.ndarray]:
    """Model images of the files: 2D images as they are, volumes as a few axial slices; bad files skipped."""
    from engine.io import load_one
    from engine.zeroshot.imaging import scan_images

    out: list[np.ndarray] = []
    for path in files:
        if len(out) >= n:
            break
        try:
            scan, _ = load_one([str(path)])
            out += [im.pixels for im in scan_images(scan, n_slices=SLICES_PER_VOLUME)]
        except Exception as exc:
            log.info("calibration image %s skipped: %s", path.name, exc)
    return out[:n]


def calibration_set(images: Sequence[np.ndarray] | None = None, n: int = N_IMAGES) -> CalibrationSet:
    """The probe's real images (see the module docstring for the order of sources)."""
    if images is not None and len(images):
        return CalibrationSet([np.asarray(im) for im in images][:n], f"{min(n, len(images))} images given by the caller")
    folder = settings.CALIBRATION_IMAGES.get()
    if folder is not None:
        found = images_of(folder_files(Path(folder), n), n) if Path(folder).is_dir() else []
        if found:
            return CalibrationSet(found, f"{len(found)} images from MEDLENS_CALIBRATION_IMAGES")
        log.warning("MEDLENS_CALIBRATION_IMAGES=%s holds no readable image; using the bundled test images", folder)
    found = images_of(bundled_files(), n)
    return CalibrationSet(found, f"{len(found)} images from pydicom's and nibabel's bundled test files")


def example_volume(prep) -> "torch.Tensor":
    """A small real volume for the 3D encoder's probe: nibabel's bundled T1 brain through `prep`
    (engine.models.volume_prep.VolumePrep), [1, 1, X, Y, Z] in 0..1; a fixed random one if unreadable."""
    import torch

    try:
        import nibabel

        from engine.io import load_one
        from engine.models.volume_prep import prepare_volume

        scan, _ = load_one([str(Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii")])
        volume = prepare_volume(scan, prep).tensor
        # at least 64 x 64 x 32 (zero padding, as volume_prep pads): the brain alone is 32^3 at 3 mm,
        # too small to time a path the way a CT series (128 x 128 x 16+) loads it
        short = [max(0, want - have) for want, have in zip(EXAMPLE_MIN_XYZ, volume.shape[2:])]
        return torch.nn.functional.pad(volume, [0, short[2], 0, short[1], 0, short[0]])
    except Exception as exc:
        log.info("bundled example volume unavailable (%s); using a random one", exc)
        return torch.rand(1, 1, 64, 64, 32, generator=torch.Generator().manual_seed(0))


def example_image() -> np.ndarray:
    """A real 448 px model image (pydicom's CT slice) for the 2D encoders' probe; a grey ramp if unreadable."""
    found = images_of(bundled_files()[:1], 1)
    if found:
        return found[0]
    ramp = np.tile(np.linspace(0, 255, 448, dtype=np.uint8), (448, 1))
    return np.repeat(ramp[..., None], 3, axis=2)
