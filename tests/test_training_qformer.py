"""The Q-Former trainer end to end on a tiny synthetic QA manifest: cache, train, save, load, answer, evaluate."""

from __future__ import annotations

import json
import re
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from engine.ask.model import load_ask_folder
from engine.io import load_one
from engine.models.qformer import QFormerConfig, build_qformer, pad_tokens
from training.qa_data import write_qa_manifest

from _ask import TINY_BERT
from _rows import image_qa_row, qa_item, volume_qa_row


def _manifest(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        label = "pneumonia" if i % 2 else "normal"
        img = (rng.random((40, 40)) * (255 if i % 2 else 90)).astype(np.uint8)
        Image.fromarray(img).save(tmp_path / f"x{i}.png")
        split = "val" if i >= 4 else "train"
        image_row = {
            "id": f"cxr/{i}",
            "dataset": "cxr",
            "modality": "xray",
            "path": f"x{i}.png",
            "split": split,
            "subject": f"p{i}",
            "labels": [label],
        }
        rows.append(
            image_qa_row(
                f"cxr/{i}",
                "cxr",
                f"p{i}",
                "xray",
                f"x{i}.png",
                split=split,
                body_region="chest",
                caption=f"Chest X-ray, {label}.",
                image_row=image_row,
                qa=[qa_item("Is there pneumonia?", "yes" if i % 2 else "no", "finding_yes_no", ["yes", "no"])],
            )
        )
    vol = (rng.random((24, 20, 12)) * 400 - 200).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([3.0, 3.0, 3.0, 1.0])), tmp_path / "ct.nii.gz")
    for i in range(3):
        rows.append(
            volume_qa_row(
                f"ct3d/a/crop{i:03d}",
                "ct_organs_3d",
                "a",
                "ct.nii.gz",
                {"z": [0, 12 - i], "y": [0, 20], "x": [i, 24]},
                body_region="abdomen",
                caption="CT of the abdomen. In view: liver.",
                qa=[
                    qa_item("Which modality is this?", "ct", "modality", ["ct", "mri"]),
                    qa_item("Which organs are in view?", "liver", "organs_in_view"),
                ],
            )
        )
    write_qa_manifest(rows, tmp_path / "qa.jsonl")
    return tmp_path / "qa.jsonl"


def _trainer_argv(manifest, data_root, out, *extra, steps: int | None = None) -> list[str]:
    """The trainer's command line for a tiny run: the tiny random encoder, one layer, small images and volumes.
    `steps` also sets how often it validates (once, at the end); without it, `extra` gives the steps."""
    argv = ["--qa-manifest", str(manifest), "--data-root", str(data_root), "--out", str(out), "--encoder", "i3resnet-tiny"]
    argv += ["--layers", "1", "--batch-size", "3", "--image-size", "64", "--volume-size", "32", "32", "16", "--warmup", "1"]
    if steps is not None:
        argv += ["--steps", str(steps), "--eval-every", str(steps)]
    return [*argv, *extra]


def test_trainer_caches_trains_saves_and_the_checkpoint_answers(tmp_path):
    from training import qformer

    manifest = _manifest(tmp_path)
    losses = ["--freeze-text-ffn", "--balance", "0.5", "--finding-weight", "3", "--closed-weight", "1"]
    code = qformer.main(_trainer_argv(manifest, tmp_path, tmp_path / "run", *losses, steps=3))
    assert code == 0
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert {"itc", "itm", "itg", "closed"} <= set(history[0]) and any("val" in h for h in history)
    model = load_ask_folder(tmp_path / "run" / "best")
    assert model.qformer.config.num_hidden_layers == 1 and model.qformer.config.encoder_hidden_size == 32
    saved = model.qformer.trainable_state()
    assert not any(re.fullmatch(r"layer\.\d+\.(intermediate|output)\..*", k) for k in saved)  # the text FFN: frozen, not saved
    assert "layer.0.crossattention.output.dense.weight" in saved and "layer.0.attention.output.dense.weight" in saved
    image, _ = load_one([str(tmp_path / "x1.png")])
    answer = model.ask(image, "Is there pneumonia?")
    assert answer.closed and answer.answer in ("yes", "no") and abs(sum(p for _, p in answer.candidates) - 1) < 1e-4
    volume, _ = load_one([str(tmp_path / "ct.nii.gz")])
    assert model.ask(volume, "Which modality is this?").answer in [
        c for c in ("ct", "mri", "x-ray", "ultrasound", "histopathology", "fundus photograph", "dermoscopy")
    ]
    # every word the decoder can write is in its vocabulary, so an open answer is made of training words
    open_answer = model.ask(volume, "Which organs are in view?")
    assert not open_answer.closed
    # the cache is reused: a second run computes nothing new
    cache_files = sorted((tmp_path / "run").parent.glob("qformer_cache/tokens-*.pt"))
    assert len(cache_files) == 2


