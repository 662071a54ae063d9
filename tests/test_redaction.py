"""Burned-in text removal (engine.redact): text in the pixels is blanked on load, and never passes as clean.

OCR tests need Debian's `tesseract-ocr`: they skip with a notice when it is
missing, unless MEDLENS_REQUIRE_OCR=1 (CI), where a missing tesseract fails.
The tests that simulate a machine without it run everywhere.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw, ImageFont

from engine import settings
from engine.cli import main
from engine.io import load
from engine.redact import find_tesseract, redact_scan, redaction_message
from engine.redact.boxes import Box, text_split
from engine.redact.frames import confirmed
from engine.scan import NO_TEXT_FOUND, NOT_CHECKED, OCR_FAILED, OCR_UNAVAILABLE, REDACTED, REDACTION_OFF, Modality, Provenance, Scan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mutate import deid_data_dir  # noqa: E402

DEID = deid_data_dir()
US_DIR = DEID / "ultrasounds" if DEID else None
CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
# Identifying text seen in the pixels of deid-data's synthetic patients (bench/redaction_phi.json has the lists).
PHI = {
    "GREYSCALE_IMAGE.dcm": ["ZZZ", "PATIENTFI", "00079241539", "08/29/1951", "CLEVELAN", "03/02/2017"],
    "RGB_IMAGE.dcm": ["ZZZDOWNTIME", "MARY", "4/14/2020", "120907058", "00047431395", "CLEVELAND"],
    "GREYSCALE_CINE.zip": ["ZZZ", "PATIENTFI", "00079241539", "08/29/1951", "03/02/2017"],
}


@pytest.fixture(scope="module")
def ocr():
    found = find_tesseract()
    if found is None:
        problem = "tesseract is not installed (apt-get install -y tesseract-ocr): OCR redaction tests skipped"
        if os.environ.get("MEDLENS_REQUIRE_OCR") == "1":
            pytest.fail(f"MEDLENS_REQUIRE_OCR=1 but {problem}")
        pytest.skip(problem)
    return found


@pytest.fixture
def no_tesseract(monkeypatch, tmp_path):
    """A machine without the OCR program (MEDLENS_TESSERACT names a program that does not exist)."""
    monkeypatch.setenv("MEDLENS_TESSERACT", str(tmp_path / "bin" / "tesseract"))
    assert find_tesseract() is None


def _needs_deid():
    if DEID is None:
        pytest.skip("deid-data is not installed")


def readable(frame: np.ndarray, psms: tuple[str, ...] = ("11", "6")) -> str:
    """Everything tesseract reads in a frame (2x upscale, two layouts), upper case, letters and digits only."""
    img = frame.max(axis=-1) if frame.ndim == 3 else frame
    lo, hi = float(img.min()), float(img.max())
    gray = np.zeros(img.shape, np.uint8) if hi <= lo else ((img - lo) * 255.0 / (hi - lo)).astype(np.uint8)
    ink = Image.fromarray(255 - gray).resize((gray.shape[1] * 2, gray.shape[0] * 2), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    ink.save(buf, format="PNG")
    text = ""
    for psm in psms:
        done = subprocess.run(["tesseract", "stdin", "stdout", "--psm", psm], input=buf.getvalue(), capture_output=True, check=True)
        text += done.stdout.decode("utf-8", "replace")
    return re.sub(r"[^0-9A-Z]", "", text.upper())


def _norm(s: str) -> str:
    return re.sub(r"[^0-9A-Z]", "", s.upper())


# --------------------------------------------------------------------------- deid-data: real burned-in PHI
@pytest.mark.parametrize("name, frame", [("GREYSCALE_IMAGE.dcm", None), ("RGB_IMAGE.dcm", None), ("GREYSCALE_CINE.zip", 13)])
def test_no_phi_readable_after_load(ocr, monkeypatch, name, frame):
    _needs_deid()
    path = US_DIR / name
    monkeypatch.setenv("MEDLENS_REDACT", "off")
    raw = load([path]).scans[0]
    before = readable(raw.voxels if frame is None else raw.voxels[frame])
    seen = [p for p in PHI[name] if _norm(p) in before]
    assert len(seen) >= 3, f"the test means nothing unless OCR reads the PHI before redaction (read {seen})"
    monkeypatch.setenv("MEDLENS_REDACT", "auto")
    scan = load([path]).scans[0]
    record = scan.provenance.redaction
    assert record.status == REDACTED and record.boxes and record.ocr.startswith("tesseract")
    # frame 13 of the cine is not one the redactor read: boxes go through every frame
    after = readable(scan.voxels if frame is None else scan.voxels[frame])
    assert not [p for p in PHI[name] if _norm(p) in after]
    assert scan.provenance.burned_in_text_risk and not scan.provenance.unredacted_text_risk
    assert scan.content_hash != raw.content_hash


def test_nothing_read_is_recorded_or_printed(ocr, capsys):
    _needs_deid()
    path = US_DIR / "GREYSCALE_IMAGE.dcm"
    code = main(["info", str(path), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    row = json.loads(out)
    assert row["redaction"]["status"] == REDACTED and row["redaction"]["n_boxes"] == len(row["redaction"]["boxes"]) > 0
    assert set(row["redaction"]["boxes"][0]) == {"axis", "rows", "cols"}
    for phi in PHI["GREYSCALE_IMAGE.dcm"]:
        assert _norm(phi) not in _norm(out), "recognised text leaked into the CLI output"
    code = main(["info", str(path)])
    out, _ = capsys.readouterr()
    assert "Burned-in text removed" in out


# --------------------------------------------------------------------------- synthetic text
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _us_with_text(path: Path, text: str, modality: str = "US") -> np.ndarray:
    """An 8-bit ultrasound-like DICOM: a speckled fan with `text` drawn in its top-left corner."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(0)
    img = np.zeros((480, 640), np.uint8)
    yy, xx = np.mgrid[:480, :640]
    fan = (np.hypot(yy + 40, xx - 320) < 470) & (np.abs(xx - 320) < (yy + 40) * 0.8) & (yy > 60)
    img[fan] = rng.gamma(2.0, 30.0, fan.sum()).clip(0, 255).astype(np.uint8)
    pil = Image.fromarray(img)
    ImageDraw.Draw(pil).text((12, 100), text, fill=255, font=_font(22))
    pixels = np.asarray(pil)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = modality, "DOE^JOHN", "12345678"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 480, 640, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return pixels


