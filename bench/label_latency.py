"""End-to-end `medlens label` latency on a 2D image and the 512x512x20 CT series, fp32 against the engine's chosen path.

    python bench/label_latency.py                               # medlens-clip and the BiomedCLIP-shaped ViT-B/16
    python bench/label_latency.py --models medlens-clip --repeats 5

Models: the shipped `medlens-clip` (ResNet-152 trunk at 96 px + MiniLM) and
BiomedCLIP's architecture (ViT-B/16 + BERT-base, 512-d) with random weights,
saved as a MedLens checkpoint folder and loaded by `local-dir:` (speed does
not depend on the weights' values).

Per model and input:
- cold: the `medlens label ... --json` command as a user runs it (a new
  process: imports, model load, inference path, read, label), wall clock,
  with MEDLENS_INFERENCE=fp32 and with the engine's choice read from a
  decision cache filled beforehand (the very first run on a machine also
  pays the probe: reported once, as "first run ever");
- warm: in one process with the model loaded, `load()` + `label_scan()`,
  the fp32 image path and the chosen one alternating per repeat (the label
  prompts' text embeddings cached, as in a warm process);
- whether the answers are equal: the same ranking of labels, and the largest
  difference of a label's probability.
The 2D image goes through batch 1, the CT series as 12 axial slices in one
batch (the CLI default), so the two rows exercise the two batch classes.
"""

from __future__ import annotations

import argparse
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

from _machine import write_result, machine_lines, uptime  # noqa: E402
from _setup import add_out_option, fresh_fastpath_cache  # noqa: E402


def biomedclip_folder() -> Path:
    folder = WORK / "biomedclip_shape_ckpt"
    if (folder / "model.safetensors").is_file():
        return folder
    from _biomedclip_shape import biomedclip_shaped

    from engine.models.checkpoint import architecture, save_checkpoint

    clip, text_dir = biomedclip_shaped(seed=0, text_dir=WORK / "bert_base_text")
    arch = architecture("biomedclip-vit-b16")
    save_checkpoint(
        clip.model,
        folder,
        model_cfg=arch["model_cfg"],
        preprocess_cfg=arch["preprocess_cfg"],
        text_tower=text_dir,
        card="# BiomedCLIP-shaped, random weights\n\nFor latency benchmarks only.\n",
    )
    return folder


def source_of(name: str) -> str:
    return f"local-dir:{biomedclip_folder()}" if name == "biomedclip-shape" else name


def inputs() -> dict[str, tuple[Path, list[str]]]:
    if not SHARED.is_dir():
        raise SystemExit(f"needs {SHARED} (real images)")
    xray = sorted((SHARED / "xray" / "nih_cxr14_1000" / "images").glob("*.png"))[0]
    return {
        "2D chest X-ray (PNG)": (xray, XRAY_LABELS),
        "CT series 512x512x20 (DICOM, JPEG 2000)": (SHARED / "volumes" / "totalsegmentator" / "ct_dicom_series", CT_LABELS),
    }


def cold(path: Path, labels: list[str], model: str, mode: str) -> float:
    cmd = [sys.executable, "-m", "engine.cli", "label", str(path), "--labels", *labels, "--model", model, "--json"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MEDLENS_INFERENCE", None)
    if mode == "fp32":
        env["MEDLENS_INFERENCE"] = "fp32"
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"medlens label failed: {proc.stderr[-2000:]}")
    return elapsed


