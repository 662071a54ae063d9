"""Trust on hand-made cases where the right answer is known: calibration, the uncertain band, OOD flags, modality conflict.

Tiny random models (tests/_models.py, tests/_ask.py) with a hand-written "trust" block and a reference set built
from one image family (tests/_trust.py), so every expected number is computed here from the fitted map.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import tiny_clip_folder  # noqa: E402
from _trust import foreign_image, grey_image, grey_reference, write_trust  # noqa: E402

from engine.trust import Calibrator  # noqa: E402

LABELS = ["pneumonia", "normal", "pleural effusion"]


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _softmax(x):
    e = np.exp(np.asarray(x, dtype=np.float64) - np.max(x))
    return e / e.sum()


def _load(folder):
    from engine.models.checkpoint import load_folder

    return load_folder(folder)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return _load(tiny_clip_folder(tmp_path_factory.mktemp("plain") / "model"))


@pytest.fixture(scope="module")
def trusted_folder(tmp_path_factory):
    """A tiny CLIP with a reference set of the grey family and a very sharp softmax (so it is confident about anything)."""
    folder = tiny_clip_folder(tmp_path_factory.mktemp("trusted") / "model")
    reference = grey_reference(_load(folder))
    return write_trust(folder, softmax={"default": Calibrator("temperature", 400.0)}, reference=reference)


# --------------------------------------------------------------------------- no trust block: as before
def test_a_model_without_trust_behaves_as_before_and_says_not_calibrated(plain):
    from engine.zeroshot import label_images, load_prompt_set, score_embeddings, text_embeddings

    assert not plain.trust.calibrated and plain.trust.reference is None
    image = grey_image(1)
    for mode in ("softmax", "present-absent"):
        result = label_images([image], LABELS, plain, prompt_set="xray", mode=mode)
        ranked, _ = score_embeddings(
            plain.encode_images([image]),
            LABELS,
            text_embeddings(plain, LABELS, load_prompt_set("xray"), mode),
            plain.logit_scale,
            mode=mode,
            aggregation=None,
        )
        assert [(s.label, s.probability) for s in result.labels] == [(s.label, pytest.approx(s.probability)) for s in ranked]
        data = result.to_dict()
        assert data["calibrated"] is False and data["trust"].startswith("not calibrated")
        for row in data["labels"]:
            assert row["calibrated_probability"] is None and row["reported_probability"] == row["probability"]
            assert row["reasons"] == [] and row["fov_bound"] is None  # a 2D image: no field-of-view check
        assert data["out_of_distribution"] is None and data["ood_checks"] == []  # nothing could be checked: not assessed


# --------------------------------------------------------------------------- calibration
def test_calibration_changes_probabilities_as_the_fitted_map_says(tmp_path):
    from engine.zeroshot import label_images

    folder = write_trust(
        tiny_clip_folder(tmp_path / "m"),
        present_absent={"xray": Calibrator("platt", -1.5, 0.3), "default": Calibrator("platt", 2.0, -0.5)},
        softmax={"other": Calibrator("temperature", 0.25)},
    )
    clip = _load(folder)
    assert clip.trust.calibrated and clip.trust.note == "calibrated on hand-made test calibration"
    image = grey_image(2)
    for pset, (a, b) in (("xray", (-1.5, 0.3)), ("us", (2.0, -0.5))):  # a prompt set without its own map uses "default"
        result = label_images([image], LABELS, clip, prompt_set=pset, mode="present-absent")
        for s in result.labels:
            expected = _sigmoid(a * clip.logit_scale * (s.score - s.absent_score) + b)
            assert s.calibrated_probability == pytest.approx(float(expected), abs=1e-9)
            assert s.reported_probability == pytest.approx(s.calibrated_probability)
            assert s.probability == pytest.approx(float(_sigmoid(clip.logit_scale * (s.score - s.absent_score))), abs=1e-9)  # raw kept
        assert result.calibrated
    soft = label_images([image], LABELS, clip, prompt_set="other", mode="softmax")
    expected = _softmax(0.25 * clip.logit_scale * np.array([s.score for s in soft.labels]))
    assert [s.calibrated_probability for s in soft.labels] == pytest.approx(list(expected), abs=1e-9)
    shown = [s.reported_probability for s in soft.labels]
    assert shown == sorted(shown, reverse=True)  # ranked by the calibrated, reported number
    assert soft.to_dict()["labels"][0]["calibrated_probability"] == pytest.approx(shown[0], abs=1e-6)


def test_the_uncertain_band_replaces_a_confident_number(tmp_path):
    from engine.trust import Calibration
    from engine.zeroshot import label_images

    folder = write_trust(
        tiny_clip_folder(tmp_path / "m"),
        present_absent={"default": Calibrator("platt", 0.0, 0.0)},
        softmax={"default": Calibrator("temperature", 0.0)},
    )
    clip = _load(folder)
    pa = label_images([grey_image(3)], LABELS, clip, prompt_set="xray", mode="present-absent")
    assert {s.verdict for s in pa.labels} == {"uncertain"} and all(s.uncertain for s in pa.labels)  # p = 0.5: inside the band
    soft = label_images([grey_image(3)], LABELS, clip, prompt_set="xray", mode="softmax")
    assert soft.labels[0].reported_probability == pytest.approx(1 / 3)  # below min_top 0.5
    assert soft.labels[0].verdict == "uncertain" and [s.verdict for s in soft.labels[1:]] == ["less probable"] * 2
    band = Calibration()
    assert [band.verdict(p) for p in (0.2, 0.35, 0.5, 0.65, 0.66)] == ["absent", "uncertain", "uncertain", "uncertain", "present"]
    assert band.choice_uncertain(0.6, 2) and not band.choice_uncertain(0.7, 2)  # yes/no: the band's upper edge
    assert band.choice_uncertain(0.45, 4) and not band.choice_uncertain(0.55, 4)  # more choices: min_top


def test_a_malformed_trust_block_is_an_error_at_load_time(tmp_path):
    from engine.errors import ModelError

    folder = tiny_clip_folder(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["trust"] = {"present_absent": {"calibrators": {"default": {"method": "platt", "a": 1.0}}, "band": [0.7, 0.2]}}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="trust block"):
        _load(folder)
    config["trust"] = {"ood": {"method": "knn", "k": 5, "file": "trust_reference.safetensors"}}  # names a file that is not there
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="trust_reference"):
        _load(folder)


# --------------------------------------------------------------------------- out of distribution
def test_a_confidently_wrong_answer_on_a_foreign_image_is_flagged(trusted_folder):
    from engine.results.schema import LabelBlock
    from engine.results.sr import finding_value
    from engine.zeroshot import label_images

    clip = _load(trusted_folder)
    assert clip.trust.reference is not None and clip.trust.reference.k == 5
    foreign = label_images([foreign_image()], LABELS, clip, prompt_set="xray")
    assert foreign.labels[0].reported_probability > 0.9  # the sharp map makes it sure of itself ...
    assert foreign.ood.out_of_distribution is True  # ... and it is flagged all the same
    assert foreign.ood.score > foreign.ood.threshold and "unlike the images this model was trained on" in foreign.ood.reasons[0]
    familiar = label_images([grey_image(5000)], LABELS, clip, prompt_set="xray")
    assert familiar.ood.out_of_distribution is False and familiar.ood.score <= familiar.ood.threshold
    block = LabelBlock.from_dict(foreign.to_dict(), is_2d=True)  # the JSON result and the SR abstain
    assert block.out_of_distribution and all(f.abstain for f in block.findings) and block.ood_reasons
    assert "abstained" in finding_value(block.top, block.mode).meaning


def test_volume_slices_are_scored_by_their_median_distance():
    from engine.trust.ood import ReferenceSet

    ref = ReferenceSet(np.eye(4, dtype=np.float16)[:2], ["a", "b"], threshold=0.5, k=1)
    near, far = np.array([1.0, 0, 0, 0]), np.array([0, 0, 1.0, 0])
    assert ref.flag(np.stack([near, near, far])).out_of_distribution is False  # one odd slice does not flag a scan
    assert ref.flag(np.stack([near, far, far])).out_of_distribution is True


# --------------------------------------------------------------------------- modality conflict
def test_modality_conflict_needs_a_confident_guess_and_a_header():
    from engine.scan import Modality
    from engine.trust.modality import conflict

    sure_us = {Modality.US: 0.93, Modality.CT: 0.02, Modality.MR: 0.05}
    reason = conflict(sure_us, Modality.CT, "the model m")
    assert reason and "ultrasound" in reason and "DICOM header says CT" in reason
    assert conflict({Modality.US: 0.55, Modality.CT: 0.40}, Modality.CT) is None  # unsure is not a conflict
    assert conflict({Modality.CT: 0.9, Modality.US: 0.1}, Modality.CT) is None
    assert conflict(sure_us, None) is None  # no header, nothing to contradict


def test_header_modality_comes_only_from_dicom():
    from pydicom.data import get_testdata_file

    from engine.io import load_one
    from engine.scan import Modality
    from engine.trust.modality import header_modality

    ct, _ = load_one([get_testdata_file("CT_small.dcm")])
    assert header_modality(ct) == Modality.CT
    import nibabel as nib

    nifti, _ = load_one([Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"])
    assert header_modality(nifti) is None  # a NIfTI's modality is engine.io's guess, not a claim


def test_a_modality_conflict_flags_the_labels(plain, monkeypatch):
    from pydicom.data import get_testdata_file

    import engine.trust.modality as modality
    from engine.io import load_one
    from engine.scan import Modality
    from engine.zeroshot import label_scan

    scan, _ = load_one([get_testdata_file("CT_small.dcm")])
    monkeypatch.setattr(modality, "clip_modality", lambda clip, emb: {Modality.US: 0.95, Modality.CT: 0.01, Modality.MR: 0.04})
    flagged = label_scan(scan, LABELS, plain).to_dict()
    assert flagged["out_of_distribution"] is True and "DICOM header says CT" in flagged["ood_reasons"][0]
    assert flagged["ood_checks"] == ["header modality"] and flagged["ood_score"] is None  # no reference set in this model
    monkeypatch.setattr(modality, "clip_modality", lambda clip, emb: {Modality.CT: 0.9, Modality.US: 0.1})
    assert label_scan(scan, LABELS, plain).to_dict()["out_of_distribution"] is False


def test_the_shipped_clip_flags_a_real_mr_slice_it_reads_as_something_else():
    """pydicom's MR_small.dcm (a 64x64 MR slice): the shipped CLIP reads it as ultrasound/dermoscopy, not MR."""
    from pydicom.data import get_testdata_file

    from engine.io import load_one
    from engine.models import catalog
    from engine.zeroshot import label_scan

    if "medlens-clip" not in catalog.shipped(catalog.CLIP):
        pytest.skip("the shipped CLIP is not installed")
    scan, _ = load_one([get_testdata_file("MR_small.dcm")])
    clip = catalog.load("medlens-clip", catalog.CLIP, fast=False)  # no fast-path measuring in tests
    data = label_scan(scan, ["brain", "liver"], clip).to_dict()
    assert data["out_of_distribution"] is True and "DICOM header says MR" in " ".join(data["ood_reasons"])
    assert data["modality"] == "MR"


