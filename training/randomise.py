"""Domain randomisation on the engine's model image, so resolution, sharpness, window, annotations and borders stop being shortcuts.

    from training.randomise import FAMILIES, randomise
    view = randomise(pixels448, np.random.default_rng([seed, row, k]), modality="us")   # uint8 (448, 448, 3)

Design decisions
- Applied to the 448 px model image (training.manifest.PixelLoader's
  `pixels448`, i.e. what engine.zeroshot.imaging.model_image gives the
  app) BEFORE the model's ImagePreprocess, so an augmented view goes through
  exactly the resize/scale/standardise the engine runs at inference.
- Five families, each switchable (the ablation trains with and without each):
  - "resolution": down-sample to a random side between 28 px and full
    (log-uniform: a 28 px PneumoniaMNIST frame and a 2,000 px radiograph
    both become ordinary) and back up with a random filter; then blur or
    sharpen (unsharp mask).
  - "intensity": gamma and window/level jitter (a contrast stretch around a
    moving level, clipped as a narrower or wider window would clip).
  - "overlays": burned-in text (scanner-like strings: side markers, dates,
    depths, "MI 0.8"), calipers and dashed measuring lines, rulers / scale
    bars with ticks, and on ultrasound a colour-Doppler-like box (red/blue/
    orange flow blobs inside a box) with a colour bar, as real Doppler
    frames show.
  - "borders": letterbox the content into a smaller, differently shaped box
    on black, or add black bands; ultrasound also gets a sector (fan) mask.
  - "geometry": a crop (zoom-in) and a small rotation (+-10 degrees); no
    flips here (training.augment keeps flips where left/right is meaningless).
- Each family fires with probability `p` (default 0.5) per view, drawn from a
  generator seeded by (seed, row index, view), so a cache of K views per
  image is reproducible bit for bit and independent of processing order.
- PIL and numpy only, a few ms per view at 448 px: cheap next to the trunk.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

FAMILIES = ("resolution", "intensity", "overlays", "borders", "geometry")
TEXT_SNIPPETS = (
    "L",
    "R",
    "AP",
    "PA",
    "SUPINE",
    "PORTABLE",
    "5 cm",
    "10cm",
    "MI 0.8",
    "TIS 0.4",
    "12-03-2019",
    "14:22:07",
    "GAIN 54",
    "DR 60",
    "FR 27Hz",
    "2D",
    "CF",
    "PW",
    "ABD",
    "ST",
    "W:400 L:40",
    "Se:3 Im:27",
    "1.5x",
    "ANT",
    "POST",
)


def _rng_float(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * rng.random())


# --------------------------------------------------------------------------- families
def resolution(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    size = img.size[0]
    side = int(round(math.exp(_rng_float(rng, math.log(28), math.log(size)))))
    filters = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.NEAREST, Image.Resampling.LANCZOS)
    if side < size:
        img = img.resize((side, side), filters[int(rng.integers(0, 4))]).resize((size, size), filters[int(rng.integers(0, 4))])
    kind = rng.random()
    if kind < 0.35:
        img = img.filter(ImageFilter.GaussianBlur(_rng_float(rng, 0.5, 3.0)))
    elif kind < 0.7:
        img = img.filter(ImageFilter.UnsharpMask(radius=_rng_float(rng, 1, 4), percent=int(rng.integers(50, 250)), threshold=2))
    return img


def intensity(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = np.power(x, math.exp(_rng_float(rng, math.log(0.6), math.log(1.6))))
    level, width = _rng_float(rng, 0.35, 0.65), math.exp(_rng_float(rng, math.log(0.6), math.log(1.4)))
    x = (x - level) / width + 0.5
    return Image.fromarray(np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8))


def _text(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator) -> None:
    for _ in range(int(rng.integers(1, 6))):
        words = " ".join(TEXT_SNIPPETS[int(i)] for i in rng.integers(0, len(TEXT_SNIPPETS), int(rng.integers(1, 3))))
        grey = int(rng.integers(150, 256))
        xy = (int(rng.integers(0, size * 3 // 4)), int(rng.choice([rng.integers(0, size // 8), rng.integers(size * 7 // 8, size)])))
        draw.text(xy, words, fill=(grey, grey, grey))


def _calipers(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator) -> None:
    colour = (255, 255, int(rng.integers(0, 256)))
    for _ in range(int(rng.integers(1, 3))):
        a, b = rng.integers(size // 6, size * 5 // 6, 2), rng.integers(size // 6, size * 5 // 6, 2)
        for x, y in (a, b):
            draw.line((x - 5, y, x + 5, y), fill=colour)
            draw.line((x, y - 5, x, y + 5), fill=colour)
        n = 12
        for i in range(0, n, 2):  # dashed line between the two marks
            p0 = a + (b - a) * i / n
            p1 = a + (b - a) * (i + 1) / n
            draw.line((float(p0[0]), float(p0[1]), float(p1[0]), float(p1[1])), fill=colour)


def _ruler(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator) -> None:
    grey = int(rng.integers(120, 256))
    vertical = rng.random() < 0.5
    pos = int(rng.choice([rng.integers(2, 20), rng.integers(size - 20, size - 2)]))
    start, stop = sorted(rng.integers(size // 10, size * 9 // 10, 2))
    step = int(rng.integers(6, 20))
    for i, t in enumerate(range(int(start), int(stop), step)):
        tick = 8 if i % 5 == 0 else 4
        draw.line((pos, t, pos + tick, t) if vertical else (t, pos, t, pos + tick), fill=(grey, grey, grey))


def _doppler(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A colour-flow box: red/blue/orange blobs inside a rectangle, plus a colour bar, over the grey image."""
    size = img.size[0]
    x = np.asarray(img, dtype=np.float32)
    w, h = int(rng.integers(size // 5, size // 2)), int(rng.integers(size // 6, size // 3))
    x0, y0 = int(rng.integers(size // 8, size - w - size // 8)), int(rng.integers(size // 6, size - h - size // 8))
    noise = rng.standard_normal((h // 8 + 2, w // 8 + 2)).astype(np.float32)
    field = np.asarray(Image.fromarray(noise).resize((w, h), Image.Resampling.BICUBIC))
    hot, cold = field > 0.8, field < -0.9
    box = x[y0 : y0 + h, x0 : x0 + w]
    box[hot] = np.stack([np.full(hot.sum(), 230), rng.uniform(40, 200, hot.sum()), np.full(hot.sum(), 20)], 1)
    box[cold] = np.stack([np.full(cold.sum(), 20), rng.uniform(60, 160, cold.sum()), np.full(cold.sum(), 230)], 1)
    out = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    draw.rectangle((x0, y0, x0 + w, y0 + h), outline=(200, 200, 200))
    bx = int(rng.choice([4, size - 14]))
    for i in range(60):  # colour bar: red to blue
        t = i / 59
        draw.line((bx, size // 4 + i, bx + 8, size // 4 + i), fill=(int(255 * (1 - t)), int(120 * (1 - abs(2 * t - 1))), int(255 * t)))
    return out


def overlays(img: Image.Image, rng: np.random.Generator, modality: str | None = None) -> Image.Image:
    if modality == "us" and rng.random() < 0.5:
        img = _doppler(img, rng)
    draw = ImageDraw.Draw(img)
    size = img.size[0]
    _text(draw, size, rng)
    if rng.random() < 0.5:
        _calipers(draw, size, rng)
    if rng.random() < 0.5:
        _ruler(draw, size, rng)
    return img


def borders(img: Image.Image, rng: np.random.Generator, modality: str | None = None) -> Image.Image:
    size = img.size[0]
    canvas = Image.new("RGB", (size, size))
    if rng.random() < 0.5:  # letterbox into a smaller box of another shape
        w, h = int(size * _rng_float(rng, 0.45, 1.0)), int(size * _rng_float(rng, 0.45, 1.0))
        canvas.paste(
            img.resize((w, h), Image.Resampling.BILINEAR), (int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1)))
        )
    else:  # black bands on some sides
        canvas.paste(img)
        draw = ImageDraw.Draw(canvas)
        sides = rng.random(4) < 0.5
        sides[int(rng.integers(0, 4))] = True  # at least one band
        for side in np.nonzero(sides)[0]:
            t = int(size * _rng_float(rng, 0.03, 0.2))
            draw.rectangle([(0, 0, size, t), (0, size - t, size, size), (0, 0, t, size), (size - t, 0, size, size)][side], fill=(0, 0, 0))
    if modality == "us" and rng.random() < 0.5:  # a sector (fan) as curvilinear probes show
        mask = Image.new("L", (size, size))
        spread = _rng_float(rng, 25, 45)
        ImageDraw.Draw(mask).pieslice((-size // 2, -size * 0.9, size * 1.5, size), 90 - spread, 90 + spread, fill=255)
        canvas = Image.composite(canvas, Image.new("RGB", (size, size)), mask)
    return canvas


def geometry(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    size = img.size[0]
    img = img.rotate(_rng_float(rng, -10, 10), resample=Image.Resampling.BILINEAR)
    frac = _rng_float(rng, 0.7, 1.0)
    side = int(size * frac)
    x0, y0 = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
    return img.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.Resampling.BILINEAR)


# --------------------------------------------------------------------------- the view
def check_families(families: Iterable[str]) -> tuple[str, ...]:
    out = tuple(families)
    unknown = [f for f in out if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown augmentation famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; known: {', '.join(FAMILIES)}")
    return out


def randomise(
    pixels: np.ndarray, rng: np.random.Generator, *, modality: str | None = None, families: Iterable[str] = FAMILIES, p: float = 0.5
) -> np.ndarray:
    """One randomised view of a uint8 RGB model image (S, S, 3) -> uint8 (S, S, 3). Geometry and borders
    come first (what the scanner framed), then resolution, intensity, and overlays last (burned in on top)."""
    chosen = set(check_families(families))
    fire = {f: rng.random() < p for f in FAMILIES}  # always drawn, so switching a family off leaves the others' draws alone
    img = Image.fromarray(np.ascontiguousarray(pixels[..., :3])).convert("RGB")
    sub = {f: np.random.default_rng(rng.integers(0, 2**63 - 1)) for f in FAMILIES}
    if "geometry" in chosen and fire["geometry"]:
        img = geometry(img, sub["geometry"])
    if "borders" in chosen and fire["borders"]:
        img = borders(img, sub["borders"], modality)
    if "resolution" in chosen and fire["resolution"]:
        img = resolution(img, sub["resolution"])
    if "intensity" in chosen and fire["intensity"]:
        img = intensity(img, sub["intensity"])
    if "overlays" in chosen and fire["overlays"]:
        img = overlays(img, sub["overlays"], modality)
    return np.asarray(img.convert("RGB"))
