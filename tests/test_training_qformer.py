"""The Q-Former trainer end to end on a tiny synthetic QA manifest: cache, train, save, load, answer, evaluate."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from engine.ask.model import load_ask_folder
from engine.io import load_one
from engine.models.qformer import QFormerConfig, build_qformer, pad_tokens
from training.qa_data import QARow, write_qa_manifest


def _qa(question, answer, family, candidates=None):
    return {"question": question, "answer": answer, "family": family, "closed": candidates is not None, "candidates": candidates or []}


def _manifest(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        label = "pneumonia" if i % 2 else "normal"
        img = (rng.random((40, 40)) * (255 if i % 2 else 90)).astype(np.uint8)
        Image.fromarray(img).save(tmp_path / f"x{i}.png")
        split = "val" if i >= 4 else "train"
        image_row = {"id": f"cxr/{i}", "dataset": "cxr", "modality": "xray", "path": f"x{i}.png", "split": split,
                     "subject": f"p{i}", "labels": [label]}
        rows.append(QARow(id=f"cxr/{i}", dataset="cxr", split=split, subject=f"p{i}", modality="xray", kind="image",
                          path=f"x{i}.png", body_region="chest", caption=f"Chest X-ray, {label}.", image_row=image_row,
                          qa=[_qa("Is there pneumonia?", "yes" if i % 2 else "no", "finding_yes_no", ["yes", "no"])]))
    vol = (rng.random((24, 20, 12)) * 400 - 200).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([3.0, 3.0, 3.0, 1.0])), tmp_path / "ct.nii.gz")
    for i in range(3):
        rows.append(QARow(id=f"ct3d/a/crop{i:03d}", dataset="ct_organs_3d", split="train", subject="a", modality="ct", kind="volume",
                          path="ct.nii.gz", body_region="abdomen", caption="CT of the abdomen. In view: liver.",
                          crop={"z": [0, 12 - i], "y": [0, 20], "x": [i, 24]}, zoom=1.0,
                          qa=[_qa("Which modality is this?", "ct", "modality", ["ct", "mri"]),
                              _qa("Which organs are in view?", "liver", "organs_in_view")]))
    write_qa_manifest(rows, tmp_path / "qa.jsonl")
    return tmp_path / "qa.jsonl"


def test_trainer_caches_trains_saves_and_the_checkpoint_answers(tmp_path):
    from training import qformer

    manifest = _manifest(tmp_path)
    code = qformer.main(["--qa-manifest", str(manifest), "--data-root", str(tmp_path), "--out", str(tmp_path / "run"),
                         "--encoder", "i3resnet-tiny", "--layers", "1", "--steps", "3", "--batch-size", "3", "--eval-every", "3",
                         "--image-size", "64", "--volume-size", "32", "32", "16", "--warmup", "1", "--freeze-text-ffn"])
    assert code == 0
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert {"itc", "itm", "itg"} <= set(history[0]) and any("val" in h for h in history)
    model = load_ask_folder(tmp_path / "run" / "best")
    assert model.qformer.config.num_hidden_layers == 1 and model.qformer.config.encoder_hidden_size == 32
    assert not any(".intermediate." in k or ".output." in k for k in model.qformer.trainable_state())  # frozen, not saved
    image, _ = load_one([str(tmp_path / "x1.png")])
    answer = model.ask(image, "Is there pneumonia?")
    assert answer.closed and answer.answer in ("yes", "no") and abs(sum(p for _, p in answer.candidates) - 1) < 1e-4
    volume, _ = load_one([str(tmp_path / "ct.nii.gz")])
    assert model.ask(volume, "Which modality is this?").answer in [c for c in ("ct", "mri", "x-ray", "ultrasound", "histopathology", "fundus photograph", "dermoscopy")]
    # every word the decoder can write is in its vocabulary, so an open answer is made of training words
    open_answer = model.ask(volume, "Which organs are in view?")
    assert not open_answer.closed
    # the cache is reused: a second run computes nothing new
    cache_files = sorted((tmp_path / "run").parent.glob("qformer_cache/tokens-*.pt"))
    assert len(cache_files) == 2


def test_per_sample_grids_match_single_grid_encoding():
    torch.manual_seed(0)
    model = build_qformer(QFormerConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                        encoder_hidden_size=8, num_query_tokens=2, init_from_text_encoder=False)).eval()
    torch.nn.init.normal_(model.encoder_position.weight)  # zero at init; make the position code matter
    a, b = torch.randn(4, 8), torch.randn(2, 8)
    tokens, mask = pad_tokens([a, b])
    batched = model.prepare_encoder(tokens, [(1, 2, 2), (1, 1, 2)])
    assert torch.allclose(batched[0], model.prepare_encoder(a[None], (1, 2, 2))[0], atol=1e-6)
    assert torch.allclose(batched[1, :2], model.prepare_encoder(b[None], (1, 1, 2))[0], atol=1e-6)
    assert mask.tolist() == [[True] * 4, [True, True, False, False]]
    with pytest.raises(Exception):
        QFormerConfig.from_dict({"no_such_knob": 1})