# --------------------------------------------------------------------------- the Q-Former
def test_qformer_calibrated_answers_uncertain_and_ood(tmp_path):
    from _ask import tiny_ask_folder

    from engine.ask.model import load_ask_folder
    from engine.io import load_one
    from PIL import Image

    folder = tiny_ask_folder(tmp_path / "qf")

    def scan_of(pixels, name):
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
        return load_one([tmp_path / f"{name}.png"])[0]

    ask = load_ask_folder(folder)
    grey = [ask.trust_embedding(ask.encode(scan_of(grey_image(i), f"g{i}"))) for i in range(12)]
    held = [ask.trust_embedding(ask.encode(scan_of(grey_image(900 + i), f"h{i}"))) for i in range(6)]
    from engine.trust.ood import ReferenceSet

    reference = ReferenceSet.fit(np.stack(grey), ["xray"] * 12, np.stack(held), k=3)
    write_trust(
        folder, closed={"organ_presence": Calibrator("temperature", 0.5), "default": Calibrator("temperature", 0.0)}, reference=reference
    )
    ask = load_ask_folder(folder)
    image = scan_of(grey_image(5000), "x")
    answer = ask.ask(image, "Is the liver visible?", with_evidence=False)
    from engine.ask import prompting

    scores = ask._candidate_scores(ask.encode(image), prompting.qa_prompt("Is the liver visible?"), ["yes", "no"])
    expected = dict(zip(["yes", "no"], _softmax(0.5 * scores)))
    assert answer.calibrated == pytest.approx(expected) and answer.calibrated_confidence == pytest.approx(expected[answer.answer])
    assert answer.uncertain == (expected[answer.answer] <= 0.65)
    # a family whose map flattens everything: uniform candidates, "uncertain" instead of an answer
    modality = ask.ask(image, "What is the imaging modality?", with_evidence=False)
    assert modality.uncertain and modality.verdict == "uncertain" and modality.to_dict()["verdict"] == "uncertain"
    assert answer.ood.out_of_distribution is False
    foreign = ask.ask(scan_of(foreign_image(), "f"), "Is the liver visible?", with_evidence=False)
    assert foreign.ood.out_of_distribution is True and foreign.to_dict()["out_of_distribution"] is True
    assert ask.trust.note == "calibrated on hand-made test calibration"


