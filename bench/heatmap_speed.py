"""Evidence heatmaps: faithfulness on the synthetic test and runtime per image, per method.

    python bench/heatmap_speed.py                      # both parts, writes bench/results/heatmap_speed.md
    python bench/heatmap_speed.py --seeds 0,1,2 --n 24 --repeats 5 --quiet-wait 20 --occlusion

Part 1 (faithfulness): the acceptance test's tiny towers (tests/test_heatmap.py: a 2-block ViT
with 8 px patches, and a 4-layer CNN, 64 px input), fine-tuned with the test's loop for each seed
so that "a bright spot" matches images with a bright square; then the pointing game on `--n`
held-out images (argmax inside the square), the median ratio of mean heat inside / outside the
square (within the crop), and roughness (mean |spatial gradient| of the [0, 1] map, per pixel x
image width: lower is smoother). The untrained towers give the randomisation sanity check
(Adebayo et al. 2018): a map that still points at the square without training follows the
image, not the model. Also measured: Grad-CAM on ViT tokens as pytorch-grad-cam does it
(output of the last block's first norm), and Grad-CAM of the raw cosine instead of the
linearised score, the two designs the module rejects.

Part 2 (runtime): seconds per image on 2 CPU threads for ViT-B/16-sized towers (open_clip's
OpenAI-style ViT as in UniMed-CLIP, timm ViT-B/16 as in BiomedCLIP) and ResNet-50-sized ones
(timm ResNet-50, open_clip's ModifiedResNet RN50), random weights, fp32, one 300 x 256 grey
image, plus the forward alone for scale. Each timed call first waits (up to --quiet-wait s)
for other work on the machine to pause; minimum and median of --repeats calls.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import test_heatmap as th  # noqa: E402  (the test's towers, data and fine-tuning loop)
from _models import tiny_clip_folder  # noqa: E402

from engine import heatmap as hm  # noqa: E402
from engine.models.checkpoint import load_folder  # noqa: E402

RESULT = REPO / "bench" / "results" / "heatmap_speed.md"

# Measured while choosing the method (2026-11-22, this machine), with exploratory code that was not
# kept; quoted into the result file so the reasons stay next to the numbers. Pointing game on 32
# held-out images per row unless noted, one number per fine-tuning seed.
EXPLORATION = """\
## Design exploration (code not kept; numbers quoted from the session that chose the method)

Same task and loop as above (60-100 steps), 32 held-out images per number, one number per
fine-tuning seed (seeds 0, 1, 2, 3 in order; "-" = not run).
"8 px ViT" is the test's tower; "16 px ViT" is tests/_models.TINY_CFG (4x4 tokens, square 27 px so
that it covers a token centre); "bars" adds thin bright bars (4 x 36 px, as bright as the square;
one with the square, three without) so that brightness alone does not give the label away.

| method | 8 px ViT | 8 px ViT + bars | 16 px ViT | CNN + bars |
|---|---|---|---|---|
| SmoothGrad \\|input x gradient\\| (8 copies) | 32, 32 | 32, 32, 32, 32 | 32, 30, 32 | 31, 30 |
| occlusion (14x14 grid, 2x2 windows) | 25, 23 | 32, 32, 32, 30 | 11, 15, 26 | 32, 32, 32 |
| Grad-CAM, CNN feature map | | | | 25, 19, 30 |
| ViT Grad-CAM, residual tokens entering the last block | 21, 1 | 3, 24 | 3, 12 (18 px square) | |
| ViT Grad-CAM, normalised tokens in the last block (pytorch-grad-cam recipe) | 32, 32 | 32, 32, 0, 0 | 0, 20, 23 | |
| ViT last attention, value path (sum_h,q A dS/dA) | 31, 31 | 32, 32, 0, 0 | 0, 21, 15 | |
| ViT gradient-weighted attention rollout, all blocks (Chefer et al. 2021) | | 32, -, 16, 32 | 18, 21, 21 | |
| same Grad-CAM (normalised tokens) of the raw cosine | 12, 18 | 18, 27 | | |

