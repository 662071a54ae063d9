"""PACS in, DICOM out: a 300-slice 512x512 series over DICOMweb from a local Orthanc vs the same files from disk,
and the push of SR + SEG (+ overlay) back into its study.

    python bench/pacs.py                 # one command: builds the series, starts Orthanc, times, writes the table
    python bench/pacs.py --repeats 7
    python bench/pacs.py --repeats 7 --rounds 5    # the published table: 5 fresh processes, each its own Orthanc

The series is synthetic (pydicom, written to a temporary folder that is
deleted afterwards): 300 axial CT slices, 512 x 512, 0.75 x 0.75 x 1.0 mm,
16-bit, Explicit VR Little Endian (158 MB), a smooth body-like phantom with
noise. It is STOWed into a private Orthanc (Debian's `orthanc` +
`orthanc-dicomweb`, started on a free loopback port with authentication on,
exactly as the tests start it: tests/_orthanc.py) and then read, in
alternating order, `--repeats` times each way:
- disk: `engine.io.load([folder])`;
- PACS: `engine.io.load(["dicomweb:STUDY/SERIES"])` (QIDO of the series,
  WADO-RS of its 300 instances as stored, the same reader in memory).
Both produce the same Scan (checked: same content hash). Target: PACS time
<= 1.5 x disk time (medians).

Push: `engine.results.push_scan` with a label result and evidence on the
12 sampled axial slices (what `medlens label --push` writes: SR + SEG of 12
frames + one overlay), timed as build + STOW; and, for scale, a SEG with
evidence on every slice (300 frames). Target: SR + SEG under 2 s.

Rounds: the ratio moves between processes far more than within one (on
this shared 2-core machine one process measured 1.36x and the next 1.56x,
with every repeat inside each process close to its own median), so
`--rounds N` runs N fresh processes, each with its own Orthanc, lists every
round, and judges the target on the median round; the detailed tables are
that round's.

Writes bench/results/pacs.md with the date, CPU, `uptime` before and after
(this machine is shared: compare minima when the load is high).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

OUT = REPO / "bench" / "results" / "pacs.md"
sys.path.insert(0, str(REPO / "bench"))
from load_series import COLS, N_SLICES, PIXEL_MM, ROWS, SLICE_MM  # noqa: E402  (the same grid as the loading benchmark)


def phantom_slice(k: int, rng: np.random.Generator) -> np.ndarray:
    """A body-like ellipse (soft tissue, a bright 'spine', dark 'lungs') with noise, as stored values (HU + 1024)."""
    yy, xx = np.mgrid[0:ROWS, 0:COLS].astype(np.float32)
    cy, cx = ROWS / 2, COLS / 2
    z = (k - N_SLICES / 2) / N_SLICES
    body = ((xx - cx) / (200 - 30 * z * z)) ** 2 + ((yy - cy) / (150 - 20 * z * z)) ** 2 <= 1
    hu = np.full((ROWS, COLS), -1000.0, np.float32)
    hu[body] = 40.0
    for side in (-1, 1):
        lung = ((xx - cx - side * 90) / 60) ** 2 + ((yy - cy + 10) / (80 + 40 * z)) ** 2 <= 1
        hu[lung] = -850.0
    hu[((xx - cx) / 25) ** 2 + ((yy - cy - 100) / 25) ** 2 <= 1] = 700.0
    hu += rng.normal(0, 12, hu.shape).astype(np.float32)
    return np.clip(np.rint(hu + 1024), 0, 4095).astype(np.uint16)


def build_series(folder: Path) -> list:
    """Write the 300 files (load_series.py's CT slices, a synthetic phantom); return them as pydicom datasets (for STOW)."""
    import pydicom
    from pydicom.uid import generate_uid

    from load_series import ct_slice

    rng = np.random.default_rng(0)
    uids = (generate_uid(), generate_uid(), generate_uid())
    names = rng.permutation(N_SLICES)
    for k in range(N_SLICES):
        position = [-COLS * PIXEL_MM / 2, -ROWS * PIXEL_MM / 2, k * SLICE_MM]
        ds = ct_slice(k, uids, position, phantom_slice(k, rng))
        ds.AccessionNumber, ds.StudyTime, ds.ReferringPhysicianName, ds.StudyID = "BENCH1", "120000", "", "1"
        ds.save_as(folder / f"{names[k]:04d}.dcm", enforce_file_format=True)
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir())]


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "n/a"