@pytest.mark.parametrize("modality", ["US", "XA"])
def test_synthetic_text_is_blanked_and_the_rest_untouched(ocr, tmp_path, modality):
    path = tmp_path / "image.dcm"
    pixels = _us_with_text(path, "DOE JOHN 12345678", modality)
    assert "DOEJOHN1234" in readable(pixels, ("11",))  # sparse-text reading: speckle reads as few letters
    scan = load([path]).scans[0]
    record = scan.provenance.redaction
    assert record.status == REDACTED, record
    after = readable(scan.voxels, ("11",))
    assert "DOE" not in after and "JOHN" not in after and "1234" not in after
    changed = scan.voxels != pixels
    rows, cols = np.nonzero(changed)
    assert rows.min() >= 90 and rows.max() <= 140 and cols.max() < 320, "blanked outside the caption"
    assert 0 < record.blanked_fraction < 0.05
    assert np.all(scan.voxels[changed] == 0)  # black: the scan's minimum


def test_a_text_free_ct_is_untouched_even_when_every_scan_is_read(ocr, monkeypatch):
    monkeypatch.setenv("MEDLENS_REDACT", "off")
    raw = load([CT_SMALL]).scans[0]
    monkeypatch.setenv("MEDLENS_REDACT", "always")
    scan = load([CT_SMALL]).scans[0]
    assert scan.provenance.redaction.status == NO_TEXT_FOUND and scan.provenance.redaction.frames_read == 1
    np.testing.assert_array_equal(scan.voxels, raw.voxels)
    monkeypatch.setenv("MEDLENS_REDACT", "auto")
    assert load([CT_SMALL]).scans[0].provenance.redaction.status == NOT_CHECKED  # a CT is not read in auto mode


def test_text_in_every_slice_of_a_volume_is_blanked_through_it(ocr):
    """A canonical volume shows an axial acquisition turned by 180 degrees: text is read as the viewer shows it."""
    rng = np.random.default_rng(1)
    vol = rng.normal(40, 8, (9, 256, 320)).astype(np.float32)
    caption = Image.new("L", (320, 256), 0)
    ImageDraw.Draw(caption).text((10, 10), "SMITH ANNA 19700101", fill=255, font=_font(18))
    text = np.asarray(caption, np.float32)[::-1, ::-1] * 4  # as stored in RAS+ after canonicalisation
    vol = np.where(text > 0, text, vol)
    scan = Scan(vol, (2.0, 0.8, 0.8), np.diag([0.8, 0.8, 2.0, 1.0]), Modality.CT, {}, Provenance("test", burned_in_text_risk=True))
    redact_scan(scan, mode="auto")
    record = scan.provenance.redaction
    assert record.status == REDACTED and {b.axis for b in record.boxes} == {0}
    for k in range(9):  # every slice, not only the three read
        assert "SMITH" not in readable(scan.voxels[k][::-1, ::-1])
    assert record.blanked_fraction < 0.1


