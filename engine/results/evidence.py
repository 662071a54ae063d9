"""Evidence heat maps on the scan's grid, and the same maps on each source instance's pixel grid.

Design decisions
- `Heat` holds 2D planes in the scan's own array orientation, along one
  array axis, and only where evidence was computed: a zero-shot label's
  evidence exists on the sampled slices the label was scored on (the same
  engine.heatmap maps the labels panel shows, for the top label), a
  Q-Former answer's attention on every axial slice (its volume map). A SEG
  frame is written only where there is evidence; nothing is interpolated.
- Every volume MedLens reads is a closest-canonical permutation of its
  acquisition grid (engine.io), so each source instance is one slice of the
  scan with flipped or swapped axes. `place()` finds that slice through the
  affine (DICOM LPS -> RAS -> voxel index) and refuses anything else (an
  instance from another scan of the series, an oblique reformat, a resampled
  gap): its SEG frame is then the plane read in the instance's row and
  column order, exact and cheap (an index gather, no resampling).
- Slice space (engine.views.extract_slice) is the array plane flipped in
  both axes; the heat maps arrive in slice space and are stored flipped back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.pacs.origin import InstanceRef
from engine.results.schema import EvidenceInfo
from engine.scan import Scan

PLANE_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}
AXIS_PLANE = {v: k for k, v in PLANE_AXIS.items()}
EMPTY = 0.5 / 255  # below this a fractional SEG pixel is 0 (8-bit fractions)
_TOLERANCE = 0.02  # voxel units: an instance's rows/columns must step by +-1 voxel along one axis


@dataclass
class Heat:
    """Evidence for one label or answer on the scan's grid."""

    target: str  # "label 'x'" or "question 'y'"
    kind: str  # "label" or "answer"
    method: str  # gradcam / gradient / occlusion / attention
    axis: int | None  # array axis the planes are normal to (0 z, 1 y, 2 x); None for a 2D scan
    planes: dict[int, np.ndarray] = field(default_factory=dict)  # index -> float32 (a, b) in [0, 1], array orientation

    @property
    def plane(self) -> str:
        return "image" if self.axis is None else AXIS_PLANE[self.axis]

    def strongest(self) -> int:
        """The plane index carrying the most evidence (the secondary capture shows it)."""
        return max(self.planes, key=lambda k: (float(np.asarray(self.planes[k], dtype=np.float32).sum()), -k))

    def info(self) -> EvidenceInfo:
        slices = sorted(k for k, p in self.planes.items() if float(np.max(p)) >= EMPTY)
        return EvidenceInfo(self.target, self.kind, self.method, self.plane, slices)

    def slice_space(self, index: int) -> np.ndarray:
        """Plane `index` as engine.views shows it (render_view's overlay)."""
        plane = np.asarray(self.planes[index], dtype=np.float32)
        return plane if self.axis is None else plane[::-1, ::-1]


# --------------------------------------------------------------------------- heat from results
def label_heat(scan: Scan, label: str, model, prompt_set=None, plane: str = "axial", indices: list[int] | None = None) -> Heat:
    """engine.heatmap evidence for `label` on the given slices (default: the 12 sampled for labelling), one normalisation."""
    from engine import heatmap
    from engine.windowing import default_window
    from engine.zeroshot import class_embeddings, heat_to_slice, load_prompt_set, model_image, resolve_model, sample_indices

    clip = resolve_model(model)
    pset = prompt_set if prompt_set is not None and not isinstance(prompt_set, str) else load_prompt_set(prompt_set or scan.modality)
    embedding = class_embeddings(clip, [label], pset)[0]
    method = heatmap.resolve_method(clip)
    if scan.is_2d:
        image = model_image(scan, "image", 0)
        heat = heat_to_slice(heatmap.image_heatmap(clip, image.pixels, embedding), image)
        return Heat(f"label '{label}'", "label", method, None, {0: heat})
    center, width, _ = default_window(scan)
    indices = sorted(set(indices or sample_indices(scan, plane)))
    images = [model_image(scan, plane, i, window=(center, width)) for i in indices]
    maps = heatmap.volume_heatmaps(clip, [im.pixels for im in images], embedding)
    planes = {i: heat_to_slice(m, im)[::-1, ::-1] for i, m, im in zip(indices, maps, images)}
    return Heat(f"label '{label}'", "label", method, PLANE_AXIS[plane], planes)


def answer_heat(scan: Scan, question: str, volume_map: np.ndarray) -> Heat:
    """A Q-Former answer's attention (engine.ask Evidence.volume_map, on the scan's grid) as Heat."""
    heat = np.nan_to_num(np.asarray(volume_map, dtype=np.float32))
    target = f"question '{question}'"
    if scan.is_2d:
        return Heat(target, "answer", "attention", None, {0: heat.max(axis=-1) if heat.ndim == 3 else heat})
    return Heat(target, "answer", "attention", 0, {k: heat[k] for k in range(heat.shape[0]) if float(heat[k].max()) >= EMPTY})