def time_loads(folder: Path, path: str, repeats: int) -> dict[str, list[float]]:
    from engine.io import load

    times: dict[str, list[float]] = {"disk": [], "PACS": []}
    runs = {"disk": lambda: load([folder]), "PACS": lambda: load([path])}
    hashes = {name: fn().scans[0].content_hash for name, fn in runs.items()}  # warm-up, and the same Scan both ways
    if hashes["disk"] != hashes["PACS"]:
        raise SystemExit("the PACS and the disk gave different scans: the comparison would be meaningless")
    for r in range(repeats):
        order = ("disk", "PACS") if r % 2 == 0 else ("PACS", "disk")
        for name in order:
            t0 = time.perf_counter()
            scan = runs[name]().scans[0]
            times[name].append(time.perf_counter() - t0)
            del scan
    return times


def stage_times(folder: Path, study: str, series: str, repeats: int) -> dict[str, list[float]]:
    """Where the PACS path spends its time: the server's stream alone, the stream parsed, the reader on parsed data."""
    import pydicom

    from engine.io.dicom import read_dicom
    from engine.io.sources import Source
    from engine.pacs import PacsClient
    from engine.pacs.client import AS_STORED

    out: dict[str, list[float]] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        result = fn()
        out.setdefault(name, []).append(time.perf_counter() - t0)
        return result

    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    with PacsClient() as pacs:
        url = f"{pacs.identity}/studies/{study}/series/{series}"
        for _ in range(repeats):
            timed(
                "bytes of the WADO-RS response, unparsed (the server's part)",
                lambda: sum(len(c) for c in pacs._session.get(url, headers={"Accept": accept}, stream=True).iter_content(4 << 20)),
            )
            datasets = timed(
                "WADO-RS streamed and parsed into datasets (dicomweb-client)",
                lambda: list(pacs._web.iter_series(study, series, media_types=AS_STORED)),
            )
            timed(
                "reader on the parsed datasets (engine.io.dicom.read_dicom)",
                lambda parsed=datasets: read_dicom(Source("x", 0, None, dataset=d) for d in parsed),
            )
            del datasets
            timed("disk: pydicom.dcmread of the 300 files", lambda: [pydicom.dcmread(f) for f in sorted(folder.iterdir())])
    return out


def time_push(path: str, repeats: int, dense: bool) -> tuple[list[float], list[float], list[str]]:
    """(build s, STOW s) per push of SR + SEG + overlay; evidence on 12 sampled slices, or every slice when dense."""
    from engine.io import load
    from engine.pacs import PacsClient
    from engine.results import Heat, record_for
    from engine.results.export import OutputUIDs, build_outputs
    from engine.results.subject import Subject
    from engine.zeroshot import sample_indices

    scan = load([path]).scans[0]
    labels = {
        "labels": [{"label": "liver", "probability": 0.72, "score": 0.31}, {"label": "lung", "probability": 0.28, "score": 0.22}],
        "mode": "softmax",
        "aggregation": "mean",
        "model": "medlens-clip@bench",
        "prompt_set": "ct",
        "inference_path": "fp32",
    }
    record = record_for(scan, labels=labels)
    indices = range(scan.voxels.shape[0]) if dense else sample_indices(scan, "axial")
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:ROWS, 0:COLS]
    planes = {}
    for i in indices:
        cy, cx = rng.uniform(150, 350, 2)
        planes[int(i)] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 60.0**2)).astype(np.float32)
    heat = Heat("label 'liver'", "label", "gradcam", 0, planes)
    build, stow, kinds = [], [], []
    with PacsClient() as pacs:
        for _ in range(repeats):
            t0 = time.perf_counter()
            outputs = build_outputs(scan, record, Subject.from_origin(scan.origin), [heat], OutputUIDs.new())
            t1 = time.perf_counter()
            pacs.store(outputs.datasets(), scan.origin.study_uid)
            build.append(t1 - t0)
            stow.append(time.perf_counter() - t1)
            kinds = outputs.kinds()
    return build, stow, kinds


