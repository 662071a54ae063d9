"""Burned-in text removal: OCR the pixels, blank the text, before anyone sees them.

De-identifying the header (engine.deid) cannot remove a name drawn into the
image. `redact_scan` reads such images with Tesseract OCR and blanks every
text box it finds. engine.io.load calls it on every scan it returns, so the
viewer, labels, questions, library thumbnails and embeddings and the CLI
only ever see redacted pixels.

Design decisions
- Which scans (MEDLENS_REDACT=auto): ultrasound, XA, RF, secondary
  captures, BurnedInAnnotation = YES, and anything engine.deid flagged for
  burned-in text. `always` reads every scan (slow on volumes); `off` reads
  none, and flagged scans then stay flagged and say so.
- All text is blanked, not only what looks like a name: deciding which
  words identify someone needs a language model we do not have offline,
  and a missed identifier costs more than a blanked "TIS 0.5". Boxes that
  do not look like drawn glyphs are dropped (engine.redact.boxes), which is
  what keeps anatomy untouched.
- Never silently clean: when no OCR program runs, or OCR fails, the scan
  keeps its burned-in-text flag, its record says "not redacted" and why,
  and the library still refuses it a thumbnail
  (`Provenance.unredacted_text_risk`).
- What is recorded (`Provenance.redaction`): status, reason, OCR program
  and version, frames read, boxes in pixel coordinates and the blanked
  share. Never the text that was read.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from engine import settings
from engine.redact.boxes import Box, header_band, scale_box, text_boxes
from engine.redact.frames import Frame, blank, blanked_fraction, confirmed, frames, needs_confirmation, to_array
from engine.redact.ocr import OcrFailed, Tesseract, Word, find_tesseract
from engine.scan import (
    NO_TEXT_FOUND,
    NOT_CHECKED,
    OCR_FAILED,
    OCR_UNAVAILABLE,
    REDACTED,
    REDACTION_OFF,
    RedactedBox,
    Redaction,
    Scan,
)

__all__ = ["redact_scan", "why_read", "redaction_message", "find_tesseract", "gray8"]

_TEXT_MODALITIES = {"US": "ultrasound", "XA": "angiography (XA)", "RF": "fluoroscopy (RF)"}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
UPSCALE_BELOW = 1400  # frames whose longer side is at most this are read at 2x (small fonts read better)


def why_read(scan: Scan, mode: str) -> str | None:
    """Why this scan's pixels must be read for text, or None (auto mode, nothing suggests text)."""
    if mode == "always":
        return "MEDLENS_REDACT=always"
    meta = scan.metadata
    code = str(meta.get("Modality") or "").upper()
    if code in _TEXT_MODALITIES:
        return f"{_TEXT_MODALITIES[code]} images often carry burned-in text"
    if str(meta.get("SOPClassUID") or "").startswith(_SECONDARY_CAPTURE):
        return "secondary capture (a screenshot-like image)"
    if str(meta.get("BurnedInAnnotation") or "").upper() == "YES":
        return "BurnedInAnnotation is YES"
    if scan.provenance.burned_in_text_risk:
        return "flagged for burned-in text on reading"
    return None