def warm(model_source: str, items: dict, repeats: int) -> tuple[dict, str]:
    """{input: {mode: [s], 'equal': bool, 'max_dp': float, 'path': str}} and the chosen path's description."""
    from engine.io import load
    from engine.models import fastpath, load_model
    from engine.models.clip import InferencePath
    from engine.zeroshot import label_scan

    clip = load_model(model_source)  # the engine's choice, from the cache the cold runs filled
    auto = (clip.path, clip._image_forward, clip._text_forward)
    described = fastpath.describe(clip)
    setups = {"fp32": (InferencePath("fp32", "reference"), clip.model.encode_image), "auto": auto[:2]}
    out = {}
    for name, (path, labels) in items.items():
        times = {m: [] for m in setups}
        results = {}
        for i in range(repeats + 1):
            for mode, setup in setups.items():
                # only the image path changes: set_inference would clear the text cache, and re-encoding the
                # label prompts each repeat is not what a warm process does (text is fp32 on every path)
                clip.path, clip._image_forward = setup
                start = time.perf_counter()
                scan = load([path]).scans[0]
                results[mode] = label_scan(scan, labels, clip)
                if i:  # the first call warms caches (text embeddings of the label set) and kernels
                    times[mode].append(time.perf_counter() - start)
        ref, got = results["fp32"], results["auto"]
        p_ref = {s.label: s.probability for s in ref.labels}
        out[name] = {
            **times,
            "equal": [s.label for s in ref.labels] == [s.label for s in got.labels],
            "max_dp": max(abs(s.probability - p_ref[s.label]) for s in got.labels),
            "path": got.inference_path,
        }
    clip.set_inference(*auto)
    return out, described


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="medlens-clip,biomedclip-shape")
    parser.add_argument("--repeats", type=int, default=3)
    add_out_option(parser, "label_latency.md")
    args = parser.parse_args()
    import torch

    cache = fresh_fastpath_cache("medlens-label-bench-")
    load_before = uptime()
    items = inputs()
    lines = (
        ["# `medlens label` end-to-end latency: fp32 vs the engine's chosen path", ""]
        + machine_lines()
        + [
            f"- torch {torch.__version__}, {torch.get_num_threads()} threads",
            f"- command: `python bench/label_latency.py --models {args.models} --repeats {args.repeats}`",
            "- volumes: 12 axial slices sampled and aggregated (the CLI default): one batch of 12; the 2D image: batch 1",
            "",
            "| model | input | path run | cold CLI fp32 median (min) s | cold CLI auto median (min) s | warm fp32 median s | warm auto median s | warm speed-up | same ranking | max prob. diff |",
            "|---|---|---|---:|---:|---:|---:|---:|---|---:|",
        ]
    )
    notes = []
    for model_name in [m.strip() for m in args.models.split(",") if m.strip()]:
        source = source_of(model_name)
        first_path, (first_input, first_labels) = next(iter(items.items()))
        first_ever = cold(first_input, first_labels, source, "auto")  # empty cache: probes and exports
        colds = {
            name: {m: [cold(p, labels, source, m) for _ in range(args.repeats)] for m in ("fp32", "auto")}
            for name, (p, labels) in items.items()
        }
        warms, described = warm(source, items, args.repeats)
        notes.append(
            f"- {model_name}: chosen path {described}; the first `medlens label` on this machine (empty decision cache: "
            f"probe + exports) took {first_ever:.1f} s"
        )
        for name in items:
            c, w = colds[name], warms[name]
            wf, wa = statistics.median(w["fp32"]), statistics.median(w["auto"])
            lines.append(
                f"| {model_name} | {name} | {w['path']} | {statistics.median(c['fp32']):.2f} ({min(c['fp32']):.2f}) | "
                f"{statistics.median(c['auto']):.2f} ({min(c['auto']):.2f}) | {wf:.3f} | {wa:.3f} | {wf / wa:.2f}x | "
                f"{'yes' if w['equal'] else '**no**'} | {w['max_dp']:.4f} |"
            )
            print(lines[-1], flush=True)
    lines += [
        "",
        *notes,
        f"- load: before `{load_before}`; after `{uptime()}`",
        "",
        "cold = a new `medlens label --json` process (imports, model load, inference path from the decision cache, read, label);",
        "warm = model already loaded in the process: read + preprocess + encode + score, fp32 and auto alternating.",
        "",
    ]
    write_result(args.out, lines)
    cache.cleanup()


if __name__ == "__main__":
    main()
