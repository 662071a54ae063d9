"""training.evaluate end to end: a tiny random CLIP model on a fake manifest of tiny images and a small CT volume.

The numbers are chance (random image tower); the tests check the plumbing: every section of
metrics.json, the Markdown, exit codes, and that organ masks land on the organ's pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import evaluate as E
from training import tasks as T
from training.manifest import PixelLoader, Row, write_manifest

from _models import tiny_clip_folder
from _rows import manifest_row

LIVER, SPLEEN = 5, 1  # TotalSegmentator ids


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return tiny_clip_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from engine.models import load_model

    return load_model(f"local-dir:{tiny_model_dir}", fast=False)


def _png(path: Path, value: int, rgb: bool, rng) -> str:
    arr = np.clip(rng.normal(value, 20, (24, 24, 3) if rgb else (24, 24)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path.name


def _volume(root: Path) -> tuple[str, str]:
    """A 32 x 24 x 6 CT (HU) with a bright 'liver' block and a dim 'spleen' block, and its label map."""
    import nibabel as nib

    ct = np.full((32, 24, 6), -1000.0, np.float32)  # (x, y, z) in NIfTI order
    seg = np.zeros(ct.shape, np.uint8)
    ct[4:14, 6:18, :] = 150.0  # liver on every slice, on the image's left half... in voxel terms
    seg[4:14, 6:18, :] = LIVER
    ct[20:28, 4:10, 1:4] = -40.0  # spleen on slices 1-3 only
    seg[20:28, 4:10, 1:4] = SPLEEN
    affine = np.diag([1.5, 2.0, 3.0, 1.0])  # anisotropic: the letterbox must resample, not just pad
    (root / "vol").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(ct.astype(np.int16), affine), root / "vol" / "ct.nii.gz")
    nib.save(nib.Nifti1Image(seg, affine), root / "vol" / "seg.nii.gz")
    return "vol/ct.nii.gz", "vol/seg.nii.gz"


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> tuple[Path, Path]:
    """(data root, manifest): 'dsa' X-rays normal/pneumonia, 'dsb' pathology 3 classes, 'ctset' CT slices."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    rows = []
    for split, n in (("train", 12), ("val", 6), ("test", 10)):
        for i in range(n):
            pos, c = i % 2, i % 3
            # (dataset, modality, subject prefix, pixel mean, colour, label): pixel mean follows the label
            for dataset, modality, prefix, value, rgb, label in (
                ("dsa", "xray", "a", 60 + 120 * pos, False, "pneumonia" if pos else "normal"),
                ("dsb", "pathology", "b", 50 + 70 * c, True, list(T.LC25000.values())[c]),
            ):
                name = _png(root / dataset / f"{split}{i}.png", value, rgb, rng)
                rows.append(manifest_row(dataset, f"{split}/{i}", modality, f"{dataset}/{name}", [label], f"{prefix}{split}{i}", split))
    ct, seg = _volume(root)
    masks = {"mask": seg, "mask_ids": {"liver": [LIVER], "spleen": [SPLEEN]}}
    for z in range(6):
        labels = ["liver"] + (["spleen"] if 1 <= z <= 3 else [])
        axial = {"slice": {"plane": "axial", "index": z}, "view": "axial", "body_part": "abdomen"}
        rows.append(manifest_row("ctset", f"test/{z}", "ct", ct, labels, "ct1", extra=masks, **axial))
    manifest = root / "manifest.jsonl"
    write_manifest(rows, manifest)
    return root, manifest


FAKE_TASKS = {
    "modality": T.TASKS["modality"],
    "pneu": T.Task("pneu", ("dsa",), T.BINARY, ("normal", "pneumonia"), "xray", frozenset({"pneumonia"})),
    "lc": T.Task("lc", ("dsb",), T.MULTICLASS, tuple(T.LC25000.values()), "pathology"),
    "organs": T.Task("organs", ("ctset",), T.MULTILABEL, ("liver", "spleen", "heart"), "ct"),
}


