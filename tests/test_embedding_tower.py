"""The fast paths' image tower: a class-token ViT's last block for the class token only, the same embedding."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from engine.models import embedding_tower, fastpath
from engine.models.cpu import cpu_profile


def timm_vit(pool: str = "") -> torch.nn.Module:
    from open_clip.timm_model import TimmModel

    torch.manual_seed(0)
    # BiomedCLIP's layout (timm ViT, class-token pooling, linear projection), at the width a test can afford
    return TimmModel("vit_tiny_patch16_224", embed_dim=16, image_size=224, pool=pool, proj="linear").eval()


def open_clip_vit(pool_type: str = "tok") -> torch.nn.Module:
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(
        image_size=32, patch_size=8, width=64, layers=3, heads=4, mlp_ratio=4.0, output_dim=16, pool_type=pool_type
    ).eval()


def tokens_into_last_mlp(tower: torch.nn.Module, block: torch.nn.Module, pixels: torch.Tensor) -> int:
    """How many tokens per image the last block's MLP is given when `tower` runs."""
    seen = []
    mlp = block.mlp
    handle = mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            tower(pixels)
    finally:
        handle.remove()
    return seen[-1]


@pytest.mark.parametrize("make", [timm_vit, open_clip_vit], ids=["timm", "open_clip"])
def test_the_class_token_tower_gives_the_same_embedding_with_one_token_in_the_last_block(make):
    visual = make()
    tower = embedding_tower.embedding_only(visual)
    assert tower is not None
    size, patches = (224, 196) if make is timm_vit else (32, 16)
    pixels = torch.randn(3, 3, size, size)
    with torch.no_grad():
        full, pruned = visual(pixels), tower(pixels)
    assert float((full - pruned).abs().max()) <= 1e-5 * float(full.abs().max())
    last = visual.trunk.blocks[-1] if hasattr(visual, "trunk") else visual.transformer.resblocks[-1]
    assert tokens_into_last_mlp(visual, last, pixels) == patches + 1  # + the class token
    assert tokens_into_last_mlp(tower, last, pixels) == 1


def test_towers_it_does_not_know_are_left_alone():
    from open_clip.modified_resnet import ModifiedResNet
    from timm.models.vision_transformer import Block

    assert embedding_tower.embedding_only(timm_vit(pool="avg")) is None  # the open_clip pool averages every token
    assert embedding_tower.embedding_only(open_clip_vit(pool_type="avg")) is None
    assert embedding_tower.embedding_only(ModifiedResNet(layers=(1, 1, 1, 1), output_dim=16, heads=2, image_size=32, width=8)) is None

    class OtherBlock(Block):  # a subclass may compute something else: not assumed to be the same
        pass

    visual = timm_vit()
    visual.trunk.blocks[-1] = OtherBlock(dim=192, num_heads=3, qkv_bias=True)
    assert embedding_tower.embedding_only(visual) is None


def test_the_class_token_tower_exports_to_onnx_with_the_same_answer(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from engine.models import openvino_path

    visual = timm_vit()
    tower = embedding_tower.embedding_only(visual)
    target = tmp_path / "tower.onnx"
    openvino_path.export_onnx(tower, torch.zeros(1, 3, 224, 224), target)
    pixels = torch.randn(3, 3, 224, 224)  # another batch size than the export's: the batch axis is dynamic
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, visual(pixels).numpy(), atol=1e-4)


def test_every_fast_path_but_the_reference_runs_the_class_token_tower(tmp_path, monkeypatch):
    from _models import tiny_clip_folder

    from engine.models.checkpoint import load_folder

    monkeypatch.setenv("MEDLENS_FASTPATH_CACHE", str(tmp_path / "cache"))
    clip = load_folder(tiny_clip_folder(tmp_path / "tiny"))
    before = copy.deepcopy(clip.model.visual.state_dict())
    profile = cpu_profile()
    reference = fastpath.build_path(clip, "fp32", profile)
    bf16 = fastpath.build_path(clip, "bf16", profile)
    int8 = fastpath.build_path(clip, "int8", profile)
    assert type(bf16.keep).__name__ == "_OpenClipClassTokenTower"
    assert type(int8.keep).__name__ == "_OpenClipClassTokenTower"
    pixels = torch.randn(2, 3, clip.image_size, clip.image_size)
    with torch.no_grad():
        assert torch.allclose(reference.image_forward(pixels), clip.model.visual(pixels))
    # the fp32 model (heatmaps read its every token and gradients) is untouched
    after = clip.model.visual.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
