"""Image-embedding throughput of a CLIP image tower: open_clip fp32 vs the engine's chosen path(s), and every path.

    python bench/clip_throughput.py                        # BiomedCLIP-shaped ViT-B/16 (the issue's gates)
    python bench/clip_throughput.py --model medlens-clip   # the shipped CLIP (ResNet-152 trunk at 96 px)
    python bench/clip_throughput.py --repeats 9 --quiet-wait 30 --threads 2

Models: `biomedclip-shape` is BiomedCLIP's architecture (timm ViT-B/16 224 px +
BERT-base, context 256) with random weights (bench/_biomedclip_shape.py; speed
does not depend on the weights); `medlens-clip` is the shipped default with
its real weights. Images: 16 real images from ../shared/data (x-ray,
ultrasound, histology, dermoscopy), decoded once; synthetic with --no-shared.

Three parts, one process, the same images:
1. the engine's choice: `engine.models.fastpath.apply_best` on an empty
   decision cache (cold: the probe and every export are timed), then again
   (warm: what the next process pays);
2. the gates: open_clip's plain fp32 `model.encode_image` under no_grad
   (as its README runs it) against `ClipModel.encode_images(images,
   batch_size=b)` at batch 1, 12 and 16, both with the engine's
   preprocessing of the same decoded images; repeats alternate the two sides
   (so other load hits both alike), median and minimum wall ms/img, process
   CPU ms/img as a cross-check, and whether the answers are equal: minimum
   cosine, and label-order flips (pairs of 8 labels that fp32 separates by
   more than 0.01 in cosine and the engine reverses);
3. every path the engine knows (`--paths`), forced, the image tower alone
   on the preprocessed pixels at batch 1, 12 and 16, interleaved with fp32:
   what each costs and whether it keeps the answer, so a path that lost
   shows by how much.
The gates of the machine's CPU class (bench/_machine.py) are checked at the end.

Other work on the machine slows torch's fp32 far more than ONNX Runtime's or
OpenVINO's (torch's OpenMP threads wait for each other at every operator), so
speed-ups measured on a busy machine overstate what an idle one gets: each
timed pass of part 2 first waits (--quiet-wait, default 10 s) for the machine
to be quiet, the table says how many passes started quiet, and the load
(`uptime`) is recorded before and after.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

LABELS = [
    "pneumonia",
    "a normal chest x-ray",
    "a benign breast mass on ultrasound",
    "a malignant breast tumour",
    "lung adenocarcinoma",
    "benign lung tissue",
    "melanoma",
    "a melanocytic nevus",
]
BATCHES = (1, 12, 16)

from _machine import SHIPPED_GATE, VIT_GATES, cpu_class, loadavg, machine_lines, uptime, wait_quiet  # noqa: E402
from _real_images import IMAGE_FOLDERS, SHARED, real_image_files  # noqa: E402
from _setup import fresh_fastpath_cache  # noqa: E402

PICKS = IMAGE_FOLDERS[:4]  # x-ray, ultrasound, histology, dermoscopy: the images LABELS above describe


def load_images(n: int, use_shared: bool) -> tuple[list[np.ndarray], str]:
    from PIL import Image

    if use_shared and SHARED.is_dir():
        images = [np.asarray(Image.open(f).convert("RGB")) for f in real_image_files(n, PICKS)]
        if len(images) >= n:
            return images[:n], f"{n} real images from ../shared/data ({', '.join(p.split('/')[0] for p, _ in PICKS)})"
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(n)], f"{n} synthetic 512x512 RGB images"


def load_clip(name: str):
    if name == "biomedclip-shape":
        from _biomedclip_shape import biomedclip_shaped

        clip, _ = biomedclip_shaped(seed=0)
        return clip, "BiomedCLIP-shaped ViT-B/16 224 px + BERT-base, random weights"
    from engine.models import load_model

    clip = load_model(name, fast=False)
    return (
        clip,
        f"{name} (shipped weights), image tower {sum(p.numel() for p in clip.model.visual.parameters()) / 1e6:.1f} M parameters at {clip.image_size} px",
    )


def normed(x) -> np.ndarray:
    x = torch.as_tensor(x).float()
    return torch.nn.functional.normalize(x, dim=-1).numpy()


def agreement(ref: np.ndarray, out: np.ndarray, text: np.ndarray) -> tuple[float, float, int]:
    """(min cosine, median cosine, label-order flips beyond fastpath.LABEL_TAU) of out vs ref."""
    from engine.models.fastpath import order_flips

    cos = (normed(ref) * normed(out)).sum(1)
    return float(cos.min()), float(np.median(cos)), order_flips(normed(ref) @ text.T, normed(out) @ text.T)


def engine_choice(clip) -> dict:
    from engine.models import fastpath

    t = time.perf_counter()
    path = fastpath.apply_best(clip)
    cold_s = time.perf_counter() - t
    cold = fastpath.describe(clip)
    t = time.perf_counter()
    warm = fastpath.apply_best(clip)  # as the next process would: decision and exports from the cache
    warm_s = time.perf_counter() - t
    if warm.name != path.name:
        print(f"warning: the cached decision ({warm.name}) differs from the probe's ({path.name})", file=sys.stderr)
    print(f"path: {cold} (cold {cold_s:.1f} s, warm {warm_s:.1f} s)", flush=True)
    return {"path": path, "describe": cold, "cold_s": cold_s, "warm_s": warm_s}


def gate_rows(clip, images, text, repeats: int, quiet_wait: float) -> tuple[list[dict], int, int]:
    """Part 2: open_clip fp32 vs the engine at each batch size."""
    model = clip.model

    def baseline(batch):
        with torch.no_grad():
            return normed(model.encode_image(clip.image_tensor(batch)))

    rows, passes, busy = [], 0, 0
    for b in BATCHES:
        chunks = [images[i : i + b] for i in range(0, len(images), b)]
        ref = np.concatenate([baseline(c) for c in chunks])  # also the warm-up
        out = np.concatenate([clip.encode_images(c, batch_size=b) for c in chunks])
        wall: dict[str, list[float]] = {"fp32": [], "engine": []}
        cpu: dict[str, list[float]] = {"fp32": [], "engine": []}
        for _ in range(repeats):
            for side in ("fp32", "engine"):
                if quiet_wait:
                    passes += 1
                    busy += not wait_quiet(quiet_wait)
                t, c = time.perf_counter(), time.process_time()
                for chunk in chunks:
                    baseline(chunk) if side == "fp32" else clip.encode_images(chunk, batch_size=b)
                wall[side].append((time.perf_counter() - t) * 1000 / len(images))
                cpu[side].append((time.process_time() - c) * 1000 / len(images))
        row = {
            "batch": b,
            "path": clip.path.name_for(b, batch_size=b),
            **{f"{k}_med": statistics.median(v) for k, v in wall.items()},
            **{f"{k}_min": min(v) for k, v in wall.items()},
            **{f"{k}_cpu": min(v) for k, v in cpu.items()},
        }
        row["cos_min"], row["cos_med"], row["flips"] = agreement(ref, out, text)
        rows.append(row)
        print(
            f"batch {b:2d}: fp32 {row['fp32_med']:.1f} ms/img (min {row['fp32_min']:.1f}), engine [{row['path']}] {row['engine_med']:.1f} "
            f"(min {row['engine_min']:.1f}), {row['fp32_med'] / row['engine_med']:.2f}x, cosine {row['cos_min']:.5f}, flips {row['flips']}",
            flush=True,
        )
    return rows, passes, busy


def every_path(clip, pixels: torch.Tensor, text: np.ndarray, names: list[str], repeats: int) -> list[dict]:
    """Part 3: each path forced, the tower alone on preprocessed pixels, interleaved with fp32."""
    from engine.models import fastpath
    from engine.models.cpu import cpu_profile

    profile = cpu_profile()
    built, rows = {}, []
    for name in names:
        try:
            t = time.perf_counter()
            built[name] = fastpath.build_path(clip, name, profile, "bench")
            built[name].build_s = time.perf_counter() - t
        except Exception as exc:
            rows.append({"path": name, "error": f"{type(exc).__name__}: {str(exc)[:100]}"})
            print(f"{name}: cannot build ({exc})", flush=True)
    with torch.inference_mode():
        forwards = {n: b.image_forward for n, b in built.items()}
        reference = forwards["fp32"](pixels).float()
        wall, cpu = fastpath.time_interleaved(forwards, {b: pixels[:b] for b in BATCHES}, repeats)
        for name, forward in forwards.items():
            cos_min, cos_med, flips = agreement(reference, forward(pixels).float(), text)
            row = {"path": name, "build_s": built[name].build_s, "cos_min": cos_min, "cos_med": cos_med, "flips": flips}
            for b in BATCHES:
                row[f"ms{b}"] = wall[name][b] * 1000 / b
                row[f"cpu{b}"] = cpu[name][b] * 1000 / b
                row[f"x{b}"] = wall["fp32"][b] / wall[name][b]
            rows.append(row)
            print(
                f"{name:14s} "
                + "  ".join(f"b{b} {row[f'ms{b}']:7.1f} ms/img ({row[f'x{b}']:.2f}x)" for b in BATCHES)
                + f"  cos {cos_min:.5f} flips {flips}",
                flush=True,
            )
    return rows


def gate_lines(model_name: str, rows: list[dict]) -> list[str]:
    from engine.models.cpu import cpu_profile

    profile = cpu_profile()
    klass = cpu_class(profile)
    gates = (
        VIT_GATES.get(klass, {}) if model_name == "biomedclip-shape" else {b: g for g in [SHIPPED_GATE.get(klass)] if g for b in (1, 16)}
    )
    lines = ["", f"## Gates for this CPU class ({klass})", "", "| gate | measured (median) | verdict |", "|---|---:|---|"]
    for row in rows:
        b, speed = row["batch"], row["fp32_med"] / row["engine_med"]
        lines.append(f"| batch {b}: never slower than fp32 | {speed:.2f}x | {'met' if speed >= 1.0 else '**not met**'} |")
        if b in gates:
            equal = row["flips"] == 0
            verdict = "met" if speed >= gates[b] and equal else "**not met**"
            lines.append(
                f"| batch {b}: >= {gates[b]}x open_clip fp32{', equal answers' if model_name != 'biomedclip-shape' else ''} | "
                f"{speed:.2f}x, {row['flips']} label flips | {verdict} |"
            )
    if not gates:
        lines.append("| (no speed-up gate for this model on this CPU class) | | |")
    if klass.startswith("AMX") and not profile.amx:
        # the class joins AMX and AVX512-BF16 without it; their int8/bf16 units differ ~16x in width
        lines += [
            "",
            "This CPU has AVX512-BF16 but no AMX: its int8 units are AVX-512 VNNI. `python bench/int8_ceiling.py` measures "
            "how far int8 can get here over the fp32 tower when everything but its matrix products costs nothing.",
        ]
    return lines


def report(args, model_note, image_note, choice, rows, passes, busy, path_rows, load_before, text_note) -> list[str]:
    from engine.models import decisions

    path = choice["path"]
    probe = path.details.get("probe") or {}
    lines = (
        [f"# Image-embedding throughput: {args.model}, open_clip fp32 vs the engine", ""]
        + machine_lines()
        + [
            f"- versions: python {platform.python_version()}, " + ", ".join(f"{k} {v}" for k, v in decisions.versions().items()),
            f"- threads: {torch.get_num_threads()} (torch); model: {model_note}",
            f"- images: {image_note}; {args.repeats} repeats alternating open_clip fp32 and the engine"
            + (
                f"; {passes - busy} of {passes} timed passes started on a quiet machine (waited up to {args.quiet_wait:g} s)"
                if passes
                else ""
            ),
            f"- load: before `{load_before}`; after `{uptime()}`",
            f"- command: `python bench/clip_throughput.py --model {args.model} --repeats {args.repeats} --quiet-wait {args.quiet_wait:g}"
            + (f" --threads {args.threads}" if args.threads else "")
            + "`",
            "",
            "## The engine's choice",
            "",
            f"- **{path.name}**: {choice['describe']}",
            f"- why: {path.reason}",
            f"- probe images: {path.details.get('calibration', '-')}; load during the probe: {path.details.get('load', '-')}",
            f"- cost of choosing at load: {choice['cold_s']:.1f} s cold (builds, exports, probe), {choice['warm_s']:.1f} s warm (cached decision)",
            "",
            "| path | probe ms/img b1 | b12 | CPU ms/img b1 | b12 | speed-up b1 / b12 | cosine | labels | build s | status |",
            "|---|---:|---:|---:|---:|---:|---:|---|---:|---|",
        ]
    )
    for name, r in probe.items():
        ms, cpu, sp = r.get("ms_per_image", {}), r.get("cpu_ms_per_image", {}), r.get("speedup", {})
        lines.append(
            f"| {name} | {ms.get('1', '')} | {ms.get('12', '')} | {cpu.get('1', '')} | {cpu.get('12', '')} | "
            f"{sp.get('1', '')} / {sp.get('12', '')} | {r.get('cos_image', '')} | {r.get('labels') or ''} | {r.get('build_s', '')} | {r.get('status', '')} |"
        )
    lines += [
        "",
        "## open_clip fp32 vs the engine (preprocessing included on both sides)",
        "",
        "| batch | engine path | fp32 ms/img median / min | engine ms/img median / min | speed-up median (min) | CPU ms/img fp32 / engine | min cosine | label flips |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['path']} | {r['fp32_med']:.1f} / {r['fp32_min']:.1f} | {r['engine_med']:.1f} / {r['engine_min']:.1f} | "
            f"{r['fp32_med'] / r['engine_med']:.2f}x ({r['fp32_min'] / r['engine_min']:.2f}x) | {r['fp32_cpu']:.1f} / {r['engine_cpu']:.1f} | "
            f"{r['cos_min']:.5f} | {r['flips']} |"
        )
    lines += gate_lines(args.model, rows)
    if path_rows:
        lines += [
            "",
            "## Every path, forced (image tower alone on preprocessed pixels, minimum of interleaved repeats)",
            "",
            "| path | b1 ms/img | b12 | b16 | speed-up b1 / b12 / b16 | CPU ms/img b1 / b16 | min / median cosine | label flips | build s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in path_rows:
            if "error" in r:
                lines.append(f"| {r['path']} | cannot build: {r['error']} | | | | | | | |")
                continue
            lines.append(
                f"| {r['path']} | {r['ms1']:.1f} | {r['ms12']:.1f} | {r['ms16']:.1f} | {r['x1']:.2f} / {r['x12']:.2f} / {r['x16']:.2f} | "
                f"{r['cpu1']:.1f} / {r['cpu16']:.1f} | {r['cos_min']:.5f} / {r['cos_med']:.5f} | {r['flips']} | {r['build_s']:.1f} |"
            )
    lines += [
        "",
        text_note,
        "",
        "Label flips: pairs among 8 labels (x-ray, ultrasound, histology, dermoscopy) that fp32 separates by more than "
        "0.01 in cosine (1 logit at CLIP's scale) and the path orders the other way, summed over the images; "
        "equal answers means 0. A random-weight model scores all labels within ~0.03, so its flips are few by construction; "
        "the shipped model's are the real test.",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="biomedclip-shape", help="biomedclip-shape (random ViT-B/16) or a shipped name, e.g. medlens-clip")
    p.add_argument("--images", type=int, default=16, help="images per timed pass (batch 16 uses them as one batch)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: what the engine sets)")
    p.add_argument("--no-shared", action="store_true", help="synthetic images instead of ../shared/data")
    p.add_argument(
        "--quiet-wait", type=float, default=10.0, help="before each timed pass of part 2, wait up to this many s for a quiet machine"
    )
    p.add_argument("--paths", default="all", help="comma-separated paths for part 3 (all: every path this CPU runs natively; none: skip)")
    p.add_argument("--out", default=None, help="result file (default bench/results/clip_throughput[_MODEL].md)")
    args = p.parse_args(argv)

    if args.threads:
        os.environ["MEDLENS_THREADS"] = str(args.threads)
    cache = fresh_fastpath_cache("medlens-fastpath-bench-")  # cold start: the probe and every export are timed

    from engine.models import fastpath
    from engine.models.cpu import cpu_profile

    load_before = uptime()
    images, image_note = load_images(args.images, not args.no_shared)
    clip, model_note = load_clip(args.model)
    with torch.no_grad():
        text = normed(clip.model.encode_text(clip.tokenizer(LABELS)))
    choice = engine_choice(clip)
    rows, passes, busy = gate_rows(clip, images, text, args.repeats, args.quiet_wait)
    text_note = text_timing(clip, LABELS, args.repeats)
    names = []
    if args.paths != "none":
        native = cpu_profile().native_bf16
        names = list(fastpath.PATHS) if args.paths == "all" else [n.strip() for n in args.paths.split(",")]
        if args.paths == "all" and not native:  # emulated bf16 is 2-10x slower than fp32: measured once, not every run
            names = [n for n in names if n not in ("bf16", "openvino-bf16")]
        names = ["fp32"] + [n for n in names if n != "fp32"]
    path_rows = every_path(clip, clip.image_tensor(images), text, names, max(2, args.repeats // 2)) if names else []

    out = Path(
        args.out
        or REPO / "bench" / "results" / ("clip_throughput.md" if args.model == "biomedclip-shape" else f"clip_throughput_{args.model}.md")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(report(args, model_note, image_note, choice, rows, passes, busy, path_rows, load_before, text_note)))
    print(f"wrote {out}")
    from engine.models.clip import InferencePath

    clip.set_inference(InferencePath())
    cache.cleanup()
    return 0


def text_timing(clip, labels: list[str], repeats: int) -> str:
    """A label set through the text tower, uncached: open_clip fp32 padded vs the engine's (padding cut)."""
    model = clip.model
    with torch.no_grad():
        ref = normed(model.encode_text(clip.tokenizer(labels)))
    clip._text_cache.clear()
    cos = float((ref * clip.encode_texts(labels)).sum(1).min())
    times: dict[str, list[float]] = {"fp32": [], "engine": []}
    for _ in range(max(2, repeats // 2)):
        t = time.perf_counter()
        with torch.no_grad():
            model.encode_text(clip.tokenizer(labels))
        times["fp32"].append((time.perf_counter() - t) * 1000 / len(labels))
        clip._text_cache.clear()
        t = time.perf_counter()
        clip.encode_texts(labels)
        times["engine"].append((time.perf_counter() - t) * 1000 / len(labels))
    med = {k: statistics.median(v) for k, v in times.items()}
    return (
        f"Text, {len(labels)} labels uncached: open_clip fp32 `encode_text` {med['fp32']:.1f} ms/label, engine {med['engine']:.1f} "
        f"({med['fp32'] / med['engine']:.1f}x; {clip.path.details.get('text', '')}), min cosine {cos:.6f}. Repeated labels come from the "
        f"engine's text cache. Load average at the end: {loadavg()}."
    )


if __name__ == "__main__":
    raise SystemExit(main())
