"""QA data for "Ask the scan": crops as valid Scans, QA rows, the recipe (synthetic volumes + ../shared/data)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from engine.ask.questions import match_question, normalise_answer
from engine.scan import Modality, Provenance, Scan
from training.manifest import Row
from training.qa_data import (
    QARow,
    check_subject_disjoint,
    crop_scan,
    iter_qa,
    load_volume_crop,
    open_volume,
    read_qa_manifest,
    write_qa_manifest,
)
from training.recipes import qa as recipe
from training.tasks import REFERABLE, TASKS

from _rows import image_qa_row, qa_item, volume_qa_row


def _rotated_affine(spacing_zyx=(2.0, 0.8, 0.7), origin=(-100.0, 50.0, 20.0), angle=0.1) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([spacing_zyx[2], spacing_zyx[1], spacing_zyx[0]])  # columns: x, y, z
    aff[:3, 3] = origin
    return aff


def _world(affine: np.ndarray, zyx) -> np.ndarray:
    z, y, x = zyx
    return (affine @ np.array([x, y, z, 1.0]))[:3]


def _marker_scan(shape=(20, 30, 40), marker=(7, 11, 23)) -> Scan:
    vox = np.zeros(shape, np.float32)
    vox[marker] = 1000.0
    return Scan(vox, (2.0, 0.8, 0.7), _rotated_affine(), Modality.CT, {}, Provenance(reader="test"))


# --------------------------------------------------------------------------- crop geometry
def test_crop_keeps_every_voxel_where_it_was():
    scan = _marker_scan()
    box = {"z": [3, 15], "y": [5, 25], "x": [10, 35]}
    crop = crop_scan(scan, box, zoom=1.0)
    assert crop.voxels.shape == (12, 20, 25)
    idx = np.unravel_index(int(np.argmax(crop.voxels)), crop.voxels.shape)
    assert idx == (4, 6, 13)
    np.testing.assert_allclose(_world(crop.affine, idx), _world(scan.affine, (7, 11, 23)), atol=1e-9)
    assert crop.spacing == scan.spacing and crop.orientation == "RAS"
    # every voxel, not just the marker: crop voxel (k, j, i) is scan voxel (k+3, j+5, i+10)
    for zyx in [(0, 0, 0), (11, 19, 24), (5, 2, 17)]:
        src = (zyx[0] + 3, zyx[1] + 5, zyx[2] + 10)
        np.testing.assert_allclose(_world(crop.affine, zyx), _world(scan.affine, src), atol=1e-9)
    # the crop is a copy: editing it leaves the cached volume alone
    crop.voxels[:] = 0
    assert scan.voxels.max() == 1000.0


def test_zoom_scales_spacing_about_the_centre():
    scan = _marker_scan()
    box = {"z": [3, 15], "y": [5, 25], "x": [10, 35]}
    plain = crop_scan(scan, box, 1.0)
    zoomed = crop_scan(scan, box, 1.2)
    np.testing.assert_allclose(zoomed.spacing, np.array(plain.spacing) * 1.2)
    centre = ((12 - 1) / 2, (20 - 1) / 2, (25 - 1) / 2)
    np.testing.assert_allclose(_world(zoomed.affine, centre), _world(plain.affine, centre), atol=1e-9)
    assert any("zoom" in w for w in zoomed.provenance.warnings)
    assert np.array_equal(zoomed.voxels, plain.voxels)  # no resampling here: the model's preprocessing does it
    none = crop_scan(scan, box, 1.2, zoom_mode="none")
    np.testing.assert_allclose(none.affine, plain.affine)


def test_crop_outside_the_volume_is_refused():
    with pytest.raises(ValueError, match="outside"):
        crop_scan(_marker_scan(), {"z": [0, 21], "y": [0, 5], "x": [0, 5]})


def _write_nifti(path: Path, data_zyx: np.ndarray, affine: np.ndarray) -> Path:
    nib.Nifti1Image(np.asarray(data_zyx).transpose(tuple(range(data_zyx.ndim))[::-1]).copy(), affine).to_filename(str(path))
    return path


def _volume_row(path: str, box: dict, **kw) -> QARow:
    return volume_qa_row(**{"id": "v/s/crop001", "dataset": "ct_organs_3d", "subject": "s", "path": path, "crop": box, **kw})


def test_load_volume_crop_from_nifti(tmp_path):
    scan = _marker_scan()
    _write_nifti(tmp_path / "vol.nii.gz", scan.voxels, scan.affine)
    box = {"z": [2, 18], "y": [0, 30], "x": [20, 40]}
    before = open_volume.cache_info().hits
    crop = load_volume_crop(tmp_path, _volume_row("vol.nii.gz", box))
    again = load_volume_crop(tmp_path, _volume_row("vol.nii.gz", box, zoom=0.9))
    assert open_volume.cache_info().hits == before + 1  # opened once, cropped twice
    idx = np.unravel_index(int(np.argmax(crop.voxels)), crop.voxels.shape)
    assert idx == (5, 11, 3)
    np.testing.assert_allclose(_world(crop.affine, idx), _world(scan.affine, (7, 11, 23)), atol=1e-4)
    assert crop.modality == Modality.CT
    assert np.isclose(again.spacing[0], 0.9 * crop.spacing[0])


def test_load_volume_crop_picks_the_volume_of_a_4d_series(tmp_path):
    data = np.zeros((2, 6, 8, 10), np.float32)  # (t, z, y, x)
    data[1, 3, 4, 5] = 7.0
    _write_nifti(tmp_path / "epi.nii.gz", data, np.diag([3.0, 3.0, 4.0, 1.0]))
    row = _volume_row("epi.nii.gz", {"z": [1, 5], "y": [2, 8], "x": [0, 10]}, modality="mr", extra={"volume": 1})
    crop = load_volume_crop(tmp_path, row)
    assert crop.voxels.shape == (4, 6, 10) and crop.voxels[2, 2, 5] == 7.0 and crop.modality == Modality.MR
    assert load_volume_crop(tmp_path, _volume_row("epi.nii.gz", row.crop, modality="mr")).voxels.max() == 0.0


def test_random_crops_cover_40_to_100_percent():
    shape = (30, 101, 122)
    crops = recipe.random_crops(shape, 200, np.random.default_rng(0), (0.8, 1.25))
    assert len(crops) == 200
    assert crops[0] == ({"z": [0, 30], "y": [0, 101], "x": [0, 122]}, 1.0)
    for box, zoom in crops:
        assert 0.8 <= zoom <= 1.25
        for a, n in zip("zyx", shape):
            lo, hi = box[a]
            assert 0 <= lo < hi <= n and 0.4 * n - 1 <= hi - lo <= n


# --------------------------------------------------------------------------- rows
def _synthetic_subject(tmp_path: Path):
    """A 24x32x40 volume with liver, spleen and two kidneys in separate blocks."""
    rng = np.random.default_rng(0)
    img = rng.normal(0, 50, (24, 32, 40)).astype(np.float32)
    seg = np.zeros(img.shape, np.int16)
    seg[4:20, 4:20, 2:16] = 1  # liver
    seg[6:14, 6:14, 26:36] = 2  # spleen
    seg[10:16, 22:28, 4:10] = 3  # right kidney
    seg[10:16, 22:28, 30:36] = 4  # left kidney
    aff = np.diag([1.5, 1.5, 2.0, 1.0])
    _write_nifti(tmp_path / "img.nii.gz", img, aff)
    _write_nifti(tmp_path / "seg.nii.gz", seg, aff)
    names = {1: "liver", 2: "spleen", 3: "right kidney", 4: "left kidney"}
    return recipe.VolumeSpec("ct_organs_3d", "synth", "train", "ct", tmp_path / "img.nii.gz", tmp_path / "seg.nii.gz", names, "ct")


def test_volume_rows_balance_and_agree_with_the_label_map(tmp_path):
    spec = _synthetic_subject(tmp_path)
    rows = recipe.volume_rows(tmp_path, spec, 60, seed=3)
    assert len(rows) == 60 and rows[0].crop == {"z": [0, 24], "y": [0, 32], "x": [0, 40]} and rows[0].zoom == 1.0
    families = set()
    for row in rows:
        row.validate()
        frac, crop_frac = row.extra["organ_fraction"], row.extra["crop_fraction"]
        presence = [q for q in row.qa if q["family"] == "organ_presence"]
        yes = [q["slots"]["organ"] for q in presence if q["answer"] == "yes"]
        no = [q["slots"]["organ"] for q in presence if q["answer"] == "no"]
        assert len(yes) == len(no)  # balanced per crop
        for organ in yes:
            assert frac[organ] >= recipe.YES_ORGAN_SHARE or crop_frac[organ] >= recipe.YES_CROP_SHARE
        for organ in no:
            assert frac.get(organ, 0.0) == 0.0
        assert set(row.organs) == {o for o, s in row.extra["organ_status"].items() if s == "yes"}
        kidneys = {o: row.extra["organ_status"][o] for o in ("left kidney", "right kidney")}
        for q in row.qa:
            families.add(q["family"])
            if q["family"] == "side":
                assert sorted(kidneys.values()) == ["no", "yes"] and kidneys[f"{q['answer']} kidney"] == "yes"
            if q["family"] == "count" and q["slots"]["organ_plural"] == "kidney":
                assert int(q["answer"]) == sum(s == "yes" for s in kidneys.values())
            m = match_question(q["question"], modality=row.modality)  # training phrasings are what the app matches
            assert m is not None and m.family == q["family"] and m.slots == q.get("slots", {}), q
            assert normalise_answer(q["answer"], q["family"]) == q["answer"]
    assert {"organ_presence", "organs_in_view", "modality", "modality_check", "body_region", "count", "side"} <= families


def test_presence_items_are_balanced():
    status = {"liver": "yes", "spleen": "yes", "stomach": "yes", "left kidney": "no", "pancreas": "ambiguous"}
    items = recipe.presence_items(
        status, {"liver", "spleen", "stomach", "left kidney", "pancreas"}, ["heart", "brain"], random.Random(0), 4
    )
    answers = [(q["slots"]["organ"], q["answer"]) for q in items]
    assert sum(a == "yes" for _o, a in answers) == sum(a == "no" for _o, a in answers) == 3
    assert ("pancreas", "yes") not in answers and ("pancreas", "no") not in answers  # ambiguous: never asked
    assert ("left kidney", "no") in answers  # the hard negative comes first


def _row(**kw) -> Row:
    base = dict(id="x/1", dataset="pneumoniamnist", modality="xray", path="p.npz", split="test", subject="s1", labels=[])
    base.update(kw)
    return Row(**base)


@pytest.mark.parametrize(
    "row, task",
    [
        (_row(labels=["pneumonia"]), "pneumonia"),
        (_row(labels=["normal"]), "pneumonia"),
        (_row(dataset="busi", modality="us", labels=["malignant"]), "busi_malignant"),
        (_row(dataset="busi", modality="us", labels=["benign"]), "busi_malignant"),
        (_row(dataset="fundus_dr", modality="fundus", labels=["mild diabetic retinopathy", "diabetic maculopathy"]), "fundus_referable"),
        (_row(dataset="fundus_dr", modality="fundus", labels=["mild diabetic retinopathy"]), "fundus_referable"),
        (_row(dataset="fundus_dr", modality="fundus", labels=["advanced eye disease"]), "fundus_referable"),
        (_row(dataset="ham10000", modality="dermoscopy", labels=["melanoma"]), "ham_melanoma"),
        (_row(dataset="ham10000", modality="dermoscopy", labels=["melanocytic nevus"]), "ham_melanoma"),
        (_row(dataset="nih_cxr14", labels=["pneumothorax", "mass"]), "nih_abnormal"),
        (_row(dataset="nih_cxr14", labels=["normal"]), "nih_abnormal"),
    ],
)
def test_image_answers_follow_the_tasks(row, task, tmp_path):
    qa = recipe.image_row(tmp_path, row, recipe.SliceLabels(tmp_path))
    qa.validate()
    tagged = [q for q in qa.qa if q.get("task") == task and q["candidates"] == ["yes", "no"]]
    assert len(tagged) == 1
    assert tagged[0]["answer"] == ("yes" if TASKS[task].target(row) else "no")
    if row.dataset == "fundus_dr":
        assert (tagged[0]["answer"] == "yes") == bool(set(row.labels) & REFERABLE)


def test_other_ham_lesions_are_asked_without_the_melanoma_task(tmp_path):
    qa = recipe.image_row(
        tmp_path, _row(dataset="ham10000", modality="dermoscopy", labels=["basal cell carcinoma"]), recipe.SliceLabels(tmp_path)
    )
    mel = [q for q in qa.qa if q["family"] == "finding_yes_no"]
    assert mel[0]["answer"] == "no" and "task" not in mel[0]
    diag = [q for q in qa.qa if q["family"] == "diagnosis"][0]
    assert diag["task"] == "ham7" and diag["answer"] == "basal cell carcinoma" and len(diag["candidates"]) == 7


def test_qarow_round_trip_and_validation(tmp_path):
    row = _volume_row(
        "vol.nii.gz",
        {"z": [0, 4], "y": [0, 4], "x": [0, 4]},
        qa=[qa_item("Is the liver visible?", "yes", "organ_presence", ["yes", "no"], slots={"organ": "liver"})],
    )
    assert QARow.from_dict(json.loads(row.to_json())) == row
    image_row = json.loads(_row(dataset="busi", modality="us", path="a.png").to_json())
    image = image_qa_row("busi/1", "busi", "b1", "us", "a.png", split="test", image_row=image_row)
    assert image.manifest_row().dataset == "busi"
    write_qa_manifest([row, image], tmp_path / "m.jsonl")
    assert [r.id for r in read_qa_manifest(tmp_path / "m.jsonl", kinds=["image"])] == ["busi/1"]
    assert [(r.id, q["answer"]) for r, q in iter_qa(read_qa_manifest(tmp_path / "m.jsonl"), closed=True)] == [(row.id, "yes")]
    bad = [
        dict(kind="slice"),
        dict(crop={"z": [0, 4], "y": [0, 4]}),
        dict(crop={"z": [4, 4], "y": [0, 4], "x": [0, 4]}),
        dict(zoom=9.0),
        dict(qa=[{"question": "q", "answer": "maybe", "family": "organ_presence", "closed": True, "candidates": ["yes", "no"]}]),
        dict(qa=[{"question": "q", "answer": "yes", "family": "organ_presence", "closed": True, "candidates": ["yes", "no"], "x": 1}]),
    ]
    for change in bad:
        data = json.loads(row.to_json())
        data.update(change)
        with pytest.raises(ValueError):
            QARow.from_dict(data)
    with pytest.raises(ValueError, match="unknown fields"):
        QARow.from_dict({**json.loads(row.to_json()), "colour": "red"})


def test_subjects_never_straddle_splits():
    vol = _volume_row("v.nii.gz", {"z": [0, 2], "y": [0, 2], "x": [0, 2]}, subject="ts-mr-a", split="train", dataset="mr_organs_3d")
    img = image_qa_row("mr_organs/ts-mr-a/axial/001", "mr_organs", "ts-mr-a", "mr", "v.nii.gz", split="test", image_row={})
    with pytest.raises(ValueError, match="ts-mr-a"):
        check_subject_disjoint([vol, img])
    # unrelated datasets may reuse a subject string (fundus patient "12", LC25000 group "12")
    a = image_qa_row("a", "fundus_dr", "12", "fundus", "a", image_row={})
    b = image_qa_row("b", "lc25000_lung", "12", "pathology", "b", split="test", image_row={})
    check_subject_disjoint([a, b])


# --------------------------------------------------------------------------- real data
def test_recipe_on_shared_data(shared_data, tmp_path):
    out = tmp_path / "qa.jsonl"
    only = ["ct_organs_3d", "mr_organs_3d", "brain_mri_3d", "busi", "pneumoniamnist", "fundus_dr", "ham10000", "mr_organs", "brain_mri"]
    assert (
        recipe.main(
            [
                "--data-root",
                str(shared_data),
                "--out",
                str(out),
                "--only",
                *only,
                "--train-crops",
                "6",
                "--test-crops",
                "4",
                "--epi-crops",
                "2",
            ]
        )
        == 0
    )
    rows = read_qa_manifest(out)
    check_subject_disjoint(rows)
    split_of = {}
    for r in rows:
        if r.dataset in ("ct_organs_3d", "mr_organs_3d", "brain_mri_3d", "mr_organs", "brain_mri"):
            split_of.setdefault(r.subject, set()).add(r.split)
    assert split_of["ts-ct-a"] == {"test"} and split_of["ts-ct-b"] == {"train"}  # test: the subject with real reformats
    assert split_of["ts-mr-a"] == {"train"} and split_of["colin27"] == {"train"}
    epi = [s for s in split_of if s.startswith("20180918")]
    assert len(epi) == 8 and all(split_of[s] == {"test"} for s in epi)
    moved = [r for r in rows if r.dataset == "mr_organs"]
    assert moved and all(r.split == "train" and r.extra["source_split"] == "test" for r in moved)
    counts = {(r.dataset, r.subject) for r in rows if r.kind == "volume"}
    assert ("ct_organs_3d", "ts-ct-a") in counts and ("brain_mri_3d", "colin27") in counts
    # yes/no balance where the recipe controls it (findings follow the data's own prevalence)
    answers = [q["answer"] for r in rows for q in r.qa if q["family"] == "organ_presence"]
    assert answers and answers.count("yes") == answers.count("no")
    checks = [q["answer"] for r in rows for q in r.qa if q["family"] == "modality_check"]
    assert 0.4 < checks.count("yes") / len(checks) < 0.6
    # EPI crops: modality and body region questions only
    epi_rows = [r for r in rows if r.kind == "volume" and r.subject in epi]
    assert {q["family"] for r in epi_rows for q in r.qa} == {"modality", "modality_check", "body_region"}
    # the pixels and voxels the rows point at load
    from training.qa_data import load_image

    ct_b = next(r for r in rows if r.subject == "ts-ct-b" and r.kind == "volume" and r.id.endswith("crop001"))
    scan = load_volume_crop(shared_data, ct_b)
    assert scan.voxels.shape == tuple(ct_b.crop[a][1] - ct_b.crop[a][0] for a in "zyx") and scan.modality == Modality.CT
    whole = next(r for r in rows if r.subject == "ts-mr-a" and r.id.endswith("crop000"))
    assert load_volume_crop(shared_data, whole).modality == Modality.MR
    busi_row = next(r for r in rows if r.dataset == "busi")
    image = load_image(shared_data, busi_row)
    assert image.shape == (448, 448, 3) and image.dtype == np.uint8


def test_medpix_items(shared_data):
    from training.qa_data import medpix_items

    items = medpix_items(shared_data)
    assert len(items) == 60 and len({i.image_id for i in items}) == 6
    assert all(i.image.is_file() and i.question and i.answer for i in items)


def test_clip_baseline_answers_the_task_questions(tmp_path):
    """Which closed 2D questions the zero-shot baseline scores, and by which task (no model needed)."""
    from training.qa_baseline import rule_for

    qa = recipe.image_row(tmp_path, _row(dataset="busi", modality="us", labels=["malignant"]), recipe.SliceLabels(tmp_path))
    rules = {q["family"]: rule_for(qa, q) for q in qa.qa}
    assert rules["body_region"] is None  # no zero-shot task answers it
    assert "busi_malignant" in rules["finding_yes_no"][0] and "busi_malignant" in rules["diagnosis"][0]
    assert rules["modality"] is not None and rules["modality_check"] is not None
