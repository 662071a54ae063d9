"""Data recipes (training/recipes): tiny fake sources made here, plus one run on ../shared/data."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from training.manifest import PixelLoader, Row, read_manifest
from training.recipes import DEFAULT, RECIPES, build_all, build_rows, main
from training.recipes.breastmnist import breastmnist, breastmnist_report
from training.recipes.busi import busi, busi_report
from training.recipes.caption_csv import caption_csv
from training.recipes.chexpert import chexpert_csv
from training.recipes.fundus_dr import fundus_dr, fundus_labels
from training.recipes.ham10000 import ham10000
from training.recipes.lc25000 import lc25000_lung
from training.recipes.medmnist import medmnist_plus, pneumoniamnist
from training.recipes.nih_cxr14 import nih_cxr14
from training.recipes.organs import aal_structure, body_region, ts_organ_name
from training.recipes.slices import volume_rows
from training.tasks import TASKS


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _png(path: Path, value: int = 128, size=(16, 16), mode="L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, value, value)).save(path)


# --------------------------------------------------------------------------- tabular sources
def test_nih_rows_labels_and_no_identifying_columns(tmp_path):
    base = tmp_path / "xray/nih_cxr14_1000"
    recs = [
        ["images/a.png", "7", "train", "1", "No Finding", "PA", "61", "F"],
        ["images/b.png", "7", "train", "0", "Effusion|Pleural_Thickening", "PA", "61", "F"],
        ["images/c.png", "9", "test", "0", "Mass", "AP", "44", "M"],
    ]
    _csv(base / "labels.csv", ["file", "patient_id", "split", "normal", "findings", "view", "age", "sex"], recs)
    for r in recs:
        _png(base / r[0])
    rows = nih_cxr14(tmp_path)
    assert [r.labels for r in rows] == [["normal"], ["pleural effusion", "pleural thickening"], ["mass"]]
    assert [r.split for r in rows] == ["train", "train", "test"]
    assert rows[0].subject == rows[1].subject != rows[2].subject
    assert rows[2].view == "AP" and rows[0].body_part == "chest" and rows[0].modality == "xray"
    assert rows[0].path == "xray/nih_cxr14_1000/images/a.png"
    text = "\n".join(r.to_json() for r in rows)
    assert "61" not in text and '"F"' not in text
    assert not {"age", "sex"} & {k for r in rows for k in [*json.loads(r.to_json()), *r.extra]}


def test_fundus_label_mapping_covers_the_ten_classes():
    expect = {
        "1 - No DR": ["no diabetic retinopathy"],
        "2 - Mild DR without maculopathy": ["mild diabetic retinopathy"],
        "3 - Mild DR with maculopathy": ["mild diabetic retinopathy", "diabetic maculopathy"],
        "4 - Moderate DR without maculopathy": ["moderate diabetic retinopathy"],
        "5 - Moderate DR with maculopathy": ["moderate diabetic retinopathy", "diabetic maculopathy"],
        "6 - Severe DR without maculopathy": ["severe diabetic retinopathy"],
        "7 - Severe DR with maculopathy": ["severe diabetic retinopathy", "diabetic maculopathy"],
        "8 - PDR without maculopathy": ["proliferative diabetic retinopathy"],
        "9 - PDR with maculopathy": ["proliferative diabetic retinopathy", "diabetic maculopathy"],
        "10 - ADED": ["advanced eye disease"],
    }
    for source, labels in expect.items():
        assert fundus_labels(source) == labels
    with pytest.raises(ValueError):
        fundus_labels("11 - something else")


def test_fundus_lc25000_ham_rows(tmp_path):
    _csv(
        tmp_path / "fundus/dr_maculopathy/labels.csv",
        ["file", "label", "patient_id", "eye", "split"],
        [["images/x_L.jpg", "5 - Moderate DR with maculopathy", "P1", "L", "val"], ["images/x_R.jpg", "1 - No DR", "P1", "R", "val"]],
    )
    f = fundus_dr(tmp_path)
    assert f[0].view == "left eye" and f[1].view == "right eye" and f[0].subject == f[1].subject == "P1"
    _csv(
        tmp_path / "pathology/lc25000_lung/labels.csv",
        ["file", "label", "group", "split"],
        [
            ["images/a.jpeg", "squamous_cell_carcinoma", "lung_scc-1", "train"],
            ["images/b.jpeg", "benign", "lung_n-2", "test"],
            ["images/c.jpeg", "adenocarcinoma", "lung_aca-3", "val"],
        ],
    )
    lc = lc25000_lung(tmp_path)
    assert [r.labels[0] for r in lc] == ["lung squamous cell carcinoma", "benign lung tissue", "lung adenocarcinoma"]
    assert lc[0].subject == "lung_scc-1" and lc[0].modality == "pathology"
    _csv(
        tmp_path / "dermatology/ham10000/labels.csv",
        ["file", "dx", "lesion_id", "age", "sex", "site", "split"],
        [
            ["images/ISIC_1.jpg", "mel", "HAM_1", "50", "male", "lower extremity", "train"],
            ["images/ISIC_2.jpg", "nv", "", "", "", "", "test"],
        ],
    )
    ham = ham10000(tmp_path)
    assert ham[0].labels == ["melanoma"] and ham[0].body_part == "lower extremity" and ham[0].subject == "HAM_1"
    assert ham[1].labels == ["melanocytic nevus"] and ham[1].body_part is None and ham[1].subject == "image-ISIC_2"
    assert "male" not in ham[0].to_json()


# --------------------------------------------------------------------------- MedMNIST
def _mnist(path: Path, n=(4, 2, 3), size=28, channels=0, n_classes=2, multilabel=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        shape = (k, size, size) + ((channels,) if channels else ())
        arrays[f"{split}_images"] = rng.integers(0, 255, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (
            rng.integers(0, 2, (k, multilabel), dtype=np.uint8) if multilabel else (np.arange(k) % n_classes).reshape(k, 1).astype(np.uint8)
        )
    np.savez_compressed(path, **arrays)


def test_pneumoniamnist_rows_and_pixels(tmp_path):
    _mnist(tmp_path / "xray/pneumoniamnist.npz")
    rows = pneumoniamnist(tmp_path)
    assert len(rows) == 9 and {r.split for r in rows} == {"train", "val", "test"}
    r = rows[1]
    assert r.array == {"key": "train_images", "index": 1} and r.labels == ["pneumonia"] and rows[0].labels == ["normal"]
    assert r.subject == "pneumoniamnist/train/1" and r.extra == {"population": "paediatric"} and r.body_part == "chest"
    px = PixelLoader(tmp_path, size=64)(r)
    assert px.shape == (64, 64, 3) and px.dtype == np.uint8


def test_medmnist_plus_builtin_names_sizes_and_refusals(tmp_path):
    _mnist(tmp_path / "medmnist/pathmnist_64.npz", size=64, channels=3, n_classes=9)
    _mnist(tmp_path / "chestmnist.npz", multilabel=14)
    _mnist(tmp_path / "medmnist/organsmnist.npz", n_classes=11)
    rows = medmnist_plus(tmp_path, flags=("pathmnist",), size=64)
    assert {r.dataset for r in rows} == {"pathmnist_64"} and rows[0].modality == "pathology"
    assert rows[0].labels == ["adipose"] and rows[1].labels == ["background"]
    chest = medmnist_plus(tmp_path, flags=("chestmnist",))
    assert all(
        r.labels == ["normal"]
        or set(r.labels)
        <= set(TASKS["ct_organs"].classes)
        | {
            "atelectasis",
            "cardiomegaly",
            "pleural effusion",
            "infiltration",
            "mass",
            "nodule",
            "pneumonia",
            "pneumothorax",
            "consolidation",
            "edema",
            "emphysema",
            "fibrosis",
            "pleural thickening",
            "hernia",
        }
        for r in chest
    )
    organs = medmnist_plus(tmp_path, flags=("organsmnist",))
    assert organs[0].labels == ["urinary bladder"] and organs[1].labels == ["left femur"] and organs[0].view == "sagittal"
    assert PixelLoader(tmp_path, size=32)(rows[0]).shape == (32, 32, 3)
    with pytest.raises(ValueError, match="OCT"):
        medmnist_plus(tmp_path, flags=("octmnist",))
    with pytest.raises(ValueError, match="3D"):
        medmnist_plus(tmp_path, flags=("organmnist3d",))
    with pytest.raises(FileNotFoundError):
        medmnist_plus(tmp_path, flags=("dermamnist",))
    assert "medmnist_plus" in RECIPES and "medmnist_plus" not in DEFAULT


# --------------------------------------------------------------------------- BUSI and BreastMNIST
def _smooth_image(rng, width: int, height: int = 256) -> Image.Image:
    a = gaussian_filter(rng.normal(size=(height, width)), 8)
    a = (a - a.min()) / (a.max() - a.min()) * 255
    return Image.fromarray(a.astype(np.uint8))


def _fake_busi(root: Path, n: int = 10):
    """n distinct 'originals' (non-square), BUSI PNGs squashed to 256x256, BreastMNIST frames centre-cropped.

    Image 1 is a near-duplicate of image 0 in another split; image 3 is an exact copy of image 2
    with the other label."""
    rng = np.random.default_rng(1)
    originals = [_smooth_image(rng, int(rng.integers(290, 360))) for _ in range(n)]
    noisy = np.asarray(originals[0], np.float32) + rng.normal(0, 6, (256, originals[0].size[0]))
    originals[1] = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    originals[3] = originals[2].copy()
    labels = ["benign", "benign", "malignant", "benign"] + ["malignant" if i % 3 == 0 else "normal" for i in range(4, n)]
    splits = ["train", "test", "train", "test"] + ["train", "val", "test"] * n
    recs = []
    for i, (im, lab) in enumerate(zip(originals, labels)):
        file = f"images/{lab}/{lab} ({i}).png"
        (root / "ultrasound/busi" / file).parent.mkdir(parents=True, exist_ok=True)
        im.resize((256, 256), Image.Resampling.BILINEAR).convert("RGB").save(root / "ultrasound/busi" / file)
        recs.append([file, lab, splits[i], f"An ultrasound image of breast with {lab} findings."])
    _csv(root / "ultrasound/busi/labels.csv", ["file", "label", "split", "caption"], recs)
    frames = []
    for im in originals:
        c = (im.size[0] - 256) // 2
        frames.append(np.asarray(im.crop((c, 0, c + 256, 256)).resize((28, 28), Image.Resampling.BILINEAR)))
    order = rng.permutation(n)  # MedMNIST's own order and split
    k1, k2 = int(n * 0.6), int(n * 0.8)
    parts = {"train": order[:k1], "val": order[k1:k2], "test": order[k2:]}
    arrays = {}
    for split, idx in parts.items():
        arrays[f"{split}_images"] = np.stack([frames[i] for i in idx])
        arrays[f"{split}_labels"] = np.array([0 if labels[i] == "malignant" else 1 for i in idx], np.uint8)
    np.savez_compressed(root / "ultrasound/breastmnist.npz", **arrays)
    return labels, splits, parts


def test_busi_groups_near_duplicates_and_drops_label_conflicts(tmp_path):
    labels, splits, _ = _fake_busi(tmp_path)
    rows = {r.id: r for r in busi(tmp_path)}
    report = busi_report(tmp_path)
    assert report["dropped_label_conflicts"] == ["benign (3)", "malignant (2)"]
    assert "busi/malignant (2)" not in rows and "busi/benign (3)" not in rows
    a, b = rows["busi/benign (0)"], rows["busi/benign (1)"]
    assert a.subject == b.subject and a.split == b.split == "test"  # tie train/test -> the held-out one
    assert a.extra == {"source_split": "train"} and report["groups_straddling_splits"] == 1
    assert len(rows) == len(labels) - 2 and all(r.text for r in rows.values())
    build_rows(tmp_path, ["busi"])  # subject-disjoint


def test_breastmnist_frames_take_their_busi_split_and_subject(tmp_path):
    labels, _splits, parts = _fake_busi(tmp_path)
    busi_rows = {r.path: r for r in busi(tmp_path)}
    by_index = {int(r.id.rsplit("(", 1)[1].rstrip(")")): r for r in busi_rows.values()}
    rows = breastmnist(tmp_path)
    report = breastmnist_report(tmp_path)
    assert report["kept"] == len(labels) - 2 and report["dropped"]["busi_dropped"] + report["dropped"]["label"] == 2
    assert report["min_r"] > 0.99
    for r in rows:
        source_index = int(parts[r.array["key"].split("_")[0]][r.array["index"]])
        src = busi_rows[r.extra["busi"]]
        if source_index >= 4:  # 0/1 are near-duplicates (either may win), 2/3 dropped twins
            assert src is by_index[source_index]  # matched to the image it was made from
        assert (r.split, r.subject) == (src.split, src.subject) == (by_index[source_index].split, by_index[source_index].subject)
        assert r.labels == (["malignant"] if labels[source_index] == "malignant" else ["non-malignant"])
    build_rows(tmp_path, ["busi", "breastmnist"])


# --------------------------------------------------------------------------- volumes
def _save_non_ras(data_ras: np.ndarray, path: Path, codes=("P", "S", "L"), spacing=2.0) -> None:
    """Store a RAS-ordered (x, y, z) array under another axis order, with an affine that says so."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    affine_ras = np.diag([spacing, spacing, spacing, 1.0])
    affine_ras[:3, 3] = (-30.0, 12.0, 40.0)
    transform = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(codes))
    data = apply_orientation(data_ras, transform)
    affine = affine_ras @ inv_ornt_aff(transform, data_ras.shape)
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    assert nib.aff2axcodes(img.affine) == tuple(codes)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _phantom(tmp_path: Path):
    """CT-like volume (x 40, y 30, z 20 in RAS order): body block, a 'liver' cube on the patient's right
    (high x), a 'left kidney' cube on the left (low x), and a 10-voxel speck too small to count."""
    ct = np.full((40, 30, 20), -1000.0, np.float32)
    seg = np.zeros((40, 30, 20), np.int16)
    ct[5:35, 3:27, :] = 0.0
    ct[25:33, 10:21, 4:13], seg[25:33, 10:21, 4:13] = 200.0, 5  # liver: x 25-32, y 10-20, z 4-12
    ct[7:13, 10:16, 13:18], seg[7:13, 10:16, 13:18] = 50.0, 3  # left kidney: x 7-12, y 10-15, z 13-17
    seg[20, 20, 0:10] = 1  # spleen speck: 1 pixel per axial slice, at most 10 per slice elsewhere
    _save_non_ras(ct, tmp_path / "vol/ct.nii.gz")
    _save_non_ras(seg, tmp_path / "vol/seg.nii.gz", codes=("P", "S", "L"))
    return tmp_path / "vol/ct.nii.gz", tmp_path / "vol/seg.nii.gz"


