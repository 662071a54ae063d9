"""The CLIP's frozen trunk (deflated Astra ResNet-152): ms per image at 96, 160 and 224 px, fp32 vs bf16 autocast,
and the cosine of bf16 features to fp32 (is bf16 good enough for training.view_cache?).

    python bench/clip_trunk.py [--n 32] [--sizes 96 160 224]    # -> bench/results/clip_trunk.md

Real model images: the first --n rows of a manifest (default runs/manifest.jsonl, built by training.recipes)
through training.manifest.PixelLoader (the engine's 448 px model image), resized by ImagePreprocess.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._machine import cpu_flags, cpu_name, loadavg  # noqa: E402


def measure(trunk, x: torch.Tensor, bf16: bool, repeats: int = 2) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            if bf16:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = trunk(x).float()
            else:
                out = trunk(x)
            best = min(best, time.perf_counter() - t0)
    return best / len(x) * 1000, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--manifest", default="runs/manifest.jsonl")
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--sizes", type=int, nargs="+", default=[96, 160, 224])
    p.add_argument("--out", default="bench/results/clip_trunk.md")
    a = p.parse_args(argv)
    from engine.models.preprocess import ImagePreprocess
    from training.manifest import PixelLoader, read_manifest
    from training.towers.astra2d import ASTRA_PREPROCESS, deflated_resnet152

    rows = read_manifest(a.manifest, splits=["test"])
    rows = [rows[i] for i in np.linspace(0, len(rows) - 1, a.n).astype(int)]
    loader = PixelLoader(a.data_root)
    images = [loader.pixels448(r) for r in rows]
    trunk = deflated_resnet152().eval()
    lines = [
        f"# CLIP trunk: deflated Astra ResNet-152, ms per image (batch {a.n})",
        "",
        f"{datetime.now(timezone.utc).date()}, {cpu_name()} ({cpu_flags()}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"load average at start {loadavg()}.",
        "",
        "| input px | fp32 ms/img | bf16 ms/img | speed-up | min cosine bf16 vs fp32 | mean cosine |",
        "|---|---|---|---|---|---|",
    ]
    for size in a.sizes:
        pre = ImagePreprocess(size, ASTRA_PREPROCESS["mean"], ASTRA_PREPROCESS["std"])
        x = pre(images)
        measure(trunk, x[:2], True, 1)  # warm-up (oneDNN kernels)
        t32, f32 = measure(trunk, x, False)
        tb, fb = measure(trunk, x, True)
        cos = torch.nn.functional.cosine_similarity(f32, fb)
        lines.append(f"| {size} | {t32:.1f} | {tb:.1f} | {t32 / tb:.2f}x | {cos.min():.5f} | {cos.mean():.5f} |")
        print(lines[-1], flush=True)
    lines += ["", f"Load average at the end {loadavg()} (the machine is shared: compare rows of one run, not runs)."]
    Path(a.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
