"""Tesseract OCR through its command line, with nothing written to disk.

Design decisions
- The `tesseract` program (Debian's `tesseract-ocr`, 5.x) is run with the
  image on stdin and TSV on stdout. pytesseract, the usual wrapper, writes
  the image and the recognised text to temporary files and reads them back:
  for a patient's pixels and the name read from them, that is exactly the
  disk trace we must not leave (a crash or a kill leaves the files behind).
  The call is ~40 lines, so we make it ourselves.
- OMP_THREAD_LIMIT=1: with its OpenMP threads on, tesseract took 1.13 s on
  a 2048x1536 frame of a busy 2-core machine and 0.51 s with one thread
  (measured 2026-12-05); the frames we read are small, so threads only fight.
- A word's text is used while parsing to count its letters and digits, then
  dropped: `Word` carries a box, a confidence and that count, never the
  text, so nothing downstream can log, store or show what was read.
- The program is found through `MEDLENS_TESSERACT` (default `tesseract` on
  PATH). No program, no English model, or a program that does not run means
  "OCR unavailable": the caller then keeps the scan flagged, never clean.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from engine import settings
from engine.errors import MedLensError

OCR_TIMEOUT_S = 120.0  # one frame; a frame that takes longer is a failure, never "no text"
_ENV = {"OMP_THREAD_LIMIT": "1"}


class OcrFailed(MedLensError):
    """Tesseract ran but did not read a frame (crash, timeout, unreadable output)."""


class Word(NamedTuple):
    """One word tesseract found: where, how sure, and how many letters/digits (never the text)."""

    top: int
    left: int
    bottom: int  # exclusive
    right: int  # exclusive
    conf: float  # tesseract's confidence, 0-100 (-1 for layout-only rows, which are not words)
    n_alnum: int  # letters and digits in the word
    line: tuple[int, int, int]  # (block, paragraph, line): words of one text line share it


@dataclass(frozen=True)
class Tesseract:
    program: str  # resolved path of the program
    version: str  # e.g. "5.3.0"

    @property
    def label(self) -> str:
        return f"tesseract {self.version}"

    def read_words(self, gray: np.ndarray, psm: int = 11) -> list[Word]:
        """Words in a uint8 (rows, cols) image, dark text on a light ground reads best.

        psm 11 (sparse text): overlays are scattered words and lines, not a page.
        """
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8), mode="L").save(buf, format="PNG", compress_level=1)
        try:
            done = subprocess.run(
                [self.program, "stdin", "stdout", "--psm", str(psm), "-l", "eng", "tsv"],
                input=buf.getvalue(),
                capture_output=True,
                timeout=OCR_TIMEOUT_S,
                env={**os.environ, **_ENV},
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise OcrFailed(f"tesseract took over {OCR_TIMEOUT_S:.0f} s on one frame") from None
        except OSError as exc:
            raise OcrFailed(f"tesseract could not be started ({exc.strerror or type(exc).__name__})") from None
        if done.returncode != 0:
            raise OcrFailed(f"tesseract exited with status {done.returncode}")
        return parse_tsv(done.stdout.decode("utf-8", errors="replace"))


def parse_tsv(tsv: str) -> list[Word]:
    """Word rows (level 5) of tesseract's TSV; each word's text is reduced to its letter/digit count."""
    words = []
    for row in tsv.splitlines()[1:]:
        cells = row.split("\t")
        if len(cells) < 12 or cells[0] != "5":
            continue
        try:
            block, par, line = int(cells[2]), int(cells[3]), int(cells[4])
            left, top, width, height = (int(v) for v in cells[6:10])
            conf = float(cells[10])
        except ValueError:
            continue
        n_alnum = sum(ch.isalnum() for ch in "\t".join(cells[11:]))
        if n_alnum == 0 or width <= 0 or height <= 0:
            continue
        words.append(Word(top, left, top + height, left + width, conf, n_alnum, (block, par, line)))
    return words


@lru_cache(maxsize=8)
def _probe(program: str) -> Tesseract | None:
    try:
        version = subprocess.run([program, "--version"], capture_output=True, timeout=30, check=False)
        langs = subprocess.run([program, "--list-langs"], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if version.returncode != 0 or langs.returncode != 0:
        return None
    text = (version.stdout + version.stderr).decode("utf-8", errors="replace").split()
    if len(text) < 2 or text[0].lower() != "tesseract":
        return None
    if "eng" not in (langs.stdout + langs.stderr).decode("utf-8", errors="replace").split():
        return None
    return Tesseract(program, text[1])


def find_tesseract() -> Tesseract | None:
    """The OCR program named by MEDLENS_TESSERACT when it runs and reads English, else None."""
    program = shutil.which(settings.TESSERACT.get() or "tesseract")
    return _probe(program) if program else None