def test_slice_rows_organ_presence_and_orientation_on_a_non_ras_phantom(tmp_path):
    from engine.views import extract_slice
    from training.recipes.slices import load_scan

    image, seg = _phantom(tmp_path)
    names = {5: "liver", 3: "left kidney", 1: "spleen"}
    rows = volume_rows(
        tmp_path,
        dataset="ct_organs",
        modality="ct",
        subject="phantom",
        split="train",
        image=image,
        seg=seg,
        id_names=names,
        body_part=body_region,
    )
    by = {(r.slice["plane"], r.slice["index"]): r for r in rows}
    assert {p for p, _ in by} == {"axial", "coronal", "sagittal"}
    # every slice with body, in the engine's RAS index convention (axial = z, coronal = y, sagittal = x)
    assert sorted(i for p, i in by if p == "axial") == list(range(20))
    assert sorted(i for p, i in by if p == "coronal") == list(range(3, 27))
    assert sorted(i for p, i in by if p == "sagittal") == list(range(5, 35))
    liver = {p: sorted(i for (q, i), r in by.items() if q == p and "liver" in r.labels) for p in ("axial", "coronal", "sagittal")}
    assert liver == {"axial": list(range(4, 13)), "coronal": list(range(10, 21)), "sagittal": list(range(25, 33))}
    kidney = sorted(i for (q, i), r in by.items() if q == "sagittal" and "left kidney" in r.labels)
    assert kidney == list(range(7, 13))
    assert not any("spleen" in r.labels for r in rows)  # below 20 pixels: not present
    r = by[("axial", 8)]
    assert r.labels == ["liver"] and r.extra["mask_ids"] == {"liver": [5]} and r.body_part == "abdomen"
    assert r.extra["mask"] == "vol/seg.nii.gz" and r.path == "vol/ct.nii.gz" and r.view == "axial"
    # the image shows the organ on exactly that slice; radiological view: patient's right on screen left
    scan = load_scan(image)
    for (plane, index), row in by.items():
        pixels, _ = extract_slice(scan, plane, index)
        assert (np.isclose(pixels, 200).sum() > 0) == ("liver" in row.labels), (plane, index)
    axial, _ = extract_slice(scan, "axial", 8)
    cols = np.nonzero(np.isclose(axial, 200).any(axis=0))[0]
    assert cols.max() < axial.shape[1] / 2  # liver (patient right) on the left of the screen
    kid, _ = extract_slice(scan, "axial", 15)
    assert np.nonzero(np.isclose(kid, 50).any(axis=0))[0].min() > kid.shape[1] / 2
    px = PixelLoader(tmp_path, size=48)(r)
    assert px.shape == (48, 48, 3)


