"""BLIP-2 stage-1 losses for the Q-Former: ITC, ITM and ITG on one batch.

Design decisions
- ITC: each image's best-matching query against each caption (BLIP-2), an
  InfoNCE over the batch in both directions where every caption identical
  to the image's own counts as a positive: crops of one volume and 2D
  images of one class share captions, and treating those as negatives
  would teach the model to tell apart things the text cannot.
- ITM: BLIP-2's hard negatives: for each image a caption drawn in
  proportion to its ITC similarity among the non-matching captions, and
  for each caption a non-matching image likewise; positives and negatives
  go through the joint (bidirectional) view and a 2-way head.
- ITG: the decoder continues "question: q answer:" with the answer, or
  "findings:" with the caption; cross-entropy on the continuation only.
- Closed questions, discriminatively (`closed`, beside BLIP-2's three):
  every candidate answer of one closed question per image is scored by
  its mean token log-likelihood, exactly as engine.ask ranks them, and a
  cross-entropy over the candidates asks the right one to win. ITG alone
  lets the decoder reach a low loss from each question's answer prior
  ("yes" to every pneumonia question); this term is only lowered by
  telling images apart.
- The encoder tokens arrive precomputed (the encoder is frozen), so a step
  costs only the Q-Former.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.ask.prompting import LMBatch
from engine.models.qformer import QFormer


@dataclass
class Stage1Batch:
    tokens: torch.Tensor  # [B, N, C] frozen encoder tokens (padded)
    token_mask: torch.Tensor  # [B, N] True where a token exists
    grid: tuple[int, int, int] | list[tuple[int, int, int]] | None  # one token grid for all, or one per sample
    caption_ids: torch.Tensor  # [B, L]
    caption_mask: torch.Tensor  # [B, L]
    caption_group: torch.Tensor  # [B] equal ids = identical captions
    lm: LMBatch  # one question/answer or caption continuation per image
    closed: "ClosedBatch | None" = None  # every candidate of one closed question per image


@dataclass
class ClosedBatch:
    lm: LMBatch  # one row per (question, candidate): the question's prompt continued by that candidate
    owner: torch.Tensor  # [S] the batch row (image) each sequence reads
    question: torch.Tensor  # [S] which question (0..Q-1) each sequence answers
    answer: torch.Tensor  # [Q] index, among its question's sequences in order, of the right candidate


def closed_loss(model: QFormer, memory, emask: torch.Tensor, closed: ClosedBatch) -> torch.Tensor:
    """Cross-entropy over each closed question's candidates, scored by mean token log-likelihood (as at inference)."""
    ll = model.answer_log_likelihood(
        memory.select(closed.owner), emask[closed.owner], closed.lm.ids, closed.lm.attention_mask, closed.lm.target_mask
    )
    n_q = int(closed.answer.shape[0])
    counts = torch.bincount(closed.question, minlength=n_q)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(closed.question)) - starts[closed.question]  # position within its question
    logits = ll.new_full((n_q, int(counts.max())), float("-inf"))
    logits = logits.index_put((closed.question, slot), ll)
    return F.cross_entropy(logits, closed.answer)


def itc_loss(sim: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Multi-positive InfoNCE both ways; sim [B, B] already scaled."""
    positive = groups[:, None] == groups[None, :]
    # -log of the probability mass on all positives: identical captions are one target, not rivals
    pos_only = sim.masked_fill(~positive, float("-inf"))
    per_image = sim.logsumexp(dim=1) - pos_only.logsumexp(dim=1)
    per_text = sim.logsumexp(dim=0) - pos_only.logsumexp(dim=0)
    return (per_image.mean() + per_text.mean()) / 2


def _hard_negatives(sim: torch.Tensor, positive: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """For each row, one column index drawn from softmax(sim) over non-positives (-1 if none)."""
    weights = sim.detach().float().softmax(dim=1).masked_fill(positive, 0)
    out = torch.full((sim.shape[0],), -1, dtype=torch.long)
    has = weights.sum(1) > 0
    if has.any():
        out[has] = torch.multinomial(weights[has] + 1e-12 * (~positive[has]), 1, generator=generator)[:, 0]
    return out


def stage1_losses(model: QFormer, batch: Stage1Batch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    memory = model.encoder_memory(model.prepare_encoder(batch.tokens, batch.grid))
    emask = batch.token_mask
    query_states, _ = model.query_output(memory, emask)
    image_emb = model.image_embeddings(query_states)
    text_emb = model.text_embeddings(batch.caption_ids, batch.caption_mask)
    sim = model.similarity(image_emb, text_emb) * model.logit_scale.exp().clamp(max=100)
    groups = batch.caption_group
    positive = groups[:, None] == groups[None, :]
    losses = {"itc": itc_loss(sim, groups)}

    neg_text = _hard_negatives(sim, positive, generator)
    neg_image = _hard_negatives(sim.T, positive.T, generator)
    b = sim.shape[0]
    idx = torch.arange(b)
    img_rows = [idx]
    txt_rows = [idx]
    labels = [torch.ones(b, dtype=torch.long)]
    # one negative per pair (a hard text for even rows, a hard image for odd ones), not BLIP-2's two:
    # the joint pass is the costliest part of a CPU step and this keeps positives:negatives at 1:1
    ok_t, ok_i = (neg_text >= 0) & (idx % 2 == 0), (neg_image >= 0) & (idx % 2 == 1)
    img_rows += [idx[ok_t], neg_image[ok_i]]
    txt_rows += [neg_text[ok_t], idx[ok_i]]
    labels += [torch.zeros(int(ok_t.sum()), dtype=torch.long), torch.zeros(int(ok_i.sum()), dtype=torch.long)]
    img_idx, txt_idx = torch.cat(img_rows), torch.cat(txt_rows)
    logits = model.itm_logits(memory.select(img_idx), emask[img_idx], batch.caption_ids[txt_idx], batch.caption_mask[txt_idx])
    losses["itm"] = F.cross_entropy(logits, torch.cat(labels))

    lm_logits = model.lm_logits(memory, emask, batch.lm.ids, batch.lm.attention_mask)[:, :-1]
    targets = model.lm_targets(batch.lm.ids, batch.lm.target_mask)
    losses["itg"] = F.cross_entropy(lm_logits.reshape(-1, lm_logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    if batch.closed is not None:
        losses["closed"] = closed_loss(model, memory, emask, batch.closed)
    return losses