Untrained towers (randomisation check), + bars: CNN Grad-CAM 2/32 and 1/32, SmoothGrad 27/32,
occlusion 4/32; 8 px ViT SmoothGrad 16/32 (its inside/outside ratio rises from 2.7 untrained to
30-72 trained). SmoothGrad copies, 8 px ViT without bars, seeds 1/3/4/5/6, 24 images each: no
noise 18/14/24/24/24, 1 copy 21/20/24/-/-, 4 copies 21/24/24/24/24, 6 copies 23/24/-/24/24,
8 copies 24/24/24/24/24.
"""


# --------------------------------------------------------------------------- machine
# --------------------------------------------------------------------------- rejected designs, for comparison

from _machine import cpu_name, loadavg, wait_quiet  # noqa: E402


def _vit_token_gradcam(model, image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Grad-CAM on the normalised tokens entering the last block's attention (the usual recipe for
    ViTs), with engine.heatmap's score and geometry."""
    target = hm.find_feature_target(model)
    block = dict(hm.image_tower(model).named_modules())[target.name]
    norm = next(m for m in block.modules() if isinstance(m, torch.nn.LayerNorm))
    seen = {}
    handle = norm.register_forward_hook(lambda mod, args, out: seen.__setitem__("t", out))
    try:
        pixels = model.image_tensor([image]).requires_grad_(True)
        score = hm._score(model, pixels, hm._text_vector(text))
        (g,) = torch.autograd.grad(score, seen["t"])
    finally:
        handle.remove()
    gh, gw = target.grid
    acts, grads = seen["t"].detach()[:, -gh * gw :], g.detach()[:, -gh * gw :]
    cam = (acts * grads.mean(1, keepdim=True)).sum(-1).reshape(1, gh, gw).clamp(min=0)
    return hm._normalise(hm.to_image(model, cam, *image.shape[:2]))[0]


def _cosine_score(model, pixels, text):
    return (torch.nn.functional.normalize(model.model.encode_image(pixels).float(), dim=-1) @ text).sum()


# --------------------------------------------------------------------------- part 1: faithfulness
def roughness(heat: np.ndarray) -> float:
    gy, gx = np.gradient(heat.astype(np.float64))
    return float(np.mean(np.hypot(gx, gy)) * heat.shape[1])


def evaluate(model, text, method, n: int, seed: int = 123):
    """(hits, median inside/outside ratio, median roughness) over n held-out images."""
    h, w, sq = th.HEIGHT, th.WIDTH, th.SQUARE
    rng = np.random.default_rng(seed)
    top, left, ch, cw = hm.crop_box(model, h, w)
    crop = np.zeros((h, w), bool)
    crop[int(np.ceil(top)) : int(top + ch), int(np.ceil(left)) : int(left + cw)] = True
    hits, ratios, rough = 0, [], []
    for y, x in th.square_places(model, rng, n, h, w, sq):
        image = th.synthetic_image(rng, h, w, sq, (y, x))
        heat = method(model, image, text)
        iy, ix = np.unravel_index(np.argmax(heat), heat.shape)
        hits += int(y <= iy < y + sq and x <= ix < x + sq)
        inside = np.zeros_like(crop)
        inside[y : y + sq, x : x + sq] = True
        ratios.append(heat[inside].mean() / max(heat[crop & ~inside].mean(), 1e-6))
        rough.append(roughness(heat))
    return hits, float(np.median(ratios)), float(np.median(rough))


def by_name(name: str):
    def run(model, image, text):
        return hm.image_heatmap(model, image, text, method=name)

    return run


def cosine_gradcam(model, image, text):
    original = hm._score
    hm._score = _cosine_score
    try:
        return hm.image_heatmap(model, image, text, method="gradcam")
    finally:
        hm._score = original