def test_slice_rows_refuse_a_label_map_on_another_grid(tmp_path):
    image, _ = _phantom(tmp_path)
    other = tmp_path / "vol/shifted.nii.gz"
    img = nib.load(image)
    aff = img.affine.copy()
    aff[0, 3] += 1.0
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.int16), aff), other)
    with pytest.raises(ValueError, match="affine"):
        volume_rows(tmp_path, dataset="x", modality="ct", subject="s", split="train", image=image, seg=other, id_names={1: "liver"})


def test_slice_rows_step_cap_and_4d_volume(tmp_path):
    vol = np.zeros((16, 16, 8, 3), np.float32)
    vol[2:14, 2:14, :, :] = 100.0
    nib.save(nib.Nifti1Image(vol, np.diag([3.0, 3.0, 5.0, 1.0])), tmp_path / "epi.nii.gz")
    rows = volume_rows(
        tmp_path,
        dataset="brain_mri",
        modality="mr",
        subject="epi",
        split="train",
        image=tmp_path / "epi.nii.gz",
        step=2,
        cap=5,
        always=("brain",),
        body_part="brain",
        volume=0,
    )
    counts = {p: sum(r.slice["plane"] == p for r in rows) for p in ("axial", "coronal", "sagittal")}
    assert counts == {"axial": 4, "coronal": 5, "sagittal": 5}
    assert all(r.extra == {"volume": 0} and r.labels == ["brain"] and r.modality == "mr" for r in rows)
    assert PixelLoader(tmp_path, size=32)(rows[0]).shape == (32, 32, 3)


