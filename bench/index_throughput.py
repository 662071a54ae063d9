"""Library indexing throughput with a shipped CLIP, fp32 against the engine's chosen path, on real scans.

    python bench/index_throughput.py                         # medlens-clip, 48 real 2D images + 2 volumes, 3 repeats
    python bench/index_throughput.py --model medlens-clip --images 96 --repeats 5

`engine.library.index_paths` into a fresh SQLite library per pass: 2D images
from ../shared/data (x-ray, ultrasound, histology, dermoscopy, fundus) go one
scan at a time (batch 1: each is its own scan), volumes (the 512x512x20 CT
series and the 181x217x181 brain MRI) as 12 axial slices in one batch, so
both batch classes of the engine's choice run. fp32 and the chosen path
alternate per repeat in one process (other load hits both alike); the table
gives scans/s (median, best), process CPU seconds, and how close the stored
embeddings of the two runs are (minimum cosine over scans).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
VOLUMES = ["volumes/totalsegmentator/ct_dicom_series", "volumes/mricron_atlas/ch2.nii.gz"]

from _machine import write_result, machine_lines, uptime  # noqa: E402
from _real_images import SHARED, real_image_files  # noqa: E402
from _setup import add_out_option, fresh_fastpath_cache  # noqa: E402


def picks(n_images: int) -> dict[str, list[Path]]:
    images = real_image_files(n_images)
    return {f"{len(images[:n_images])} 2D images": images[:n_images], f"{len(VOLUMES)} volumes": [SHARED / v for v in VOLUMES]}


def index_once(paths: list[Path], model) -> tuple[float, float, dict]:
    """(wall s, CPU s, {scan hash: embedding}) of indexing `paths` into a new library."""
    import numpy as np

    from engine.library import index_paths
    from engine.library.db import connect

    folder = Path(tempfile.mkdtemp(prefix="medlens-index-bench-"))
    try:
        t, c = time.perf_counter(), time.process_time()
        report = index_paths(paths, folder / "library.db", model)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        if report.failed or report.added != len(paths):
            raise SystemExit(f"indexing failed: {report.line()} {report.failed[:3]}")
        with connect(folder / "library.db") as db:
            rows = {r["id"]: r["content_hash"] for r in db["scans"].rows}
            vecs = {rows[r["scan_id"]]: np.frombuffer(r["vector"], dtype=np.float32) for r in db["embeddings"].rows}
        return wall, cpu, vecs
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medlens-clip")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    add_out_option(parser, "index_throughput.md")
    args = parser.parse_args()
    import numpy as np
    import torch

    cache = fresh_fastpath_cache("medlens-index-bench-cache-")
    from engine.models import fastpath, load_model
    from engine.models.clip import InferencePath

    load_before = uptime()
    t = time.perf_counter()
    clip = load_model(args.model)
    load_s = time.perf_counter() - t
    auto = (clip.path, clip._image_forward, clip._text_forward)
    setups = {"fp32": (InferencePath("fp32", "reference"), None, None), "auto": auto}
    rows = []
    for label, paths in picks(args.images).items():
        times = {m: [] for m in setups}
        cpus = {m: [] for m in setups}
        vecs = {}
        for i in range(args.repeats + 1):
            for mode, setup in setups.items():
                clip.set_inference(*setup)
                wall, cpu, vecs[mode] = index_once(paths, clip)
                if i:  # the first pass warms kernels and caches
                    times[mode].append(wall)
                    cpus[mode].append(cpu)
        cos = min(
            float(np.dot(vecs["fp32"][k], vecs["auto"][k]) / np.linalg.norm(vecs["fp32"][k]) / np.linalg.norm(vecs["auto"][k]))
            for k in vecs["fp32"]
        )
        n = len(paths)
        row = {
            "input": label,
            "n": n,
            **{f"{m}_rate": n / statistics.median(v) for m, v in times.items()},
            **{f"{m}_best": n / min(v) for m, v in times.items()},
            **{f"{m}_cpu": min(v) for m, v in cpus.items()},
            "cos": cos,
            "path": auto[0].name_for(1 if "2D" in label else 12),
        }
        rows.append(row)
        print(row, flush=True)
    clip.set_inference(*auto)
    lines = (
        [f"# Library indexing throughput: {args.model}, fp32 vs the engine's chosen path", ""]
        + machine_lines()
        + [
            f"- torch {torch.__version__}, {torch.get_num_threads()} threads; model load + path choice (empty cache) {load_s:.1f} s",
            f"- engine's choice: {fastpath.describe(clip)}",
            f"- load: before `{load_before}`; after `{uptime()}`",
            f"- command: `python bench/index_throughput.py --model {args.model} --images {args.images} --repeats {args.repeats}`",
            "",
            "| input | scans | path run | fp32 scans/s median (best) | auto scans/s median (best) | speed-up | CPU s fp32 / auto | min cosine of stored embeddings |",
            "|---|---:|---|---:|---:|---:|---:|---:|",
        ]
    )
    for r in rows:
        lines.append(
            f"| {r['input']} | {r['n']} | {r['path']} | {r['fp32_rate']:.2f} ({r['fp32_best']:.2f}) | {r['auto_rate']:.2f} ({r['auto_best']:.2f}) | "
            f"{r['auto_rate'] / r['fp32_rate']:.2f}x | {r['fp32_cpu']:.1f} / {r['auto_cpu']:.1f} | {r['cos']:.6f} |"
        )
    lines += [
        "",
        "Each pass indexes into a new library (reading, de-identifying, thumbnails, embedding, SQLite writes): the rate is what "
        "`medlens index` achieves, not the model alone.",
        "",
    ]
    write_result(args.out, lines, echo=True)
    cache.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