def test_a_qformer_reference_fitted_as_training_fits_it_is_read_in_the_same_space(tmp_path):
    """training/qformer_trust.py fits the reference on the queries' mean output (384-d for the shipped model, not the
    256-d ITC space): the engine must flag scans in the space the checkpoint names, or every ask fails on shapes."""
    import torch
    from _ask import tiny_ask_folder
    from PIL import Image

    from engine.ask.model import OOD_EMBEDDING, load_ask_folder, ood_embedding
    from engine.io import load_one
    from engine.trust.ood import ReferenceSet
    from training import qformer_trust

    folder = tiny_ask_folder(tmp_path / "qf")

    def scan_of(pixels, name):
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
        return load_one([tmp_path / f"{name}.png"])[0]

    ask = load_ask_folder(folder)
    grey = [ood_embedding(ask.encode(scan_of(grey_image(i), f"g{i}"))) for i in range(12)]
    held = [ood_embedding(ask.encode(scan_of(grey_image(900 + i), f"h{i}"))) for i in range(6)]
    with torch.inference_mode():
        itc = ask.qformer.image_embeddings(ask.encode(scan_of(grey_image(1), "g1")).query_states)[0].mean(dim=0)
    assert itc.shape[-1] != grey[0].shape[-1]  # the ITC space differs in width, as in the shipped model (256 vs 384)
    reference = ReferenceSet.fit(np.stack(grey), ["xray"] * 12, np.stack(held), k=3)
    calibration = qformer_trust.fit_closed([{"family": "default", "scores": [1.0, 0.0], "truth_index": 0}] * 40, min_family=30)
    trust = qformer_trust.write_trust(folder, calibration, reference, "hand-made")
    assert trust["ood"]["embedding"] == OOD_EMBEDDING
    ask = load_ask_folder(folder)
    image = scan_of(grey_image(5000), "x")
    assert ask.trust_embedding(ask.encode(image)).shape == grey[0].shape
    answer = ask.ask(image, "Is the liver visible?", with_evidence=False)
    assert answer.ood.score is not None and answer.ood.out_of_distribution is False
    foreign = ask.ask(scan_of(foreign_image(), "f"), "Is the liver visible?", with_evidence=False)
    assert foreign.ood.out_of_distribution is True
