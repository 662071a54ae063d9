"""Scan -> the tensor a volume encoder sees, and the way back from its tokens to the scan's voxels.

`prepare_volume(scan, prep)` gives [1, 1, X, Y, Z] float32 in 0..1 (the
Astra I3ResNet's input, engine.models.i3resnet) plus a `VoxelMapping`;
`prepare_image(scan_2d)` gives [1, 3, H, W] in 0..1 for the deflated 2D
trunk. The recipe is data (`VolumePrep`, JSON-serialisable) so it lives in a
model's config.json: what a model was trained with is what it is fed.

Design decisions
- Orientation: Scans are closest-canonical RAS+ (the readers canonicalise),
  array (z, y, x); the encoder wants (X, Y, Z), so the array is transposed.
  A non-RAS affine is reoriented here too (flips/permutation recorded in the
  mapping), so a hand-made Scan cannot silently feed a mirrored volume.
- Intensities (before resampling, so CT padding at -2048/-3024 HU cannot
  bleed into tissue through interpolation):
  CT: HU clipped to [-1000, 1000] -> [0, 1] (Merlin / CT-CLIP / Astra);
  a "CT" whose values do not look like HU (raw stored values) falls back to
  percentiles. MR: the 0.5 / 99.5 percentiles of the volume -> [0, 1],
  clipped (MR has no absolute unit). Anything else: min-max. Percentiles are
  taken on a strided subsample (<= 1 M voxels): milliseconds on any volume.
- Resampling: torch `F.interpolate(trilinear, align_corners=False)` to the
  target spacing. It is the same linear interpolation as MONAI's Spacing
  transform (which Merlin-style pipelines train with; neither anti-aliases),
  multi-threaded, and gives an exact scale + offset per axis for the
  mapping. scipy.ndimage.zoom(order=1) computes the same kind of result
  single-threaded and with its own corner convention: no gain.
- Crop-or-pad to the input size, centred on the body: the bounding box of
  slabs where at least `body_fraction` of voxels exceed the body threshold
  (CT > -500 HU, else 0.1 of the normalised range) -- so air is cropped
  before anatomy, and a body wider than the box loses both sides equally.
  Short axes are padded with 0 (air / background), data centred.
  `pad_to_size=False` pads short axes only to a multiple of the encoder's
  grid stride instead: fewer tokens of pure padding, a faster encode (a
  20-slice CT needs 16, not 48 or 64, slices); the token count then varies.
- Defaults for a 2-core CPU (measured in bench/results/encoder3d.md): 3 mm
  isotropic and (X, Y, Z) = (128, 128, 64) = 384 x 384 x 192 mm: the body's
  width in-plane (a 500 mm CT field of view keeps the ~350 mm trunk after
  the air is cropped; arms at the sides may lose their outer part), a whole brain (~180 mm with skull) or a ~19 cm chest
  slab in Z, 4 x 4 x 4 = 64 tokens. The Astra encoder needs 2.1-2.9 s of
  CPU time on one thread for it; on 2 free cores that is ~1.5 s (estimate:
  2 threads ran 1.5x faster than one whenever the shared cores were free;
  2.3 s in the one quiet 2-thread run caught). 160 x 160 x 96 costs ~6 s of
  CPU: too slow for a 5 s first answer; 96 x 96 x 48 ~1.2 s but its 288 mm
  field crops a torso. Merlin uses
  1.5 x 1.5 x 3 mm and 224 x 224 x 160: raise both in the model config on a
  GPU.
- The mapping: tensor index t along tensor axis a is scan index
  `scale[a] * t + offset[a]` along scan array axis `axes[a]` (voxel
  centres, align_corners=False), so any token or voxel maps back exactly;
  `content` says which tensor indices hold scan data (the rest is padding).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from engine.scan import Modality, Scan, ScanError
from engine.windowing import overlaps_tissue_hu, sample_values

DEFAULT_SPACING_MM = (3.0, 3.0, 3.0)  # (x, y, z)
DEFAULT_SIZE = (128, 128, 64)  # (X, Y, Z)
# 2D: 7 x 7 tokens, 0.33-0.44 s of CPU on one thread through the deflated trunk (448 px: 196 tokens, 1.05-1.2 s). A chest
# film (~350 mm) at 224 px has ~1.6 mm pixels, near the in-plane spacing the Astra net was trained at.
DEFAULT_IMAGE_SIZE = 224
I3RESNET_STRIDE_XYZ = (32, 32, 16)  # grid stride of engine.models.i3resnet along (X, Y, Z)


# --------------------------------------------------------------------------- the recipe
@dataclass(frozen=True)
class VolumePrep:
    """How a volume becomes the encoder's input. All lengths (x, y, z) / (X, Y, Z), i.e. the tensor's order."""

    spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM
    size: tuple[int, int, int] = DEFAULT_SIZE
    ct_clip_hu: tuple[float, float] = (-1000.0, 1000.0)  # -> [0, 1]
    mr_percentiles: tuple[float, float] = (0.5, 99.5)  # -> [0, 1], clipped
    ct_body_hu: float = -500.0  # CT voxels above this are body (air and lung parenchyma ~ -1000 .. -700)
    body_level: float = 0.1  # other modalities: body above this fraction of the normalised range
    body_fraction: float = 0.02  # a slab is body when 2 % of it is above the threshold (as engine.zeroshot.imaging)
    pad_to_size: bool = True  # False: short axes padded only to a multiple of pad_multiple
    pad_multiple: tuple[int, int, int] = I3RESNET_STRIDE_XYZ

    def __post_init__(self) -> None:
        for name in ("spacing_mm", "size", "ct_clip_hu", "mr_percentiles", "pad_multiple"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.spacing_mm) != 3 or not all(math.isfinite(s) and s > 0 for s in self.spacing_mm):
            raise ValueError(f"spacing_mm must be three positive numbers (x, y, z), got {self.spacing_mm}")
        if len(self.size) != 3 or not all(int(n) == n and n >= 1 for n in self.size):
            raise ValueError(f"size must be three positive integers (X, Y, Z), got {self.size}")
        if len(self.pad_multiple) != 3 or not all(int(n) == n and n >= 1 for n in self.pad_multiple):
            raise ValueError(f"pad_multiple must be three positive integers, got {self.pad_multiple}")
        object.__setattr__(self, "size", tuple(int(n) for n in self.size))
        object.__setattr__(self, "pad_multiple", tuple(int(n) for n in self.pad_multiple))
        lo, hi = self.ct_clip_hu
        if not lo < hi:
            raise ValueError(f"ct_clip_hu must be (low, high) with low < high, got {self.ct_clip_hu}")
        p_lo, p_hi = self.mr_percentiles
        if not 0.0 <= p_lo < p_hi <= 100.0:
            raise ValueError(f"mr_percentiles must satisfy 0 <= low < high <= 100, got {self.mr_percentiles}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (lists, not tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "VolumePrep":
        """From a config dict; missing keys take the defaults, unknown keys are an error (a typo must not pass)."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown volume_prep keys {unknown} (known: {sorted(known)})")
        return cls(**data)


