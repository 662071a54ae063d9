"""Display windows: which range of voxel values maps onto the 256 grey levels.

Design decisions
- Presets are data (a tuple of frozen dataclasses), centre/width in the
  scan's units: Hounsfield units for CT. The values are the ones found in
  radiology teaching material; they are conventions, not measurements.
- The default for CT is the abdomen (soft-tissue) window: it is the one a
  reader expects on opening an unknown CT. When the "CT" does not look like
  Hounsfield units (a NIfTI exported with raw stored values, say) a fixed HU
  window would show a blank image, so the automatic window is used instead.
- Everything else (MR, X-ray, ultrasound, photographs, unknown) gets an
  automatic window from the 0.5-99.5 percentiles of the volume. Percentiles
  are computed on a strided subsample (at most ~1 M values) so a 500-slice CT
  costs milliseconds, and exact zeros are ignored when they are most of the
  volume (padding / background outside a skull-stripped or masked volume
  would otherwise pull the low end down to zero and squash the contrast).
- Colour images default to their full range, which leaves 8-bit photographs
  untouched; stretching each channel would change the colours.
- `apply_window` is the linear mapping: values <= centre - width/2 are 0,
  values >= centre + width/2 are 255. (DICOM's PS3.3 C.11.2.1.2 formula
  differs by half a grey level; for display this does not matter and the
  simple form makes both endpoints exact.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.scan import Modality, Scan

AUTO = "Auto (0.5-99.5 percentile)"
FULL_RANGE = "Full range"
CUSTOM = "Custom"

_AUTO_LOW, _AUTO_HIGH = 0.5, 99.5
_MAX_SAMPLES = 1_000_000


@dataclass(frozen=True)
class WindowPreset:
    name: str  # shown in the preset picker
    center: float  # window level, in the scan's units (HU for CT)
    width: float  # window width, same units; > 0
    modalities: tuple[Modality, ...]  # modalities the preset makes sense for


CT_PRESETS: tuple[WindowPreset, ...] = (
    WindowPreset("CT abdomen", 50.0, 400.0, (Modality.CT,)),
    WindowPreset("CT brain", 40.0, 80.0, (Modality.CT,)),
    WindowPreset("CT subdural", 75.0, 215.0, (Modality.CT,)),
    WindowPreset("CT stroke", 40.0, 40.0, (Modality.CT,)),
    WindowPreset("CT lung", -600.0, 1500.0, (Modality.CT,)),
    WindowPreset("CT mediastinum", 50.0, 350.0, (Modality.CT,)),
    WindowPreset("CT liver", 60.0, 150.0, (Modality.CT,)),
    WindowPreset("CT bone", 400.0, 1800.0, (Modality.CT,)),
)
PRESETS: dict[str, WindowPreset] = {p.name: p for p in CT_PRESETS}
CT_DEFAULT = "CT abdomen"


def presets_for(modality: Modality | str) -> list[WindowPreset]:
    """Fixed presets that make sense for `modality` (none outside CT)."""
    modality = Modality(modality)
    return [p for p in CT_PRESETS if modality in p.modalities]


def window_names(modality: Modality | str) -> list[str]:
    """Names for a preset picker: the fixed presets, then the data-driven windows."""
    return [p.name for p in presets_for(modality)] + [AUTO, FULL_RANGE]


def apply_window(array: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map values linearly to uint8: <= center-width/2 -> 0, >= center+width/2 -> 255."""
    width = max(float(width), 1e-6)
    low = float(center) - width / 2.0
    scale = np.float32(255.0 / width)
    out = np.subtract(array, np.float32(low), dtype=np.float32)
    out *= scale
    np.clip(out, 0.0, 255.0, out=out)
    out += np.float32(0.5)  # round half up instead of truncating
    return out.astype(np.uint8)


