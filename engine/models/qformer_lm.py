"""BLIP-2 stage 2: the Q-Former's query outputs as a soft prompt for any Hugging Face causal LM.

Design decisions
- The LM is frozen and only a linear projection (query width -> the LM's
  embedding width) is trained, as in BLIP-2's decoder-only variant: 32
  projected query vectors are put in front of the LM's own embeddings of
  "question: ... answer:", and the LM's loss covers only the answer.
- The LM comes from a hub id (`hf-hub:org/name`, needs the network once)
  or a folder (`local-dir:/path`); nothing ships one, so this path is for
  users who have an LM. Tests build a tiny causal LM from a config.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.errors import ModelError
from engine.models.qformer import EncoderMemory, QFormer


def load_causal_lm(ref: str):
    """(model, tokenizer) for `hf-hub:org/name` or `local-dir:/path`, frozen, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if ref.startswith("local-dir:"):
        where, kwargs = ref.split(":", 1)[1], {"local_files_only": True}
    elif ref.startswith("hf-hub:"):
        where, kwargs = ref.split(":", 1)[1], {}
    else:
        raise ModelError(f"a causal LM is named hf-hub:org/name or local-dir:/path, not {ref!r}")
    try:
        lm = AutoModelForCausalLM.from_pretrained(where, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except Exception as exc:
        raise ModelError(f"cannot load the causal LM {ref} ({type(exc).__name__}: {exc})") from None
    return freeze_lm(lm), tokenizer


def freeze_lm(lm: nn.Module) -> nn.Module:
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm.eval()


class QFormerToLM(nn.Module):
    def __init__(self, qformer: QFormer, lm: nn.Module):
        super().__init__()
        self.qformer = qformer
        self.lm = lm
        self.projection = nn.Linear(qformer.config.hidden_size, lm.get_input_embeddings().embedding_dim)

    def soft_prompt(self, memory: EncoderMemory, encoder_mask: torch.Tensor | None = None) -> torch.Tensor:
        states, _ = self.qformer.query_output(memory, encoder_mask)
        return self.projection(states)  # [B, Q, D_lm]

    def _inputs(self, prefix: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor):
        embeds = torch.cat([prefix, self.lm.get_input_embeddings()(ids)], dim=1)
        mask = torch.cat([torch.ones(prefix.shape[:2], dtype=attention_mask.dtype), attention_mask], dim=1)
        return embeds, mask

    def loss(self, memory: EncoderMemory, ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        """LM loss on the target tokens (target_mask) given the soft prompt and the text before them."""
        prefix = self.soft_prompt(memory)
        embeds, mask = self._inputs(prefix, ids, attention_mask)
        labels = torch.cat([torch.full(prefix.shape[:2], -100, dtype=torch.long), ids.masked_fill(~target_mask.bool(), -100)], dim=1)
        return self.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss

    @torch.inference_mode()
    def generate(self, memory: EncoderMemory, ids: torch.Tensor, max_new_tokens: int = 24, eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy continuation of `ids` (one sequence) after the soft prompt; returns the new token ids."""
        prefix = self.soft_prompt(memory)
        out: list[int] = []
        current = ids
        for _ in range(max_new_tokens):
            embeds, mask = self._inputs(prefix, current, torch.ones_like(current))
            token = int(self.lm(inputs_embeds=embeds, attention_mask=mask).logits[0, -1].argmax())
            if eos_token_id is not None and token == eos_token_id:
                break
            out.append(token)
            current = torch.cat([current, torch.tensor([[token]])], dim=1)
        return torch.tensor(out, dtype=torch.long)