# --------------------------------------------------------------------------- the way back
@dataclass(frozen=True)
class VoxelMapping:
    """Tensor index t along tensor axis a <-> scan index s = scale[a] * t + offset[a] along scan axis axes[a].

    Volumes: tensor axes (X, Y, Z), scan axes (z, y, x), so axes = (2, 1, 0) for
    a RAS scan, scales ~ target / scan spacing (negative where reoriented by a
    flip). 2D: tensor (H, W) -> scan (rows, cols), axes = (0, 1).
    `grid_axes` names the tensor axis of each token-grid axis: (2, 0, 1) for
    the 3D grid (Z', X', Y'), (-1, 0, 1) for the 2D grid (1, H', W')."""

    axes: tuple[int, ...]
    scale: tuple[float, ...]
    offset: tuple[float, ...]
    tensor_shape: tuple[int, ...]  # spatial: (X, Y, Z) or (H, W)
    scan_shape: tuple[int, ...]  # (z, y, x) or (rows, cols)
    content: tuple[tuple[int, int], ...]  # per tensor axis [lo, hi): indices holding scan data, the rest padding
    grid_axes: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {k: [list(x) if isinstance(x, tuple) else x for x in v] for k, v in asdict(self).items()}

    def tensor_to_scan(self, index: Sequence[float]) -> tuple[float, ...]:
        """A (fractional) tensor index (X, Y, Z) / (H, W) -> the scan index in scan array order."""
        out = [0.0] * len(self.scan_shape)
        for a, t in enumerate(index):
            out[self.axes[a]] = self.scale[a] * float(t) + self.offset[a]
        return tuple(out)

    def scan_to_tensor(self, index: Sequence[float]) -> tuple[float, ...]:
        """A scan index in scan array order -> the (fractional) tensor index; outside [0, n) means cropped away."""
        return tuple((float(index[self.axes[a]]) - self.offset[a]) / self.scale[a] for a in range(len(self.axes)))

    def token_to_tensor(self, grid_index: Sequence[int], grid: Sequence[int]) -> tuple[float, ...]:
        """Centre of token `grid_index` (grid order, e.g. (z', x', y')) of a `grid`, as a tensor index."""
        out = [0.0] * len(self.tensor_shape)
        for g, a in enumerate(self.grid_axes):
            if a < 0:
                continue
            stride = self.tensor_shape[a] / grid[g]
            out[a] = (grid_index[g] + 0.5) * stride - 0.5
        return tuple(out)

    def token_to_scan(self, grid_index: Sequence[int], grid: Sequence[int]) -> tuple[float, ...]:
        """Centre of a token in scan array indices (z, y, x) / (row, col)."""
        return self.tensor_to_scan(self.token_to_tensor(grid_index, grid))

    def grid_to_scan(self, values: np.ndarray | torch.Tensor, grid: Sequence[int]) -> np.ndarray:
        """Per-token values (N,) or grid-shaped -> float32 map over the scan's voxels (scan_shape).

        Linear between token centres (edge tokens extend to the border), 0 where the
        scan voxel was cropped away. For attention / relevance maps over the scan."""
        vals = torch.as_tensor(values, dtype=torch.float32).reshape(tuple(int(n) for n in grid))
        # grid order -> tensor axis order (drop the 2D grid's unit depth axis)
        order = [g for g in sorted(range(len(self.grid_axes)), key=lambda g: self.grid_axes[g]) if self.grid_axes[g] >= 0]
        squeeze = [g for g in range(len(self.grid_axes)) if self.grid_axes[g] < 0]
        vals = vals.permute(*squeeze, *order).reshape(tuple(int(grid[g]) for g in order)).numpy()
        n_axes = len(self.tensor_shape)
        # Separable: per tensor axis, a (scan voxels x tokens) matrix of linear-interpolation weights with that
        # axis' crop mask folded in (the mask is a product of per-axis masks), applied one axis at a time, the
        # scan's slowest axis last so the largest array is written once, contiguous, in scan order. A 20 x 512
        # x 512 CT map: 140 ms (float64, full-size mask) -> ~50 ms (float32, per-axis lerp + transpose) -> ~10 ms.
        weights = []
        for a in range(n_axes):
            s = np.arange(self.scan_shape[self.axes[a]], dtype=np.float64)
            t = (s - self.offset[a]) / self.scale[a]
            stride = self.tensor_shape[a] / vals.shape[a]
            inside = (t > -0.5) & (t < self.tensor_shape[a] - 0.5)
            weights.append(_lerp_matrix(vals.shape[a], (t + 0.5) / stride - 0.5, inside))
        order = [int(a) for a in np.argsort(self.axes)]  # order[i]: the tensor axis that scan axis i comes from
        out = vals.astype(np.float32).transpose(order)
        for i in reversed(range(n_axes)):
            out = np.tensordot(weights[order[i]], out, axes=([1], [i]))
            if i:
                out = np.moveaxis(out, 0, i)
        return np.ascontiguousarray(out, dtype=np.float32)


