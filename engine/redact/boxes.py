"""From OCR words to the rectangles that get blanked.

Design decisions
- Burned-in text is drawn, not photographed: glyphs of one colour on a flat
  ground. Inside a true text box the grey levels split cleanly in two
  (Otsu's between-class variance is 0.81-1.0 of the total on deid-data's
  ultrasound overlays, 0.79 for a small blurred font), while tesseract's
  "words" in speckle or anatomy split badly (<= 0.77 there, and none of
  those was read with confidence >= 80). That ratio, not OCR confidence alone, is
  what keeps redactions off anatomy: a confident "word" on speckle is
  dropped, an unsure word on a flat ground (a truncated name, a small
  font) is kept.
- Burned-in captions are small next to the frame: a "word" taller than
  10 % of it is a shape (CT's body outline splits as cleanly as glyphs do).
- Words of one text line are joined into one box when the gap between them
  is small (the spaces between a name's parts are blanked too), and every
  box is padded so anti-aliased glyph edges go with it.
- Ultrasound header band: scanners print the patient's name, ID, date of
  birth and the date in one or two lines at the top of the frame, often
  truncated ("PATIENTFI...") or in a small font OCR half-reads. When a kept
  box starts in the top 6 % of an ultrasound frame, the rows from the top
  edge to the bottom of those boxes are blanked across the full width, as
  de-identification tools do for these bands. It never reaches below 12 %
  of the frame, where the image itself starts.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from engine.redact.ocr import Word

MIN_CONF = 30.0  # tesseract confidence a word needs when its box looks like text
SURE_CONF = 80.0  # a read this sure needs only SURE_READ_SPLIT
SURE_READ_SPLIT = 0.75
TEXT_SPLIT = 0.85  # Otsu between-class / total variance: glyphs on a flat ground
SURE_TEXT_SPLIT = 0.92  # ... so clean that an unsure word of >= 2 letters/digits is kept anyway
MIN_HEIGHT_PX = 4  # smaller "words" are noise (and unreadable)
MAX_HEIGHT_FRACTION = 0.1  # a "word" taller than this share of the frame is a shape (a body outline on CT), not a caption
LINE_GAP = 1.5  # join words on one line whose gap is under this many text heights
PAD_FRACTION = 0.2  # padding around a box, as a share of its height (at least PAD_MIN_PX)
PAD_MIN_PX = 2
BAND_START = 0.06  # header band: boxes starting above this share of the rows...
BAND_LIMIT = 0.12  # ... blank full-width rows down to their bottom, never below this share


class Box(NamedTuple):
    """Half-open pixel rectangle (rows top..bottom, cols left..right)."""

    top: int
    left: int
    bottom: int
    right: int

    @property
    def height(self) -> int:
        return self.bottom - self.top

    def area(self) -> int:
        return max(0, self.bottom - self.top) * max(0, self.right - self.left)

    def iou(self, other: "Box") -> float:
        inter = Box(max(self.top, other.top), max(self.left, other.left), min(self.bottom, other.bottom), min(self.right, other.right))
        if inter.top >= inter.bottom or inter.left >= inter.right:
            return 0.0
        union = self.area() + other.area() - inter.area()
        return inter.area() / union if union else 0.0


def text_split(patch: np.ndarray) -> float:
    """Otsu's between-class variance over the total variance of a uint8 patch (0 when flat)."""
    hist = np.bincount(np.asarray(patch, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1.0)
    levels = np.arange(256, dtype=np.float64)
    mean = float(p @ levels)
    total = float(p @ (levels - mean) ** 2)
    if total <= 1e-9:
        return 0.0
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * levels)
    valid = (w0 > 0) & (w0 < 1)
    between = np.zeros_like(w0)
    between[valid] = (mean * w0[valid] - m0[valid]) ** 2 / (w0[valid] * (1 - w0[valid]))
    return float(between.max() / total)


def is_text(word: Word, gray: np.ndarray) -> bool:
    """Keep a word whose box looks like drawn glyphs (see the module notes).

    Three ways in: a sure read on a fairly clean split (small, blurred fonts
    split at 0.79-0.85), a fair read on a clean split, or a clean split alone.
    """
    height = word.bottom - word.top
    if height < MIN_HEIGHT_PX or height > MAX_HEIGHT_FRACTION * gray.shape[0]:
        return False
    split = text_split(gray[word.top : word.bottom, word.left : word.right])
    if word.conf >= SURE_CONF and split >= SURE_READ_SPLIT:
        return True
    if word.conf >= MIN_CONF and split >= TEXT_SPLIT:
        return True
    return split >= SURE_TEXT_SPLIT and word.n_alnum >= 2


def _join_line(words: Sequence[Word]) -> list[Box]:
    out: list[Box] = []
    for w in sorted(words, key=lambda w: w.left):
        box = Box(w.top, w.left, w.bottom, w.right)
        if out:
            last = out[-1]
            height = max(last.height, box.height)
            if box.left - last.right <= LINE_GAP * height:
                out[-1] = Box(min(last.top, box.top), last.left, max(last.bottom, box.bottom), max(last.right, box.right))
                continue
        out.append(box)
    return out


def _pad(box: Box, shape: tuple[int, int]) -> Box:
    pad = max(PAD_MIN_PX, int(round(PAD_FRACTION * box.height)))
    return Box(max(0, box.top - pad), max(0, box.left - pad), min(shape[0], box.bottom + pad), min(shape[1], box.right + pad))


def text_boxes(words: Sequence[Word], gray: np.ndarray) -> list[Box]:
    """Padded boxes of the words that look like text, joined along their lines."""
    lines: dict[tuple[int, int, int], list[Word]] = {}
    for word in words:
        if is_text(word, gray):
            lines.setdefault(word.line, []).append(word)
    boxes = [box for line in lines.values() for box in _join_line(line)]
    return [_pad(b, gray.shape[:2]) for b in boxes]


def header_band(boxes: Sequence[Box], shape: tuple[int, int]) -> Box | None:
    """The full-width band over the top text lines of an ultrasound frame, or None."""
    rows, cols = shape
    top_boxes = [b for b in boxes if b.top < BAND_START * rows]
    if not top_boxes:
        return None
    bottom = max(b.bottom for b in top_boxes)
    if bottom > BAND_LIMIT * rows:
        bottom = int(BAND_LIMIT * rows)
    return Box(0, 0, bottom, cols)


def scale_box(box: Box, factor: float, shape: tuple[int, int]) -> Box:
    """A box found on an image scaled by `factor`, in the unscaled image (rounded outwards)."""
    rows, cols = shape
    return Box(
        max(0, int(np.floor(box.top / factor))),
        max(0, int(np.floor(box.left / factor))),
        min(rows, int(np.ceil(box.bottom / factor))),
        min(cols, int(np.ceil(box.right / factor))),
    )