def faithfulness(seeds: list[int], n: int, tmp: Path) -> list[str]:
    rows = []
    methods = {
        "vit": [
            ("gradient (auto)", by_name("gradient")),
            ("occlusion", by_name("occlusion")),
            ("token Grad-CAM (rejected)", _vit_token_gradcam),
        ],
        "cnn": [
            ("gradcam (auto)", by_name("gradcam")),
            ("gradient", by_name("gradient")),
            ("occlusion", by_name("occlusion")),
            ("gradcam of raw cosine (rejected)", cosine_gradcam),
        ],
    }
    for seed in seeds:
        base = load_folder(tiny_clip_folder(tmp / f"vit{seed}", seed=seed, cfg=th.VIT_CFG))
        text = base.encode_texts([th.LABEL])[0]
        towers = {"vit": th._copy(base)}
        torch.manual_seed(seed)
        towers["cnn"] = th._copy(base, th.CompactCNN(th.VIT_CFG["embed_dim"]).eval())
        for fam, model in towers.items():
            untrained = {name: evaluate(model, text, fn, n) for name, fn in methods[fam]} if seed == seeds[0] else {}
            t0 = time.perf_counter()
            pos, neg = th.fine_tune(model, text, steps=60 if fam == "vit" else 80, seed=seed)
            took = time.perf_counter() - t0
            for name, fn in methods[fam]:
                hits, ratio, rough = evaluate(model, text, fn, n)
                row = f"| {fam} | {seed} | {name} | {hits}/{n} | {ratio:.1f} | {rough:.1f} |"
                if name in untrained:
                    u = untrained[name]
                    row += f" {u[0]}/{n}, {u[1]:.1f} |"
                else:
                    row += " |"
                rows.append(row)
                print(row, flush=True)
            print(f"  ({fam} seed {seed}: cosine with square {pos:.2f}, without {neg:.2f}; fine-tuning {took:.1f} s)", flush=True)
    return rows


# --------------------------------------------------------------------------- part 2: runtime
def towers():
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    from engine.models.checkpoint import architecture

    biomed = architecture("biomedclip-vit-b16")["model_cfg"]["vision_cfg"]
    yield (
        "OpenAI-style ViT-B/16 (UniMed-CLIP)",
        lambda: VisionTransformer(image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp_ratio=4.0, output_dim=512),
    )
    yield (
        "timm ViT-B/16 (BiomedCLIP)",
        lambda: TimmModel(biomed["timm_model_name"], 512, image_size=224, pool=biomed["timm_pool"], proj=biomed["timm_proj"]),
    )
    yield "timm ResNet-50", lambda: TimmModel("resnet50", 512, image_size=224, pool="avg", proj="linear")
    yield "open_clip ModifiedResNet RN50", lambda: ModifiedResNet(layers=(3, 4, 6, 3), output_dim=1024, heads=32, image_size=224, width=64)


def timed(fn, repeats: int, quiet: float) -> tuple[float, float, int]:
    times, calm = [], 0
    for _ in range(repeats):
        if quiet:
            calm += wait_quiet(quiet)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times)), calm