def _lerp_matrix(n: int, coords: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """(len(coords), n) float32: row k interpolates n values linearly at fractional coords[k] (clamped to
    the ends), times keep[k]."""
    c = np.clip(coords, 0.0, n - 1)
    lo = np.floor(c).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    w = c - lo
    rows = np.arange(len(c))
    matrix = np.zeros((len(c), n), np.float64)
    np.add.at(matrix, (rows, lo), (1 - w) * keep)
    np.add.at(matrix, (rows, hi), w * keep)
    return matrix.astype(np.float32)


@dataclass
class PreparedVolume:
    """The encoder's input and how it relates to the scan."""

    tensor: torch.Tensor  # [1, 1, X, Y, Z] float32 in 0..1 (volumes) or [1, 3, H, W] (images)
    mapping: VoxelMapping
    spacing_mm: tuple[float, ...]  # actual tensor voxel size (x, y, z) after resampling (2D: (row, col) of the source)
    intensity: str  # what was done to the values, in words (the engine reports it)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- intensities
def intensity_range(voxels: np.ndarray, modality: Modality, prep: VolumePrep) -> tuple[float, float, float, str]:
    """(low, high, body threshold in 0..1, description): values map linearly low -> 0, high -> 1, clipped."""
    sample = sample_values(voxels)
    if modality == Modality.CT and overlaps_tissue_hu(sample):  # the viewer's test (engine.windowing)
        lo, hi = prep.ct_clip_hu
        return float(lo), float(hi), (prep.ct_body_hu - lo) / (hi - lo), f"CT: HU clipped to [{lo:g}, {hi:g}] -> [0, 1]"
    if sample.size == 0:
        return 0.0, 1.0, prep.body_level, "no finite voxels"
    if modality == Modality.CT or modality == Modality.MR:
        p_lo, p_hi = prep.mr_percentiles
        lo, hi = (float(v) for v in np.percentile(sample, [p_lo, p_hi]))
        what = "MR" if modality == Modality.MR else "CT not in HU"
        desc = f"{what}: percentiles {p_lo:g} / {p_hi:g} ({lo:.4g}, {hi:.4g}) -> [0, 1]"
    else:
        lo, hi = float(sample.min()), float(sample.max())
        desc = f"{modality.value}: min-max ({lo:.4g}, {hi:.4g}) -> [0, 1]"
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi, prep.body_level, desc


def normalise(voxels: np.ndarray, low: float, high: float) -> np.ndarray:
    """float32 (v - low) / (high - low) clipped to [0, 1]; NaN -> 0."""
    out = np.subtract(voxels, np.float32(low), dtype=np.float32)
    out *= np.float32(1.0 / (high - low))
    np.clip(out, 0.0, 1.0, out=out)
    if np.issubdtype(np.asarray(voxels).dtype, np.integer):  # int16 storage (engine.memory): no NaN to clear
        return out
    return np.nan_to_num(out, copy=False, nan=0.0)


# --------------------------------------------------------------------------- geometry
def _ras_axes(affine: np.ndarray) -> list[tuple[int, bool]]:
    """For RAS axis a (x, y, z): (source voxel axis in NIfTI order, flipped?)."""
    from nibabel.orientations import io_orientation

    ornt = io_orientation(affine)
    out: list[tuple[int, bool]] = [(a, False) for a in range(3)]
    for src, (dst, flip) in enumerate(ornt):
        if np.isnan(dst):
            return [(a, False) for a in range(3)]  # degenerate affine: take the array as it is
        out[int(dst)] = (src, flip < 0)
    return out


def body_box(volume: np.ndarray, threshold: float, fraction: float) -> list[tuple[int, int]]:
    """Per axis [first, last] index of slabs with >= `fraction` of voxels above `threshold` (whole axis if none)."""
    mask = volume > threshold
    box = []
    for axis in range(volume.ndim):
        others = tuple(a for a in range(volume.ndim) if a != axis)
        area = max(1, volume.size // max(1, volume.shape[axis]))
        counts = mask.sum(axis=others)
        keep = np.nonzero(counts >= max(1.0, fraction * area))[0]
        box.append((int(keep[0]), int(keep[-1])) if keep.size else (0, volume.shape[axis] - 1))
    return box


def crop_or_pad_start(n: int, size: int, box: tuple[int, int]) -> int:
    """Start index of the `size` window along an axis of length n (negative: padding before the data)."""
    if n >= size:
        centre = (box[0] + box[1] + 1) / 2.0
        return int(min(max(round(centre - size / 2.0), 0), n - size))
    return -((size - n) // 2)


def _target_size(n: int, size: int, pad_to_size: bool, multiple: int) -> int:
    if pad_to_size or n >= size:
        return size
    return min(size, max(multiple, -(-n // multiple) * multiple))


def prepare_volume(scan: Scan, prep: VolumePrep | None = None, *, volume: int = 0) -> PreparedVolume:
    """A 3D scan -> [1, 1, X, Y, Z] float32 in 0..1 and the mapping back to its (z, y, x) voxels."""
    prep = prep or VolumePrep()
    if scan.is_2d:
        raise ScanError("this is a 2D image: use prepare_image (the 2D trunk), not the volume encoder")
    vox = scan.voxels[volume] if scan.voxels.ndim == 4 else scan.voxels
    if vox.ndim != 3 or min(vox.shape) < 1:
        raise ScanError(f"expected a (z, y, x) volume, got shape {vox.shape}")
    lo, hi, threshold, desc = intensity_range(vox, scan.modality, prep)
    norm = torch.from_numpy(normalise(vox, lo, hi))  # (z, y, x), contiguous

    # (z, y, x) -> RAS (x, y, z): a transpose for a canonical scan, flips/permutation otherwise
    ras = _ras_axes(scan.affine)
    src_xyz = norm.permute(2, 1, 0)  # NIfTI voxel order (i, j, k)
    n_src = tuple(src_xyz.shape)
    sp_src = tuple(float(s) for s in scan.spacing[::-1])
    perm = [src for src, _ in ras]
    xyz = src_xyz.permute(*perm)
    flips = [a for a, (_, flip) in enumerate(ras) if flip]
    if flips:
        xyz = torch.flip(xyz, flips)
    n_in = tuple(int(n) for n in xyz.shape)
    sp_in = tuple(sp_src[src] for src, _ in ras)

    n_out = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(n_in, sp_in, prep.spacing_mm))
    if n_out != n_in:
        with torch.inference_mode():
            resampled = F.interpolate(xyz[None, None], size=n_out, mode="trilinear", align_corners=False)[0, 0]
    else:
        resampled = xyz
    res = resampled.numpy() if resampled.is_contiguous() else resampled.contiguous().numpy()

    box = body_box(res, threshold, prep.body_fraction)
    out_size = tuple(_target_size(n, s, prep.pad_to_size, m) for n, s, m in zip(n_out, prep.size, prep.pad_multiple))
    starts = [crop_or_pad_start(n, s, b) for n, s, b in zip(n_out, out_size, box)]
    tensor = torch.zeros((1, 1) + out_size, dtype=torch.float32)
    src_sl, dst_sl, content = [], [], []
    for n, s, start in zip(n_out, out_size, starts):
        a0, a1 = max(start, 0), min(start + s, n)
        src_sl.append(slice(a0, a1))
        dst_sl.append(slice(a0 - start, a1 - start))
        content.append((a0 - start, a1 - start))
    tensor[(0, 0, *dst_sl)] = torch.from_numpy(res[tuple(src_sl)])

    scale, offset, axes = [], [], []
    for a in range(3):
        k = n_in[a] / n_out[a]  # F.interpolate(size=...) samples input coordinate k * (o + 0.5) - 0.5
        sc, off = k, k * (starts[a] + 0.5) - 0.5
        src, flip = ras[a]
        if flip:
            sc, off = -sc, (n_src[src] - 1) - off
        scale.append(sc)
        offset.append(off)
        axes.append(2 - src)  # NIfTI voxel axis i -> scan array axis (z, y, x) index
    mapping = VoxelMapping(
        axes=tuple(axes),
        scale=tuple(scale),
        offset=tuple(offset),
        tensor_shape=out_size,
        scan_shape=tuple(int(n) for n in vox.shape),
        content=tuple(content),
        grid_axes=(2, 0, 1),
    )
    notes = []
    for a, name in enumerate("XYZ"):
        if n_out[a] > out_size[a]:
            body_len = box[a][1] - box[a][0] + 1
            if body_len > out_size[a]:
                notes.append(
                    f"{name}: body {body_len * prep.spacing_mm[a]:.0f} mm > input {out_size[a] * prep.spacing_mm[a]:.0f} mm, "
                    f"{(body_len - out_size[a]) * prep.spacing_mm[a]:.0f} mm cropped"
                )
    actual = tuple(s * k for s, k in zip(sp_in, (n_in[a] / n_out[a] for a in range(3))))
    return PreparedVolume(tensor=tensor, mapping=mapping, spacing_mm=actual, intensity=desc, notes=notes)


def prepare_image(scan: Scan, size: int = DEFAULT_IMAGE_SIZE) -> PreparedVolume:
    """A 2D scan -> [1, 3, size, size] float32 in 0..1 for the deflated 2D trunk, and the mapping to its pixels.

    Pixels are exactly what the 2D CLIP models get (engine.zeroshot.imaging.
    model_image: the scan's default window to uint8, square physical pixels,
    letterboxed into a black square; grey copied to RGB, colour kept), / 255."""
    from engine.zeroshot.imaging import model_image

    if not scan.is_2d:
        raise ScanError("this is a volume: use prepare_volume (the 3D encoder)")
    image = model_image(scan, size=int(size))
    tensor = torch.from_numpy(np.array(image.pixels, dtype=np.uint8)).permute(2, 0, 1)[None].float().div_(255.0)
    top, left, h, w = image.box
    rows, cols = image.slice_shape
    # PIL's bilinear resize samples source (o + 0.5) * in / out - 0.5, the same convention as above
    k_r, k_c = rows / h, cols / w
    mapping = VoxelMapping(
        axes=(0, 1),
        scale=(k_r, k_c),
        offset=(k_r * (0.5 - top) - 0.5, k_c * (0.5 - left) - 0.5),
        tensor_shape=(int(size), int(size)),
        scan_shape=(int(rows), int(cols)),
        content=((top, top + h), (left, left + w)),
        grid_axes=(-1, 0, 1),
    )
    sp = tuple(float(s) for s in scan.spacing)
    desc = "colour 0..255 -> [0, 1]" if scan.is_color else "default window -> grey RGB [0, 1]"
    return PreparedVolume(tensor=tensor, mapping=mapping, spacing_mm=(sp[0] * k_r, sp[1] * k_c), intensity=desc)
