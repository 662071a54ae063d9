"""End-to-end `medlens label` latency: one 2D image and the 512x512x20 CT series.

Model: BiomedCLIP's architecture (ViT-B/16 + BERT-base, 512-d) with random
weights, saved as a MedLens checkpoint folder and loaded by `local-dir:`, so
the timing covers exactly what a user's BiomedCLIP-sized model costs (speed
does not depend on the weights' values).

Two numbers per input:
- cold: the `medlens label ... --json` command as a user runs it (new process:
  imports, model load, fast-path probe, read, label), wall clock;
- warm: in one process with the model loaded, `load()` + `label_scan()`.

    python bench/label_latency.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
SHARED = Path(os.environ.get("MEDLENS_SHARED_DATA", REPO.parent / "shared" / "data"))
WORK = REPO / "bench" / "work"

XRAY_LABELS = ["pneumonia", "pleural effusion", "cardiomegaly", "no finding"]
CT_LABELS = ["liver", "lung", "kidney", "spleen"]

from _machine import cpu_flags, cpu_name  # noqa: E402


def model_folder() -> Path:
    folder = WORK / "biomedclip_shape_ckpt"
    if (folder / "model.safetensors").is_file():
        return folder
    from _biomedclip_shape import biomedclip_shaped

    from engine.models.checkpoint import architecture, save_checkpoint

    clip, text_dir = biomedclip_shaped(seed=0, text_dir=WORK / "bert_base_text")
    arch = architecture("biomedclip-vit-b16")
    save_checkpoint(clip.model, folder, model_cfg=arch["model_cfg"], preprocess_cfg=arch["preprocess_cfg"], text_tower=text_dir,
                    card="# BiomedCLIP-shaped, random weights\n\nFor latency benchmarks only.\n")
    return folder


def inputs() -> dict[str, tuple[Path, list[str]]]:
    if not SHARED.is_dir():
        raise SystemExit(f"needs {SHARED} (real images)")
    xray = sorted((SHARED / "xray" / "nih_cxr14_1000" / "images").glob("*.png"))[0]
    return {
        "2D chest X-ray (PNG)": (xray, XRAY_LABELS),
        "CT series 512x512x20 (DICOM, JPEG 2000)": (SHARED / "volumes" / "totalsegmentator" / "ct_dicom_series", CT_LABELS),
    }


def cold(path: Path, labels: list[str], model: str) -> float:
    exe = Path(sys.executable).parent / "medlens"
    cmd = [str(exe), "label", str(path), "--labels", *labels, "--model", model, "--json"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"medlens label failed: {proc.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "label_latency.md"))
    args = parser.parse_args()
    import torch

    from engine.io import load
    from engine.models import load_model
    from engine.zeroshot import label_scan

    source = f"local-dir:{model_folder()}"
    rows = []
    for name, (path, labels) in inputs().items():
        colds = [cold(path, labels, source) for _ in range(args.repeats)]
        model = load_model(source)
        warms = []
        for i in range(args.repeats + 1):
            start = time.perf_counter()
            scan = load([path]).scans[0]
            label_scan(scan, labels, model)
            if i:  # first call warms caches (text embeddings of the label set)
                warms.append(time.perf_counter() - start)
        rows.append((name, statistics.median(colds), min(colds), statistics.median(warms), min(warms)))
        print(f"{name}: cold median {rows[-1][1]:.2f} s, warm median {rows[-1][3]:.2f} s", flush=True)
    path_name = f"{model.path.name} ({model.path.reason})"
    lines = [
        "# `medlens label` end-to-end latency",
        "",
        f"- Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Command: `python bench/label_latency.py --repeats {args.repeats}`",
        f"- CPU: {cpu_name()}, {os.cpu_count()} cores; flags: {cpu_flags()}",
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads; inference path chosen: {path_name}",
        "- Model: BiomedCLIP architecture (ViT-B/16 + BERT-base, 512-d), random weights, `local-dir:` checkpoint",
        "- Volumes: 12 axial slices sampled and aggregated (the CLI default)",
        "",
        "| input | cold CLI median s | cold min s | warm median s | warm min s |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {n} | {a:.2f} | {b:.2f} | {c:.2f} | {d:.2f} |" for n, a, b, c, d in rows]
    lines += [
        "",
        "cold = a new `medlens label --json` process (imports, model load, inference-path probe, read, label);",
        "warm = model already loaded in the process: read + preprocess + encode + score.",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
