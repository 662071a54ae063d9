"""Self-supervised pretraining of a 2D image tower (SimCLR / NT-Xent) on every train image and slice.

    python -m training.ssl --manifest runs/manifest.jsonl --data-root ../shared/data \\
        --out runs/ssl --tower convnext_atto --image-size 96 --epochs 3

LVM-Med's lesson: a tower pretrained without labels on medical images
transfers better than one trained from scratch (and no pretrained 2D
weights install offline). This stage runs before CLIP alignment; the CLIP
trainer starts its image tower from `load_trunk` / `trunk_state_for_open_clip`.

Design decisions
- Data: the manifest's `split == "train"` rows of every dataset (the
  recipes put unlabelled rows there too); val/test rows are never seen, so
  later linear-probe and zero-shot numbers stay honest. Labels are ignored.
- Pixels come from `training.image_cache` at C = ceil(1.15 * image_size):
  decoded once, memory-mapped afterwards; crops are taken from the C-pixel
  image and resampled to image_size.
- Augmentation runs on whole batches of tensors, not per image through
  PIL: one `affine_grid` + `grid_sample` per view does random resized crop
  (area 0.3-1, aspect 3/4-4/3), flips (each axis p=0.5) only for the
  modalities in `training.augment.FLIP_OK` (pathology, dermoscopy: the CLIP
  stage's policy; a trunk made flip-invariant on X-ray or CT would forget
  laterality, heart side, "left kidney") and small rotations (+-10 deg); then per-sample brightness/contrast (+-0.3, p=0.8),
  saturation (+-0.2, p=0.8) and grayscale (p=0.1), and Gaussian blur
  (p=0.5, sigma 0.1-1.5 px at 96 px, one grouped separable conv). No hue
  jitter: colour is diagnostic in pathology/fundus/dermoscopy. Saturation
  and grayscale are exact no-ops on grey images (equal channels), so grey
  modalities get no colour jitter without needing to be detected.
- Loss: NT-Xent over 2B views (SimCLR), temperature 0.2 by default (small
  batches favour the upper end of 0.1-0.2); both views pass through the
  trunk as one 2B batch. Projection head Linear-BN-ReLU-Linear (F -> 512 ->
  128), discarded after training.
- Optimiser: AdamW (no weight decay on biases and norm parameters), linear
  warmup (10% of steps) then cosine to 1% of the peak. The learning rate is
  a pure function of the step, so resuming needs only the optimiser state
  and the step.
- Determinism: the model is initialised after `torch.manual_seed(seed)`;
  each epoch's image order is `default_rng(seed, epoch)`'s permutation and
  each step's augmentation draws from a generator seeded by (seed, step), so
  a resumed run sees exactly the batches and views an uninterrupted one
  would.
- Normalisation after augmentation: open_clip's OPENAI_DATASET_MEAN/STD,
  the default of the CLIP stage that inherits this trunk, so its inputs
  match; written into ssl_config.json.
- Outputs in --out: `trunk.safetensors` (timm keys of the trunk created
  with num_classes=0), `ssl_config.json` (tower, sizes, loss curve, wall
  time, img/s, CPU), `last.pt` (model + optimiser + step, for resume).
- fp32 on CPU: this machine has no AMX / avx512_bf16, where bf16 autocast
  is slower, not faster.

Throughput (Intel(R) Xeon(R) Processor @ 2.80GHz, avx512f, 2 cores shared
with other jobs (load 3-4 during the runs), torch 2.14.1, fp32, batch 128
at 96 px = 256 views per step, augmentation included, median of 4 steps):
  tower          threads  NCHW       NHWC (channels_last)
  convnext_atto  1        34 img/s   32 img/s
  convnext_atto  2        16-49      13-15     (49 at the quietest moment)
  regnetx_004    1        29 img/s   41-50 img/s  (43 in a CLI run)
  regnetx_004    2        8-18       8-13
With another job on the machine, two OpenMP threads fight it and lose;
`--threads 1` is then the faster choice. Augmentation costs ~0.12 s per
step (two views of 128, ~4% of a step); decoding the cache ~4 ms per
PNG/JPEG row, once. Budget for ~16k train images: one epoch is ~5.5 min
at 49 img/s, ~8 min at 34 img/s, ~6 min at 43 img/s, so the default 2
epochs take ~11-16 min plus the one-off decode; pick `--epochs` from the
img/s the progress bar shows.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from engine.models.cpu import cpu_profile
from torch import nn

from training.config import arg, parse

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip.constants.OPENAI_DATASET_MEAN
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)  # open_clip.constants.OPENAI_DATASET_STD


@dataclass
class AugmentConfig:
    scale: tuple[float, float] = (0.3, 1.0)  # random resized crop: fraction of the cached image's area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio range
    hflip: float = 0.5  # probability of a left-right flip (rows whose modality allows flips)
    vflip: float = 0.5  # probability of an up-down flip (same rows)
    rotate: float = 10.0  # max rotation, degrees either way
    brightness: float = 0.3  # multiplicative brightness factor in [1-b, 1+b]
    contrast: float = 0.3  # contrast factor in [1-c, 1+c] around the image mean
    saturation: float = 0.2  # saturation factor in [1-s, 1+s]; no-op on grey images
    jitter_p: float = 0.8  # probability of the brightness/contrast/saturation jitter
    grayscale_p: float = 0.1  # probability of converting to grey; no-op on grey images
    blur_p: float = 0.5  # probability of Gaussian blur
    blur_sigma: tuple[float, float] = (0.1, 1.5)  # blur sigma in pixels at 96 px (scaled with image size)


@dataclass
class SSLConfig:
    manifest: str = field(
        default="runs/manifest.jsonl", metadata=arg('JSONL manifest (training/manifest.py); split == "train" rows are used')
    )
    data_root: str = field(default="../shared/data", metadata=arg("root that manifest paths are relative to"))
    out: str = field(default="runs/ssl", metadata=arg("output folder: trunk.safetensors, ssl_config.json, last.pt"))
    cache: str | None = field(default=None, metadata=arg("image cache .npy (default <out>/images_<C>px.npy)"))
    tower: str = field(default="convnext_atto", metadata=arg("timm model name, created with pretrained=False, num_classes=0"))
    image_size: int = field(default=96, metadata=arg("training resolution (views are image_size squares)"))
    epochs: int = field(default=2, metadata=arg("passes over the train rows (2 x 16k images fit ~10-15 min on 2 cores, see above)"))
    batch_size: int = field(default=128, metadata=arg("images per step (2x views go through the trunk)"))
    lr: float = field(default=1e-3, metadata=arg("peak AdamW learning rate"))
    weight_decay: float = field(default=0.05, metadata=arg("AdamW decoupled weight decay (not on biases/norms)"))
    warmup: float = field(default=0.1, metadata=arg("fraction of all steps spent in linear warmup"))
    min_lr_ratio: float = 0.01  # cosine floor as a fraction of the peak
    temperature: float = field(default=0.2, metadata=arg("NT-Xent temperature"))
    proj_hidden: int = 512  # projection head hidden width
    proj_dim: int = 128  # projection head output width
    seed: int = field(default=0, metadata=arg("seeds init, image order and augmentation"))
    max_steps: int | None = field(
        default=None, metadata=arg("stop after this many steps (tests, smoke runs); schedule still spans all epochs")
    )
    limit: int | None = field(default=None, metadata=arg("use only the first N train rows (development)"))
    save_every: int = field(default=50, metadata=arg("steps between last.pt checkpoints (also saved at the end)"))
    threads: int | None = field(default=None, metadata=arg("torch intra-op threads (default: torch's choice; 1 is faster on a shared CPU)"))
    channels_last: bool | None = field(
        default=None, metadata=arg("NHWC tensors; None = on except for ConvNeXt towers (measured, see above)")
    )
    device: str = field(default="auto", metadata=arg('"auto" (cuda if available), "cpu", "cuda"', choices=["auto", "cpu", "cuda"]))
    fresh: bool = field(default=False, metadata=arg("ignore an existing last.pt instead of resuming"))
    progress: bool = field(default=True, metadata=arg("tqdm bars"))
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # view augmentations


# --------------------------------------------------------------------------- loss
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss. z1, z2: (B, D) projections of two views of the same B images.

    Each of the 2B views must pick its partner among the 2B - 1 others
    (cosine similarity / temperature, softmax); the mean cross-entropy is returned."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


# --------------------------------------------------------------------------- augmentation
def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def _bern(g: torch.Generator, n: int, p: float) -> torch.Tensor:
    return torch.rand(n, generator=g) < p


def augment_batch(
    images: torch.Tensor, size: int, g: torch.Generator, cfg: AugmentConfig = AugmentConfig(), flip_ok: torch.Tensor | None = None
) -> torch.Tensor:
    """uint8 (B, C, C, 3) -> float (B, 3, size, size) in 0..1: one random view per image.

    flip_ok: bool (B,), which images may be flipped (None: all).

    Random draws come from `g` on the CPU (reproducible whatever the device);
    the pixel work runs on the images' device."""
    dev = images.device
    b = images.shape[0]
    x = images.permute(0, 3, 1, 2).float().div_(255.0)

    # Crop + flip + rotation as one affine map from output to input coordinates (normalised [-1, 1]).
    area = _uniform(g, b, *cfg.scale)
    logr = _uniform(g, b, math.log(cfg.ratio[0]), math.log(cfg.ratio[1]))
    w = torch.sqrt(area * torch.exp(logr)).clamp(max=1.0)
    h = torch.sqrt(area / torch.exp(logr)).clamp(max=1.0)
    cx = _uniform(g, b, -1, 1) * (1 - w)
    cy = _uniform(g, b, -1, 1) * (1 - h)
    allowed = torch.ones(b, dtype=torch.bool) if flip_ok is None else flip_ok.cpu().bool()
    sx = torch.where(_bern(g, b, cfg.hflip) & allowed, -1.0, 1.0)
    sy = torch.where(_bern(g, b, cfg.vflip) & allowed, -1.0, 1.0)
    ang = _uniform(g, b, -cfg.rotate, cfg.rotate) * (math.pi / 180)
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.stack(
        [
            torch.stack([w * cos * sx, -w * sin * sy, cx], 1),
            torch.stack([h * sin * sx, h * cos * sy, cy], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta.to(dev), [b, 3, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # Photometric jitter: per-sample factors, 1.0 where the coin says no.
    on = _bern(g, b, cfg.jitter_p)
    bright = torch.where(on, _uniform(g, b, 1 - cfg.brightness, 1 + cfg.brightness), 1.0)
    contr = torch.where(on, _uniform(g, b, 1 - cfg.contrast, 1 + cfg.contrast), 1.0)
    sat = torch.where(on, _uniform(g, b, 1 - cfg.saturation, 1 + cfg.saturation), 1.0)
    sat = torch.where(_bern(g, b, cfg.grayscale_p), 0.0, sat)
    x = x * bright.to(dev).view(b, 1, 1, 1)
    lum = torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)
    grey = (x * lum).sum(1, keepdim=True)
    x = grey + (x - grey) * sat.to(dev).view(b, 1, 1, 1)
    mean = grey.mean((1, 2, 3), keepdim=True)
    x = ((x - mean) * contr.to(dev).view(b, 1, 1, 1) + mean).clamp_(0.0, 1.0)

    # Gaussian blur, separable, one grouped conv for the whole batch; unblurred samples get a delta kernel.
    k_scale = size / 96.0
    smax = cfg.blur_sigma[1] * k_scale
    radius = max(1, math.ceil(3 * smax))
    sigma = torch.where(_bern(g, b, cfg.blur_p), _uniform(g, b, cfg.blur_sigma[0] * k_scale, smax), 1e-3)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k1 = torch.exp(-(t.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    k1 = (k1 / k1.sum(1, keepdim=True)).to(dev).repeat_interleave(3, 0)  # (B*3, K)
    y = x.reshape(1, b * 3, size, size)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k1.view(b * 3, 1, 1, -1), groups=b * 3)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k1.view(b * 3, 1, -1, 1), groups=b * 3)
    return y.view(b, 3, size, size)


def normalize(x: torch.Tensor, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


# --------------------------------------------------------------------------- model
class SSLModel(nn.Module):
    """timm trunk (pooled features) + projection head for the contrastive loss (the head is discarded)."""

    def __init__(self, tower: str, proj_hidden: int = 512, proj_dim: int = 128):
        super().__init__()
        import timm

        self.trunk = timm.create_model(tower, pretrained=False, num_classes=0)
        feats = self.trunk.num_features
        self.head = nn.Sequential(
            nn.Linear(feats, proj_hidden, bias=False),
            nn.BatchNorm1d(proj_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(proj_hidden, proj_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def load_trunk(path: str | Path, map_location: str = "cpu") -> nn.Module:
    """An SSL output folder (or its trunk.safetensors) -> the timm trunk with the pretrained weights, eval mode.

    The tower name comes from ssl_config.json beside the weights."""
    import timm
    from safetensors.torch import load_file

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = folder / "trunk.safetensors" if path.is_dir() else path
    cfg = json.loads((folder / "ssl_config.json").read_text())
    model = timm.create_model(cfg["tower"], pretrained=False, num_classes=0)
    model.load_state_dict(load_file(str(weights), device=map_location), strict=True)
    model.pretrained_cfg = dict(
        getattr(model, "pretrained_cfg", {}) or {},
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        input_size=(3, cfg["image_size"], cfg["image_size"]),
    )
    return model.eval()


def trunk_state_for_open_clip(state: dict[str, torch.Tensor] | nn.Module) -> dict[str, torch.Tensor]:
    """Trunk weights keyed for an open_clip CLIP whose vision tower is TimmModel (`visual.trunk.*`).

    Load with `clip.load_state_dict(sd, strict=False)` and check that the
    missing keys are only the text tower, `visual.head.*` and the logit
    scale: open_clip builds the trunk with the same timm keys when
    vision_cfg has timm_model_name=<tower>, timm_proj "linear"/"mlp" (checked
    for convnext_atto and regnetx_004, pool "avg" and ""). With
    timm_proj "none" the trunk gains a classifier (`visual.trunk.head.fc`
    or `fc`) that this state does not have."""
    if isinstance(state, nn.Module):
        state = state.state_dict()
    return {f"visual.trunk.{k}": v for k, v in state.items()}


# --------------------------------------------------------------------------- training
def use_channels_last(cfg: SSLConfig) -> bool:
    """NHWC helps BatchNorm/grouped-conv towers (regnetx_004: 29 -> 41 img/s on one core) and not
    timm's ConvNeXt (its LayerNorm2d permutes anyway; 34 -> 32 img/s)."""
    if cfg.channels_last is not None:
        return cfg.channels_last
    return not cfg.tower.startswith(("convnext", "test_convnext"))


def lr_at(step: int, total: int, cfg: SSLConfig) -> float:
    warm = max(1, round(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _param_groups(model: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0] >> 1))


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def select_rows(cfg: SSLConfig):
    from training.manifest import read_manifest

    rows = read_manifest(cfg.manifest, splits=["train"])
    if cfg.limit:
        rows = rows[: cfg.limit]
    if not rows:
        raise SystemExit(f"no train rows in {cfg.manifest}")
    return rows


def train(cfg: SSLConfig) -> dict:
    """Run (or resume) SSL pretraining; returns the summary written to ssl_config.json."""
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads_before)  # callers (tests, notebooks) keep their setting


@dataclass
class _Schedule:
    """How many rows, the batch, and the steps: whole batches only (NT-Xent wants full batches)."""

    n: int
    batch: int
    steps_per_epoch: int
    total: int  # steps the cosine schedule spans (all epochs)
    stop: int  # steps actually run (max_steps may cut the run short)

    @classmethod
    def of(cls, n: int, cfg: SSLConfig) -> "_Schedule":
        batch = min(cfg.batch_size, n)
        steps_per_epoch = max(1, n // batch)  # drop the ragged tail: NT-Xent wants full batches
        total = steps_per_epoch * cfg.epochs
        return cls(n, batch, steps_per_epoch, total, min(total, cfg.max_steps) if cfg.max_steps else total)


@dataclass
class _Progress:
    """What a checkpoint resumes: steps done, the loss curve, training wall time."""

    step: int = 0
    losses: list = field(default_factory=list)
    wall: float = 0.0


def _resume(last: Path, model: nn.Module, opt, ident: dict, device) -> _Progress:
    """Model and optimiser state from `last`; a checkpoint of another run (other ident) is an error."""
    ck = torch.load(last, map_location=device, weights_only=True)
    if ck["ident"] != ident:
        diff = {k: (ck["ident"].get(k), v) for k, v in ident.items() if ck["ident"].get(k) != v}
        raise SystemExit(f"{last} is from a different run {diff}; pass --fresh to start over")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    return _Progress(ck["step"], list(ck["losses"]), float(ck["wall"]))


def _checkpoint(last: Path, model: nn.Module, opt, progress: _Progress, ident: dict, cfg: SSLConfig) -> None:
    _atomic_save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "step": progress.step,
            "losses": progress.losses,
            "wall": progress.wall,
            "ident": ident,
            "config": asdict(cfg),
        },
        last,
    )


def _train(cfg: SSLConfig) -> dict:
    from training.image_cache import build_cache, cache_key

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = select_rows(cfg)
    cache_size = math.ceil(cfg.image_size * 1.15)
    cache_path = Path(cfg.cache) if cfg.cache else out / f"images_{cache_size}px.npy"
    images = build_cache(rows, cfg.data_root, cache_size, cache_path, progress=cfg.progress)
    rows_key = cache_key(rows, cache_size)
    from training.augment import FLIP_OK  # one flip policy for SSL and CLIP

    flip_ok = torch.tensor([r.modality in FLIP_OK for r in rows])
    sched = _Schedule.of(len(rows), cfg)

    _seed_all(cfg.seed)
    model = SSLModel(cfg.tower, cfg.proj_hidden, cfg.proj_dim).to(device)
    channels_last = use_channels_last(cfg)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    ident = {
        "tower": cfg.tower,
        "image_size": cfg.image_size,
        "batch_size": sched.batch,
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "rows_key": rows_key,
    }
    last = out / "last.pt"
    progress = _resume(last, model, opt, ident, device) if last.is_file() and not cfg.fresh else _Progress()
    _run_steps(
        cfg,
        model,
        opt,
        images,
        flip_ok,
        sched,
        progress,
        device,
        channels_last,
        lambda: _checkpoint(last, model, opt, progress, ident, cfg),
    )

    from safetensors.torch import save_file

    trunk_state = {k: v.detach().cpu().contiguous() for k, v in model.trunk.state_dict().items()}
    save_file(trunk_state, str(out / "trunk.safetensors"))
    summary = _summary(cfg, sched, progress, cache_size, device, channels_last, rows_key, model)
    (out / "ssl_config.json").write_text(json.dumps(summary, indent=1))
    return summary


def _run_steps(
    cfg: SSLConfig, model, opt, images, flip_ok, sched: _Schedule, progress: _Progress, device, channels_last, checkpoint
) -> None:
    """Train from progress.step to sched.stop (checkpoint every save_every steps and at the end)."""
    from tqdm import tqdm

    model.train()
    perm_epoch, perm = -1, None
    bar = tqdm(
        total=sched.stop,
        initial=progress.step,
        desc=f"ssl {cfg.tower} {cfg.image_size}px",
        unit="step",
        disable=not cfg.progress,
        smoothing=0.1,
    )
    seen_since, t_since = 0, time.perf_counter()
    while progress.step < sched.stop:
        t0 = time.perf_counter()
        epoch, k = divmod(progress.step, sched.steps_per_epoch)
        if epoch != perm_epoch:
            perm, perm_epoch = np.random.default_rng([cfg.seed, epoch]).permutation(sched.n), epoch
        idx = np.sort(perm[k * sched.batch : (k + 1) * sched.batch])  # sorted: memmap reads stay sequential
        value = _step(cfg, model, opt, images, idx, flip_ok, sched, progress.step, device, channels_last)
        progress.losses.append(round(value, 5))
        progress.step += 1
        progress.wall += time.perf_counter() - t0
        seen_since += sched.batch
        bar.update(1)
        elapsed = time.perf_counter() - t_since
        bar.set_postfix(
            loss=f"{value:.3f}", img_s=f"{seen_since / max(elapsed, 1e-9):.1f}", lr=f"{opt.param_groups[0]['lr']:.2e}", epoch=epoch
        )
        if progress.step % cfg.save_every == 0 and progress.step < sched.stop:
            checkpoint()
    bar.close()
    checkpoint()


def _step(cfg: SSLConfig, model, opt, images, idx: np.ndarray, flip_ok, sched: _Schedule, step: int, device, channels_last: bool) -> float:
    """One optimiser step on two augmented views of the images `idx`; returns the loss (an error if not finite)."""
    imgs = torch.from_numpy(np.ascontiguousarray(images[idx])).to(device)
    g = _step_generator(cfg.seed, step)
    ok = flip_ok[torch.from_numpy(idx)]
    v1 = normalize(augment_batch(imgs, cfg.image_size, g, cfg.augment, ok))
    v2 = normalize(augment_batch(imgs, cfg.image_size, g, cfg.augment, ok))
    for group in opt.param_groups:
        group["lr"] = lr_at(step, sched.total, cfg)
    views = torch.cat([v1, v2])
    z = model(views.contiguous(memory_format=torch.channels_last) if channels_last else views)
    loss = nt_xent(z[: sched.batch], z[sched.batch :], cfg.temperature)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"SSL loss became {value} at step {step}")
    return value


def _summary(cfg: SSLConfig, sched: _Schedule, progress: _Progress, cache_size: int, device, channels_last, rows_key, model) -> dict:
    """The run's record written to ssl_config.json (what a later CLIP run and the model card read)."""
    step, losses, wall, batch, spe = progress.step, progress.losses, progress.wall, sched.batch, sched.steps_per_epoch
    per_epoch = [float(np.mean(losses[e * spe : (e + 1) * spe])) for e in range(math.ceil(len(losses) / spe))]
    return {
        "tower": cfg.tower,
        "image_size": cfg.image_size,
        "cache_size": cache_size,
        "mean": list(OPENAI_MEAN),
        "std": list(OPENAI_STD),
        "epochs": cfg.epochs,
        "steps": step,
        "total_steps": sched.total,
        "steps_per_epoch": spe,
        "batch_size": batch,
        "images": sched.n,
        "images_seen": step * batch,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "temperature": cfg.temperature,
        "seed": cfg.seed,
        "loss_curve": losses,
        "loss_per_epoch": per_epoch,
        "wall_time_s": round(wall, 2),
        "images_per_s": round(step * batch / max(wall, 1e-9), 2),
        "cpu": cpu_profile().model,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "channels_last": channels_last,
        "torch": torch.__version__,
        "manifest": str(cfg.manifest),
        "rows_key": rows_key,
        "trunk_params": sum(p.numel() for p in model.trunk.parameters()),
        "config": asdict(cfg),
    }


# --------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> SSLConfig:
    return parse(SSLConfig, argv, prog="python -m training.ssl")


def main(argv: Sequence[str] | None = None) -> int:
    summary = train(parse_args(argv))
    print(json.dumps({k: summary[k] for k in ("tower", "steps", "images", "wall_time_s", "images_per_s", "loss_per_epoch")}))
    return 0


if __name__ == "__main__":
    from training.config import run_main

    raise SystemExit(run_main(main))
