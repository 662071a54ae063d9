"""How questions, answers and captions become Q-Former token sequences.

Design decisions
- One text format for training and inference, so they cannot drift:
  "question: <q> answer: <a>" for questions and "findings: <caption>" for
  captions. The decoder is trained to continue the prompt (image-grounded
  generation, BLIP-2's ITG), and the loss covers only the continuation and
  its closing [SEP], because the question is given, not predicted.
- A closed question is answered by scoring each candidate answer's
  log-likelihood as that continuation and normalising over the candidates
  (softmax of the per-token mean, so "squamous cell carcinoma" is not
  penalised against "benign" for its length); the user sees every
  candidate's probability.
- Text is lower-cased by the uncased MiniLM tokenizer; questions longer
  than the context are cut at the end of the question, never the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TEXT_TOKENS = 64
CAPTION_PROMPT = "findings:"


def qa_prompt(question: str) -> str:
    return f"question: {question.strip()} answer:"


@dataclass
class LMBatch:
    ids: torch.Tensor  # [B, L] starting with [CLS]
    attention_mask: torch.Tensor  # [B, L]
    target_mask: torch.Tensor  # [B, L] True on continuation tokens (and the closing [SEP])


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def lm_batch(tokenizer, prompts: list[str], targets: list[str], max_tokens: int = MAX_TEXT_TOKENS) -> LMBatch:
    """[CLS] prompt target [SEP], padded; the prompt is shortened first when too long."""
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    rows, flags = [], []
    for prompt, target in zip(prompts, targets):
        t = _ids(tokenizer, target)[: max_tokens - 8] + [sep]
        p = _ids(tokenizer, prompt)[: max_tokens - 1 - len(t)]
        rows.append([cls] + p + t)
        flags.append([False] * (1 + len(p)) + [True] * len(t))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, f) in enumerate(zip(rows, flags)):
        ids[i, : len(r)] = torch.tensor(r)
        attention[i, : len(r)] = 1
        target[i, : len(f)] = torch.tensor(f)
    return LMBatch(ids, attention, target)


def text_batch(tokenizer, texts: list[str], max_tokens: int = MAX_TEXT_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain [CLS] text [SEP] sequences for ITC / ITM."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """[CLS] + prompt ids: where greedy generation starts."""
    return [tokenizer.cls_token_id] + _ids(tokenizer, prompt)[: MAX_TEXT_TOKENS - 16]