def test_organ_and_brain_names():
    assert ts_organ_name("kidney_left") == "left kidney"
    assert ts_organ_name("lung_upper_lobe_left") == ts_organ_name("lung_left") == "left lung"
    assert ts_organ_name("lung_middle_lobe_right") == "right lung"
    assert ts_organ_name("vertebrae_L3") == ts_organ_name("vertebrae") == "vertebrae"
    assert ts_organ_name("rib_right_11") == "ribs"
    assert ts_organ_name("urinary_bladder") == "urinary bladder" and ts_organ_name("small_bowel") == "small bowel"
    assert ts_organ_name("iliac_vena_left") == "left iliac vein" and ts_organ_name("clavicula_right") == "right clavicle"
    assert aal_structure("ParaHippocampal_L") == "temporal lobe" and aal_structure("Hippocampus_R") == "hippocampus"
    assert aal_structure("Putamen_L") == "basal ganglia" and aal_structure("Vermis_4_5") == "vermis"
    assert body_region({"left lung": 900, "liver": 100}) == "chest"
    assert body_region({"liver": 900, "right lung": 100}) == "abdomen"
    assert body_region({"urinary bladder": 50}) == "pelvis" and body_region({}) is None


# --------------------------------------------------------------------------- caption and CheXpert CSVs
def test_caption_csv_rows_splits_and_modalities(tmp_path):
    _csv(
        tmp_path / "roco/captions.csv",
        ["image", "caption", "modality"],
        [
            ["train/radiology/images/PMC1.jpg", "Axial CT of the abdomen showing a liver lesion.", ""],
            ["validation/radiology/images/PMC2.jpg", "A radiograph of the left wrist.", ""],
            ["test/radiology/images/PMC3.jpg", "Figure 2: flow chart of the study.", ""],
            ["train/radiology/images/PMC4.jpg", "Gross specimen.", "ultrasound"],
        ],
    )
    rows = caption_csv(tmp_path, "roco/captions.csv", dataset="roco")
    assert [r.modality for r in rows] == ["ct", "xray", "us"]
    assert [r.split for r in rows] == ["train", "val", "train"]
    assert rows[0].text == "Axial CT of the abdomen showing a liver lesion." and rows[0].labels == []
    assert rows[0].path == "roco/train/radiology/images/PMC1.jpg" and rows[0].dataset == "roco"
    _csv(
        tmp_path / "flat.csv",
        ["path", "caption", "split", "subject"],
        [["a.png", "MRI of the brain, T2-weighted.", "", "s1"], ["b.png", "Brain MRI again.", "", "s1"]],
    )
    flat = caption_csv(tmp_path, "flat.csv")
    assert flat[0].split == flat[1].split and flat[0].subject == flat[1].subject  # hashed per subject
    assert "caption_csv" not in DEFAULT