def sample_values(voxels: np.ndarray, max_samples: int = _MAX_SAMPLES) -> np.ndarray:
    """Finite values of an evenly strided subsample (percentiles of ~1 M values match the whole volume's)."""
    flat = voxels.reshape(-1)
    step = max(1, flat.size // max_samples)
    sample = flat[::step]
    return sample[np.isfinite(sample)]


def _foreground(sample: np.ndarray) -> np.ndarray:
    """Drop exact zeros when they are most of the sample (padding / masked background)."""
    nonzero = sample[sample != 0]
    if nonzero.size and nonzero.size < sample.size / 2:
        return nonzero
    return sample


def auto_window(voxels: np.ndarray, low: float = _AUTO_LOW, high: float = _AUTO_HIGH) -> tuple[float, float]:
    """(center, width) spanning the `low`-`high` percentiles of the values."""
    sample = _foreground(sample_values(voxels))
    if sample.size == 0:
        return 0.5, 1.0
    lo, hi = (float(v) for v in np.percentile(sample, [low, high]))
    if hi <= lo:  # a flat image: widen around the value so it shows mid-grey
        lo, hi = lo - 0.5, lo + 0.5
    return (lo + hi) / 2.0, hi - lo


def full_range(voxels: np.ndarray) -> tuple[float, float]:
    """(center, width) from the minimum to the maximum value."""
    sample = sample_values(voxels, max_samples=4 * _MAX_SAMPLES)
    if sample.size == 0:
        return 0.5, 1.0
    lo, hi = float(sample.min()), float(sample.max())
    if hi <= lo:
        lo, hi = lo - 0.5, lo + 0.5
    return (lo + hi) / 2.0, hi - lo


def overlaps_tissue_hu(sample: np.ndarray) -> bool:
    """Whether sampled CT values overlap the HU range of tissue at all (else they are not in HU)."""
    if sample.size == 0:
        return False
    lo, hi = np.percentile(sample, [5, 95])
    return hi > -500 and lo < 500 and hi - lo > 50


def _looks_like_hu(voxels: np.ndarray) -> bool:
    return overlaps_tissue_hu(sample_values(voxels, max_samples=200_000))


def resolve_window(scan: Scan, name: str) -> tuple[float, float]:
    """(center, width) for the window named `name` on this scan."""
    if name in PRESETS:
        preset = PRESETS[name]
        return preset.center, preset.width
    if name == FULL_RANGE:
        return full_range(scan.voxels)
    if name == AUTO:
        return auto_window(scan.voxels)
    raise ValueError(f"unknown window {name!r}; choose one of {', '.join(window_names(scan.modality))}")


def default_window(scan: Scan) -> tuple[float, float, str]:
    """(center, width, name) to show a scan with when it is first opened."""
    if scan.is_color:
        name = FULL_RANGE
    elif scan.modality == Modality.CT and _looks_like_hu(scan.voxels):
        name = CT_DEFAULT
    else:
        name = AUTO
    center, width = resolve_window(scan, name)
    return center, width, name


def slider_range(scan: Scan) -> tuple[float, float, float]:
    """(minimum, maximum, step) for free centre/width sliders on this scan.

    The centre slider spans the data range; the width slider spans 0..2x it.
    CT ranges always include the whole preset span so every preset is reachable.
    """
    sample = sample_values(scan.voxels, max_samples=4 * _MAX_SAMPLES)
    lo, hi = (float(sample.min()), float(sample.max())) if sample.size else (0.0, 1.0)
    if scan.modality == Modality.CT:
        lo, hi = min(lo, -1024.0), max(hi, 3071.0)
    if hi <= lo:
        hi = lo + 1.0
    span = hi - lo
    # ~1000 steps across the range, rounded to 1 / 2 / 5 x 10^k
    raw = span / 1000.0
    exp = np.floor(np.log10(raw))
    step = float(min((m * 10**exp for m in (1, 2, 5, 10) if m * 10**exp >= raw), default=raw))
    return lo, hi, step
