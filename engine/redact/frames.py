"""Which 2D frames of a scan OCR reads, in which orientation, and how a box found there is blanked.

Design decisions
- Text is read in the orientation it was drawn in. A 2D image, and a stack
  of frames without patient geometry (ultrasound cine, XA/RF runs), are
  stored as acquired: axis-0 slices as they are. A volume is stored
  closest-canonical RAS+, which turns an axial, coronal or sagittal
  acquisition by 180 degrees; the viewer's display (engine.views) turns it
  back, so volumes are read as the viewer shows them, in all three planes.
- Cost: OCR takes ~0.5-1 s a frame on a busy 2-core machine, so a stack or
  a volume is sampled (first/middle/last frame of a stack; slices at 25, 50
  and 75 % of each plane of a volume) and every box is blanked through all
  frames along that axis: burned-in text sits at the same place on every
  frame of a run or every slice of a series.
- Stacks blank the union of what the samples found (an overlay can appear
  on some frames only). Volumes blank a box only when it was found on at
  least two of a plane's samples: real burned-in text repeats on every
  slice, while a "word" OCR sees in anatomy does not, and a false box here
  would cut a slab out of the whole volume.
- Blanked pixels get the scan's minimum: black in every window, and plainly
  a redaction rather than an invented background.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from engine.redact.boxes import Box
from engine.scan import RedactedBox, Scan

STACK_SAMPLES = (0.0, 0.5, 1.0)  # fractions of the frame count: first, middle, last
VOLUME_SAMPLES = (0.25, 0.5, 0.75)
VOLUME_CONFIRM = 2  # a volume box must be found on this many of a plane's samples
CONFIRM_IOU = 0.5


@dataclass
class Frame:
    """One 2D image for OCR and how to put its boxes back into the scan."""

    image: np.ndarray  # (rows, cols) or (rows, cols, 3), float, in reading orientation
    axis: int | None  # array axis the boxes extend through (None: 2D scan)
    rotated: bool  # reading orientation = the array plane turned by 180 degrees
    group: int  # frames of one group are samples of one plane (confirmation is per group)


def _sample(n: int, fractions: tuple[float, ...]) -> list[int]:
    return sorted({min(n - 1, int(round(f * (n - 1)))) for f in fractions})


def _volume(scan: Scan, volume: int = 0) -> np.ndarray:
    """One (z, y, x) volume in RAS+ as a view of the scan's voxels (writes reach the scan)."""
    from engine.views import canonical_volume

    vol, _spacing = canonical_volume(scan, volume)
    return vol


def frames(scan: Scan) -> Iterator[Frame]:
    """The frames OCR reads for this scan (see the module notes)."""
    if scan.is_2d:
        yield Frame(scan.voxels, None, False, 0)
        return
    vol = _volume(scan, 0)
    if scan.provenance.frames_as_stored:
        for k in _sample(vol.shape[0], STACK_SAMPLES):
            yield Frame(vol[k], 0, False, 0)
        return
    for axis in range(3):
        for k in _sample(vol.shape[axis], VOLUME_SAMPLES):
            yield Frame(np.take(vol, k, axis=axis)[::-1, ::-1], axis, True, axis)


def needs_confirmation(scan: Scan) -> bool:
    return not scan.is_2d and not scan.provenance.frames_as_stored


def confirmed(found: list[list[Box]]) -> list[Box]:
    """Boxes of one group's samples found on at least VOLUME_CONFIRM of them (union when fewer samples)."""
    if len(found) < VOLUME_CONFIRM:
        return [b for boxes in found for b in boxes]
    out = []
    for i, boxes in enumerate(found):
        for box in boxes:
            hits = 1 + sum(any(box.iou(o) >= CONFIRM_IOU for o in other) for j, other in enumerate(found) if j != i)
            if hits >= VOLUME_CONFIRM and not any(box.iou(o) >= CONFIRM_IOU for o in out):
                out.append(box)
    return out


def to_array(box: Box, frame: Frame) -> RedactedBox:
    """A box in reading orientation -> the same pixels in the array plane (rows/cols in array order)."""
    rows, cols = frame.image.shape[:2]
    if frame.rotated:
        box = Box(rows - box.bottom, cols - box.right, rows - box.top, cols - box.left)
    return RedactedBox(frame.axis, box.top, box.left, box.bottom, box.right)


def blank_array(array: np.ndarray, box: RedactedBox, value) -> None:
    """Set a box's pixels in a 2D image (axis None) or a (z, y, x) volume (through `box.axis`)."""
    rows, cols = slice(box.row0, box.row1), slice(box.col0, box.col1)
    if box.axis is None:
        array[rows, cols] = value
        return
    index: list[slice] = [slice(None)] * 3
    plane_axes = [a for a in range(3) if a != box.axis]
    index[plane_axes[0]], index[plane_axes[1]] = rows, cols
    array[tuple(index)] = value


def blank(scan: Scan, boxes: list[RedactedBox], value: float) -> None:
    """Set the boxes' pixels to `value` in every frame, slice and volume they extend through."""
    targets = [scan.voxels] if scan.is_2d else [_volume(scan, v) for v in range(scan.n_volumes)]
    for array in targets:
        for box in boxes:
            blank_array(array, box, value)


def blanked_fraction(scan: Scan, boxes: list[RedactedBox]) -> float:
    """Share of the scan's pixel positions the boxes cover (colour channels and volumes counted once)."""
    shape = scan.voxels.shape[:2] if scan.is_2d else _volume(scan, 0).shape
    mask = np.zeros(shape, dtype=bool)
    for box in boxes:
        blank_array(mask, box, True)
    return float(mask.mean())