def test_chexpert_policies_views_and_subjects(tmp_path):
    cols = [
        "Path",
        "Sex",
        "Age",
        "Frontal/Lateral",
        "AP/PA",
        "No Finding",
        "Enlarged Cardiomediastinum",
        "Cardiomegaly",
        "Lung Opacity",
        "Lung Lesion",
        "Edema",
        "Consolidation",
        "Pneumonia",
        "Atelectasis",
        "Pneumothorax",
        "Pleural Effusion",
        "Pleural Other",
        "Fracture",
        "Support Devices",
    ]

    def rec(path, fl, appa, **vals):
        return [path, "Female", "68", fl, appa] + [vals.get(c, "") for c in cols[5:]]

    _csv(
        tmp_path / "CheXpert-v1.0-small/train.csv",
        cols,
        [
            rec("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "Frontal", "AP", **{"No Finding": "1.0"}),
            rec(
                "CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg",
                "Frontal",
                "PA",
                **{"Edema": "-1.0", "Pleural Effusion": "1.0", "Cardiomegaly": "0.0"},
            ),
            rec("CheXpert-v1.0-small/valid/patient00003/study1/view2_lateral.jpg", "Lateral", "", **{"Atelectasis": "-1.0"}),
        ],
    )
    ones = chexpert_csv(tmp_path, uncertain="ones")
    zeros = chexpert_csv(tmp_path, uncertain="zeros")
    assert [r.labels for r in ones] == [["normal"], ["edema", "pleural effusion"], ["atelectasis"]]
    assert [r.labels for r in zeros] == [["normal"], ["pleural effusion"], []]
    assert [r.view for r in ones] == ["AP", "PA", "lateral"] and [r.split for r in ones] == ["train", "train", "val"]
    assert ones[0].subject == "chexpert/patient00001" and ones[0].path == "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    assert "Female" not in ones[0].to_json() and "68" not in ones[0].to_json()


# --------------------------------------------------------------------------- build_all and the CLI
def test_build_all_refuses_a_subject_in_two_splits(tmp_path):
    def leaky(root):
        return [
            Row(id=f"leak/{i}", dataset="leak", modality="xray", path="a.png", split=s, subject="p1")
            for i, s in enumerate(("train", "test"))
        ]

    with pytest.raises(ValueError, match="p1"):
        build_all(tmp_path, tmp_path / "m.jsonl", ["leak"], {"leak": leaky})
    assert not (tmp_path / "m.jsonl").exists()


def test_cli_writes_manifest_and_prints_counts(tmp_path, capsys):
    _mnist(tmp_path / "xray/pneumoniamnist.npz")
    _csv(
        tmp_path / "pathology/lc25000_lung/labels.csv",
        ["file", "label", "group", "split"],
        [["images/a.jpeg", "benign", "g1", "train"], ["images/b.jpeg", "benign", "g2", "test"]],
    )
    out = tmp_path / "runs/manifest.jsonl"
    assert main(["--data-root", str(tmp_path), "--out", str(out), "--only", "pneumoniamnist", "lc25000_lung"]) == 0
    text = capsys.readouterr().out
    assert "pneumoniamnist" in text and "lc25000_lung" in text and "11" in text
    rows = read_manifest(out)
    assert len(rows) == 11 and {r.dataset for r in rows} == {"pneumoniamnist", "lc25000_lung"}
    assert main(["--data-root", str(tmp_path), "--out", str(out), "--only", "nih_cxr14"]) == 2  # missing source


# --------------------------------------------------------------------------- the real data
def test_build_all_on_shared_data(shared_data, tmp_path):
    t0 = time.time()
    counts = build_all(shared_data, tmp_path / "manifest.jsonl")
    rows = read_manifest(tmp_path / "manifest.jsonl")
    assert set(DEFAULT) == {r.dataset for r in rows}
    assert counts["nih_cxr14"] == 1000 and counts["pneumoniamnist"] == 5030 and counts["ham10000"] == 3464
    assert counts["lc25000_lung"] == 2959 and counts["fundus_dr"] == 596
    assert counts["busi"] == 778 and counts["breastmnist"] == 778  # BUSI's two-label twin dropped
    for name in ("ct_organs", "mr_organs", "brain_mri"):
        assert 100 <= counts[name] <= 1000
    assert counts["ct_organs/test"] > 0 and counts.get("ct_organs/val", 0) == 0 and counts["mr_organs/test"] == counts["mr_organs"]
    by_subject = {(r.dataset, r.subject): r.split for r in rows}
    assert by_subject[("ct_organs", "ts-ct-b")] == "test" and by_subject[("ct_organs", "ts-ct-a")] == "train"
    ct_test = [r for r in rows if r.dataset == "ct_organs" and r.split == "test"]
    assert {"liver", "spleen", "stomach"} <= {lab for r in ct_test for lab in r.labels}
    assert all(r.extra["mask"].endswith("example_seg_dicom.nii.gz") for r in ct_test)
    assert sum(bool(r.extra.get("unlabelled")) for r in rows if r.dataset == "ct_organs") > 50
    # BreastMNIST frames sit in the split of the BUSI image they came from
    busi_split = {r.path: (r.split, r.subject) for r in rows if r.dataset == "busi"}
    assert all(busi_split[r.extra["busi"]] == (r.split, r.subject) for r in rows if r.dataset == "breastmnist")
    assert not any("age" in r.extra or "sex" in r.extra for r in rows)
    # PixelLoader renders one row of every dataset (and each EPI series, 4D)
    loader = PixelLoader(shared_data, size=64)
    firsts = {}
    for r in rows:
        firsts.setdefault((r.dataset, r.subject if r.dataset == "brain_mri" else ""), r)
    for r in firsts.values():
        px = loader(r)
        assert px.shape == (64, 64, 3) and px.dtype == np.uint8 and px.max() > 0, r.id
    assert time.time() - t0 < 60
    json.dumps(counts)