def test_mask_lands_on_the_organ(fake):
    root, manifest = fake
    from training.manifest import read_manifest

    row = next(r for r in read_manifest(manifest) if r.id == "ctset/test/2")
    loader = PixelLoader(root)
    image = loader.model_image(row)
    masks = E.MaskLoader(loader)
    liver = masks(row, [LIVER], image)
    spleen = masks(row, [SPLEEN], image)
    assert liver.shape == image.pixels.shape[:2] and liver.any() and spleen.any() and not (liver & spleen).any()
    grey = image.pixels[..., 0].astype(int)
    # liver (150 HU) is the brightest thing in the abdomen window; spleen (-40 HU) is mid-grey
    bright = grey > 150
    iou = (bright & liver).sum() / (bright | liver).sum()
    assert iou > 0.85
    assert grey[spleen].mean() > 40 and grey[spleen].mean() < 150
    # ids from class_names.json when the row has no id table
    names = {"total": {str(SPLEEN): "spleen", str(LIVER): "liver"}}
    (root / "vol" / "class_names.json").write_text(json.dumps(names))
    bare = Row(**{**row.__dict__, "extra": {"mask": row.extra["mask"]}})
    assert E._mask_ids(bare, "liver", root) == [LIVER]
    assert E._mask_ids(bare, "left kidney", root) == []
    # a label map of another grid is refused, not silently misaligned
    other = Row(**{**row.__dict__, "extra": {"mask": "vol/seg_other.nii.gz"}})
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((32, 24, 7), np.uint8), np.diag([1.5, 2.0, 3.0, 1.0])), root / "vol" / "seg_other.nii.gz")
    with pytest.raises(ValueError, match="grid"):
        masks(other, [LIVER])


def test_evaluate_end_to_end(fake, tiny_model, tmp_path):
    root, manifest = fake
    from training.manifest import read_manifest

    rows = read_manifest(manifest)
    body = E.evaluate(tiny_model, rows, root, tasks=FAKE_TASKS, do_probe=True, do_pointing=True, pointing_max=4, log=None)
    zs = body["zero_shot"]
    assert set(zs) == set(FAKE_TASKS)
    assert zs["modality"]["n"] == 26 and set(zs["modality"]["per_modality"]) == {"xray", "pathology", "ct"}
    assert zs["pneu"]["n"] == 10 and 0 <= zs["pneu"]["auc"] <= 1 and len(zs["pneu"]["auc_ci95"]) == 2
    assert zs["lc"]["n"] == 10 and 0 <= zs["lc"]["accuracy"] <= 1 and "macro_auc" in zs["lc"]
    org = zs["organs"]
    assert list(org["per_organ"]) == ["spleen"]  # liver is on every slice, heart on none
    assert org["skipped_organs"] == {"liver": "present on every slice", "heart": "never present"}
    assert org["n_organs"] == 1 and org["mean_auc"] == org["per_organ"]["spleen"]["auc"]
    assert 0 <= org["per_organ"]["spleen"]["control_auc"] <= 1 and org["mean_control_auc"] == org["per_organ"]["spleen"]["control_auc"]
    t2i = body["retrieval"]["text_to_image"]
    assert t2i["pneu"]["n_queries"] == 2 and t2i["lc"]["n_queries"] == 3 and t2i["organs"]["n_queries"] == 2
    i2i = body["retrieval"]["image_to_image"]
    assert i2i["dsa"]["classes_from"] == "pneu" and i2i["dsa"]["n_gallery"] == 10
    assert "skipped" in i2i["ctset"]
    pr = body["probe"]
    assert set(pr) == {"pneu", "lc"}
    assert pr["pneu"]["n_train"] == 12 and pr["pneu"]["n_val"] == 6 and set(pr["pneu"]["fractions"]) == {"1%", "10%", "100%"}
    assert set(pr["lc"]["few_shot"]) == {"5", "10", "20"}
    pt = body["pointing"]["organs"]
    assert pt["n"] == 4 and set(pt["per_organ"]) == {"liver", "spleen"} and not pt["errors"]
    assert pt["method"] == "gradient" and 0 < pt["chance"] < 1
    assert body["embedding"]["images"] == 26 + 2 * 12 + 2 * 6  # test once, then train and val of the probed sets
    md = E.write_outputs({"model": tiny_model.model_id, "split": "test", **body}, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())  # strict JSON: NaN became null
    assert data["zero_shot"]["pneu"]["n"] == 10
    heads = E.headline_metrics(data)
    assert set(heads) == set(FAKE_TASKS) and heads["organs"] == pytest.approx(org["mean_auc"], abs=1e-6)
    card = E.to_markdown(data, top=2, title=False)  # for a model card's own "## Evaluation" section
    assert "### Zero-shot" in card and not card.startswith("#") and "\n## " not in card
    for section in (
        "## Zero-shot",
        "### Modality recognition",
        "per-organ AUC",
        "text -> image",
        "image -> image",
        "Linear probe",
        "Few-shot",
        "Pointing game",
    ):
        assert section in md


