"""A tiny Q-Former checkpoint for tests: random weights, a tiny random 3D encoder, the real MiniLM tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.ask.model import save_ask_model
from engine.models.qformer import QFormerConfig, build_qformer
from engine.models.volume_prep import VolumePrep

# The BERT shape of every tiny Q-Former in the tests (and of a text encoder it can initialise from):
# the smallest that keeps several heads and layers, so the per-layer code paths still run.
TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
TINY_QFORMER = dict(
    **TINY_BERT,
    cross_attention_frequency=1,
    encoder_hidden_size=32,
    num_query_tokens=4,
    embed_dim=16,
    init_from_text_encoder=False,
    frozen=[],
)


def tiny_ask_folder(folder: str | Path, supports_2d: bool = True) -> Path:
    torch.manual_seed(0)
    model = build_qformer(QFormerConfig(**TINY_QFORMER))
    prep = VolumePrep.from_dict({**VolumePrep().to_dict(), "size": [32, 32, 16]})
    config = {
        "volume_prep": prep.to_dict(),
        "image_size": 64,
        "supports_2d": supports_2d,
        "encoder": {"type": "i3resnet-tiny", "widths": [4, 8, 8, 8], "seed": 0},
        "note": "tiny random test model",
    }
    return save_ask_model(model, folder, config, dtype=torch.float32)