def test_per_sample_grids_match_single_grid_encoding():
    torch.manual_seed(0)
    model = build_qformer(
        QFormerConfig(**{**TINY_BERT, "num_hidden_layers": 1}, encoder_hidden_size=8, num_query_tokens=2, init_from_text_encoder=False)
    ).eval()
    torch.nn.init.normal_(model.encoder_position.weight)  # zero at init; make the position code matter
    a, b = torch.randn(4, 8), torch.randn(2, 8)
    tokens, mask = pad_tokens([a, b])
    batched = model.prepare_encoder(tokens, [(1, 2, 2), (1, 1, 2)])
    assert torch.allclose(batched[0], model.prepare_encoder(a[None], (1, 2, 2))[0], atol=1e-6)
    assert torch.allclose(batched[1, :2], model.prepare_encoder(b[None], (1, 1, 2))[0], atol=1e-6)
    assert mask.tolist() == [[True] * 4, [True, True, False, False]]
    with pytest.raises(ValueError, match="unknown Q-Former config keys"):
        QFormerConfig.from_dict({"no_such_knob": 1})


def test_a_saved_checkpoint_reloads_to_identical_outputs(tmp_path):
    """Frozen parts come back from the text encoder, everything else from the file: same logits after a round trip."""
    from transformers import BertConfig, BertModel

    from engine.ask.model import save_ask_model
    from engine.models.qformer import text_encoder_dir
    from training.qformer import TEXT_FFN

    text = tmp_path / "text"
    BertModel(BertConfig(**TINY_BERT)).save_pretrained(text)
    minilm = text_encoder_dir(QFormerConfig().text_encoder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(f"{minilm}/{name}", text / name)
    cfg = QFormerConfig(
        **TINY_BERT, encoder_hidden_size=32, num_query_tokens=4, text_encoder=str(text), decoder_vocab=list(range(100, 400))
    )
    cfg.frozen = cfg.frozen + TEXT_FFN
    torch.manual_seed(3)
    model = build_qformer(cfg).eval()
    torch.nn.init.normal_(model.layer[0].crossattention.output.dense.weight)  # "trained" away from any init
    save_ask_model(model, tmp_path / "ckpt", {"encoder": {"type": "i3resnet-tiny", "widths": [4, 8, 8, 8]}})
    torch.manual_seed(99)  # a different RNG state at load must not matter
    loaded = load_ask_folder(tmp_path / "ckpt").qformer
    tokens, ids = torch.randn(1, 6, 32), torch.tensor([[101, 150, 160, 102]])
    outs = []
    for m in (model, loaded):
        memory = m.encoder_memory(m.prepare_encoder(tokens, (1, 2, 3)))
        outs.append(m.lm_logits(memory, None, ids, torch.ones_like(ids)))
    assert torch.allclose(outs[0], outs[1], atol=2e-2)  # fp16 storage


def _example(dataset, caption, qa=()):
    from training.qformer import Example

    row = image_qa_row(f"{dataset}/{caption}", dataset, "s", "xray", "x.png", body_region="chest", caption=caption, qa=list(qa))
    return Example(row, torch.zeros(4, 8), (1, 2, 2))


def test_row_weights_give_datasets_equal_shares_and_flatten_classes():
    from training.qformer import row_weights

    examples = [_example("a", "normal")] * 90 + [_example("a", "pneumonia")] * 10 + [_example("b", "benign")] * 20
    assert row_weights(examples, 0.0) == [1.0] * 120
    for balance, share in ((1.0, 0.5), (0.5, 0.25)):  # pneumonia's share of dataset a: even, square-root (sqrt 10 / (sqrt 90 + sqrt 10))
        w = row_weights(examples, balance)
        assert sum(w[:100]) == pytest.approx(0.5) and sum(w[100:]) == pytest.approx(0.5)
        assert sum(w[90:100]) / sum(w[:100]) == pytest.approx(share)


def test_closed_batch_scores_every_candidate_and_favours_findings():
    import random

    from transformers import AutoTokenizer

    from engine.models.qformer import text_encoder_dir
    from training.qformer import closed_batch

    tok = AutoTokenizer.from_pretrained(text_encoder_dir(QFormerConfig().text_encoder))
    qa = [
        qa_item("Which part of the body is this?", "chest", "body_region", ["head", "chest", "abdomen"]),
        qa_item("Is there pneumonia?", "no", "finding_yes_no", ["yes", "no"]),
        qa_item("Which organs?", "lungs", "organs_in_view"),
    ]  # open: never in the closed batch
    examples = [_example("a", "normal", qa) for _ in range(400)] + [_example("a", "empty")]
    batch = closed_batch(examples, tok, random.Random(0), finding_weight=3.0)
    assert len(batch.answer) == 400 and int(batch.owner.max()) == 399  # the image without closed questions is skipped
    sizes = torch.bincount(batch.question)
    assert set(sizes.tolist()) == {2, 3}
    share = float((sizes == 2).float().mean())
    assert 0.68 < share < 0.82  # finding questions 3:1 -> 0.75
    for q in range(len(batch.answer)):  # the right candidate's row continues with the right answer
        rows = (batch.question == q).nonzero()[:, 0]
        right = rows[int(batch.answer[q])]
        text = tok.decode(batch.lm.ids[right][batch.lm.target_mask[right]], skip_special_tokens=True)
        assert text == ("no" if len(rows) == 2 else "chest")


def test_a_continued_run_starts_from_the_earlier_weights_and_records_them(tmp_path):
    from engine.models.weights import read_weights

    from training import qformer

    manifest = _manifest(tmp_path)
    first_run = _trainer_argv(manifest, tmp_path, tmp_path / "a", "--freeze-text-ffn", steps=2)
    assert qformer.main(first_run) == 0
    init = ["--steps", "0", "--init", str(tmp_path / "a" / "best"), "--closed-weight", "1", "--balance", "0.5"]
    assert qformer.main(_trainer_argv(manifest, tmp_path, tmp_path / "b", "--freeze-text-ffn", *init)) == 0
    first = json.loads((tmp_path / "a" / "best" / "config.json").read_text())
    second = json.loads((tmp_path / "b" / "last" / "config.json").read_text())
    assert second["init_from"] == {"training": first["training"], "step": first["step"]}
    assert second["qformer"]["decoder_vocab"] == first["qformer"]["decoder_vocab"]
    before, after = read_weights(tmp_path / "a" / "best"), read_weights(tmp_path / "b" / "last")
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)  # zero steps: the same weights