def test_max_per_task_and_task_selection(fake, tiny_model):
    root, manifest = fake
    from training.manifest import read_manifest

    body = E.evaluate(tiny_model, read_manifest(manifest), root, tasks=FAKE_TASKS, task_names=["pneu", "lc"], max_per_task=4, log=None)
    assert set(body["zero_shot"]) == {"pneu", "lc"}
    assert set(body["retrieval"]["image_to_image"]) == {"dsa", "dsb"}  # only the selected tasks' datasets
    assert body["zero_shot"]["pneu"]["n"] == 4 and body["zero_shot"]["pneu"]["n_positive"] == 2  # stratified
    assert body["zero_shot"]["lc"]["n"] <= 5 and len(set(body["zero_shot"]["lc"]["per_class"])) == 3
    with pytest.raises(E.UsageError, match="unknown task"):
        E.evaluate(tiny_model, read_manifest(manifest), root, tasks=FAKE_TASKS, task_names=["nope"], log=None)
    with pytest.raises(E.UsageError, match="no rows in split"):
        E.evaluate(tiny_model, read_manifest(manifest), root, tasks=FAKE_TASKS, split="val2", log=None)


def test_unreadable_rows_are_counted_not_fatal(fake, tiny_model, tmp_path):
    root, manifest = fake
    from training.manifest import read_manifest

    rows = read_manifest(manifest)
    rows.append(
        Row(id="dsa/test/missing", dataset="dsa", modality="xray", path="dsa/missing.png", split="test", subject="zz", labels=["normal"])
    )
    body = E.evaluate(tiny_model, rows, root, tasks={"pneu": FAKE_TASKS["pneu"]}, log=None)
    assert body["embedding"]["errors"] == 1 and "dsa/test/missing" in body["embedding"]["error_examples"]
    assert body["zero_shot"]["pneu"]["n"] == 10


def test_cli(fake, tiny_model_dir, tmp_path, monkeypatch, capsys):
    root, manifest = fake
    monkeypatch.setattr(T, "TASKS", FAKE_TASKS)
    out = tmp_path / "eval"
    code = E.main(
        [
            f"local-dir:{tiny_model_dir}",
            "--manifest",
            str(manifest),
            "--data-root",
            str(root),
            "--out",
            str(out),
            "--exact",
            "--tasks",
            "modality,pneu",
            "--max-per-task",
            "6",
        ]
    )
    assert code == 0
    data = json.loads((out / "metrics.json").read_text())
    for key in ("model", "source", "split", "manifest", "date", "cpu", "wall_s", "settings", "zero_shot", "retrieval", "embedding"):
        assert key in data
    assert data["manifest"]["sha256"] == E.file_sha256(manifest) and data["split"] == "test"
    assert set(data["zero_shot"]) == {"modality", "pneu"}
    md = (out / "metrics.md").read_text()
    assert "## Zero-shot" in md and md in capsys.readouterr().out

    assert E.main(["local-dir:/nonexistent/model", "--manifest", str(manifest), "--data-root", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot load model")
    assert E.main([f"local-dir:{tiny_model_dir}", "--manifest", str(tmp_path / "none.jsonl"), "--out", str(out)]) == 2
    assert "manifest" in capsys.readouterr().err