def runtime(repeats: int, quiet: float, occlusion: bool) -> tuple[list[str], int, int]:
    rows, calm_total, total = [], 0, 0
    image = np.random.default_rng(0).integers(0, 255, (256, 300), dtype=np.uint8)
    for name, make in towers():
        torch.manual_seed(0)
        model = th._tower_model(make().eval(), 224)
        text = torch.nn.functional.normalize(torch.randn(model.model.visual(torch.zeros(1, 3, 224, 224)).shape[-1]), dim=0).numpy()
        target = hm.find_feature_target(model)  # the probe, once per tower, outside the timing
        pixels = model.image_tensor([image])

        def forward():
            with torch.no_grad():
                model.model.encode_image(pixels)

        cells = [name, f"{target.kind} `{target.name}` {target.grid[0]}x{target.grid[1]}", hm.resolve_method(model)]
        jobs = [("forward", forward)]
        if target.kind == "map":
            jobs.append(("gradcam", lambda: hm.image_heatmap(model, image, text, method="gradcam")))
        else:
            jobs.append(("gradcam", None))
        jobs.append(("gradient", lambda: hm.image_heatmap(model, image, text, method="gradient")))
        jobs.append(("occlusion", (lambda: hm.image_heatmap(model, image, text, method="occlusion")) if occlusion else None))
        for label, fn in jobs:
            if fn is None:
                cells.append("n/a" if label == "gradcam" else "not run")
                continue
            fn()  # warm-up
            reps = 1 if label == "occlusion" else repeats
            best, med, calm = timed(fn, reps, quiet)
            calm_total, total = calm_total + calm, total + reps
            cells.append(f"{best:.2f} / {med:.2f}")
        row = "| " + " | ".join(cells) + " |"
        rows.append(row)
        print(row, flush=True)
    return rows, calm_total, total


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds for part 1")
    p.add_argument("--n", type=int, default=24, help="held-out images per pointing game")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per method in part 2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quiet-wait", type=float, default=20.0, help="seconds to wait for an idle machine before each timed call (0: no wait)")
    p.add_argument("--occlusion", action="store_true", help="also time occlusion on the big towers (~15-60 s each)")
    p.add_argument("--skip-faithfulness", action="store_true")
    p.add_argument("--skip-runtime", action="store_true")
    p.add_argument("--out", type=Path, default=RESULT)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import tempfile

    load_before = loadavg()
    faith = (
        []
        if args.skip_faithfulness
        else faithfulness([int(s) for s in args.seeds.split(",")], args.n, Path(tempfile.mkdtemp(prefix="medlens-heatmap-")))
    )
    speed, calm, total = ([], 0, 0) if args.skip_runtime else runtime(args.repeats, args.quiet_wait, args.occlusion)
    import open_clip
    import timm

    lines = [
        "# Evidence heatmaps: faithfulness on the synthetic test, and runtime",
        "",
        f"- date: {dt.datetime.now():%Y-%m-%d %H:%M}",
        f"- CPU: {cpu_name()} ({platform.machine()}), torch threads: {args.threads}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, open_clip {open_clip.__version__}, timm {timm.__version__}",
        f"- load average before {load_before}, after {loadavg()}"
        + (f"; {calm} of {total} timed calls started on an idle machine (waited up to {args.quiet_wait:.0f} s)" if total else ""),
        f"- methods: `gradcam` = Grad-CAM on the CNN's last feature map; `gradient` = SmoothGrad |input x gradient| ({hm.SAMPLES} noisy copies, sigma {hm.SIGMA}); `occlusion` = 2x2-cell windows of a 14x14 grid set to the mean colour (169 windows). All explain the linearised score <e, t>/|e| (engine.heatmap._score).",
        "",
    ]
    if faith:
        lines += [
            "## Faithfulness (tiny towers fine-tuned on the synthetic bright-square task)",
            "",
            f"Pointing game on {args.n} held-out 96x72 images (square 18 px at random places inside the 64 px crop); ratio = median of mean heat inside / outside the square; roughness = median of mean |grad heat| x width (lower = smoother). Last column: the same on the untrained tower (randomisation sanity check: high values there mean the map follows the image, not the model).",
            "",
            "| tower | seed | method | pointing | ratio in/out | roughness | untrained: pointing, ratio |",
            "|---|---:|---|---:|---:|---:|---|",
            *faith,
            "",
        ]
    if speed:
        lines += [
            "## Runtime per image, seconds (min / median), fp32, random weights",
            "",
            "| tower | feature map found | auto = | forward only | gradcam | gradient | occlusion |",
            "|---|---|---|---:|---:|---:|---:|",
            *speed,
            "",
            "Every heatmap includes preprocessing and the resampling back to the 300x256 input. Occlusion runs forwards only, through the model's current inference path (fp32 here; faster when engine.models.fastpath picks bf16/int8).",
            "",
        ]
    lines += [EXPLORATION, ""]
    lines.append(
        "Re-run: `python bench/heatmap_speed.py` (options: --seeds, --n, --repeats, --threads, --quiet-wait, --occlusion, --skip-faithfulness, --skip-runtime)."
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.exists() and (args.skip_faithfulness or args.skip_runtime):
        print(f"partial run: not overwriting {args.out}; printing instead\n")
        print("\n".join(lines))
        return 0
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
