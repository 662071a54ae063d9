"""Evidence heatmaps: where an image supports a label, for CNN and ViT image towers.

Method (the default, `method="auto"`): **Grad-CAM on the last spatial feature map**
of the image tower, found generically, with **occlusion** as the model-agnostic
fallback.

- The score explained is the one zero-shot ranks by: cosine(image embedding,
  text embedding of the label). Grad-CAM weights each channel of a spatial
  feature map A by the mean gradient of that score and keeps the positive part,
  relu(sum_c mean(dS/dA_c) * A_c), then samples it back to the original pixels.
- Where the map is found (one probe forward with hooks, cached per tower):
  ViT towers (open_clip's OpenAI-style `VisionTransformer`, timm ViT trunks as
  in BiomedCLIP, anything with a list of token blocks): the tokens *entering the
  last block*, patch tokens reshaped to the patch grid (prefix tokens such as CLS
  or registers dropped by count). Not the last block's output: with CLS pooling
  the patch tokens leaving the last block never reach the embedding, so their
  gradient is zero. CNN towers (open_clip's ModifiedResNet, timm ResNets via
  TimmModel, our compact and deflated-3D trunks): the last module output shaped
  (N, C, h, w) with h*w > 1, i.e. the map entering global/attention pooling.
- Why this one: it is the only candidate that is both faithful on our synthetic
  test and fast enough for a one-image click on a 2-core CPU with a ViT-B/16
  tower: one forward plus a backward through one block or the pooling head.
  Measured (bench/heatmap_speed.py, bench/results/heatmap_speed.md; 2 threads,
  fp32, one image):

      tower                     gradcam   gradient (SmoothGrad x8)   occlusion (169 windows)
      OpenAI ViT-B/16 224 px    0.13 s    2.4 s                      8.0 s (fp32)
      timm ViT-B/16 (BiomedCLIP)0.12 s    2.4 s                      7.9 s (fp32)
      ResNet-50 (timm) 224 px   0.19 s    3.9 s                      12 s (fp32)

  Faithfulness on the synthetic test (tiny towers fine-tuned to answer "bright
  spot" for a bright square, 24 held-out images with the square at random
  places; pointing game = argmax inside the square; ratio = mean heat inside /
  mean heat outside the square, inside the crop):

      tiny ViT (8x8 tokens)     gradcam 24/24 (ratio 10.4)  gradient 24/24 (5.1)  occlusion 24/24 (8.0)
      tiny CNN (4x4 map)        gradcam 24/24 (ratio  5.6)  gradient 24/24 (5.5)  occlusion 24/24 (9.0)

  All three point correctly; input gradients are speckled (they need blurring
  and 8 noisy passes to be readable) and occlusion costs ~150 forwards. Grad-CAM
  is smooth by construction (one value per patch / feature cell), and its
  resolution (16 px for ViT-B/16 at 224, 32 px for a ResNet) matches what an
  overlay in the viewer can show. The generic locator is what makes it work for
  both families without per-architecture code; a tower where no spatial map can
  be found (or `method="occlusion"`) gets occlusion, which needs nothing but
  forwards and uses the model's fast inference path.
- Output geometry: the model sees a resized + centre-cropped square; the map
  is sampled back through that transform (read from the model's own transform),
  so it has the input's (H, W) and is 0 outside the crop.
- Normalisation: a single image's map is divided by its maximum (no positive
  evidence -> all zeros). A volume's slice maps share one maximum, so a slice
  with weak support stays dim next to the slice that carries the finding.
- Gradients are taken with `torch.autograd.grad` w.r.t. the feature map only:
  parameter `.grad`s are never touched and the backward stops at that map.
  Hooks record only the calling thread's forward, so a concurrent
  `encode_images` on the same model is not captured.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from engine.models.clip import ClipModel

METHODS = ("auto", "gradcam", "gradient", "occlusion")
BATCH = 16  # slices per forward/backward in volume_heatmaps

# --------------------------------------------------------------------------- locating the feature map


@dataclass(frozen=True)
class FeatureTarget:
    """Where Grad-CAM reads the tower: a module whose input ("tokens") or output ("map") is hooked."""

    name: str  # dotted module name inside the image tower
    kind: str  # "tokens": (N, L, D) input of the last ViT block; "map": (N, C, h, w) output
    grid: tuple[int, int]  # (gh, gw) of the spatial map at the model's image size


_TARGETS: "weakref.WeakKeyDictionary[torch.nn.Module, FeatureTarget | None]" = weakref.WeakKeyDictionary()
_TARGET_LOCK = threading.Lock()


def image_tower(model: ClipModel) -> torch.nn.Module:
    """The open_clip image tower (`visual`) of a ClipModel."""
    return getattr(model.model, "visual", model.model)


def find_feature_target(model: ClipModel) -> FeatureTarget | None:
    """Locate the last spatial feature map of the image tower (cached per tower), or None."""
    visual = image_tower(model)
    with _TARGET_LOCK:
        if visual in _TARGETS:
            return _TARGETS[visual]
    target = _probe(model, visual)
    with _TARGET_LOCK:
        _TARGETS[visual] = target
    return target


def _probe(model: ClipModel, visual: torch.nn.Module) -> FeatureTarget | None:
    """One forward of a blank image with hooks on every submodule, recording output shapes in order."""
    records: list[tuple[str, tuple[int, ...]]] = []
    handles = []
    for name, module in visual.named_modules():
        if not name:
            continue

        def hook(mod, args, out, name=name):
            if isinstance(out, torch.Tensor):
                records.append((name, tuple(out.shape)))

        handles.append(module.register_forward_hook(hook))
    size = model.image_size
    try:
        with torch.no_grad():
            model.model.encode_image(torch.zeros(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    shapes = dict(records)
    modules = dict(visual.named_modules())

    # Patch grid: the first 4-D output (the patch embedding conv, or a CNN stem).
    first_map = next((s for _, s in records if len(s) == 4 and s[2] * s[3] > 1), None)

    # ViT: the longest list of blocks whose members all map tokens (1, L, D) -> (1, L, D).
    if first_map is not None:
        candidates = []
        for name, module in visual.named_modules():
            if not isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)) or len(module) < 1:
                continue
            names = [f"{name}.{i}" if name else str(i) for i in range(len(module))]
            outs = [shapes.get(n) for n in names]
            if any(o is None or len(o) != 3 for o in outs) or len(set(outs)) != 1:
                continue
            shape = outs[0]
            length = shape[1] if shape[0] == 1 else shape[0]  # batch-first or (L, N, D)
            if length < first_map[2] * first_map[3]:  # fewer tokens than patches: not a patch-token stack
                continue
            candidates.append((name, names))
        # Outermost stacks only (an MLP Sequential inside a block is not the block list); the longest wins.
        outer = [c for c in candidates if not any(c[0].startswith(o[0] + ".") for o in candidates if o is not c)]
        best = None
        for name, names in outer:
            if best is None or len(names) >= best[1]:
                best = (names[-1], len(names), (first_map[2], first_map[3]))
        if best is not None:
            return FeatureTarget(name=best[0], kind="tokens", grid=best[2])

    # CNN: the last module output shaped (1, C, h, w) with more than one cell.
    last_map = None
    for name, shape in records:
        if len(shape) == 4 and shape[2] * shape[3] > 1:
            last_map = (name, shape)
    if last_map is not None and last_map[0] in modules:
        return FeatureTarget(name=last_map[0], kind="map", grid=(last_map[1][2], last_map[1][3]))
    return None


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
        s = size / min(height, width)
        nh, nw = (size, int(size * width / height)) if height <= width else (int(size * height / width), size)
        scale_y, scale_x = height / nh, width / nw
        off_y, off_x = int(round((nh - size) / 2.0)) * scale_y, int(round((nw - size) / 2.0)) * scale_x
        h = w = size
        del s
    return off_y, off_x, h * scale_y, w * scale_x


def to_image(model: ClipModel, maps: torch.Tensor, height: int, width: int) -> np.ndarray:
    """(N, gh, gw) maps over the model's square input -> (N, height, width) over the original image,
    bilinear, zero outside the crop."""
    top, left, ch, cw = crop_box(model, height, width)
    ys = (torch.arange(height, dtype=torch.float32) + 0.5 - top) / ch  # 0..1 inside the crop
    xs = (torch.arange(width, dtype=torch.float32) + 0.5 - left) / cw
    gy, gx = torch.meshgrid(ys * 2 - 1, xs * 2 - 1, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1)[None].expand(maps.shape[0], -1, -1, -1)
    out = F.grid_sample(maps[:, None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0]
    inside = ((ys >= 0) & (ys < 1))[:, None] & ((xs >= 0) & (xs < 1))[None, :]
    return (out * inside).numpy().astype(np.float32)


# --------------------------------------------------------------------------- methods


def _text_vector(text_embedding: np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(text_embedding, dtype=np.float32)).reshape(-1)
    return F.normalize(t, dim=0)


class _Capture:
    """Hook that keeps the target tensor of the calling thread's forward."""

    def __init__(self, target: FeatureTarget):
        self.target = target
        self.thread = threading.get_ident()
        self.value: torch.Tensor | None = None

    def pre(self, module, args):
        if threading.get_ident() == self.thread and args and isinstance(args[0], torch.Tensor):
            self.value = args[0]

    def post(self, module, args, out):
        if threading.get_ident() == self.thread and isinstance(out, torch.Tensor):
            self.value = out


