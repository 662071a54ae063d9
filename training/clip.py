"""`python -m training.clip`: CLIP training on a MedLens manifest, one process or torchrun DDP.

    python -m training.clip --manifest runs/manifest.jsonl --data-root ../shared/data --out runs/clip
    torchrun --nproc_per_node 2 -m training.clip ...      # gloo on CPU, nccl on GPU

Design decisions
- The global batch is the unit: batch indices, captions and augmentation
  parameters are drawn for the whole global batch from generators seeded by
  (seed, step), and rank r takes rows [r*B/W, (r+1)*B/W). One process and W
  processes with the same global batch therefore see the same data, and a
  resumed run continues exactly where it stopped.
- The contrastive loss is computed over the gathered global batch. Other
  ranks' embeddings are gathered without autograd and the local slice is
  swapped back in with its graph, so each rank back-propagates only its own
  images; the loss is multiplied by the world size because DDP averages
  gradients. This reproduces the single-process gradient exactly (the DDP
  test checks it) without autograd collectives.
- Sampling: datasets are drawn with weight ~ size**balance (0.5 by default),
  so 400 fundus photos are not drowned by 5,000 PneumoniaMNIST frames.
- Captions come from training/captions.py, a fresh one per image per step,
  and pairs with the same labels count as positives (see clip_model.soft_clip_loss).
- Precision: bf16 autocast on CUDA and on CPUs that compute bf16 natively
  (AMX, AVX512-BF16); fp32 elsewhere, where bf16 runs several times slower.
- The best checkpoint by validation accuracy (val split, never test) is the
  one exported; `last.pt` holds everything needed to resume.
- A frozen trunk trains on K cached views per image (`--views K`,
  training.view_cache): view 0 the clean model image, views 1..K-1 domain-
  randomised (training.randomise) on the 448 px model image before the
  model's ImagePreprocess. Each step draws which view each image uses from
  its own generator (seed, step, salt 1), so `--views 1` draws the batches,
  captions and augmentations it always did. Validation uses the clean view.
- The exported model carries its "trust" block (`--trust`, training.calibrate):
  calibration per prompt set fitted on the val split and the OOD reference set,
  both from the exported head's own embeddings.
- Structure: `build_model` (tower, trunk, preprocessing, tokenizer),
  `build_data` (rows, captions, pixel or feature caches), `Trainer`
  (`train_step`, `run_eval` = validate + export of the best, `save_last`),
  `finish` (final export, trust, summary); `main` only strings them together.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.models.cpu import cpu_profile
from engine.models.preprocess import ImagePreprocess
from training import augment
from training import clip_model as cm
from training.distributed import DistEnv, all_reduce_mean, barrier, cleanup, init_distributed
from training.manifest import Row, read_manifest
from training.config import UsageError, to_dict
from training.params import ClipConfig, parse_clip_args


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_profile().native_bf16


def label_key(row: Row) -> str:
    """Rows with the same key are positives for each other; unlabelled rows only match themselves."""
    if not row.labels:
        return f"#row:{row.id}"
    return f"{row.modality}|{'|'.join(sorted(row.labels))}"


class Sampler:
    """Deterministic global batches: epoch e draws `per_epoch` rows with dataset-balanced weights."""

    def __init__(self, rows: list[Row], batch: int, per_epoch: int, balance: float, seed: int):
        counts: dict[str, int] = {}
        for r in rows:
            counts[r.dataset] = counts.get(r.dataset, 0) + 1
        w = np.array([counts[r.dataset] ** balance / counts[r.dataset] for r in rows], dtype=np.float64)
        self.p = w / w.sum()
        self.batch, self.seed = batch, seed
        self.steps_per_epoch = max(1, per_epoch // batch)
        self._epoch, self._order = -1, None

    def indices(self, step: int) -> np.ndarray:
        epoch, offset = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = rng.choice(len(self.p), size=self.steps_per_epoch * self.batch, replace=True, p=self.p)
            self._epoch = epoch
        return self._order[offset * self.batch : (offset + 1) * self.batch]


# --------------------------------------------------------------------------- pieces
def log_line(env: DistEnv, msg: str) -> None:
    if env.is_master:
        print(msg, file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def caption_tables(rows: list[Row]):
    """Caption pools as vocabulary ids: (vocab, pools) with pools[i] an int array for rows[i]."""
    from training import captions

    pools_text = [captions.caption_pool(r) for r in rows]
    vocab = sorted({c for pool in pools_text for c in pool})
    index = {c: i for i, c in enumerate(vocab)}
    pools = [np.array([index[c] for c in pool], dtype=np.int64) for pool in pools_text]
    return vocab, pools


def trunk_features(trunk: nn.Module, images: np.ndarray, preprocess: ImagePreprocess, batch: int = 64) -> torch.Tensor:
    trunk.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            out.append(trunk(preprocess.standardise(preprocess.scale(images[s : s + batch]))).float())
    return torch.cat(out)


@torch.no_grad()
def validate(
    train: cm.TrainableClip,
    preprocess: ImagePreprocess,
    images: np.ndarray,
    feats: torch.Tensor | None,
    rows: list[Row],
    pooled: torch.Tensor,
    train_rows: list[Row],
    train_pools: list[np.ndarray],
) -> dict:
    """Per-dataset accuracy of matching each val image to its label key's caption prototype.

    Prototypes average the caption embeddings of every label key seen in training for that
    dataset; datasets with more than 24 keys (multi-label sets) are skipped."""
    train.eval()
    keys_by_set: dict[str, dict[str, np.ndarray]] = {}
    for r, pool in zip(train_rows, train_pools):
        keys_by_set.setdefault(r.dataset, {}).setdefault(label_key(r), pool)
    emb = []
    for s in range(0, len(rows), 128):
        x = feats[s : s + 128] if feats is not None else preprocess.standardise(preprocess.scale(images[s : s + 128]))
        emb.append(nn.functional.normalize(train.encode_image(x).float(), dim=-1))
    emb = torch.cat(emb) if emb else torch.zeros(0)
    result: dict[str, float] = {}
    for dataset, keys in sorted(keys_by_set.items()):
        if len(keys) > 24 or len(keys) < 2:
            continue
        idx = [i for i, r in enumerate(rows) if r.dataset == dataset and label_key(r) in keys]
        if not idx:
            continue
        names = list(keys)
        protos = torch.stack(
            [nn.functional.normalize(train.encode_text(pooled[torch.as_tensor(keys[k])]).float(), dim=-1).mean(0) for k in names]
        )
        protos = nn.functional.normalize(protos, dim=-1)
        pred = (emb[idx] @ protos.t()).argmax(1).numpy()
        truth = np.array([names.index(label_key(rows[i])) for i in idx])
        # balanced accuracy: small classes (malignant, referable DR) count as much as big ones
        accs = [float(np.mean(pred[truth == c] == c)) for c in np.unique(truth)]
        result[dataset] = float(np.mean(accs))
    train.train()
    result["mean"] = float(np.mean(list(result.values()))) if result else float("nan")
    return result


# --------------------------------------------------------------------------- build-model
@dataclass
class Built:
    """The model and everything that describes it in the checkpoint."""

    model: nn.Module
    model_cfg: dict
    preprocess: ImagePreprocess  # the model's one preprocessing (engine.models.preprocess)
    tokenizer: Any
    tower: str
    image_weights: str | None  # a frozen packaged trunk is rebuilt by the engine, not stored


def build_model(args: ClipConfig, env: DistEnv) -> Built:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    # open_clip's defaults, which training.ssl also uses: a pretrained trunk keeps its input statistics
    stats = {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD)}
    tower = args.tower
    if args.trunk == "astra-deflated":
        from training.towers.astra2d import ASTRA_PREPROCESS

        tower, stats = "resnet152", dict(ASTRA_PREPROCESS)
    model_cfg = cm.model_config(
        tower,
        args.image_size,
        args.embed_dim,
        args.text_proj,
        proj=args.image_proj,
        drop_path=args.drop_path if not args.frozen_trunk else None,
    )
    model = cm.build(model_cfg)
    model.logit_scale.data.fill_(math.log(1 / args.init_temperature))
    if args.trunk == "astra-deflated":
        from training.towers.astra2d import deflated_resnet152

        model.visual.trunk.load_state_dict(deflated_resnet152().state_dict())
    if args.init_trunk:
        from safetensors.torch import load_file

        state = load_file(args.init_trunk)
        state = {k[len("visual.trunk.") :] if k.startswith("visual.trunk.") else k: v for k, v in state.items()}
        model.visual.trunk.load_state_dict(state)
        log_line(env, f"image trunk initialised from {args.init_trunk}")
    image_weights = None
    if args.trunk == "astra-deflated" and args.frozen_trunk:
        from engine.models.astra import DEFLATED_REF as image_weights
    from engine.models.checkpoint import make_tokenizer

    preprocess = ImagePreprocess(args.image_size, stats["mean"], stats["std"])
    return Built(model, model_cfg, preprocess, make_tokenizer(model_cfg, cm.text_dir()), tower, image_weights)


# --------------------------------------------------------------------------- build-data
@dataclass
class Data:
    train_rows: list[Row]
    val_rows: list[Row]
    vocab: list[str]
    pools: list[np.ndarray]  # caption ids per training row
    pooled: torch.Tensor | None  # locked text tower: pooled MiniLM outputs of the vocabulary
    tokens_all: torch.Tensor | None  # unlocked text layers: the vocabulary's tokens
    images: np.ndarray | None  # (N, S, S, 3) uint8 model-size pixels (trained trunk)
    val_images: np.ndarray | None
    feats: torch.Tensor | None  # frozen trunk: (views, N, F) cached features
    val_feats: torch.Tensor | None  # frozen trunk: (N_val, F), clean view
    flip_ok: torch.Tensor
    row_keys: torch.Tensor


def _master_first(env: DistEnv, make):
    """The master builds a cache; the other ranks then open the same files."""
    value = make() if env.is_master else None
    barrier(env)
    return value if env.is_master else make()


def _cap_per_dataset(rows: list[Row], cap: int, seed: int) -> list[Row]:
    """At most `cap` rows of each dataset (a seeded choice, manifest order kept); all rows when cap is 0."""
    if not cap:
        return rows
    by_set: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_set.setdefault(r.dataset, []).append(i)
    rng = np.random.default_rng(seed)
    keep = sorted(i for idx in by_set.values() for i in (idx if len(idx) <= cap else rng.choice(idx, cap, replace=False)))
    return [rows[i] for i in keep]


def _read_rows(args: ClipConfig, env: DistEnv) -> tuple[list[Row], list[Row]]:
    rows = read_manifest(args.manifest, datasets=args.datasets)
    train_rows = _cap_per_dataset([r for r in rows if r.split == "train"], args.max_rows_per_dataset, args.seed)
    val_rows = _cap_per_dataset([r for r in rows if r.split == "val" and r.labels], args.max_rows_per_dataset, args.seed)
    if not train_rows:
        raise UsageError(f"{args.manifest}: no training rows")
    log_line(env, f"{len(train_rows)} training rows, {len(val_rows)} validation rows, world size {env.world_size}")
    return train_rows, val_rows


def _frozen_features(args: ClipConfig, env: DistEnv, built: Built, rows: list[Row], val_rows: list[Row], cache: Path):
    from training.randomise import FAMILIES
    from training.view_cache import build_view_features

    families = FAMILIES if args.randomise is None else tuple(args.randomise)
    bf16 = use_bf16(args.cache_precision, torch.device("cpu"))
    log_line(
        env,
        f"frozen-trunk features: {args.views} view(s) per training image ({', '.join(families) if args.views > 1 else 'clean only'})"
        f", {'bf16' if bf16 else 'fp32'} trunk",
    )
    common = dict(
        trunk=built.model.visual.trunk,
        preprocess=built.preprocess,
        trunk_name=built.tower + (args.init_trunk or args.trunk or ""),
        bf16=bf16,
        log=lambda m: log_line(env, m),
    )
    train = _master_first(
        env,
        lambda: build_view_features(
            rows,
            args.data_root,
            path=cache / f"train_views_{args.image_size}.npy",
            views=args.views,
            families=families,
            p=args.randomise_p,
            seed=args.seed,
            **common,
        ),
    )
    val = None
    if val_rows:
        val = _master_first(
            env, lambda: build_view_features(val_rows, args.data_root, path=cache / f"val_views_{args.image_size}.npy", **common)
        )
    return torch.from_numpy(np.asarray(train, dtype=np.float32)), (
        torch.from_numpy(np.asarray(val[0], dtype=np.float32)) if val is not None else None
    )


def build_data(args: ClipConfig, env: DistEnv, built: Built, out: Path) -> Data:
    train_rows, val_rows = _read_rows(args, env)
    vocab, pools = caption_tables(train_rows)
    pooled = None
    if args.unlock_text_layers == 0:  # locked text tower: pooled outputs once, cached
        pooled = _master_first(
            env, lambda: cm.cached_pooled_text(built.model, vocab, built.tokenizer, out / "cache", log=lambda m: log_line(env, m))
        )
    tokens_all = built.tokenizer(vocab) if args.unlock_text_layers > 0 else None
    images = val_images = feats = val_feats = None
    if args.frozen_trunk:
        feats, val_feats = _frozen_features(args, env, built, train_rows, val_rows, out / "cache")
    else:
        from training.image_cache import build_cache

        cache = out / "cache"
        images = _master_first(
            env, lambda: build_cache(train_rows, args.data_root, args.image_size, cache / f"train_{args.image_size}.npy")
        )
        if val_rows:
            val_images = _master_first(
                env, lambda: build_cache(val_rows, args.data_root, args.image_size, cache / f"val_{args.image_size}.npy")
            )
    keys = {k: i for i, k in enumerate(sorted({label_key(r) for r in train_rows}))}
    return Data(
        train_rows,
        val_rows,
        vocab,
        pools,
        pooled,
        tokens_all,
        images,
        val_images,
        feats,
        val_feats,
        torch.tensor([r.modality in augment.FLIP_OK for r in train_rows]),
        torch.tensor([keys[label_key(r)] for r in train_rows]),
    )


# --------------------------------------------------------------------------- step / validate / export
class Trainer:
    """The training state of one run: model, optimiser, sampler, progress and the best checkpoint."""

    def __init__(self, args: ClipConfig, env: DistEnv, built: Built, data: Data, out: Path):
        self.args, self.env, self.built, self.data, self.out = args, env, built, data, out
        self.t_start = time.time()
        self.train = cm.TrainableClip(built.model, frozen_trunk=args.frozen_trunk, unlocked_text_layers=args.unlock_text_layers).to(
            env.device
        )
        self.memory_format = torch.channels_last if args.channels_last and not args.frozen_trunk else torch.contiguous_format
        if args.channels_last:
            self.train.visual.to(memory_format=self.memory_format)
        self.n_trainable = sum(p.numel() for p in self.train.parameters() if p.requires_grad)
        log_line(env, f"model {built.tower} @ {args.image_size}px, {self.n_trainable / 1e6:.2f}M trainable parameters")
        self.net: nn.Module = self.train
        if env.distributed:
            self.net = nn.parallel.DistributedDataParallel(self.train, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(cm.param_groups(self.train, args.wd), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
        self.bf16 = use_bf16(args.precision, env.device)
        self.sampler = Sampler(data.train_rows, args.batch_size, args.samples_per_epoch or len(data.train_rows), args.balance, args.seed)
        self.total_steps = max(1, int(round(args.epochs * self.sampler.steps_per_epoch)))
        if args.max_steps:
            self.total_steps = min(self.total_steps, args.max_steps)
        self.step, self.best, self.history, self.ema = 0, {"mean": -1.0, "step": -1}, [], None
        self.local = args.batch_size // env.world_size
        self.micro = self.local // args.accum

    def autocast(self):
        return torch.autocast(self.env.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def resume(self) -> None:
        a = self.args
        path = self.out / "last.pt" if a.resume == "auto" else (None if a.resume == "none" else Path(a.resume))
        if path is not None and path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=False)
            self.train.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step, self.best, self.history = state["step"], state["best"], state.get("history", [])
            log_line(self.env, f"resumed from {path} at step {self.step}")

    def save_last(self) -> None:
        if self.env.is_master:
            tmp = self.out / "last.pt.tmp"
            torch.save(
                {
                    "model": self.train.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "step": self.step,
                    "best": self.best,
                    "history": self.history,
                    "args": to_dict(self.args),
                },
                tmp,
            )
            tmp.replace(self.out / "last.pt")

    def export(self, folder: Path) -> None:
        b = self.built
        cm.export(
            b.model,
            folder,
            b.model_cfg,
            b.preprocess.to_config(),
            "",
            {"train_config": to_dict(self.args)},
            text_from_package=self.args.unlock_text_layers == 0,
            image_weights=b.image_weights,
        )

    def _inputs(self, idx: np.ndarray, params: dict, mine: slice, views: np.ndarray | None) -> torch.Tensor:
        d, pre = self.data, self.built.preprocess
        if d.feats is not None:
            return d.feats[torch.as_tensor(views), torch.as_tensor(idx)]
        x = augment.apply(pre.scale(d.images[idx]), augment.take(params, mine))
        return pre.standardise(x).contiguous(memory_format=self.memory_format)

    def _micro_loss(self, x: torch.Tensor, cap: np.ndarray, gkeys: torch.Tensor, m: int) -> torch.Tensor:
        d, env = self.data, self.env
        with self.autocast():
            if d.tokens_all is not None:
                img, txt, scale = self.net(x.to(env.device), tokens=d.tokens_all[torch.as_tensor(cap)].to(env.device))
            else:
                img, txt, scale = self.net(x.to(env.device), pooled=self._pooled()[torch.as_tensor(cap)].to(env.device))
        img, txt = img.float(), txt.float()
        if not env.distributed:
            return cm.soft_clip_loss(img, txt, scale.float(), gkeys[m * self.micro : (m + 1) * self.micro])
        # the micro-batch's global view: this rank's slice with its graph, the others' without
        gi = [torch.zeros_like(img) for _ in range(env.world_size)]
        gt = [torch.zeros_like(txt) for _ in range(env.world_size)]
        torch.distributed.all_gather(gi, img.detach())
        torch.distributed.all_gather(gt, txt.detach())
        gi[env.rank], gt[env.rank] = img, txt
        kk = torch.cat([gkeys[r * self.local + m * self.micro : r * self.local + (m + 1) * self.micro] for r in range(env.world_size)])
        return cm.soft_clip_loss(torch.cat(gi), torch.cat(gt), scale.float(), kk)

    def _pooled(self) -> torch.Tensor:  # unlocked text: pooled outputs at the current weights
        d = self.data
        return d.pooled if d.pooled is not None else cm.pooled_text(self.built.model, d.vocab, self.built.tokenizer)

    def train_step(self) -> tuple[float, float]:
        """One optimiser step over the global batch; returns (loss, lr)."""
        a, d, env, step = self.args, self.data, self.env, self.step
        lr = cm.lr_at(step, self.total_steps, a.warmup, a.lr)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        gidx = self.sampler.indices(step)
        gen = augment.step_generator(a.seed, step)
        choice = torch.rand(len(gidx), generator=gen).numpy()
        cap_ids = np.array([d.pools[i][int(c * len(d.pools[i]))] for i, c in zip(gidx, choice)])
        params = augment.draw_params(len(gidx), d.flip_ok[gidx], gen, a.aug_strength)
        views = None
        if d.feats is not None:  # which cached view each image of the global batch uses (its own stream: views=1 changes nothing)
            views = torch.randint(0, d.feats.shape[0], (len(gidx),), generator=augment.step_generator(a.seed, step, salt=1)).numpy()
        gkeys = d.row_keys[gidx] if a.label_aware else torch.arange(len(gidx))
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for m in range(a.accum):
            mine = slice(env.rank * self.local + m * self.micro, env.rank * self.local + (m + 1) * self.micro)
            x = self._inputs(gidx[mine], params, mine, None if views is None else views[mine])
            ctx = self.net.no_sync if (env.distributed and m < a.accum - 1) else nullcontext
            with ctx():
                loss = self._micro_loss(x, cap_ids[mine], gkeys, m)
                (loss * env.world_size / a.accum).backward()
            step_loss += float(loss.detach()) / a.accum
        if a.grad_clip:
            nn.utils.clip_grad_norm_(self.train.parameters(), a.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            self.train.logit_scale.clamp_(0, math.log(100))
        self.step += 1
        return step_loss, lr

    def run_eval(self) -> None:
        d = self.data
        if self.env.is_master and d.val_rows:
            res = validate(self.train, self.built.preprocess, d.val_images, d.val_feats, d.val_rows, self._pooled(), d.train_rows, d.pools)
            self.history.append({"step": self.step, "val": res, "elapsed_s": round(time.time() - self.t_start, 1)})
            log_line(self.env, f"step {self.step}: val balanced accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
            if res["mean"] > self.best["mean"]:
                self.best = {"mean": res["mean"], "step": self.step, "val": res}
                self.export(self.out / "best")
        barrier(self.env)

    def loop(self) -> None:
        a, env = self.args, self.env
        progress = None
        if env.is_master and not a.quiet:
            from tqdm import tqdm

            progress = tqdm(total=self.total_steps, initial=self.step, desc="clip", unit="step", dynamic_ncols=True, file=sys.stderr)
        t_last, seen = time.time(), 0
        self.train.train()
        if a.frozen_trunk:
            self.built.model.visual.trunk.eval()
        while self.step < self.total_steps:
            loss, lr = self.train_step()
            seen += a.batch_size
            self.ema = loss if self.ema is None else 0.95 * self.ema + 0.05 * loss
            if progress is not None:
                rate = seen / max(1e-6, time.time() - t_last)
                progress.set_postfix(
                    loss=f"{self.ema:.3f}", lr=f"{lr:.1e}", T=f"{1 / self.train.logit_scale.exp().item():.3f}", img_s=f"{rate:.0f}"
                )
                progress.update(1)
            elif self.step % 20 == 0:  # no bar (--quiet, logs to a file): a line now and then
                log_line(
                    env,
                    f"step {self.step}/{self.total_steps} loss {self.ema:.3f} lr {lr:.1e} {seen / max(1e-6, time.time() - t_last):.0f} img/s",
                )
            if a.eval_every and self.step % a.eval_every == 0 and self.step < self.total_steps:
                self.run_eval()
            if a.save_every and self.step % a.save_every == 0:
                self.save_last()
        if progress is not None:
            progress.close()


def fit_trust_into(folder: Path, args: ClipConfig, data: Data, env: DistEnv) -> None:
    """Calibration on the val split and the OOD reference set from the exported model's own embeddings."""
    from engine.models import load_model
    from training.calibrate import embed_images, fit_trust, write_trust

    clip = load_model(f"local-dir:{folder}", fast=False)

    def embed(feats: torch.Tensor | None, images: np.ndarray | None) -> np.ndarray:
        if feats is None:
            return embed_images(clip, images)
        with torch.inference_mode():  # clean view through the exported head (the trunk is the frozen one)
            e = torch.cat([clip.model.visual.head(feats[s : s + 512]) for s in range(0, len(feats), 512)])
        return nn.functional.normalize(torch.as_tensor(e).float(), dim=-1).numpy()

    train_emb = embed(data.feats[0] if data.feats is not None else None, data.images)
    val_emb = embed(data.val_feats, data.val_images)
    block, reference = fit_trust(clip, val_emb, data.val_rows, train_emb, data.train_rows, seed=args.seed)
    write_trust(folder, block, reference)
    pa = block["present_absent"]["metrics"]["per_key"].get("default", {})
    log_line(
        env,
        f"trust: present/absent ECE on val {pa.get('ece_before', float('nan')):.3f} -> {pa.get('ece_after', float('nan')):.3f}; "
        f"OOD threshold {reference.threshold:.3f} over {len(reference.vectors)} reference vectors",
    )