def _row(name: str, values: list[float]) -> str:
    return f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} | {', '.join(f'{v:.3f}' for v in values)} |"


def measure(repeats: int) -> dict:
    """Build the series, start Orthanc, STOW it, time everything; the numbers the report needs."""
    from _app import free_port
    from _machine import wait_quiet
    from _orthanc import Orthanc

    from _machine import first_touch_ms_per_mb

    m: dict = {"started": dt.datetime.now(dt.timezone.utc), "up_before": uptime(), "touch_before": first_touch_ms_per_mb()}
    with tempfile.TemporaryDirectory(prefix="medlens-bench-pacs-") as tmp:
        folder = Path(tmp) / "series"
        folder.mkdir()
        datasets = build_series(folder)
        m["size_mb"] = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
        server = Orthanc(Path(tmp) / "orthanc", free_port())
        server.folder.mkdir()
        server.start()
        try:
            t0 = time.perf_counter()
            for start in range(0, len(datasets), 50):
                server.store(datasets[start : start + 50])
            m["stow_series_s"] = time.perf_counter() - t0
            path = f"dicomweb:{datasets[0].StudyInstanceUID}/{datasets[0].SeriesInstanceUID}"
            del datasets
            os.environ["MEDLENS_PACS_URL"] = server.dicomweb
            os.environ["MEDLENS_PACS_USER"], os.environ["MEDLENS_PACS_PASSWORD"] = "medlens-test", "correct-horse-battery"
            m["quiet"] = wait_quiet(120)  # a shared machine: wait (up to 2 min) until no other job is runnable
            m["loads"] = time_loads(folder, path, repeats)
            m["stages"] = stage_times(folder, *path[len("dicomweb:") :].split("/"), repeats=repeats)
            push_build, push_stow, m["kinds"] = time_push(path, repeats, dense=False)
            dense_build, dense_stow, _ = time_push(path, max(2, repeats // 2), dense=True)
        finally:
            server.stop()
    m["up_after"] = uptime()
    m["push_build"], m["push_stow"] = push_build, push_stow
    m["push_total"] = [b + s for b, s in zip(push_build, push_stow)]
    m["dense_total"] = [b + s for b, s in zip(dense_build, dense_stow)]
    return m


def _ratio(m: dict) -> float:
    return statistics.median(m["loads"]["PACS"]) / statistics.median(m["loads"]["disk"])


def rounds_section(rounds: list[dict]) -> list[str]:
    ratios = [_ratio(m) for m in rounds]
    median = statistics.median(ratios)
    met = sum(r <= 1.5 for r in ratios)
    return [
        "## Rounds (fresh processes, each with its own Orthanc)",
        "",
        "| round | started | disk median s | PACS median s | PACS / disk |",
        "|---:|---|---:|---:|---:|",
        *(
            f"| {i + 1} | {m['started']:%H:%M:%S} | {statistics.median(m['loads']['disk']):.3f} "
            f"| {statistics.median(m['loads']['PACS']):.3f} | {r:.2f}x |"
            for i, (m, r) in enumerate(zip(rounds, ratios))
        ),
        "",
        f"**Median round: PACS / disk = {median:.2f}x (target <= 1.5x): {'met' if median <= 1.5 else 'NOT met'}**; "
        f"{met} of {len(rounds)} rounds within the target, range {min(ratios):.2f}-{max(ratios):.2f}x. "
        "The tables below are the median round's.",
        "",
    ]


def report(m: dict, repeats: int, rounds: list[dict] | None = None) -> list[str]:
    """The Markdown table of bench/results/pacs.md."""
    from importlib.metadata import version

    from _machine import cpu_name, first_touch_ms_per_mb, loadavg

    loads, stages, kinds = m["loads"], m["stages"], m["kinds"]
    started, up_before, up_after, quiet = m["started"], m["up_before"], m["up_after"], m["quiet"]
    size_mb, stow_series_s = m["size_mb"], m["stow_series_s"]
    push_build, push_stow, push_total, dense_total = m["push_build"], m["push_stow"], m["push_total"], m["dense_total"]
    ratio = statistics.median(loads["PACS"]) / statistics.median(loads["disk"])

    lines = [
        "# PACS in, DICOM out: DICOMweb retrieval vs disk, and the push of results",
        "",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC",
        f"- Command: `python bench/pacs.py --repeats {repeats}{f' --rounds {len(rounds)}' if rounds else ''}{m.get('prefault_cmd', '')}`",
        f"- CPU: {cpu_name()}, {os.cpu_count()} logical cores; python {platform.python_version()}, pydicom {version('pydicom')}, "
        f"dicomweb-client {version('dicomweb-client')}, highdicom {version('highdicom')}, Orthanc 1.10.1 + DICOMweb plugin (Debian)",
        f"- Series: {N_SLICES} axial CT slices, {ROWS}x{COLS}, 16-bit, Explicit VR Little Endian, {size_mb:.0f} MB, synthetic "
        "(pydicom, temporary folder); page cache warm; Orthanc on loopback, authentication on",
        "- The machine is shared with other engineers' jobs: `uptime` before and after the run (compare minima when the load is high):",
        f"  - before: `{up_before}`",
        f"  - after: `{up_after}`; load average now {loadavg()}",
        f"  - waited up to 2 min for a quiet machine before timing: {'quiet' if quiet else 'still busy, timed anyway'}",
        f"- Writing fresh memory: {m.get('touch_before', float('nan')):.2f} ms/MB before the run, {first_touch_ms_per_mb():.2f} after "
        f"(bench/_machine.first_touch_ms_per_mb; ~0.1 where RAM is the machine's own){m.get('prefault_note', '')}",
        f"- STOW of the 300 instances (setup, in 6 requests): {stow_series_s:.2f} s",
        "",
        *(rounds_section(rounds) if rounds else []),
        "## Retrieval into a Scan",
        "",
        "| source | median s | min s | runs (s) |",
        "|---|---:|---:|---|",
        _row("disk: `load([folder])`", loads["disk"]),
        _row("PACS: `load(['dicomweb:STUDY/SERIES'])`", loads["PACS"]),
        "",
        f"**PACS / disk = {ratio:.2f}x (median; target <= 1.5x): {'met' if ratio <= 1.5 else 'NOT met'}.** "
        f"Minima: {min(loads['PACS']) / min(loads['disk']):.2f}x. Both give the same Scan (same content hash).",
        "",
        "Where the PACS path's time goes (each step alone, same repeats):",
        "",
        "| step | median s | min s |",
        "|---|---:|---:|",
        *(f"| {name} | {statistics.median(v):.3f} | {min(v):.3f} |" for name, v in stages.items()),
        "",
        "## Push of results into the study (STOW-RS)",
        "",
        f"`push_scan` objects: {', '.join(kinds)} (SEG frames on the 12 sampled axial slices, as `medlens label --push` writes).",
        "",
        "| what | median s | min s | runs (s) |",
        "|---|---:|---:|---|",
        _row("build SR + SEG + overlay", push_build),
        _row("STOW", push_stow),
        _row("**total**", push_total),
        _row("total, SEG with evidence on all 300 slices", dense_total),
        "",
        f"**Push of SR + SEG (+ overlay) = {statistics.median(push_total):.2f} s median (target < 2 s): "
        f"{'met' if statistics.median(push_total) < 2 else 'NOT met'}.**",
        "",
        "## Notes (from the runs that shaped engine.pacs, 2026-12-05, same machine)",
        "",
        "- Reading the whole WADO-RS body before splitting it (dicomweb-client's `retrieve_series`: requests reads",
        "  10 KiB at a time) took 1.0-1.1 s for this series; streaming it in 4 MiB chunks (`iter_series`) 0.25-0.32 s.",
        "- Decoding each instance as it arrives was slower than parsing the stream to its end and then reading",
        "  (medians 0.55-0.68 s against 0.57-0.60 s on a quiet machine), and a background thread parsing ahead",
        "  slower still (0.63-0.67 s): on 2 cores Orthanc needs the other core. Chunk sizes 1-16 MiB made no",
        "  difference, nor did a leaner multipart splitter; disabling Python's garbage collector during the read",
        "  saved 0.03 s and was not adopted (a process-wide switch).",
        "- What the PACS path adds over disk is the multipart parse (0.3 s parsed vs 0.15 s for the files) while",
        "  Orthanc serves the series (0.15 s) on the same 2 cores; both then run the same reader. Runs of the",
        "  other engineers' jobs make single repeats jump to 1 s and more: compare minima.",
        "- Later the same day (19:00 UTC): reading each part by its Content-Length header straight off the socket",
        "  (no multipart buffer) parsed in 0.29 s against dicomweb-client's 0.28 s; Orthanc's storage cache raised to",
        "  512 MB changed nothing (1.35x with it, 1.39x without, in the same kind of process); the parse adds only",
        "  ~0.06 s to the 0.16 s the server takes to send. What moves the ratio is the process: the PACS",
        "  path's median was 0.44-0.47 s in some processes and 0.55-0.64 s in others, with disk at 0.32-0.37 s",
        "  (hence --rounds). Below 1.5x every time needs the server's 0.16 s hidden behind the reader, which on",
        "  2 cores competes with Orthanc for the second core.",
        "",
    ]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1, help="fresh processes, each with its own Orthanc (the verdict: the median round)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--prefault-gb", type=float, default=0.0, help="write this much memory once before timing (a fresh VM: see _machine.prefault)"
    )
    parser.add_argument("--round-result", type=Path, help=argparse.SUPPRESS)  # a round's measurements (pickle), for --rounds
    args = parser.parse_args(argv)
    from _orthanc import DICOMWEB_PLUGIN, ORTHANC

    if not ORTHANC.exists() or not DICOMWEB_PLUGIN.exists():
        print("bench/pacs.py needs Debian's orthanc and orthanc-dicomweb (apt-get install orthanc orthanc-dicomweb)", file=sys.stderr)
        return 2
    if args.round_result:
        args.round_result.write_bytes(pickle.dumps(measure(args.repeats)))
        return 0
    prefault_note = ""
    if args.prefault_gb:
        from _machine import prefault

        prefault_note = f"; {args.prefault_gb:g} GB written once before timing (--prefault-gb) in {prefault(args.prefault_gb):.0f} s"
    rounds = []
    if args.rounds > 1:
        with tempfile.TemporaryDirectory(prefix="medlens-bench-rounds-") as tmp:
            for i in range(args.rounds):
                result = Path(tmp) / f"round{i}.pickle"
                subprocess.run([sys.executable, __file__, "--repeats", str(args.repeats), "--round-result", str(result)], check=True)
                rounds.append(pickle.loads(result.read_bytes()))
                print(f"round {i + 1}: PACS / disk = {_ratio(rounds[-1]):.2f}x", flush=True)
        m = sorted(rounds, key=_ratio)[len(rounds) // 2]
    else:
        m = measure(args.repeats)
    m["prefault_note"] = prefault_note
    m["prefault_cmd"] = f" --prefault-gb {args.prefault_gb:g}" if args.prefault_gb else ""
    lines = report(m, args.repeats, rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