# --------------------------------------------------------------------------- never silently clean
def test_without_tesseract_the_scan_stays_flagged(no_tesseract, tmp_path):
    path = tmp_path / "image.dcm"
    pixels = _us_with_text(path, "DOE JOHN 12345678")
    scan = load([path]).scans[0]
    record = scan.provenance.redaction
    assert record.status == OCR_UNAVAILABLE and "not found" in record.why and not record.boxes
    np.testing.assert_array_equal(scan.voxels, pixels)
    assert scan.provenance.burned_in_text_risk and scan.provenance.unredacted_text_risk
    assert "OCR unavailable" in redaction_message(scan)
    from engine.library.store import NO_THUMBNAIL_BURNED_IN, thumbnail_png

    assert thumbnail_png(scan) == (None, NO_THUMBNAIL_BURNED_IN)
    assert scan.summary()["redaction"]["status"] == OCR_UNAVAILABLE


def test_turned_off_it_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDLENS_REDACT", "off")
    path = tmp_path / "image.dcm"
    _us_with_text(path, "DOE")
    scan = load([path]).scans[0]
    assert scan.provenance.redaction.status == REDACTION_OFF and scan.provenance.unredacted_text_risk
    assert "MEDLENS_REDACT=off" in redaction_message(scan)


def test_an_ocr_failure_is_not_clean(ocr, monkeypatch, tmp_path):
    from engine.redact.ocr import OcrFailed, Tesseract

    def crash(self, gray, psm=11):
        raise OcrFailed("tesseract exited with status 1")

    monkeypatch.setattr(Tesseract, "read_words", crash)
    path = tmp_path / "image.dcm"
    _us_with_text(path, "DOE")
    scan = load([path]).scans[0]
    assert scan.provenance.redaction.status == OCR_FAILED and scan.provenance.unredacted_text_risk


def test_library_thumbnail_only_after_ocr_ran(ocr, tmp_path):
    from engine.library.store import thumbnail_png

    path = tmp_path / "image.dcm"
    _us_with_text(path, "DOE JOHN 12345678")
    scan = load([path]).scans[0]
    png, note = thumbnail_png(scan)
    assert scan.provenance.redaction.status == REDACTED and png and note is None


def test_app_warnings_tell_what_was_done(ocr, tmp_path):
    from app.handlers import scan_warnings

    path = tmp_path / "image.dcm"
    _us_with_text(path, "DOE JOHN 12345678")
    messages = scan_warnings(load([path]).scans[0], [])
    assert any(m.startswith("Burned-in text removed: ") and "tesseract" in m for m in messages)


# --------------------------------------------------------------------------- pieces
def test_glyphs_split_cleanly_and_speckle_does_not():
    rng = np.random.default_rng(0)
    caption = Image.new("L", (120, 24), 0)
    ImageDraw.Draw(caption).text((2, 2), "ABC 123", fill=255, font=_font(18))
    assert text_split(np.asarray(caption)) > 0.85
    assert text_split(rng.gamma(2.0, 30.0, (24, 120)).clip(0, 255).astype(np.uint8)) < 0.8
    assert text_split(np.full((10, 10), 7, np.uint8)) == 0.0


def test_volume_boxes_need_two_of_three_slices():
    a, b = Box(10, 10, 30, 90), Box(200, 200, 220, 260)
    assert confirmed([[a], [a, b], []]) == [a]  # b was seen once: a "word" in anatomy
    assert confirmed([[b]]) == [b]  # one sample only: nothing to confirm against


def test_the_setting_is_checked(monkeypatch):
    monkeypatch.setenv("MEDLENS_REDACT", "sometimes")
    with pytest.raises(settings.SettingsError, match="MEDLENS_REDACT"):
        settings.REDACT.get()
    monkeypatch.setenv("MEDLENS_REDACT", "ALWAYS")
    assert settings.REDACT.get() == "always"


def test_label_json_says_what_was_redacted(ocr, tmp_path, capsys):
    from _models import tiny_clip_folder

    path = tmp_path / "image.dcm"
    _us_with_text(path, "DOE JOHN 12345678")
    model = f"local-dir:{tiny_clip_folder(tmp_path / 'model')}"
    code = main(["label", str(path), "--labels", "a", "b", "--model", model, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    row = json.loads(out)
    assert row["redaction"]["status"] == REDACTED and row["redaction"]["n_boxes"] >= 1 and "DOE" not in out
