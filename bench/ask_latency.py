"""Ask-the-scan latency: the first answer on a scan (load, preprocess, encode, answer) and each further question.

Inputs: the 512x512x20 CT DICOM series and the 181x217x181 Colin27 brain MRI
from ../shared/data, plus one 2D image. "Warm" means the Q-Former and the
frozen encoder are loaded (the app's and a long CLI run's steady state);
the scan itself is new each repeat (its encoding cache is cleared), so a
first answer always pays for reading and encoding.

    python bench/ask_latency.py [--model medlens-qformer] [--repeats 3] [--threads 2]

Writes bench/results/ask_latency.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
SHARED = Path(os.environ.get("MEDLENS_SHARED_DATA", REPO.parent / "shared" / "data"))

from _machine import cpu_name, loadavg, rss_mb, wait_quiet  # noqa: E402

INPUTS = {
    "CT series 512x512x20 (DICOM, JPEG 2000)": ("volumes/totalsegmentator/ct_dicom_series", ["Is the liver visible?", "Which modality is this?", "Is the left kidney visible?", "Which organs are in view?"]),
    "brain MRI 181x217x181 (NIfTI)": ("volumes/mricron_atlas/ch2.nii.gz", ["Which body region is this?", "Is the cerebellum visible?", "Which modality is this?", "Which organs are in view?"]),
    "chest X-ray 2D (PNG)": ("xray/nih_cxr14_1000", ["Is there pneumonia?", "Which modality is this?", "Is this image abnormal?", "Which organs are in view?"]),
}


def first_file(path: Path) -> Path:
    return next(p for p in sorted(path.rglob("*.png"))) if path.is_dir() and "xray" in str(path) else path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="medlens-qformer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from engine.ask.model import load_ask_model
    from engine.io import load_one
    from engine.models import i3resnet

    t0 = time.perf_counter()
    model = load_ask_model(args.model)
    i3resnet.load_astra_i3resnet()
    i3resnet.load_astra_deflated_2d()
    load_s = time.perf_counter() - t0
    rows = []
    for name, (rel, questions) in INPUTS.items():
        path = first_file(SHARED / rel)
        firsts, parts, further = [], [], []
        for r in range(args.repeats + 1):  # repeat 0 warms the kernels for this input shape
            wait_quiet(20)
            model._cache.clear()
            t = time.perf_counter()
            scan, _ = load_one([str(path)])
            t_load = time.perf_counter()
            tokens_t = time.perf_counter()
            answer = model.ask(scan, questions[0])
            t_first = time.perf_counter()
            times = []
            for q in questions[1:]:
                s = time.perf_counter()
                model.ask(scan, q)
                times.append(time.perf_counter() - s)
            if r:
                firsts.append(t_first - t)
                parts.append((t_load - t, t_first - tokens_t))
                further.append(max(times))
        rows.append((name, "x".join(map(str, scan.voxels.shape)), statistics.median(firsts), statistics.median(p[0] for p in parts),
                     statistics.median(p[1] for p in parts), statistics.median(further), answer.answer))
    lines = [
        "# Ask latency (bench/ask_latency.py)",
        "",
        f"Date: {dt.date.today()}; CPU: {cpu_name()}; torch {torch.__version__}, {args.threads} threads; model {args.model};",
        f"load average at the end {loadavg()}; peak RSS {rss_mb():.0f} MB. One-off model + encoder load: {load_s:.1f} s.",
        f"Median of {args.repeats} repeats (after one warm-up per input). Targets: first answer <= 5 s warm, each further question <= 0.3 s.",
        "",
        "| input | voxels | first answer (s) | of which read (s) | of which preprocess+encode+answer (s) | slowest further question (s) | first answer given |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, shape, first, read, rest, more, ans in rows:
        lines.append(f"| {name} | {shape} | {first:.2f} | {read:.2f} | {rest:.2f} | {more:.3f} | {ans} |")
    out = REPO / "bench" / "results" / "ask_latency.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