def gradcam_maps(model: ClipModel, pixels: torch.Tensor, text: torch.Tensor, target: FeatureTarget) -> torch.Tensor:
    """Grad-CAM maps (N, gh, gw), non-negative, un-normalised."""
    module = dict(image_tower(model).named_modules())[target.name]
    cap = _Capture(target)
    import os
    if target.kind == "tokens" and os.environ.get("HM_LN"):
        sub = [m for m in module.modules() if isinstance(m, torch.nn.LayerNorm)][0]
        handle = sub.register_forward_hook(cap.post)
    else:
        handle = module.register_forward_pre_hook(cap.pre) if target.kind == "tokens" else module.register_forward_hook(cap.post)
    try:
        with torch.enable_grad():
            pixels = pixels.detach().requires_grad_(True)  # the graph exists even if the weights are frozen
            emb = model.encode_image_tensor(pixels)
            acts = cap.value
            if acts is None:
                raise RuntimeError(f"heatmap: the hook on {target.name} saw no tensor")
            score = (emb @ text).sum()  # per-image scores are independent: one backward for the batch
            (grads,) = torch.autograd.grad(score, acts)
    finally:
        handle.remove()
    acts, grads = acts.detach(), grads.detach()
    n = pixels.shape[0]
    gh, gw = target.grid
    if target.kind == "tokens":
        if acts.shape[0] != n and acts.shape[1] == n:  # (L, N, D) transformers
            acts, grads = acts.transpose(0, 1), grads.transpose(0, 1)
        acts, grads = acts[:, -gh * gw :], grads[:, -gh * gw :]  # drop prefix tokens (CLS, registers)
        import os
        v = os.environ.get("HM_VARIANT", "gradcam")
        if v == "gradcam":
            weights = grads.mean(dim=1, keepdim=True)  # (N, 1, D)
            cam = (acts * weights).sum(-1).reshape(n, gh, gw)
        elif v == "taylor":
            cam = (acts * grads).sum(-1).reshape(n, gh, gw)
        elif v == "centred":
            weights = grads.mean(dim=1, keepdim=True)
            cam = ((acts - acts.mean(1, keepdim=True)) * weights).sum(-1).reshape(n, gh, gw)
        elif v == "layercam":
            cam = (acts * grads.clamp(min=0)).sum(-1).reshape(n, gh, gw)
        elif v == "gradnorm":
            cam = grads.norm(dim=-1).reshape(n, gh, gw)
    else:
        weights = grads.mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
        cam = (acts * weights).sum(1)
    return cam.clamp(min=0)


