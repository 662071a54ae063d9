"""Evidence heatmaps: where an image supports a label, for CNN and ViT image towers.

Method (`method="auto"`):
- **CNN towers** (a spatial feature map is found): **Grad-CAM** on the last feature map,
  relu(sum_c mean_hw(dS/dA_c) * A_c), sampled back to the input's pixels.
- **ViT towers, and any tower where no CNN map is found**: **SmoothGrad of |input x gradient|**
  (8 noisy copies, noise 0.15 of the input range, blurred over 1/28 of the image); it needs
  nothing but a differentiable forward, so it works the same for every tower.
`method="gradcam" | "gradient" | "occlusion"` forces one (occlusion: a 14x14 grid of 2x2-cell
mean-colour windows, forwards only).

The score explained is the one zero-shot ranks by, made linear: <e, t>/|e| with the norm |e|
held constant (e = image embedding, t = the label's text embedding). The raw cosine's gradient
is the part of t orthogonal to e, which vanishes and turns against the evidence exactly where
the image already matches the label (Grad-CAM of the raw cosine: 20, 22 and 5 of 24 on the
CNN below, against 24, 24, 24).

Why these (bench/heatmap_speed.py; results and the design exploration in
bench/results/heatmap_speed.md). The acceptance task: tiny towers fine-tuned for 60-80 Adam
steps so that "a bright spot" matches images with a bright square; pointing game = argmax of
the map inside the square, on 24 held-out images per fine-tuning seed, seeds 0/1/2:

    tower                       auto                      gradient       occlusion      rejected
    CNN (8x8 map)               gradcam 24/24/24           24/24/24       24/24/16       Grad-CAM of cosine 20/22/5
    ViT (2 blocks, 8x8 tokens)  gradient 24/24/24          (same)         13/15/21       last-block token Grad-CAM 24/23/5

- No Grad-CAM for ViTs. The tokens entering the last block reach a CLS-pooled embedding only
  through LayerNorm, which is scale-invariant, so activation x gradient is ~0 per token; on the
  normalised tokens (pytorch-grad-cam's recipe), and equally for the last attention's value
  path, the map pointed at the square on some fine-tuned towers and *away* from it on others
  (0/32 on 2 of 4 seeds): a tower may gather the evidence into the CLS token in an earlier
  block, which no last-layer map can see. Gradient-weighted attention rollout over all blocks
  (Chefer et al. 2021) fixed some of those and not others (16-32/32). SmoothGrad pointed
  30-32/32 on every ViT and seed tried, trained with and without distracting bright bars.
- Grad-CAM for CNNs rather than SmoothGrad: same pointing on the acceptance task, 10-20x
  cheaper (one forward plus a backward through the pooling head), and it passes the
  randomisation check (Adebayo et al. 2018): on untrained CNNs it rarely points at the square
  (1/24; 1-2/32 with bars; 0-4/12 over four random inits), where SmoothGrad still does 24/24
  (input x gradient partly follows image salience). Its maps are coarse (7x7 for a ResNet at
  224 px), which suits an overlay. On ViTs the plain task cannot make that check (SmoothGrad
  on the untrained ViT also points 24/24, though 3-7x less concentrated: in/out ratio 3 vs
  7-21); with bars it can (16/32 untrained, 32/32 trained).
- Occlusion is model-agnostic and gradient-free but saturates when evidence is redundant
  (covering part of the square leaves the rest to answer: 13-21/24 on the ViT) and costs 169
  forwards per image; kept as an explicit second opinion.
- Runtime per image, 2 threads, fp32, this CPU (min of 3, random weights): OpenAI-style
  ViT-B/16 (UniMed-CLIP) SmoothGrad 3.7 s (its forward alone 0.22 s); timm ViT-B/16
  (BiomedCLIP) 3.7 s; timm ResNet-50 Grad-CAM 0.09 s (SmoothGrad 1.9 s); open_clip RN50
  Grad-CAM 0.16 s; occlusion 15-26 s. The tiny test towers: milliseconds. SmoothGrad needs its
  8 copies: with 4 the ViT pointed 21/24 on one seed, without noise 14-18/24 on two.

Details
- Finding the map (one probe forward with hooks, cached per tower): a ViT is a list of blocks
  mapping (1, L, D) tokens to tokens, L >= the cells of the first 4-D output (the patch
  embedding); a CNN map is the last module output shaped (1, C, h, w), h*w > 1, i.e. what enters
  global or attention pooling (open_clip ModifiedResNet `layer4`, timm ResNet `trunk.layer4`,
  any compact or deflated-3D 2-D trunk).
- Padded stride-2 convolutions centre cell j's receptive field on pixel stride*j rather than
  stride*(j + 1/2); the probe measures that offset (centroid of |d cell / d input|: -15.4 px
  for a ResNet-50 at 224, half a cell) and the map is shifted back by it.
- Geometry: the model sees a resized + centre-cropped square; maps are sampled back through
  that transform (read from the model's own transform), so they have the input's (H, W) and
  are 0 outside the crop.
- Normalisation: one image's map is divided by its maximum (all 0 when nothing supports the
  label); a volume's slices share one maximum, so a slice with weak support stays dim next to
  the slice that carries the finding.
- Only activations or inputs are differentiated (`torch.autograd.grad`): no parameter `.grad`
  is written. Grad-CAM's hook records only the calling thread's forward, so a concurrent
  `encode_images` on the same model is not captured.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engine.models.clip import ClipModel

METHODS = ("auto", "gradcam", "gradient", "occlusion")
SAMPLES = 8  # SmoothGrad noisy copies per image (~0.5 s each for a ViT-B/16 on 2 CPU threads)
SIGMA = 0.15  # SmoothGrad noise, as a fraction of the input's value range
MAX_BATCH = 16  # images (slices) per forward/backward

# --------------------------------------------------------------------------- locating the feature map


@dataclass(frozen=True)
class FeatureTarget:
    """What the probe found in the image tower.

    kind "map": a CNN's last (N, C, h, w) feature map, the output of module `name` (Grad-CAM reads it).
    kind "tokens": a ViT; `name` is its last token block. Grad-CAM is not used there (see the module
    docstring); the grid is the patch grid, for information."""

    name: str  # dotted module name inside the image tower
    kind: str  # "map" or "tokens"
    grid: tuple[int, int]  # (h, w) of the feature map / patch grid at the model's image size
    offset: tuple[float, float] = (0.0, 0.0)  # receptive-field centre of a cell minus its nominal centre, input pixels


_TARGETS: "weakref.WeakKeyDictionary[torch.nn.Module, FeatureTarget | None]" = weakref.WeakKeyDictionary()
_TARGET_LOCK = threading.Lock()


def _device(model: ClipModel) -> torch.device:
    param = next(model.model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def image_tower(model: ClipModel) -> torch.nn.Module:
    """The open_clip image tower (`visual`) of a ClipModel."""
    return getattr(model.model, "visual", model.model)


def find_feature_target(model: ClipModel) -> FeatureTarget | None:
    """Probe the image tower once (cached per tower): a CNN feature map, a ViT token stack, or None."""
    visual = image_tower(model)
    with _TARGET_LOCK:
        if visual in _TARGETS:
            return _TARGETS[visual]
    target = _probe(model, visual)
    with _TARGET_LOCK:
        _TARGETS[visual] = target
    return target


def _probe(model: ClipModel, visual: torch.nn.Module) -> FeatureTarget | None:
    """One forward of a blank image with a hook on every submodule, recording output shapes in order."""
    records: list[tuple[str, tuple[int, ...]]] = []
    me = threading.get_ident()

    def record(mod, args, out, name):
        if threading.get_ident() == me and isinstance(out, torch.Tensor):
            records.append((name, tuple(out.shape)))

    handles = [m.register_forward_hook(lambda mod, args, out, name=n: record(mod, args, out, name)) for n, m in visual.named_modules() if n]
    size = model.image_size
    try:
        with torch.no_grad():
            model.model.encode_image(torch.zeros(1, 3, size, size, device=_device(model)))
    finally:
        for h in handles:
            h.remove()
    shapes = dict(records)
    modules = dict(visual.named_modules())
    maps = [(name, shape) for name, shape in records if len(shape) == 4 and shape[2] * shape[3] > 1]
    if not maps:
        return None

    # ViT: a list of blocks that all map (1, L, D) tokens to (1, L, D), with at least as many tokens
    # as the first 4-D output (the patch embedding) has cells. Outermost lists only (an MLP
    # Sequential inside a block is not the block list); the longest wins.
    patches = maps[0][1][2] * maps[0][1][3]
    stacks = []
    for name, module in visual.named_modules():
        if not isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)) or len(module) == 0:
            continue
        outs = [shapes.get(f"{name}.{i}" if name else str(i)) for i in range(len(module))]
        if any(o is None or len(o) != 3 for o in outs) or len(set(outs)) != 1:
            continue
        length = outs[0][1] if outs[0][0] == 1 else outs[0][0]  # batch-first (1, L, D) or (L, 1, D)
        if length >= patches:
            stacks.append((name, len(module)))
    stacks = [s for s in stacks if not any(s[0].startswith(o[0] + ".") for o in stacks if o is not s)]
    if stacks:
        name, count = max(stacks, key=lambda s: s[1])
        last = f"{name}.{count - 1}" if name else str(count - 1)
        return FeatureTarget(name=last, kind="tokens", grid=(maps[0][1][2], maps[0][1][3]))

    # CNN: the last module output shaped (1, C, h, w) with more than one cell.
    name, shape = maps[-1]
    if name not in modules:
        return None
    grid = (shape[2], shape[3])
    return FeatureTarget(name=name, kind="map", grid=grid, offset=_rf_offset(model, modules[name], grid))


def _rf_offset(model: ClipModel, module: torch.nn.Module, grid: tuple[int, int]) -> tuple[float, float]:
    """Where a CNN cell really looks: the centroid of |d cell / d input| for the central cell, minus
    the cell's nominal centre. Padded stride-2 convolutions put cell j's receptive field around
    pixel stride*j, not stride*(j + 1/2): half a cell (16 px for a ResNet at 224) to the upper left."""
    size = model.image_size
    seen = {}
    me = threading.get_ident()
    handle = module.register_forward_hook(lambda mod, args, out: seen.__setitem__("map", out) if threading.get_ident() == me else None)
    try:
        with torch.enable_grad():
            # a few random images: one alone leaves the centroid at the mercy of which ReLUs are on
            x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0)).to(_device(model)).requires_grad_(True)
            model.model.encode_image(x)
            fmap = seen["map"]
            ci, cj = grid[0] // 2, grid[1] // 2
            (g,) = torch.autograd.grad(fmap[:, :, ci, cj].sum(), x)
    except Exception:
        return (0.0, 0.0)
    finally:
        handle.remove()
    w = g.detach().abs().sum((0, 1)).cpu()
    if float(w.sum()) <= 0:
        return (0.0, 0.0)
    coords = torch.arange(size, dtype=torch.float64) + 0.5
    cy = float((w.sum(1).double() * coords).sum() / w.sum())
    cx = float((w.sum(0).double() * coords).sum() / w.sum())
    return (cy - (ci + 0.5) * size / grid[0], cx - (cj + 0.5) * size / grid[1])


# --------------------------------------------------------------------------- geometry: crop <-> image


def crop_box(model: ClipModel, height: int, width: int) -> tuple[float, float, float, float]:
    """(top, left, crop_height, crop_width) of the model's square input, in original pixel units.

    Read from the model's own eval transform (Resize, then CenterCrop), falling back to
    open_clip's default (shortest side to the model size, centre crop)."""
    size = model.image_size
    h, w = height, width
    scale_y = scale_x = 1.0  # original pixels per current pixel
    off_y = off_x = 0.0  # current image origin, in original pixels
    steps = list(getattr(getattr(model, "_transform", None), "transforms", []))
    seen = False
    for t in steps:
        cls = type(t).__name__
        if cls == "Resize":
            from torchvision.transforms.functional import _compute_resized_output_size

            req = t.size if isinstance(t.size, (list, tuple)) else [t.size]
            nh, nw = _compute_resized_output_size((h, w), list(req), getattr(t, "max_size", None))
            scale_y, scale_x = scale_y * h / nh, scale_x * w / nw
            h, w = nh, nw
            seen = True
        elif cls in ("CenterCrop", "CenterCropOrPad"):
            ch, cw = (t.size, t.size) if isinstance(t.size, int) else (t.size[0], t.size[-1])
            top = int(round((h - ch) / 2.0)) if ch <= h else -((ch - h) // 2)
            left = int(round((w - cw) / 2.0)) if cw <= w else -((cw - w) // 2)
            off_y, off_x = off_y + top * scale_y, off_x + left * scale_x
            h, w = ch, cw
            seen = True
    if not seen:  # unknown transform: assume open_clip's default
        nh, nw = (size, int(size * width / height)) if height <= width else (int(size * height / width), size)
        scale_y, scale_x = height / nh, width / nw
        off_y, off_x = int(round((nh - size) / 2.0)) * scale_y, int(round((nw - size) / 2.0)) * scale_x
        h = w = size
    return off_y, off_x, h * scale_y, w * scale_x


def to_image(model: ClipModel, maps: torch.Tensor, height: int, width: int, offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """(N, gh, gw) maps over the model's square input -> (N, height, width) over the original image,
    bilinear, zero outside the crop."""
    top, left, ch, cw = crop_box(model, height, width)
    ys = (torch.arange(height, dtype=torch.float32) + 0.5 - top) / ch  # 0..1 inside the crop
    xs = (torch.arange(width, dtype=torch.float32) + 0.5 - left) / cw
    size = model.image_size
    sy, sx = ys - offset[0] / size, xs - offset[1] / size  # where each pixel's evidence sits on the map
    gy, gx = torch.meshgrid(sy * 2 - 1, sx * 2 - 1, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1)[None].expand(maps.shape[0], -1, -1, -1)
    out = F.grid_sample(maps[:, None].detach().float().cpu(), grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0]
    inside = ((ys >= 0) & (ys < 1))[:, None] & ((xs >= 0) & (xs < 1))[None, :]
    return (out * inside).numpy().astype(np.float32)


# --------------------------------------------------------------------------- methods


def _text_vector(text_embedding: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    t = torch.as_tensor(np.asarray(text_embedding, dtype=np.float32)).reshape(-1)
    return F.normalize(t, dim=0).to(device)


def _score(model: ClipModel, pixels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of <e, t> / |e|, the norm held constant: the cosine that zero-shot ranks by,
    made linear in the embedding e. The cosine's own gradient is the part of t orthogonal to e,
    which vanishes (and turns against the evidence) exactly where the image already matches."""
    e = model.model.encode_image(pixels).float()
    return ((e @ text) / e.norm(dim=-1).detach().clamp(min=1e-12)).sum()


def gradcam_maps(model: ClipModel, pixels: torch.Tensor, text: torch.Tensor, target: FeatureTarget) -> torch.Tensor:
    """Grad-CAM on a CNN feature map: relu(sum_c mean_hw(dS/dA_c) A_c), (N, h, w), un-normalised."""
    module = dict(image_tower(model).named_modules())[target.name]
    me = threading.get_ident()
    seen: dict[str, torch.Tensor] = {}

    def keep(mod, args, out):
        if threading.get_ident() == me and isinstance(out, torch.Tensor):  # not another thread's forward
            seen["map"] = out

    handle = module.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            pixels = pixels.detach().requires_grad_(True)  # a graph exists even when the weights are frozen
            score = _score(model, pixels, text)  # images are independent: one backward for the batch
            if "map" not in seen:
                raise RuntimeError(f"heatmap: the hook on {target.name} saw no tensor")
            # Only the feature map is differentiated: no parameter .grad is touched, and the backward
            # stops there (it runs through the pooling head only).
            (grads,) = torch.autograd.grad(score, seen["map"])
    finally:
        handle.remove()
    acts = seen["map"].detach()
    weights = grads.detach().mean(dim=(2, 3), keepdim=True)
    return (acts * weights).sum(1).clamp(min=0)


def gradient_maps(
    model: ClipModel, pixels: torch.Tensor, text: torch.Tensor, samples: int | None = None, sigma: float | None = None, seed: int = 0
) -> torch.Tensor:
    """SmoothGrad of |input x gradient|: the mean over `samples` noisy copies of |sum_c x_c dS/dx_c|
    (x normalised, so the reference is the dataset's mean colour), blurred over ~1/28 of the
    image. (N, S, S), non-negative, un-normalised. Model-agnostic: no hooks."""
    samples = int(samples or SAMPLES)
    sigma = SIGMA if sigma is None else float(sigma)
    gen = torch.Generator().manual_seed(seed)
    n, _, height, width = pixels.shape
    pixels = pixels.detach()
    span = float(pixels.max() - pixels.min()) or 1.0
    total = torch.zeros(n, height, width, device=pixels.device)
    with torch.enable_grad():
        # One pass per noisy copy over up to MAX_BATCH images: on a CPU a batch of copies of one
        # image is no faster per copy than one copy at a time, and it costs memory.
        for _ in range(samples):
            for start in range(0, n, MAX_BATCH):
                chunk = pixels[start : start + MAX_BATCH]
                noise = torch.randn(chunk.shape, generator=gen).to(chunk.device)
                noisy = (chunk + sigma * span * noise).requires_grad_(True)
                (g,) = torch.autograd.grad(_score(model, noisy, text), noisy)
                total[start : start + chunk.shape[0]] += (g.detach() * chunk).sum(1).abs()
    return _blur(total / samples, max(3, (height // 28) | 1))


def _blur(maps: torch.Tensor, k: int) -> torch.Tensor:
    x = torch.arange(k, dtype=torch.float32) - k // 2
    g = torch.exp(-(x**2) / (2 * (k / 4) ** 2))
    g = (g / g.sum()).to(maps.dtype).to(maps.device)
    m = maps[:, None]
    m = F.conv2d(F.pad(m, (k // 2, k // 2, 0, 0), mode="replicate"), g.view(1, 1, 1, k))
    m = F.conv2d(F.pad(m, (0, 0, k // 2, k // 2), mode="replicate"), g.view(1, 1, k, 1))
    return m[:, 0]


def occlusion_maps(model: ClipModel, pixels: torch.Tensor, text: torch.Tensor, cells: int = 14, window: int = 2) -> torch.Tensor:
    """Score drop when a window of `window` x `window` cells (of a `cells` x `cells` grid) is set
    to the dataset mean (0 after normalisation), stride one cell; each cell averages the windows
    covering it. (N, cells, cells), non-negative. Forwards only, through the model's current
    inference path (bf16/int8 when engine.models.fastpath switched it on)."""
    size = pixels.shape[-1]
    edges = np.linspace(0, size, cells + 1).round().astype(int)
    positions = [(i, j) for i in range(cells - window + 1) for j in range(cells - window + 1)]
    count = torch.zeros(cells, cells, device=pixels.device)
    for i, j in positions:
        count[i : i + window, j : j + window] += 1
    out = torch.zeros(pixels.shape[0], cells, cells, device=pixels.device)

    def cosine(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(model._image_forward(x).float(), dim=-1) @ text

    with torch.inference_mode():
        base = cosine(pixels)
        for n in range(pixels.shape[0]):
            for start in range(0, len(positions), MAX_BATCH):
                chunk = positions[start : start + MAX_BATCH]
                occluded = pixels[n].expand(len(chunk), -1, -1, -1).clone()
                for b, (i, j) in enumerate(chunk):
                    occluded[b, :, edges[i] : edges[i + window], edges[j] : edges[j + window]] = 0.0
                drops = base[n] - cosine(occluded)
                for b, (i, j) in enumerate(chunk):
                    out[n, i : i + window, j : j + window] += drops[b]
    return (out / count).clamp(min=0)


def resolve_method(model: ClipModel, method: str = "auto") -> str:
    """The method `auto` stands for on this model: "gradcam" for CNN towers, "gradient" otherwise."""
    if method not in METHODS:
        raise ValueError(f"unknown heatmap method '{method}' (known: {', '.join(METHODS)})")
    if method != "auto":
        return method
    target = find_feature_target(model)
    return "gradcam" if target is not None and target.kind == "map" else "gradient"


def _maps(model: ClipModel, pixels: torch.Tensor, text: torch.Tensor, method: str) -> tuple[torch.Tensor, tuple[float, float]]:
    """(N, h, w) maps over the model input, and the receptive-field offset of their cells."""
    method = resolve_method(model, method)
    pixels, text = pixels.to(_device(model)), text.to(_device(model))
    if method == "gradcam":
        target = find_feature_target(model)
        if target is None or target.kind != "map":
            raise ValueError("gradcam needs a CNN feature map, and this image tower has none; use 'gradient' or 'occlusion'")
        return gradcam_maps(model, pixels, text, target), target.offset
    if method == "gradient":
        return gradient_maps(model, pixels, text), (0.0, 0.0)
    return occlusion_maps(model, pixels, text), (0.0, 0.0)


# --------------------------------------------------------------------------- public API


def image_heatmap(model: ClipModel, image: np.ndarray, text_embedding: np.ndarray, *, method: str = "auto") -> np.ndarray:
    """Where `image` supports the label whose (normalised, (D,)) embedding is `text_embedding`.

    image: uint8 grey (H, W) or RGB (H, W, 3), as fed to the model.
    Returns float32 (H, W) in [0, 1] (divided by its maximum; all 0 when nothing supports the
    label); 0 outside the model's centre crop; higher = more support."""
    image = np.asarray(image)
    height, width = image.shape[:2]
    maps, offset = _maps(model, model.image_tensor([image]), _text_vector(text_embedding), method)
    return _normalise(to_image(model, maps, height, width, offset))[0]


def volume_heatmaps(model: ClipModel, images: list[np.ndarray], text_embedding: np.ndarray, *, method: str = "auto") -> list[np.ndarray]:
    """Heatmaps for the slices of a volume (each as `image_heatmap` takes it), batched, with one
    normalisation for the whole volume: the strongest evidence anywhere is 1, so a slice with weak
    support stays dim next to the slice that carries the finding. Slices may differ in size."""
    if len(images) == 0:
        return []
    text = _text_vector(text_embedding)
    raw: list[np.ndarray] = []
    for start in range(0, len(images), MAX_BATCH):
        chunk = [np.asarray(im) for im in images[start : start + MAX_BATCH]]
        maps, offset = _maps(model, model.image_tensor(chunk), text, method)
        for m, im in zip(maps, chunk):
            raw.append(to_image(model, m[None], im.shape[0], im.shape[1], offset)[0])
    top = max(float(r.max()) for r in raw)
    if not np.isfinite(top) or top <= 0:
        return [np.zeros_like(r) for r in raw]
    return [np.clip(r / top, 0.0, 1.0).astype(np.float32) for r in raw]


def _normalise(maps: np.ndarray) -> np.ndarray:
    top = float(maps.max()) if maps.size else 0.0
    if not np.isfinite(top) or top <= 0:
        return np.zeros_like(maps, dtype=np.float32)
    return np.clip(maps / top, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- overlay

# matplotlib's "inferno" (perceptually uniform, readable on grey) at 11 stops; interpolated to 256.
_INFERNO_STOPS = np.array(
    [
        (0, 0, 4),
        (22, 11, 57),
        (66, 10, 104),
        (106, 23, 110),
        (147, 38, 103),
        (188, 55, 84),
        (221, 81, 58),
        (243, 120, 25),
        (252, 165, 10),
        (246, 215, 70),
        (252, 255, 164),
    ],
    dtype=np.float32,
)
_POS = np.linspace(0.0, 1.0, len(_INFERNO_STOPS))
LUT = np.stack([np.interp(np.linspace(0, 1, 256), _POS, _INFERNO_STOPS[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)

LOW, HIGH = 0.2, 0.5  # heat below LOW is fully transparent; opacity ramps up to `alpha` at HIGH


def colorize(heat: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> uint8 (H, W, 3) through the built-in LUT."""
    idx = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float32)) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return LUT[idx]


def overlay(image_rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a heatmap over an image: uint8 grey (H, W) or RGB (H, W, 3) -> uint8 (H, W, 3).
    Transparent where heat < 0.2, full `alpha` from heat 0.5 up."""
    img = np.asarray(image_rgb)
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3]
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float32))
    if heat.shape != img.shape[:2]:
        raise ValueError(f"overlay: heat {heat.shape} and image {img.shape[:2]} differ in size")
    heat = np.clip(heat, 0.0, 1.0)
    a = float(np.clip(alpha, 0.0, 1.0)) * np.clip((heat - LOW) / (HIGH - LOW), 0.0, 1.0)[..., None]
    out = img.astype(np.float32) * (1.0 - a) + colorize(heat).astype(np.float32) * a
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


__all__ = [
    "METHODS",
    "FeatureTarget",
    "colorize",
    "crop_box",
    "find_feature_target",
    "image_heatmap",
    "resolve_method",
    "overlay",
    "volume_heatmaps",
]
