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
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.models.cpu import cpu_profile
from engine.models.preprocess import ImagePreprocess
from training import augment
from training import clip_model as cm
from training.distributed import DistEnv, all_reduce_mean, barrier, cleanup, init_distributed
from training.manifest import Row, read_manifest
from training.params import parse_clip_args


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
def validate(train: cm.TrainableClip, preprocess: ImagePreprocess, images: np.ndarray, feats: torch.Tensor | None,
             rows: list[Row], pooled: torch.Tensor, train_rows: list[Row], train_pools: list[np.ndarray]) -> dict:
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
        protos = torch.stack([nn.functional.normalize(train.encode_text(pooled[torch.as_tensor(keys[k])]).float(), dim=-1).mean(0) for k in names])
        protos = nn.functional.normalize(protos, dim=-1)
        pred = (emb[idx] @ protos.t()).argmax(1).numpy()
        truth = np.array([names.index(label_key(rows[i])) for i in idx])
        # balanced accuracy: small classes (malignant, referable DR) count as much as big ones
        accs = [float(np.mean(pred[truth == c] == c)) for c in np.unique(truth)]
        result[dataset] = float(np.mean(accs))
    train.train()
    result["mean"] = float(np.mean(list(result.values()))) if result else float("nan")
    return result


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_clip_args(argv)
    env = init_distributed(args.device)
    out = Path(args.out)
    if env.is_master:
        out.mkdir(parents=True, exist_ok=True)
    barrier(env)
    if args.batch_size % (env.world_size * args.accum):
        raise SystemExit(f"--batch-size {args.batch_size} must divide by world size x accum ({env.world_size} x {args.accum})")
    seed_everything(args.seed)
    t_start = time.time()

    rows = read_manifest(args.manifest, datasets=args.datasets)
    train_rows = [r for r in rows if r.split == "train"]
    val_rows = [r for r in rows if r.split == "val" and r.labels]
    if not train_rows:
        raise SystemExit(f"{args.manifest}: no training rows")
    log_line(env, f"{len(train_rows)} training rows, {len(val_rows)} validation rows, world size {env.world_size}")

    # model ---------------------------------------------------------------
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    # open_clip's defaults, which training.ssl also uses: a pretrained trunk keeps its input statistics
    preprocess = {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD)}
    tower = args.tower
    if args.trunk == "astra-deflated":
        from training.towers.astra2d import ASTRA_PREPROCESS

        tower, preprocess = "resnet152", dict(ASTRA_PREPROCESS)
    model_cfg = cm.model_config(tower, args.image_size, args.embed_dim, args.text_proj, proj=args.image_proj,
                                drop_path=args.drop_path if not args.frozen_trunk else None)
    model = cm.build(model_cfg)
    model.logit_scale.data.fill_(math.log(1 / args.init_temperature))
    if args.trunk == "astra-deflated":
        from training.towers.astra2d import deflated_resnet152

        model.visual.trunk.load_state_dict(deflated_resnet152().state_dict())
    if args.init_trunk:
        from safetensors.torch import load_file

        state = load_file(args.init_trunk)
        state = {k[len("visual.trunk."):] if k.startswith("visual.trunk.") else k: v for k, v in state.items()}
        model.visual.trunk.load_state_dict(state)
        log_line(env, f"image trunk initialised from {args.init_trunk}")
    # a frozen packaged trunk is not copied into the checkpoint: the engine rebuilds it from the package
    image_weights = None
    if args.trunk == "astra-deflated" and args.frozen_trunk:
        from engine.models.astra import DEFLATED_REF as image_weights
    # the model's one preprocessing: stored in its checkpoint, run by the engine at inference
    image_preprocess = ImagePreprocess(args.image_size, preprocess["mean"], preprocess["std"])
    preprocess = image_preprocess.to_config()
    from engine.models.checkpoint import make_tokenizer

    tokenizer = make_tokenizer(model_cfg, cm.text_dir())

    # captions and text features (locked text tower: once, cached) ------------------
    vocab, pools = caption_tables(train_rows)
    pooled = None
    if args.unlock_text_layers == 0:
        if env.is_master:
            pooled = cm.cached_pooled_text(model, vocab, tokenizer, out / "cache", log=lambda m: log_line(env, m))
        barrier(env)
        if pooled is None:
            pooled = cm.cached_pooled_text(model, vocab, tokenizer, out / "cache")
    tokens_all = tokenizer(vocab) if args.unlock_text_layers > 0 else None

    # images --------------------------------------------------------------
    from training.image_cache import build_cache

    cache_dir = out / "cache"
    def caches():  # the master decodes; the other ranks then open the same files (memory-mapped)
        train_c = build_cache(train_rows, args.data_root, args.image_size, cache_dir / f"train_{args.image_size}.npy")
        val_c = build_cache(val_rows, args.data_root, args.image_size, cache_dir / f"val_{args.image_size}.npy") if val_rows else None
        return train_c, val_c

    if env.is_master:
        images, val_images = caches()
    barrier(env)
    if not env.is_master:
        images, val_images = caches()
    flip_ok = torch.tensor([r.modality in augment.FLIP_OK for r in train_rows])
    keys = {k: i for i, k in enumerate(sorted({label_key(r) for r in train_rows}))}
    row_keys = torch.tensor([keys[label_key(r)] for r in train_rows])

    feats = val_feats = None
    if args.frozen_trunk:
        log_line(env, "computing frozen-trunk features once (no augmentation)")
        feats = trunk_features(model.visual.trunk, images, image_preprocess)
        val_feats = trunk_features(model.visual.trunk, val_images, image_preprocess) if val_images is not None else None

    train = cm.TrainableClip(model, frozen_trunk=args.frozen_trunk, unlocked_text_layers=args.unlock_text_layers).to(env.device)
    memory_format = torch.channels_last if args.channels_last and not args.frozen_trunk else torch.contiguous_format
    if args.channels_last:
        train.visual.to(memory_format=memory_format)
    n_trainable = sum(p.numel() for p in train.parameters() if p.requires_grad)
    log_line(env, f"model {tower} @ {args.image_size}px, {n_trainable / 1e6:.2f}M trainable parameters")
    net: nn.Module = train
    if env.distributed:
        net = nn.parallel.DistributedDataParallel(train, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(cm.param_groups(train, args.wd), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    bf16 = use_bf16(args.precision, env.device)
    autocast = (lambda: torch.autocast(env.device.type, dtype=torch.bfloat16)) if bf16 else nullcontext

    per_epoch = args.samples_per_epoch or len(train_rows)
    sampler = Sampler(train_rows, args.batch_size, per_epoch, args.balance, args.seed)
    total_steps = max(1, int(round(args.epochs * sampler.steps_per_epoch)))
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)

    step, best, history = 0, {"mean": -1.0, "step": -1}, []
    resume = out / "last.pt" if args.resume == "auto" else (None if args.resume == "none" else Path(args.resume))
    if resume is not None and resume.is_file():
        state = torch.load(resume, map_location="cpu", weights_only=False)
        train.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, best, history = state["step"], state["best"], state.get("history", [])
        log_line(env, f"resumed from {resume} at step {step}")

    local = args.batch_size // env.world_size
    micro = local // args.accum
    log_line(env, f"{total_steps} steps of global batch {args.batch_size} ({sampler.steps_per_epoch} per epoch), "
             f"{'bf16 autocast' if bf16 else 'fp32'}, {torch.get_num_threads()} threads, CPU: {cpu_profile().model}")

    def save_last() -> None:
        if env.is_master:
            tmp = out / "last.pt.tmp"
            torch.save({"model": train.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "best": best,
                        "history": history, "args": vars(args)}, tmp)
            tmp.replace(out / "last.pt")

    def run_eval() -> None:
        nonlocal best
        if env.is_master and val_rows:
            res = validate(train, image_preprocess, val_images, val_feats, val_rows, pooled if pooled is not None else _pool_now(),
                           train_rows, pools)
            history.append({"step": step, "val": res, "elapsed_s": round(time.time() - t_start, 1)})
            log_line(env, f"step {step}: val balanced accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
            if res["mean"] > best["mean"]:
                best = {"mean": res["mean"], "step": step, "val": res}
                cm.export(model, out / "best", model_cfg, preprocess, "", {}, text_from_package=args.unlock_text_layers == 0, image_weights=image_weights)
        barrier(env)

    def _pool_now() -> torch.Tensor:  # unlocked text: pooled outputs at the current weights
        return cm.pooled_text(model, vocab, tokenizer)

    progress = None
    if env.is_master and not args.quiet:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=step, desc="clip", unit="step", dynamic_ncols=True, file=sys.stderr)
    ema, t_last, seen = None, time.time(), 0
    train.train()
    if args.frozen_trunk:
        model.visual.trunk.eval()
    while step < total_steps:
        lr = cm.lr_at(step, total_steps, args.warmup, args.lr)
        for g in optimizer.param_groups:
            g["lr"] = lr
        gidx = sampler.indices(step)
        gen = augment.step_generator(args.seed, step)
        choice = torch.rand(len(gidx), generator=gen).numpy()
        cap_ids = np.array([pools[i][int(c * len(pools[i]))] for i, c in zip(gidx, choice)])
        params = augment.draw_params(len(gidx), flip_ok[gidx], gen, args.aug_strength)
        gkeys = row_keys[gidx] if args.label_aware else torch.arange(len(gidx))
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for m in range(args.accum):
            lo = env.rank * local + m * micro
            mine = slice(lo, lo + micro)
            idx = gidx[mine]
            if feats is not None:
                x = feats[torch.as_tensor(idx)]
            else:
                x = image_preprocess.standardise(augment.apply(image_preprocess.scale(images[idx]), augment.take(params, mine))).contiguous(
                    memory_format=memory_format)
            ctx = net.no_sync if (env.distributed and m < args.accum - 1) else nullcontext
            with ctx():
                with autocast():
                    if tokens_all is not None:
                        img, txt, scale = net(x.to(env.device), tokens=tokens_all[torch.as_tensor(cap_ids[mine])].to(env.device))
                    else:
                        img, txt, scale = net(x.to(env.device), pooled=pooled[torch.as_tensor(cap_ids[mine])].to(env.device))
                img, txt = img.float(), txt.float()
                # the micro-batch's global view: this rank's slice with its graph, the others' without
                if env.distributed:
                    gi = [torch.zeros_like(img) for _ in range(env.world_size)]
                    gt = [torch.zeros_like(txt) for _ in range(env.world_size)]
                    torch.distributed.all_gather(gi, img.detach())
                    torch.distributed.all_gather(gt, txt.detach())
                    gi[env.rank], gt[env.rank] = img, txt
                    all_img, all_txt = torch.cat(gi), torch.cat(gt)
                    kk = torch.cat([gkeys[r * local + m * micro : r * local + (m + 1) * micro] for r in range(env.world_size)])
                else:
                    all_img, all_txt, kk = img, txt, gkeys[m * micro : (m + 1) * micro]
                loss = cm.soft_clip_loss(all_img, all_txt, scale.float(), kk)
                (loss * env.world_size / args.accum).backward()
            step_loss += float(loss.detach()) / args.accum
        if args.grad_clip:
            nn.utils.clip_grad_norm_(train.parameters(), args.grad_clip)
        optimizer.step()
        with torch.no_grad():
            train.logit_scale.clamp_(0, math.log(100))
        step += 1
        seen += args.batch_size
        ema = step_loss if ema is None else 0.95 * ema + 0.05 * step_loss
        if progress is not None:
            rate = seen / max(1e-6, time.time() - t_last)
            progress.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.1e}", T=f"{1 / train.logit_scale.exp().item():.3f}", img_s=f"{rate:.0f}")
            progress.update(1)
        elif step % 20 == 0:  # no bar (--quiet, logs to a file): a line now and then
            log_line(env, f"step {step}/{total_steps} loss {ema:.3f} lr {lr:.1e} {seen / max(1e-6, time.time() - t_last):.0f} img/s")
        if args.eval_every and step % args.eval_every == 0 and step < total_steps:
            run_eval()
        if args.save_every and step % args.save_every == 0:
            save_last()
    if progress is not None:
        progress.close()
    final_loss = all_reduce_mean(ema if ema is not None else float("nan"), env)
    run_eval()
    save_last()
    if env.is_master:
        if not val_rows or best["step"] < 0:
            cm.export(model, out / "best", model_cfg, preprocess, "", {}, text_from_package=args.unlock_text_layers == 0, image_weights=image_weights)
            best = {"mean": float("nan"), "step": step}
        cm.export(model, out / "final", model_cfg, preprocess, "", {}, text_from_package=args.unlock_text_layers == 0, image_weights=image_weights)
        summary = {
            "args": vars(args), "model_cfg": model_cfg, "preprocess_cfg": preprocess, "steps": step,
            "epochs": step / sampler.steps_per_epoch, "train_rows": len(train_rows), "val_rows": len(val_rows),
            "best": best, "history": history, "final_loss_ema": final_loss, "wall_s": round(time.time() - t_start, 1),
            "cpu": cpu_profile().model, "threads": torch.get_num_threads(), "world_size": env.world_size, "bf16": bf16,
            "torch": torch.__version__, "caption_vocabulary": len(vocab), "trainable_params": n_trainable,
        }
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        if args.export:
            import shutil

            dest = Path(args.export)
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(out / "best", dest)
        log_line(env, f"done: {step} steps in {summary['wall_s']} s; best val {best['mean']:.3f} at step {best['step']}; model in {out / 'best'}")
    cleanup(env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
