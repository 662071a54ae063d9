"""`medlens batch index` throughput: local and Ray on 1 and 2 workers, against `medlens index`, over the same 1,000 real files.

    python bench/batch.py                      # 1,000 files (400 NIH chest X-rays, 300 HAM10000, 300 BUSI), medlens-clip
    python bench/batch.py --n 100 --configs index local-1 ray-2     # a quick look

Every configuration indexes the same files (a listing: the batch runner's
listing SOURCE; `medlens index` gets the same paths) into a fresh library
with the shipped model. The model is loaded once in this process first
(its load time and inference path are reported), so `medlens index` and
the in-process local engine run with the model in memory; worker
processes (local pool, Ray actors) load it themselves, and that startup
(Ray's start, the actors', the model load and the fast-path probe) is
reported apart from the steady rate after the first batch.

Per-unit time is split into read (bytes in, hashed, decoded), preprocess
(model image, thumbnail, de-identified summary), model (the encoder with its
own resize/normalise, pooling) and write (shards and the library), summed over
workers (so with 2 workers the sum exceeds wall time per unit).

The machine may be shared: each configuration waits up to --quiet-wait
seconds for no other runnable thread, and the load average before and after
each one is in the table. Compare numbers only within one results file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
SHARED = Path(os.environ.get("MEDLENS_SHARED_DATA", REPO.parent / "shared" / "data"))
WORK = REPO / "bench" / "work" / "batch"
CONFIGS = ("index", "local-1", "local-pool-2", "ray-1", "ray-2")

from _machine import cpu_flags, cpu_name, loadavg, wait_quiet  # noqa: E402


def real_files(n: int) -> list[str]:
    """n real images: 40 % NIH chest X-rays (PNG 64x64), 30 % HAM10000 (JPEG 224x224), 30 % BUSI (PNG ~256x256)."""
    if not SHARED.is_dir():
        raise SystemExit(f"needs {SHARED} (real images)")
    nih = sorted((SHARED / "xray" / "nih_cxr14_1000" / "images").glob("*.png"))
    ham = sorted((SHARED / "dermatology" / "ham10000" / "images").glob("*.jpg"))
    busi = sorted((SHARED / "ultrasound" / "busi" / "images").rglob("*.png"))
    n_nih, n_ham = int(n * 0.4), int(n * 0.3)
    files = nih[:n_nih] + ham[:n_ham] + busi[: n - n_nih - n_ham]
    if len(files) < n:
        raise SystemExit(f"only {len(files)} images found under {SHARED}")
    return [str(f) for f in files]


def run_config(name: str, files: list[str], listing: Path, model: str) -> dict:
    from engine.batch import LocalEngine, RunOptions, TaskSpec, run_batch
    from engine.library import index_paths
    from engine.models import load_model

    folder = WORK / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    library = str(folder / "library.db")
    before = loadavg()
    start = time.perf_counter()
    if name == "index":
        report = index_paths(files, library, load_model(model))
        wall = time.perf_counter() - start
        return {"config": name, "wall_s": wall, "units": report.indexed + len(report.failed), "before": before, "after": loadavg()}
    if name.startswith("ray"):
        from engine.batch.ray_engine import RayEngine

        engine = RayEngine(workers=int(name.split("-")[-1]))
    else:
        engine = LocalEngine(workers=int(name.split("-")[-1]))
    summary = run_batch(
        TaskSpec("index", model, {"library": library}),
        [str(listing)],
        engine,
        RunOptions(out=str(folder / "out"), library=library, progress=False),
    )
    wall = time.perf_counter() - start
    return {"config": name, "wall_s": wall, "units": summary["run"]["rows"], "summary": summary, "before": before, "after": loadavg()}


CLI_CONFIGS = {"local": ["--engine", "local"], "ray-2": ["--engine", "ray", "--workers", "2"]}


def cli_runs(listing: Path, model: str, repeats: int, quiet_wait: float) -> list[str]:
    """The whole `medlens batch index` command in a fresh process, local and ray-2 alternating: what a user waits for
    (interpreter start, model load in every worker, Ray's start and shutdown included), and the issue's 0.7x gate on it."""
    import statistics

    walls: dict[str, list[float]] = {name: [] for name in CLI_CONFIGS}
    for _ in range(repeats):
        for name, engine_args in CLI_CONFIGS.items():
            folder = WORK / f"cli-{name}"
            shutil.rmtree(folder, ignore_errors=True)
            wait_quiet(quiet_wait)
            command = [sys.executable, "-m", "engine.cli", "batch", "index", str(listing), "--out", str(folder / "out")]
            command += ["--library", str(folder / "library.db"), "--model", model, "--quiet", *engine_args]
            start = time.perf_counter()
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
            walls[name].append(time.perf_counter() - start)
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr[-500:]}")
    local, ray2 = statistics.median(walls["local"]), statistics.median(walls["ray-2"])
    ratio = local / ray2
    return [
        "",
        "## Whole commands, cold: `medlens batch index` in a fresh process (the issue's gate)",
        "",
        f"{repeats} runs of each, alternating; median wall seconds from the shell's point of view.",
        "",
        "| command | runs (s) | median s | units/s |",
        "|---|---|---:|---:|",
        *(
            f"| `medlens batch index files.txt {' '.join(CLI_CONFIGS[n])}` | {', '.join(f'{w:.1f}' for w in walls[n])} "
            f"| {statistics.median(walls[n]):.1f} | {len(listing.read_text().split()) / statistics.median(walls[n]):.1f} |"
            for n in CLI_CONFIGS
        ),
        "",
        f"ray with 2 workers vs local, end to end: **{ratio:.2f}x** (gate: >= 0.7x; {'met' if ratio >= 0.7 else 'not met'}).",
    ]


def full_size_cr(folder: Path, n: int) -> Path:
    """n full-size CR DICOM files (2048 x 2500, 12 bits in 16, uncompressed, ~10 MB each) from real NIH radiographs,
    upsampled: decoding and preprocessing cost depends on the size, not on the content."""
    import numpy as np
    import pydicom
    from PIL import Image
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted((SHARED / "xray" / "nih_cxr14_1000" / "images").glob("*.png"))[-n:]
    for i, png in enumerate(sources):
        target = folder / f"cr{i:03d}.dcm"
        if target.exists():
            continue
        grey = np.asarray(Image.open(png).convert("L").resize((2048, 2500), Image.Resampling.BILINEAR), dtype=np.uint16) * 16
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.Modality, ds.BodyPartExamined, ds.PatientName, ds.PatientID = "CR", "CHEST", "Bench^Synthetic", "BENCH"
        ds.Rows, ds.Columns = grey.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelSpacing = [0.15, 0.15]
        ds.PixelData = grey.tobytes()
        pydicom.dcmwrite(target, ds, enforce_file_format=True)
    return folder


def ct_series_300(folder: Path) -> Path:
    """The 300-file 512x512 CT series of bench/load_series.py (real CT resampled, uncompressed, 158 MB), built once."""
    if len(list(folder.glob("*.dcm"))) != 300:
        import load_series

        load_series.build_series(folder, load_series.SOURCE)
    return folder


def model_side_preprocessing(model: str) -> float:
    """ms per image the model's own resize + normalise take (CPU work that stays on the CPU with a GPU)."""
    import numpy as np

    from engine.models import load_model

    clip = load_model(model)
    images = [np.random.default_rng(i).integers(0, 256, (448, 448, 3), dtype=np.uint8) for i in range(32)]
    clip.image_tensor(images[:4])
    start = time.perf_counter()
    clip.image_tensor(images)
    return 1000 * (time.perf_counter() - start) / len(images)


def unit_costs(model: str, repeats: int) -> list[str]:
    """Time per unit for a full-size CR image and the real 20-slice CT series (JPEG 2000), and the header scan per file."""
    import statistics

    from engine.batch import LocalEngine, RunOptions, TaskSpec, plan_units, run_batch

    ct300 = ct_series_300(WORK / "ct300")
    cases = {
        "CR 2048x2500, 12-bit DICOM, uncompressed (10 MB)": (full_size_cr(WORK / "cr", 20), 20),
        "CT series 300 x 512x512, uncompressed (158 MB; real CT resampled, bench/load_series.py)": (ct300, 1),
        "CT series 20 x 512x512, JPEG 2000 lossless (real)": (SHARED / "volumes" / "totalsegmentator" / "ct_dicom_series", 1),
    }
    lines = [
        "| unit | units per run | runs | read ms | preprocess ms | model ms | write ms | total ms per unit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (source, units) in cases.items():
        splits = []
        for _ in range(repeats):
            folder = WORK / "units" / f"{len(splits)}-{abs(hash(name)) % 10000}"
            shutil.rmtree(folder, ignore_errors=True)
            summary = run_batch(
                TaskSpec("index", model, {"library": str(folder / "lib.db")}),
                [str(source)],
                LocalEngine(),
                RunOptions(out=str(folder / "out"), library=str(folder / "lib.db"), progress=False),
            )
            splits.append(summary["run"]["ms_per_unit"])
        med = {p: statistics.median(s[p] for s in splits) for p in ("read", "preprocess", "model", "write")}
        lines.append(
            f"| {name} | {units} | {repeats} | {med['read']:.0f} | {med['preprocess']:.0f} | {med['model']:.0f} | {med['write']:.0f} "
            f"| {sum(med.values()):.0f} |"
        )
    lines += ["", "| header scan (planning) | files | s | ms per file |", "|---|---:|---:|---:|"]
    for name, source in (("CT series, 300 files of 0.5 MB", ct300), ("CR DICOM, 20 files of 10 MB", WORK / "cr")):
        start = time.perf_counter()
        units = plan_units([str(source)])
        elapsed = time.perf_counter() - start
        files = sum(len(u.members) for u in units)
        lines.append(f"| {name} | {files} | {elapsed:.2f} | {1000 * elapsed / files:.2f} |")
    lines += [
        "",
        f"The model's own resize and normalise (inside 'model'; CPU work even with a GPU): {model_side_preprocessing(model):.1f} ms per image.",
    ]
    return lines


def table(results: list[dict], baseline: dict | None, local: dict | None) -> list[str]:
    lines = [
        "| config | engine | inference path | wall s | units/s end to end | startup s (first batch) | units/s after startup "
        "| vs `medlens index` | vs local-1 | plan s | read / preprocess / model / write ms per unit | load avg before → after |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    base_rate = baseline["units"] / baseline["wall_s"] if baseline else None
    local_rate = local["units"] / local["wall_s"] if local else None
    for r in results:
        rate = r["units"] / r["wall_s"]
        s = r.get("summary")
        if s is None:
            engine, path, startup, steady, plan, split = "`medlens index` (index_paths, model loaded)", "as loaded", "—", rate, "—", "—"
        else:
            run = s["run"]
            engine, path, plan = s["engine"], ", ".join(run["inference_paths"]).replace("|", "\\|"), f"{s['plan']['plan_s']:.2f}"
            startup = f"{run['first_batch_s']:.1f}" if run["first_batch_s"] is not None else "—"
            steady = run["units_per_s_after_first_batch"] or rate
            ms = run["ms_per_unit"]
            split = " / ".join(f"{ms[p]:.1f}" for p in ("read", "preprocess", "model", "write"))
        # steady rates for engines whose workers start (pool, Ray); wall rate where the model was already loaded
        compared = steady if r["config"] not in ("index", "local-1") else rate
        vs_index = f"{compared / base_rate:.2f}x" if base_rate else "—"
        vs_local = f"{compared / local_rate:.2f}x" if local_rate else "—"
        lines.append(
            f"| {r['config']} | {engine} | {path} | {r['wall_s']:.1f} | {rate:.1f} | {startup} | {steady:.1f} | {vs_index} | {vs_local} "
            f"| {plan} | {split} | {r['before']} → {r['after']} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="real files (default 1000)")
    parser.add_argument("--model", default="medlens-clip")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--unit-repeats", type=int, default=3, help="runs per unit-cost case (0: skip that section)")
    parser.add_argument("--quiet-wait", type=float, default=30.0, help="seconds to wait for an idle machine before each configuration")
    parser.add_argument("--cli-repeats", type=int, default=3, help="cold whole-command runs of local and ray-2 (0: skip)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "batch.md"))
    args = parser.parse_args()
    import torch

    from engine.models import load_model

    WORK.mkdir(parents=True, exist_ok=True)
    files = real_files(args.n)
    listing = WORK / "files.txt"
    listing.write_text("\n".join(files) + "\n")
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    start = time.perf_counter()
    model = load_model(args.model)  # decides (and caches) the inference path for this process's thread count
    load_s = time.perf_counter() - start
    results, quiet = [], 0
    for name in args.configs:
        quiet += wait_quiet(args.quiet_wait)
        results.append(run_config(name, files, listing, args.model))
        r = results[-1]
        print(f"{name}: {r['units']} units in {r['wall_s']:.1f} s ({r['units'] / r['wall_s']:.1f}/s)", flush=True)
    by_name = {r["config"]: r for r in results}
    cli_lines = cli_runs(listing, args.model, args.cli_repeats, args.quiet_wait) if args.cli_repeats else []
    unit_lines = []
    if args.unit_repeats:
        wait_quiet(args.quiet_wait)
        unit_lines = [
            "",
            "## Cost of one unit by kind (local-1, model loaded; for docs/scaling.md)",
            "",
            *unit_costs(args.model, args.unit_repeats),
            "",
            "Read includes decoding (JPEG 2000 for the CT series); preprocess includes the model images "
            "(12 axial slices for a volume), the 128 px thumbnail and the de-identified summary; model includes "
            "the encoder's resize and normalise. The header scan reads each file's header up to the pixel data "
            "(pydicom, SeriesInstanceUID only), on the driver.",
        ]
    lines = [
        "# `medlens batch` throughput: local and Ray vs `medlens index`",
        "",
        f"- Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Command: `python bench/batch.py --n {args.n} --model {args.model}`",
        f"- CPU: {cpu_name()}, {os.cpu_count()} cores; flags: {cpu_flags()}",
        f"- `uptime` at the start: `{uptime}`; {quiet} of {len(results)} configurations started on an idle machine "
        f"(waited up to {args.quiet_wait:g} s). The machine is shared with other engineers: numbers are indicative; rerun on a quiet machine.",
        f"- torch {torch.__version__}; model `{model.model_id}` loaded in {load_s:.1f} s in this process, inference path "
        f"{model.path.name} ({model.path.reason}), {torch.get_num_threads()} threads",
        f"- Files: {args.n} real images from ../shared/data (40 % NIH ChestX-ray14 PNG 64x64, 30 % HAM10000 JPEG 224x224, "
        "30 % BUSI PNG ~256x256), each one unit; every configuration indexes all of them into a fresh library",
        "",
        *table(results, by_name.get("index"), by_name.get("local-1")),
        "",
        "- wall s: the whole run (batch: planning, reading, model, shards and library writes, and starting workers and Ray where there are some).",
        "- startup: until the first batch came back (local-1 has the model in memory already; pool and Ray workers load it,"
        " Ray starts first). units/s after startup: the rest of the run.",
        "- vs columns: the steady rate for pool and Ray (after startup), the wall rate for `medlens index` and local-1 (model already loaded).",
        "- ms per unit: summed over workers; `medlens index` has no split (it commits one transaction per scan and encodes one image per call).",
        *cli_lines,
        *unit_lines,
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