def gradient_maps(model: ClipModel, pixels: torch.Tensor, text: torch.Tensor, samples: int = 8, sigma: float = 0.15, seed: int = 0) -> torch.Tensor:
    """SmoothGrad of |input x gradient| (N, S, S), blurred over ~1/28 of the image."""
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(pixels.shape[0], pixels.shape[2], pixels.shape[3])
    span = float(pixels.max() - pixels.min()) or 1.0
    with torch.enable_grad():
        for _ in range(samples):
            noisy = (pixels + sigma * span * torch.randn(pixels.shape, generator=gen)).requires_grad_(True)
            score = (model.encode_image_tensor(noisy) @ text).sum()
            (g,) = torch.autograd.grad(score, noisy)
            total += (g * pixels).sum(1).abs().detach()
    size = pixels.shape[-1]
    k = max(3, (size // 28) | 1)
    return _blur(total / samples, k)


def _blur(maps: torch.Tensor, k: int) -> torch.Tensor:
    x = torch.arange(k, dtype=torch.float32) - k // 2
    g = torch.exp(-(x**2) / (2 * (k / 4) ** 2))
    g = g / g.sum()
    m = maps[:, None]
    m = F.conv2d(F.pad(m, (k // 2, k // 2, 0, 0), mode="replicate"), g.view(1, 1, 1, k))
    m = F.conv2d(F.pad(m, (0, 0, k // 2, k // 2), mode="replicate"), g.view(1, 1, k, 1))
    return m[:, 0]


def occlusion_maps(model: ClipModel, pixels: torch.Tensor, text: torch.Tensor, cells: int = 14, window: int = 2, batch: int = BATCH) -> torch.Tensor:
    """Score drop when a window of `window` x `window` cells (of a cells x cells grid) is set to the
    dataset mean (0 after normalisation); stride one cell. (N, cells, cells), non-negative."""
    size = pixels.shape[-1]
    edges = np.linspace(0, size, cells + 1).round().astype(int)
    positions = [(i, j) for i in range(cells - window + 1) for j in range(cells - window + 1)]
    out = torch.zeros(pixels.shape[0], cells, cells)
    count = torch.zeros(cells, cells)
    for i, j in positions:
        count[i : i + window, j : j + window] += 1
    with torch.inference_mode():
        base = F.normalize(model._image_forward(pixels).float(), dim=-1) @ text  # (N,)
        for n in range(pixels.shape[0]):
            img = pixels[n]
            for start in range(0, len(positions), batch):
                chunk = positions[start : start + batch]
                occluded = img.expand(len(chunk), -1, -1, -1).clone()
                for b, (i, j) in enumerate(chunk):
                    occluded[b, :, edges[i] : edges[i + window], edges[j] : edges[j + window]] = 0.0
                scores = F.normalize(model._image_forward(occluded).float(), dim=-1) @ text
                for b, (i, j) in enumerate(chunk):
                    out[n, i : i + window, j : j + window] += base[n] - scores[b]
    return (out / count).clamp(min=0)


def _maps(model: ClipModel, pixels: torch.Tensor, text: torch.Tensor, method: str) -> torch.Tensor:
    if method not in METHODS:
        raise ValueError(f"unknown heatmap method '{method}' (known: {', '.join(METHODS)})")
    if method in ("auto", "gradcam"):
        target = find_feature_target(model)
        if target is not None:
            return gradcam_maps(model, pixels, text, target)
        if method == "gradcam":
            raise ValueError("gradcam: no spatial feature map found in this image tower; use method='occlusion'")
        method = "occlusion"
    if method == "gradient":
        return gradient_maps(model, pixels, text)
    return occlusion_maps(model, pixels, text)


def _normalise(maps: np.ndarray) -> np.ndarray:
    top = float(maps.max()) if maps.size else 0.0
    if not np.isfinite(top) or top <= 0:
        return np.zeros_like(maps, dtype=np.float32)
    return np.clip(maps / top, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- public API


def image_heatmap(model: ClipModel, image: np.ndarray, text_embedding: np.ndarray, *, method: str = "auto") -> np.ndarray:
    """Where `image` supports the label whose (normalised, (D,)) embedding is `text_embedding`.

    image: uint8 grey (H, W) or RGB (H, W, 3), as fed to the model.
    Returns float32 (H, W) in [0, 1]; 0 outside the model's centre crop; higher = more support."""
    image = np.asarray(image)
    height, width = image.shape[:2]
    pixels = model.image_tensor([image])
    maps = _maps(model, pixels, _text_vector(text_embedding), method)
    return _normalise(to_image(model, maps, height, width))[0]


def volume_heatmaps(model: ClipModel, images: list[np.ndarray], text_embedding: np.ndarray, *, method: str = "auto") -> list[np.ndarray]:
    """Heatmaps for the slices of a volume, batched; one shared normalisation across slices
    (the strongest evidence in the volume is 1). Slices may differ in size."""
    if len(images) == 0:
        return []
    text = _text_vector(text_embedding)
    raw: list[np.ndarray] = []
    for start in range(0, len(images), BATCH):
        chunk = [np.asarray(im) for im in images[start : start + BATCH]]
        maps = _maps(model, model.image_tensor(chunk), text, method)
        for m, im in zip(maps, chunk):
            raw.append(to_image(model, m[None], im.shape[0], im.shape[1])[0])
    top = max(float(r.max()) for r in raw)
    if not np.isfinite(top) or top <= 0:
        return [np.zeros_like(r) for r in raw]
    return [np.clip(r / top, 0.0, 1.0).astype(np.float32) for r in raw]


# --------------------------------------------------------------------------- overlay

# matplotlib's "inferno" (perceptually uniform, readable on grey) at 11 stops; interpolated to 256.
_INFERNO_STOPS = np.array(
    [
        (0, 0, 4), (22, 11, 57), (66, 10, 104), (106, 23, 110), (147, 38, 103), (188, 55, 84),
        (221, 81, 58), (243, 120, 25), (252, 165, 10), (246, 215, 70), (252, 255, 164),
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
    "overlay",
    "volume_heatmaps",
]