def finish(tr: Trainer) -> None:
    """Final validation, the exported folders (best with its trust block, final) and the run summary."""
    a, env, out = tr.args, tr.env, tr.out
    final_loss = all_reduce_mean(tr.ema if tr.ema is not None else float("nan"), env)
    tr.run_eval()
    tr.save_last()
    if not env.is_master:
        return
    if not tr.data.val_rows or tr.best["step"] < 0:
        tr.export(out / "best")
        tr.best = {"mean": float("nan"), "step": tr.step}
    tr.export(out / "final")
    if a.trust and tr.data.val_rows:
        fit_trust_into(out / "best", a, tr.data, env)
    summary = {
        "args": to_dict(a),
        "model_cfg": tr.built.model_cfg,
        "preprocess_cfg": tr.built.preprocess.to_config(),
        "steps": tr.step,
        "epochs": tr.step / tr.sampler.steps_per_epoch,
        "train_rows": len(tr.data.train_rows),
        "val_rows": len(tr.data.val_rows),
        "best": tr.best,
        "history": tr.history,
        "final_loss_ema": final_loss,
        "wall_s": round(time.time() - tr.t_start, 1),
        "cpu": cpu_profile().model,
        "threads": torch.get_num_threads(),
        "world_size": env.world_size,
        "bf16": tr.bf16,
        "torch": torch.__version__,
        "caption_vocabulary": len(tr.data.vocab),
        "trainable_params": tr.n_trainable,
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if a.export:
        import shutil

        dest = Path(a.export)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(out / "best", dest)
    log_line(
        env,
        f"done: {tr.step} steps in {summary['wall_s']} s; best val {tr.best['mean']:.3f} at step {tr.best['step']}; model in {out / 'best'}",
    )


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_clip_args(argv)
    env = init_distributed(args.device)
    out = Path(args.out)
    if env.is_master:
        out.mkdir(parents=True, exist_ok=True)
    barrier(env)
    if args.batch_size % (env.world_size * args.accum):
        raise UsageError(f"--batch-size {args.batch_size} must divide by world size x accum ({env.world_size} x {args.accum})")
    if args.views < 1 or (args.views > 1 and not args.frozen_trunk):
        raise UsageError(
            "--views N > 1 caches randomised views of a frozen trunk: add --frozen-trunk (a trained trunk augments on the fly)"
        )
    seed_everything(args.seed)
    built = build_model(args, env)
    data = build_data(args, env, built, out)
    tr = Trainer(args, env, built, data, out)
    tr.resume()
    log_line(
        env,
        f"{tr.total_steps} steps of global batch {args.batch_size} ({tr.sampler.steps_per_epoch} per epoch), "
        f"{'bf16 autocast' if tr.bf16 else 'fp32'}, {torch.get_num_threads()} threads, CPU: {cpu_profile().model}",
    )
    tr.loop()
    finish(tr)
    cleanup(env)
    return 0


if __name__ == "__main__":
    from training.config import run_main

    sys.exit(run_main(main))
