"""Burned-in text removal (engine.redact), measured on deid-data's images with burned-in PHI.

Writes bench/results/redaction.md:
- text boxes found: the words a stronger, independent OCR pass reads with
  confidence >= 60 on the unredacted frames (3x upscale, two page layouts,
  no inversion: not the redactor's own settings), and the share of them whose
  box the redactor blanked (>= 90 % of its pixels);
- PHI still readable after redaction, on EVERY frame of every image (stacks
  are sampled by the redactor, so this also checks that assumption), by the
  redactor's OCR settings and by the stronger pass: the hand-listed PHI seen
  in the pixels (bench/redaction_phi.json), the header's identifying values
  that OCR read in the pixels before redaction, and every word of >= 3
  letters/digits read before redaction; target 0;
- false redactions on images without text (pydicom's bundled CT/MR files and
  ../shared/data images and volumes), read with MEDLENS_REDACT=always;
- PHI readable on 128 px library thumbnails of the *unredacted* images (why
  thumbnails are allowed after redaction);
- load time with and without redaction.

    python bench/redaction.py            # ~5-10 min on 2 busy cores
    python bench/redaction.py --presidio-python V/bin/python   # also Presidio (its own venv V: see bench/_presidio_redact.py)
"""

from __future__ import annotations

import copy
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _machine import cpu_name, loadavg, write_result  # noqa: E402
from _report import header, table  # noqa: E402

from engine.io import load  # noqa: E402
from engine.redact import gray8, find_tesseract, redact_scan  # noqa: E402
from engine.redact.frames import blank_array  # noqa: E402

OUT = ROOT / "bench" / "results" / "redaction.md"
PHI_FILE = ROOT / "bench" / "redaction_phi.json"
HEADER_PHI = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "StudyDate",
    "AccessionNumber",
    "InstitutionName",
    "ReferringPhysicianName",
    "OperatorsName",
    "PerformingPhysicianName",
    "StudyTime",
)