def test_trainer_settings_are_one_dataclass_saved_verbatim_and_bad_ones_exit_2(tmp_path, capsys):
    from training import qformer
    from training.config import to_argv, to_dict
    from training.qformer_params import QFormerTrainConfig, parse_qformer_args

    manifest = _manifest(tmp_path)
    argv = _trainer_argv(manifest, tmp_path, tmp_path / "run", steps=1)
    assert qformer.main(argv) == 0
    saved = json.loads((tmp_path / "run" / "best" / "config.json").read_text())["training"]
    cfg = parse_qformer_args(argv)
    assert saved == to_dict(cfg) and saved["volume_size"] == [32, 32, 16]
    assert parse_qformer_args(to_argv(QFormerTrainConfig, saved)) == cfg  # the saved settings rebuild the same run
    assert qformer.main([*argv, "--volume-size", "32", "32"]) == 2
    assert "--volume-size takes three numbers" in capsys.readouterr().err
    assert qformer.main([*argv, "--encoder", "resnet9000"]) == 2


def test_trust_step_calibrates_and_writes_the_reference_set_of_a_trained_checkpoint(tmp_path):
    from engine.ask.model import ood_embedding
    from engine.trust import Calibration, ReferenceSet
    from training import qformer, qformer_trust

    manifest = _manifest(tmp_path)
    assert qformer.main(_trainer_argv(manifest, tmp_path, tmp_path / "run", steps=2)) == 0
    folder = tmp_path / "run" / "best"
    assert (
        qformer_trust.main(
            [str(folder), "--qa-manifest", str(manifest), "--data-root", str(tmp_path), "--cache", str(tmp_path / "qformer_cache")]
        )
        == 0
    )
    config = json.loads((folder / "config.json").read_text())
    calibration = Calibration.from_config(config["trust"]["closed"])
    assert calibration.fitted and set(calibration.calibrators) == {"default"}  # two val questions: no family of its own
    assert config["trust"]["closed"]["metrics"]["val"]["all"]["n"] == 2
    reference = ReferenceSet.load(folder)
    assert reference is not None and len(reference.vectors) == 7  # every cached training row: 4 images + 3 crops
    model = load_ask_folder(folder)  # the trust files do not disturb loading
    volume, _ = load_one([str(tmp_path / "ct.nii.gz")])
    vector = ood_embedding(model.encode(volume))
    assert vector.shape == (model.qformer.config.hidden_size,) and np.isfinite(reference.scores(vector[None])).all()