def gray8(image: np.ndarray) -> np.ndarray | None:
    """uint8 grey of a frame over its full range; colour by its brightest channel (coloured text stays bright)."""
    img = image.max(axis=-1) if image.ndim == 3 else image
    lo, hi = float(np.min(img)), float(np.max(img))
    if not hi > lo:
        return None  # a flat frame holds no text
    return ((img - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def read_frame(ocr: Tesseract, gray: np.ndarray) -> list[Box]:
    """Text boxes in one uint8 frame, in its own pixel coordinates."""
    rows, cols = gray.shape
    factor = 2 if max(rows, cols) <= UPSCALE_BELOW else 1
    ink = gray if gray.mean() > 127 else 255 - gray  # tesseract reads dark text on a light ground best
    if factor > 1:
        ink = np.asarray(Image.fromarray(ink).resize((cols * factor, rows * factor), Image.Resampling.LANCZOS))
    words = []
    for w in ocr.read_words(ink):
        b = scale_box(Box(w.top, w.left, w.bottom, w.right), factor, (rows, cols))
        words.append(Word(b.top, b.left, b.bottom, b.right, w.conf, w.n_alnum, w.line))
    return text_boxes(words, gray)


def _frame_boxes(ocr: Tesseract, frame: Frame, ultrasound: bool) -> list[Box]:
    gray = gray8(frame.image)
    if gray is None:
        return []
    boxes = read_frame(ocr, gray)
    band = header_band(boxes, gray.shape) if ultrasound and frame.axis in (None, 0) and not frame.rotated else None
    return boxes + [band] if band else boxes


def _find(scan: Scan, ocr: Tesseract) -> tuple[list[RedactedBox], int]:
    """Boxes to blank (array coordinates) and the number of frames read."""
    ultrasound = str(scan.metadata.get("Modality") or "").upper() == "US"
    groups: dict[int, list[tuple[Frame, list[Box]]]] = {}
    n = 0
    for frame in frames(scan):
        groups.setdefault(frame.group, []).append((frame, _frame_boxes(ocr, frame, ultrasound)))
        n += 1
    out: list[RedactedBox] = []
    for found in groups.values():
        frame = found[0][0]
        boxes = confirmed([b for _f, b in found]) if needs_confirmation(scan) else [b for _f, bs in found for b in bs]
        out.extend(dict.fromkeys(to_array(b, frame) for b in boxes))
    return out, n


def redact_scan(scan: Scan, mode: str | None = None) -> Scan:
    """Blank burned-in text in `scan`'s pixels in place and record it on `scan.provenance.redaction`."""
    mode = mode or settings.REDACT.get() or "auto"
    why = why_read(scan, mode)
    if why is None:
        scan.provenance.redaction = Redaction(NOT_CHECKED, "nothing about this scan suggests burned-in text")
        return scan
    if mode == "off":
        scan.provenance.redaction = Redaction(REDACTION_OFF, f"{why}; MEDLENS_REDACT=off")
        return scan
    ocr = find_tesseract()
    if ocr is None:
        program = settings.TESSERACT.get()
        scan.provenance.redaction = Redaction(OCR_UNAVAILABLE, f"{why}; the OCR program '{program}' was not found or does not run")
        return scan
    try:
        boxes, n_read = _find(scan, ocr)
    except OcrFailed as exc:
        scan.provenance.redaction = Redaction(OCR_FAILED, f"{why}; {exc}", ocr.label)
        return scan
    except Exception as exc:  # never let a redaction bug pass a scan as clean, nor stop the load
        scan.provenance.redaction = Redaction(OCR_FAILED, f"{why}; {type(exc).__name__} while reading text", ocr.label)
        return scan
    if not scan.voxels.flags.writeable:
        scan.voxels = scan.voxels.copy()
    if boxes:
        blank(scan, boxes, float(scan.voxels.min()))
        scan._content_hash = ""  # the pixels changed
    share = blanked_fraction(scan, boxes) if boxes else 0.0
    scan.provenance.redaction = Redaction(REDACTED if boxes else NO_TEXT_FOUND, why, ocr.label, n_read, boxes, share)
    return scan


def redaction_message(scan: Scan) -> str | None:
    """One sentence for the user about burned-in text in this scan, or None when there is nothing to say."""
    r = scan.provenance.redaction
    if r is None or r.status == NOT_CHECKED:
        if scan.provenance.burned_in_text_risk:
            return "The pixels may contain burned-in text (names, dates) and were not checked for it."
        return None
    if r.status == REDACTED:
        n = len(r.boxes)
        return (
            f"Burned-in text removed: {n} region{'s' if n != 1 else ''} of text ({100 * r.blanked_fraction:.1f}% of the pixels) "
            f"blanked before display ({r.ocr}, {r.frames_read} frame{'s' if r.frames_read != 1 else ''} read). "
            "OCR can miss text: check the image before sharing it."
        )
    if r.status == NO_TEXT_FOUND:
        return f"Checked for burned-in text ({r.ocr}, {r.frames_read} frame{'s' if r.frames_read != 1 else ''} read): none found. OCR can miss text: check the image before sharing it."
    return f"Burned-in text {r.status} ({r.why}): the pixels may show names or dates; nothing was blanked."