# --------------------------------------------------------------------------- OCR with text (bench only)
def read_text(gray: np.ndarray, scale: int, psm: int, invert: bool) -> list[tuple[str, float, tuple[int, int, int, int]]]:
    """(text, conf, (top, left, bottom, right) in `gray` pixels) of every word tesseract reads."""
    import io
    import subprocess

    ink = 255 - gray if invert else gray
    if scale > 1:
        ink = np.asarray(Image.fromarray(ink).resize((gray.shape[1] * scale, gray.shape[0] * scale), Image.Resampling.LANCZOS))
    buf = io.BytesIO()
    Image.fromarray(ink).save(buf, format="PNG", compress_level=1)
    done = subprocess.run(
        ["tesseract", "stdin", "stdout", "--psm", str(psm), "tsv"],
        input=buf.getvalue(),
        capture_output=True,
        env={**os.environ, "OMP_THREAD_LIMIT": "1"},
        check=True,
    )
    words = []
    for row in done.stdout.decode("utf-8", "replace").splitlines()[1:]:
        c = row.split("\t")
        if len(c) < 12 or c[0] != "5" or not c[11].strip():
            continue
        left, t, w, h = (int(v) // scale for v in c[6:10])
        words.append((c[11], float(c[10]), (t, left, t + max(1, h), left + max(1, w))))
    return words


def redactor_reader(gray):  # the redactor's own OCR settings
    return read_text(gray, 2 if max(gray.shape) <= 1400 else 1, 11, gray.mean() <= 127)


def strong_reader(gray):  # different scale, layouts and polarity
    return read_text(gray, 3, 11, False) + read_text(gray, 3, 6, False) + read_text(gray, 2, 6, gray.mean() <= 127)


def norm(text: str) -> str:
    return re.sub(r"[^0-9A-Z]", "", text.upper())


def phi_tokens(strings) -> set[str]:
    out = set()
    for s in strings:
        for piece in re.split(r"[\s,^]+", str(s)):
            piece = norm(piece)
            if len(piece) >= 3:
                out.add(piece)
    return out


def header_phi(ds) -> set[str]:
    values = []
    for kw in HEADER_PHI:
        v = ds.get(kw)
        if not v:
            continue
        v = str(v)
        values.append(v)
        if re.fullmatch(r"\d{8}", v):  # a DICOM date, as screens print it
            y, m, d = v[:4], v[4:6], v[6:]
            values += [f"{m}/{d}/{y}", f"{int(m)}/{int(d)}/{y}", f"{d}/{m}/{y}", f"{d}.{m}.{y}", f"{y}-{m}-{d}"]
    return phi_tokens(values)


# --------------------------------------------------------------------------- frames of a scan
def all_frames(scan) -> list[np.ndarray]:
    v = scan.voxels
    return [v] if scan.is_2d else [v[k] for k in range(v.shape[0])]


def sampled(n: int) -> list[int]:
    return sorted({0, n // 2, n - 1})


def deid_files() -> list[Path]:
    import deid_data

    base = Path(deid_data.__file__).parent / "data" / "ultrasounds"
    return sorted(base.glob("*.dcm")) + sorted(base.glob("*.zip"))


def header_of(path: Path):
    import io
    import zipfile

    import pydicom

    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as zf:
            return pydicom.dcmread(io.BytesIO(zf.read(zf.namelist()[0])), stop_before_pixels=True)
    return pydicom.dcmread(path, stop_before_pixels=True)


def load_pair(path: Path):
    """(unredacted scan, redacted scan, seconds to load without / with redaction)."""
    os.environ["MEDLENS_REDACT"] = "off"
    t = time.perf_counter()
    raw = load([path]).scans[0]
    t_off = time.perf_counter() - t
    os.environ["MEDLENS_REDACT"] = "auto"
    t = time.perf_counter()
    red = load([path]).scans[0]
    t_on = time.perf_counter() - t
    return raw, red, t_off, t_on


# --------------------------------------------------------------------------- text images
def covered(box, blanked: np.ndarray) -> float:
    t, left, b, r = box
    patch = blanked[t:b, left:r]
    return float(patch.mean()) if patch.size else 0.0


def evaluate_text_image(path: Path, phi_list: dict) -> dict:
    raw, red, t_off, t_on = load_pair(path)
    raw_frames, red_frames = all_frames(raw), all_frames(red)
    hand = phi_tokens(phi_list.get(path.name, []))
    header = header_phi(header_of(path))
    reference, before_tokens, header_seen = [], set(), set()
    for k in sampled(len(raw_frames)):
        gray = gray8(raw_frames[k])
        words = strong_reader(gray)
        reference += [(k, w) for w in words if w[1] >= 60 and sum(ch.isalnum() for ch in w[0]) >= 2]
        text = "".join(norm(w[0]) for w in words)
        before_tokens |= {norm(w[0]) for w in words if w[1] >= 50 and len(norm(w[0])) >= 3}
        header_seen |= {tok for tok in header if tok in text}
    # blanked pixels: value changed to the scan's minimum by redaction
    blanked = np.zeros(raw_frames[0].shape[:2], dtype=bool)  # stacks: boxes go through every frame (axis 0)
    for box in red.provenance.redaction.boxes:
        blank_array(blanked, box._replace(axis=None), True)
    found = [covered(box, blanked) >= 0.9 for _k, (_text, _conf, box) in reference]
    phi = hand | header_seen
    left_phi, left_words = set(), set()
    for k, frame in enumerate(red_frames):
        gray = gray8(frame)
        if gray is None:
            continue
        words = redactor_reader(gray) + (strong_reader(gray) if k in sampled(len(red_frames)) else [])
        text = "".join(norm(w[0]) for w in words)
        left_phi |= {tok for tok in phi if tok in text}  # PHI: any substring of the joined reading counts
        left_words |= {norm(w[0]) for w in words} & before_tokens
    r = red.provenance.redaction
    return {
        "name": path.name,
        "frames": len(raw_frames),
        "shape": "x".join(map(str, raw.voxels.shape)),
        "status": r.status,
        "boxes": len(r.boxes),
        "blanked": r.blanked_fraction,
        "frames_read": r.frames_read,
        "ref_words": len(reference),
        "ref_found": sum(found),
        "phi": len(phi),
        "phi_left": len(left_phi),
        "words_before": len(before_tokens),
        "words_left": len(left_words),
        "left_list": sorted(left_words - phi),
        "t_off": t_off,
        "t_on": t_on,
        "thumb_phi": thumbnail_phi(raw, phi),
    }


def thumbnail_phi(raw, phi: set[str]) -> int:
    """PHI tokens the strong reader gets from a 128 px thumbnail of the UNredacted scan."""
    from engine.library.store import THUMBNAIL_SIZE
    from engine.views import render_view
    from engine.windowing import default_window

    scan = copy.copy(raw)
    if not scan.is_2d:
        scan.voxels = raw.voxels[0]
        scan.spacing = scan.spacing[1:]
    center, width, _ = default_window(scan)
    rgb = render_view(scan, "axial", None, center, width, size=THUMBNAIL_SIZE, letters=False, square=False)
    gray = gray8(rgb.astype(np.float32))
    text = "".join(norm(w[0]) for w in strong_reader(gray)) if gray is not None else ""
    return sum(tok in text for tok in phi)


# --------------------------------------------------------------------------- images without text
def textless_sources(per_folder: int) -> list[tuple[str, list[Path]]]:
    """(group, paths): pydicom's bundled CT/MR files, then ../shared/data images and volumes without text."""
    import pydicom

    out = []
    for path in sorted((Path(pydicom.__file__).parent / "data" / "test_files").glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        if str(ds.get("Modality", "")) in ("CT", "MR"):
            out.append(("pydicom CT/MR test files", [path]))
    shared = ROOT.parent / "shared" / "data"
    if not shared.is_dir():
        return out
    for folder in ("fundus/dr_maculopathy/images", "pathology/lc25000_lung/images", "dermatology/ham10000/images"):
        for path in sorted((shared / folder).glob("*"))[:per_folder]:
            out.append((f"shared {folder.split('/')[0]} (2D)", [path]))
    out.append(("shared CT DICOM series (3D)", [shared / "volumes/totalsegmentator/ct_dicom_series"]))
    for name in ("example_ct_sm.nii.gz", "example_mr_sm.nii.gz"):
        out.append(("shared CT/MR NIfTI (3D)", [shared / "volumes/totalsegmentator" / name]))
    out.append(("shared CT/MR NIfTI (3D)", [shared / "volumes/mricron_atlas/ch2.nii.gz"]))
    return out


def evaluate_textless(per_folder: int) -> list[dict]:
    os.environ["MEDLENS_REDACT"] = "off"
    rows = []
    for group, paths in textless_sources(per_folder):
        try:
            scans = load(paths).scans
        except Exception as exc:  # a malformed test file: not part of this measure
            print(f"skip {paths[0].name}: {type(exc).__name__}", file=sys.stderr)
            continue
        for scan in scans:
            redact_scan(scan, mode="always")
            r = scan.provenance.redaction
            rows.append(
                {
                    "group": group,
                    "name": paths[0].name,
                    "status": r.status,
                    "boxes": len(r.boxes),
                    "blanked": r.blanked_fraction,
                    "frames": r.frames_read,
                }
            )
    os.environ["MEDLENS_REDACT"] = "auto"
    return rows


# --------------------------------------------------------------------------- Presidio, for comparison
def evaluate_presidio(python: str, phi_list: dict) -> list[str]:
    """Run bench/_presidio_redact.py in Presidio's own venv and score it like engine.redact (first frame)."""
    import subprocess
    import tempfile

    out = ["| image | Presidio | PHI strings readable after / in pixels | pixels changed | s |", "|---|---|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as work:
        done = subprocess.run([python, str(ROOT / "bench" / "_presidio_redact.py"), work], capture_output=True, text=True, check=True)
        rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        for row in rows:
            path = next(p for p in deid_files() if p.name == row["name"])
            if not row["ok"]:
                out.append(f"| {row['name']} | failed: {row['error'].replace('|', '/')} | - | - | {row['seconds']} |")
                continue
            raw = load_pair(path)[0]
            arr = np.load(Path(work) / f"{row['name']}.npy").astype(np.float32)
            first = raw.voxels if raw.is_2d else raw.voxels[0]
            before = "".join(norm(w[0]) for w in strong_reader(gray8(first)))
            phi = phi_tokens(phi_list.get(row["name"], [])) | {t for t in header_phi(header_of(path)) if t in before}
            gray = gray8(arr)
            text = "".join(norm(w[0]) for w in redactor_reader(gray) + strong_reader(gray))
            changed = np.any(arr != first, axis=-1) if arr.ndim == 3 else arr != first
            out.append(
                f"| {row['name']} | redacted | {sum(t in text for t in phi)}/{len(phi)} | {100 * changed.mean():.1f}% | {row['seconds']} |"
            )
    default = rows[0]["default_analyzer"].split(":")[0] if rows else "not run"
    out += ["", f"- Presidio's default analyzer offline: {default} (it fetches its spaCy English model at first use; none is on PyPI)."]
    return out


# --------------------------------------------------------------------------- report
def versions() -> str:
    import pydicom

    ocr = find_tesseract()
    return (
        f"python {platform.python_version()}, {ocr.label if ocr else 'no tesseract'}, pydicom {pydicom.__version__}, numpy {np.__version__}"
    )


def text_table(rows: list[dict]) -> list[str]:
    columns = (
        "image | shape | status | boxes | blanked | frames OCR read | reference words found | PHI strings readable after / in pixels | "
        "words readable after / before | PHI on 128 px thumbnail (unredacted) | load s (off / on)"
    )
    cells = (
        (
            r["name"],
            str(r["shape"]),
            r["status"],
            str(r["boxes"]),
            f"{100 * r['blanked']:.1f}%",
            str(r["frames_read"]),
            f"{r['ref_found']}/{r['ref_words']}",
            f"{r['phi_left']}/{r['phi']}",
            f"{r['words_left']}/{r['words_before']}",
            str(r["thumb_phi"]),
            f"{r['t_off']:.2f} / {r['t_on']:.2f}",
        )
        for r in rows
    )
    out = table(columns, "lllrrrrrrrl", cells)
    ref = sum(r["ref_words"] for r in rows)
    found = sum(r["ref_found"] for r in rows)
    out += [
        "",
        f"- **Text boxes found: {found}/{ref} = {100 * found / max(ref, 1):.1f} %** of the reference words (>= 90 % of each box blanked). "
        "The reference is OCR's own (confidence >= 60): on a speckled image (the echocardiogram) it also holds 'words' read in the "
        "speckle, which the redactor rightly leaves, and boxes it blanks only in part count as missed.",
        f"- **PHI strings still readable after redaction: {sum(r['phi_left'] for r in rows)} of {sum(r['phi'] for r in rows)}** (target 0), on every frame of every image.",
        f"- Words (>= 3 letters/digits) read before redaction still readable after: {sum(r['words_left'] for r in rows)} of {sum(r['words_before'] for r in rows)}.",
        f"- PHI read from 128 px thumbnails of the unredacted images: {sum(r['thumb_phi'] for r in rows)}.",
        "- Non-PHI words read before and after redaction (check by eye whether each is real text or OCR reading speckle): "
        + ("; ".join(f"{r['name']}: {', '.join(r['left_list'])}" for r in rows if r["left_list"]) or "none")
        + ".",
    ]
    return out


def textless_table(rows: list[dict]) -> list[str]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    out = [
        "| images without text | scans | scans with any redaction | pixels blanked (mean / max) | frames OCR read |",
        "|---|---:|---:|---|---:|",
    ]
    for group, rs in groups.items():
        hit = [r for r in rs if r["boxes"]]
        out.append(
            f"| {group} | {len(rs)} | {len(hit)} | {100 * np.mean([r['blanked'] for r in rs]):.2f}% / {100 * max(r['blanked'] for r in rs):.2f}% | {sum(r['frames'] for r in rs)} |"
        )
    hits = [r for r in rows if r["boxes"]]
    out += [
        "",
        f"- **False redactions: {len(hits)} of {len(rows)} text-free scans** had any pixel blanked"
        + (": " + ", ".join(f"{r['name']} ({r['boxes']} boxes, {100 * r['blanked']:.2f}%)" for r in hits) if hits else "")
        + ".",
    ]
    return out


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-folder", type=int, default=10, help="images taken from each ../shared/data 2D folder")
    parser.add_argument(
        "--presidio-python", help="python of a venv with presidio-image-redactor, pydicom and deid-data: compare with Presidio"
    )
    args = parser.parse_args(argv)
    if find_tesseract() is None:
        print("tesseract is not installed: nothing to measure", file=sys.stderr)
        return 2
    phi_list = json.loads(PHI_FILE.read_text())
    load_before = loadavg()
    text_rows = [evaluate_text_image(p, phi_list) for p in deid_files()]
    textless = evaluate_textless(args.per_folder)
    lines = [
        *header(
            "Burned-in text removal (engine.redact)",
            f"python bench/redaction.py --per-folder {args.per_folder}"
            + (" --presidio-python V/bin/python" if args.presidio_python else ""),
            f"{cpu_name()}, {os.cpu_count()} cores; load average before / after: {load_before} / {loadavg()}",
            versions(),
        ),
        "- Redactor: MEDLENS_REDACT=auto (images with burned-in PHI) and =always (images without text).",
        "",
        "## deid-data ultrasound images with burned-in PHI",
        "",
        *text_table(text_rows),
        "",
        "## False redactions on images without text (MEDLENS_REDACT=always)",
        "",
        *textless_table(textless),
        "",
    ]
    if args.presidio_python:
        lines += [
            "## Presidio's DICOM image redactor on the same images (blank spaCy pipeline: no English model installs offline)",
            "",
            *evaluate_presidio(args.presidio_python, phi_list),
            "",
        ]
    write_result(OUT, lines, echo=True, end="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
