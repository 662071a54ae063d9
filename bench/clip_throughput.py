"""Image-embedding throughput: open_clip's plain fp32 `encode_image` vs the engine's chosen path.

    python bench/clip_throughput.py                 # 16 real images, batch 1 and 16, 5 repeats
    python bench/clip_throughput.py --repeats 9 --threads 2 --quiet-wait 0

Model: BiomedCLIP-shaped (timm ViT-B/16 224 px + BERT-base, context 256),
random weights (bench/_biomedclip_shape.py): speed does not depend on the
weights. Images: real images from ../shared/data (4 modalities), decoded once;
synthetic ones with --no-shared or when the folder is absent.

Both sides do the same work on the same images in the same process: the
engine's preprocessing (`ClipModel.image_tensor`), then
- baseline: `model.encode_image(pixels)` under `torch.no_grad()`, fp32, as
  open_clip's README runs it, then L2-normalised;
- engine: `ClipModel.encode_images(images, batch_size=b)` after
  `engine.models.fastpath.apply_best` chose a path on this machine.
Repeats alternate baseline and engine (so other load on the machine hits both
alike); the table gives the median and the minimum per image. It also gives
the cosine between the two sides' embeddings, what the path choice cost at
load (cold: empty cache, including any ONNX export; warm: decision and
exported model read from the cache), the CPU model and flags, versions,
threads and the load average around the run.

Other work on the machine slows torch's fp32 forward far more than ONNX
Runtime's (measured here: fp32 batch 1 went from ~210 to ~1600 ms/img while
another 2-thread job ran, the ONNX Runtime int8 path from ~95 to ~270), which
would inflate the speed-up; so each timed pass first waits (--quiet-wait,
default 30 s) until no other thread on the machine has been runnable for a
second, and the table says how many passes started on an idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SHARED = Path(os.environ.get("MEDLENS_SHARED_DATA", REPO.parent / "shared" / "data"))
PICKS = [
    ("xray/nih_cxr14_1000/images", "*.png"),
    ("ultrasound/busi/images", "*/*.png"),
    ("pathology/lc25000_lung/images", "*.jpeg"),
    ("dermatology/ham10000/images", "*.jpg"),
]

from _machine import loadavg, wait_quiet  # noqa: E402


def load_images(n: int, use_shared: bool) -> tuple[list[np.ndarray], str]:
    from PIL import Image

    if use_shared and SHARED.is_dir():
        per = max(1, -(-n // len(PICKS)))
        images = []
        for folder, pattern in PICKS:
            files = [f for f in sorted((SHARED / folder).glob(pattern)) if "mask" not in f.name][:per]
            images += [np.asarray(Image.open(f).convert("RGB")) for f in files]
        if len(images) >= n:
            return images[:n], f"{n} real images from ../shared/data ({', '.join(p.split('/')[0] for p, _ in PICKS)})"
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(n)], f"{n} synthetic 512x512 RGB images"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=16, help="images per run (batch 16 uses them as one batch)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: what the engine sets)")
    p.add_argument("--no-shared", action="store_true", help="synthetic images instead of ../shared/data")
    p.add_argument("--quiet-wait", type=float, default=30.0,
                   help="before each timed pass wait up to this many seconds for other work on the machine to pause (0: never wait)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "clip_throughput.md"))
    args = p.parse_args(argv)

    if args.threads:
        os.environ["MEDLENS_THREADS"] = str(args.threads)
    cache = tempfile.TemporaryDirectory(prefix="medlens-fastpath-bench-")
    os.environ["MEDLENS_FASTPATH_CACHE"] = cache.name  # cold start: the probe and any export are timed

    from _biomedclip_shape import biomedclip_shaped

    from engine.models import fastpath
    from engine.models.clip import InferencePath
    from engine.models.cpu import cpu_profile

    load_before = loadavg()
    images, image_note = load_images(args.images, not args.no_shared)
    clip, _ = biomedclip_shaped(seed=0)
    model = clip.model

    t = time.perf_counter()
    path = fastpath.apply_best(clip)
    cold_s = time.perf_counter() - t
    chosen, cold_description = path, fastpath.describe(clip)
    t = time.perf_counter()
    warm = fastpath.apply_best(clip)  # as the next process would: decision and export from the cache
    warm_s = time.perf_counter() - t
    if warm.name != chosen.name:
        print(f"warning: the cached decision ({warm.name}) differs from the probe's ({chosen.name})", file=sys.stderr)
    threads = torch.get_num_threads()
    print(f"path: {cold_description} (cold {cold_s:.1f} s, warm {warm_s:.1f} s)", flush=True)

    def baseline(batch: list[np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            feats = model.encode_image(clip.image_tensor(batch))
        return torch.nn.functional.normalize(feats, dim=-1).numpy()

    def engine(batch: list[np.ndarray], b: int) -> np.ndarray:
        return clip.encode_images(batch, batch_size=b)

    rows = []
    cosines = {}
    passes = busy = 0
    for b in (1, 16):
        chunks = [images[i : i + b] for i in range(0, len(images), b)]
        # warm-up + parity on the same images
        ref = np.concatenate([baseline(c) for c in chunks])
        out = np.concatenate([engine(c, b) for c in chunks])
        cosines[b] = float((ref * out).sum(1).min())
        times: dict[str, list[float]] = {"fp32": [], "engine": []}
        for _ in range(args.repeats):
            for side in ("fp32", "engine"):
                if args.quiet_wait:
                    passes += 1
                    busy += not wait_quiet(args.quiet_wait)
                start = time.perf_counter()
                for c in chunks:
                    baseline(c) if side == "fp32" else engine(c, b)
                times[side].append((time.perf_counter() - start) * 1000 / len(images))
        med = {k: statistics.median(v) for k, v in times.items()}
        low = {k: min(v) for k, v in times.items()}
        rows.append((b, med, low))
        print(f"batch {b:2d}: fp32 {med['fp32']:.1f} ms/img (min {low['fp32']:.1f}), engine {med['engine']:.1f} (min {low['engine']:.1f}), "
              f"{med['fp32'] / med['engine']:.2f}x, cosine {cosines[b]:.5f}", flush=True)
    # text: a label set, uncached (the engine's cache would make repeats free)
    labels = ["pneumonia", "a normal chest x-ray", "a benign breast mass on ultrasound", "a malignant breast tumour",
              "lung adenocarcinoma", "benign lung tissue", "melanoma", "a melanocytic nevus"]
    text_times: dict[str, list[float]] = {"fp32": [], "engine": []}
    with torch.no_grad():
        text_ref = torch.nn.functional.normalize(model.encode_text(clip.tokenizer(labels)), dim=-1).numpy()
    clip._text_cache.clear()
    text_cos = float((text_ref * clip.encode_texts(labels)).sum(1).min())
    for _ in range(max(2, args.repeats // 2)):
        start = time.perf_counter()
        with torch.no_grad():
            model.encode_text(clip.tokenizer(labels))
        text_times["fp32"].append((time.perf_counter() - start) * 1000 / len(labels))
        clip._text_cache.clear()
        start = time.perf_counter()
        clip.encode_texts(labels)
        text_times["engine"].append((time.perf_counter() - start) * 1000 / len(labels))
    text_med = {k: statistics.median(v) for k, v in text_times.items()}
    print(f"text: fp32 {text_med['fp32']:.1f} ms/label, engine {text_med['engine']:.1f}, cosine {text_cos:.6f}", flush=True)
    load_after = loadavg()

    profile = cpu_profile()
    versions = fastpath._versions()
    probe = chosen.details.get("probe") or {}
    lines = [
        "# CLIP image-embedding throughput: open_clip fp32 vs the engine's chosen path",
        "",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- CPU: {profile.model} ({platform.machine()}), {profile.cores} physical cores usable, torch kernels: {profile.capability}",
        f"- CPU flags of interest: {' '.join(sorted(profile.flags)) or 'none read'}",
        f"- versions: python {platform.python_version()}, " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- threads: {threads} (torch); model: BiomedCLIP-shaped ViT-B/16 224 px + BERT-base, random weights",
        f"- images: {image_note}; {args.repeats} repeats, baseline and engine alternating; load average before {load_before}, after {load_after}"
        + (f"; each timed pass waited (up to {args.quiet_wait:.0f} s) for other work to pause: {passes - busy} of {passes} started on an idle machine" if passes else ""),
        f"- chosen path: **{chosen.name}** — {cold_description}",
        f"- why: {chosen.reason}",
        f"- cost of choosing at load: {cold_s:.1f} s cold (probe{', ONNX export + quantisation' if 'onnx-int8' in probe else ''}), {warm_s:.1f} s warm (cached decision)",
        "",
        "| batch | open_clip fp32 encode_image, ms/img (median / min) | engine, ms/img (median / min) | speed-up (median) | min cosine engine vs fp32 |",
        "|---:|---:|---:|---:|---:|",
    ]
    for b, med, low in rows:
        lines.append(
            f"| {b} | {med['fp32']:.1f} / {low['fp32']:.1f} | {med['engine']:.1f} / {low['engine']:.1f} | "
            f"{med['fp32'] / med['engine']:.2f}x | {cosines[b]:.5f} |"
        )
    slower = [b for b, med, _ in rows if med["engine"] > med["fp32"]]
    lines += ["", "Both columns include the engine's preprocessing (PIL resize + crop + normalise) of the same decoded images."]
    if slower:
        lines.append(f"**The engine was slower than fp32 at batch {', '.join(map(str, slower))} in this run.**")
    if probe:
        lines += [
            "",
            "Probe at load (synthetic images, minimum of interleaved repeats, ms/img):",
            "",
            "| path | batch 1 | batch 4 | speed-up (1 / 4) | cosine | build s | status |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for name, r in probe.items():
            ms, sp = r.get("ms_per_image", {}), r.get("speedup", {})
            lines.append(
                f"| {name} | {ms.get('1', '')} | {ms.get('4', '')} | {sp.get('1', '')} / {sp.get('4', '')} | "
                f"{r.get('cos_image', '')} | {r.get('build_s', '')} | {r.get('status', '')} |"
            )
    lines += [
        "",
        f"Text, {len(labels)} labels uncached: open_clip fp32 `encode_text` (padded to context 256) "
        f"{text_med['fp32']:.1f} ms/label, engine {text_med['engine']:.1f} ms/label "
        f"({text_med['fp32'] / text_med['engine']:.1f}x; {chosen.details.get('text', '')}), min cosine {text_cos:.6f}. "
        "Repeated labels come from the engine's text cache.",
        "",
        "Re-run: `python bench/clip_throughput.py` (options: --repeats, --images, --threads, --quiet-wait, --no-shared).",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")
    clip.set_inference(InferencePath())
    cache.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