def view_heat(scan: Scan, question: str, view) -> Heat:
    """An EvidenceView (the app keeps the answer's attention shrunk, in display slices) back on the scan's grid."""
    from PIL import Image

    target = f"question '{question}'"
    stack = np.asarray(view.axial, dtype=np.float32)
    if scan.is_2d:
        rows, cols = scan.voxels.shape[:2]
        return Heat(target, "answer", "attention", None, {0: _resize(stack[0], rows, cols, Image)})
    _, rows, cols = scan.volume_shape
    planes = {k: _resize(stack[k], rows, cols, Image)[::-1, ::-1] for k in range(stack.shape[0]) if float(stack[k].max()) >= EMPTY}
    return Heat(target, "answer", "attention", 0, planes)


def _resize(plane: np.ndarray, rows: int, cols: int, image_module) -> np.ndarray:
    if plane.shape == (rows, cols):
        return plane
    resized = image_module.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F").resize(
        (cols, rows), image_module.Resampling.BILINEAR
    )
    return np.clip(np.asarray(resized), 0.0, 1.0)


# --------------------------------------------------------------------------- source grid
@dataclass(frozen=True)
class Placement:
    """Where one source instance lies in the scan: a slice along `axis`, rows and columns along two other axes."""

    ref: InstanceRef
    axis: int | None  # None: the 2D scan itself
    index: int
    rows: tuple[int, int, int]  # (array axis, first index, step +-1) for increasing row
    cols: tuple[int, int, int]


def _voxel_index(inverse: np.ndarray, lps: np.ndarray) -> np.ndarray:
    ras = np.array([-lps[0], -lps[1], lps[2], 1.0])
    return (inverse @ ras)[:3][::-1]  # (x, y, z) index -> array order (z, y, x)


def _axis_step(delta: np.ndarray) -> tuple[int, int] | None:
    axis = int(np.argmax(np.abs(delta)))
    off = np.delete(delta, axis)
    if abs(abs(delta[axis]) - 1.0) > _TOLERANCE or np.any(np.abs(off) > _TOLERANCE):
        return None
    return axis, int(np.sign(delta[axis]))


def place(scan: Scan, ref: InstanceRef) -> Placement | None:
    """The instance's slice in `scan`, or None when it is not exactly one slice of this scan's grid."""
    if ref.n_frames != 1:
        return None
    if scan.is_2d:
        rows, cols = scan.voxels.shape[:2]
        return Placement(ref, None, 0, (0, 0, 1), (1, 0, 1)) if (ref.rows, ref.cols) == (rows, cols) else None
    if scan.n_volumes != 1 or ref.position is None or ref.orientation is None or ref.pixel_spacing is None:
        return None
    inverse = np.linalg.inv(scan.affine)
    ipp = np.asarray(ref.position, dtype=float)
    row_dir, col_dir = np.asarray(ref.orientation[:3], dtype=float), np.asarray(ref.orientation[3:], dtype=float)
    p0 = _voxel_index(inverse, ipp)
    down = _axis_step(_voxel_index(inverse, ipp + ref.pixel_spacing[0] * col_dir) - p0)  # next row
    right = _axis_step(_voxel_index(inverse, ipp + ref.pixel_spacing[1] * row_dir) - p0)  # next column
    if down is None or right is None or down[0] == right[0]:
        return None
    normal = 3 - down[0] - right[0]
    shape = scan.volume_shape
    index = int(round(p0[normal]))
    if abs(p0[normal] - index) > 0.25 or not 0 <= index < shape[normal]:
        return None
    first_row, first_col = int(round(p0[down[0]])), int(round(p0[right[0]]))
    for (axis, step), first, n in ((down, first_row, ref.rows), (right, first_col, ref.cols)):
        last = first + step * (n - 1)
        if not (0 <= first < shape[axis] and 0 <= last < shape[axis]):
            return None
    return Placement(ref, normal, index, (down[0], first_row, down[1]), (right[0], first_col, right[1]))


def frame_of(heat: Heat, where: Placement) -> np.ndarray | None:
    """The heat on the instance's pixel grid (rows, cols), or None where there is none."""
    r_axis, r0, r_step = where.rows
    c_axis, c0, c_step = where.cols
    r_idx = r0 + r_step * np.arange(where.ref.rows)
    c_idx = c0 + c_step * np.arange(where.ref.cols)
    if where.axis is None or heat.axis is None:
        plane = heat.planes.get(0)
        if plane is None or where.axis is not None or heat.axis is not None or plane.shape != (where.ref.rows, where.ref.cols):
            return None
        return plane if float(plane.max()) >= EMPTY else None
    if heat.axis == where.axis:
        plane = heat.planes.get(where.index)
        if plane is None:
            return None
        frame = plane[np.ix_(r_idx, c_idx)] if r_axis < c_axis else plane[np.ix_(c_idx, r_idx)].T
    else:  # the heat planes cut across this instance: each is a line of it
        frame = np.zeros((where.ref.rows, where.ref.cols), dtype=np.float32)
        along, other_idx, is_row = (r_idx, c_idx, True) if heat.axis == r_axis else (c_idx, r_idx, False)
        other_axis = c_axis if is_row else r_axis
        for key, plane in heat.planes.items():
            hits = np.nonzero(along == key)[0]
            if hits.size == 0:
                continue
            line = plane[where.index, other_idx] if where.axis < other_axis else plane[other_idx, where.index]
            if is_row:
                frame[hits, :] = line
            else:
                frame[:, hits] = line[:, None]
    frame = np.asarray(frame, dtype=np.float32)
    return frame if float(frame.max()) >= EMPTY else None
