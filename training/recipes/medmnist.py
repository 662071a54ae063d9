"""MedMNIST frames (.npz with {train,val,test}_{images,labels}): PneumoniaMNIST and MedMNIST+.

Design decisions
- A row points at one frame (`array={"key": "train_images", "index": i}`);
  the .npz stays as published. Splits are MedMNIST's own arrays; MedMNIST
  publishes no patient ids, so subject = "<dataset>/<split>/<index>" (each
  frame its own subject: disjointness holds by construction, and the
  official splits are what MedMNIST results are reported on).
- `medmnist_plus` reads any 2D MedMNIST(+) flag at any size
  (`pathmnist.npz`, `pathmnist_224.npz`, ...). Class names come from the
  `medmnist` package's INFO when it is importable, else from `BUILTIN_INFO`
  below (the same names, MedMNIST v2/v3); either way they pass through
  `CANONICAL` so they match the engine's prompt-set class names. 3D flags
  and OCT (no modality of ours) are refused with a clear message.
- Multi-label flags (ChestMNIST) list the positive findings, "normal" when none.
- BreastMNIST has its own recipe (breastmnist.py): its splits are not
  BUSI's, so it must be re-split through the BUSI images it came from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.manifest import Row
from training.recipes._common import rel, require
from training.tasks import DR_GRADES, HAM_DX

SPLIT_KEYS = ("train", "val", "test")

# flag -> (modality, body_part, view, task, {index: class name}); names as MedMNIST's INFO spells them.
_ORGAN_NAMES = {
    0: "bladder",
    1: "femur-left",
    2: "femur-right",
    3: "heart",
    4: "kidney-left",
    5: "kidney-right",
    6: "liver",
    7: "lung-left",
    8: "lung-right",
    9: "pancreas",
    10: "spleen",
}
BUILTIN_INFO: dict[str, tuple[str, str | None, str | None, str, dict[int, str]]] = {
    "pathmnist": (
        "pathology",
        "colon",
        None,
        "multi-class",
        {
            0: "adipose",
            1: "background",
            2: "debris",
            3: "lymphocytes",
            4: "mucus",
            5: "smooth muscle",
            6: "normal colon mucosa",
            7: "cancer-associated stroma",
            8: "colorectal adenocarcinoma epithelium",
        },
    ),
    "chestmnist": (
        "xray",
        "chest",
        None,
        "multi-label, binary-class",
        {
            0: "atelectasis",
            1: "cardiomegaly",
            2: "effusion",
            3: "infiltration",
            4: "mass",
            5: "nodule",
            6: "pneumonia",
            7: "pneumothorax",
            8: "consolidation",
            9: "edema",
            10: "emphysema",
            11: "fibrosis",
            12: "pleural",
            13: "hernia",
        },
    ),
    "dermamnist": (
        "dermoscopy",
        "skin",
        None,
        "multi-class",
        {
            0: "actinic keratoses and intraepithelial carcinoma",
            1: "basal cell carcinoma",
            2: "benign keratosis-like lesions",
            3: "dermatofibroma",
            4: "melanoma",
            5: "melanocytic nevi",
            6: "vascular lesions",
        },
    ),
    "pneumoniamnist": ("xray", "chest", None, "binary-class", {0: "normal", 1: "pneumonia"}),
    "retinamnist": ("fundus", "eye", None, "ordinal-regression", {0: "0", 1: "1", 2: "2", 3: "3", 4: "4"}),
    "breastmnist": ("us", "breast", None, "binary-class", {0: "malignant", 1: "normal, benign"}),
    "bloodmnist": (
        "pathology",
        "blood",
        None,
        "multi-class",
        {
            0: "basophil",
            1: "eosinophil",
            2: "erythroblast",
            3: "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
            4: "lymphocyte",
            5: "monocyte",
            6: "neutrophil",
            7: "platelet",
        },
    ),
    "tissuemnist": (
        "pathology",
        "kidney",
        None,
        "multi-class",
        {
            0: "Collecting Duct, Connecting Tubule",
            1: "Distal Convoluted Tubule",
            2: "Glomerular endothelial cells",
            3: "Interstitial endothelial cells",
            4: "Leukocytes",
            5: "Podocytes",
            6: "Proximal Tubule Segments",
            7: "Thick Ascending Limb",
        },
    ),
    "organamnist": ("ct", "abdomen", "axial", "multi-class", _ORGAN_NAMES),
    "organcmnist": ("ct", "abdomen", "coronal", "multi-class", _ORGAN_NAMES),
    "organsmnist": ("ct", "abdomen", "sagittal", "multi-class", _ORGAN_NAMES),
}
UNSUPPORTED = {"octmnist": "OCT is not one of MedLens's modalities"}

# MedMNIST class names -> the canonical names the engine's prompt sets and training/tasks.py use.
CANONICAL = {
    "effusion": "pleural effusion",
    "pleural": "pleural thickening",
    "actinic keratoses and intraepithelial carcinoma": HAM_DX["akiec"],
    "benign keratosis-like lesions": HAM_DX["bkl"],
    "melanocytic nevi": HAM_DX["nv"],
    "vascular lesions": HAM_DX["vasc"],
    "basal cell carcinoma": HAM_DX["bcc"],
    "dermatofibroma": HAM_DX["df"],
    "melanoma": HAM_DX["mel"],
    "normal, benign": "non-malignant",
    "bladder": "urinary bladder",
    "femur-left": "left femur",
    "femur-right": "right femur",
    "kidney-left": "left kidney",
    "kidney-right": "right kidney",
    "lung-left": "left lung",
    "lung-right": "right lung",
    "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)": "immature granulocyte",
    **{str(i): g for i, g in enumerate(DR_GRADES)},  # RetinaMNIST grades 0-4
}


def canonical_name(name: str) -> str:
    return CANONICAL.get(name, CANONICAL.get(name.lower(), " ".join(name.lower().replace("_", " ").split())))


def flag_info(flag: str) -> tuple[str, str | None, str | None, str, dict[int, str]]:
    """(modality, body_part, view, task, index -> raw class name) for a 2D MedMNIST flag."""
    if flag in UNSUPPORTED:
        raise ValueError(f"{flag}: {UNSUPPORTED[flag]}")
    if flag.endswith("3d"):
        raise ValueError(f"{flag}: 3D MedMNIST volumes are not supported by the 2D manifest rows")
    if flag not in BUILTIN_INFO:
        raise ValueError(f"unknown MedMNIST flag {flag!r}; known: {sorted(BUILTIN_INFO)}")
    modality, body, view, task, names = BUILTIN_INFO[flag]
    try:  # the package is optional: prefer its INFO (newer names) when installed
        from medmnist import INFO  # type: ignore[import-not-found]

        info = INFO.get(flag)
        if info:
            names = {int(k): str(v) for k, v in info["label"].items()}
            task = str(info.get("task", task))
    except ImportError:
        pass
    return modality, body, view, task, names


def npz_labels(arr: np.ndarray, names: dict[int, str], task: str) -> list[list[str]]:
    """One list of canonical labels per frame from MedMNIST's label array ((N,) or (N, C))."""
    arr = np.asarray(arr)
    if task.startswith("multi-label"):
        arr = arr.reshape(len(arr), -1)
        out = []
        for vec in arr:
            pos = sorted(canonical_name(names[i]) for i in np.nonzero(vec)[0])
            out.append(pos or ["normal"])
        return out
    return [[canonical_name(names[int(v)])] for v in arr.reshape(len(arr), -1)[:, 0]]


def npz_rows(npz_path: Path, root: Path, dataset: str, flag: str, extra: dict | None = None) -> list[Row]:
    modality, body, view, task, names = flag_info(flag)
    path = rel(npz_path, root)
    rows = []
    with np.load(require(npz_path)) as data:
        for split in SPLIT_KEYS:
            if f"{split}_labels" not in data:
                continue
            for i, labels in enumerate(npz_labels(data[f"{split}_labels"], names, task)):
                rows.append(
                    Row(
                        id=f"{dataset}/{split}/{i}",
                        dataset=dataset,
                        modality=modality,
                        path=path,
                        split=split,
                        subject=f"{dataset}/{split}/{i}",
                        labels=labels,
                        array={"key": f"{split}_images", "index": i},
                        view=view,
                        body_part=body,
                        extra=dict(extra or {}),
                    )
                )
    return rows


def pneumoniamnist(root: Path) -> list[Row]:
    return npz_rows(
        Path(root) / "xray" / "pneumoniamnist.npz", root, "pneumoniamnist", "pneumoniamnist", extra={"population": "paediatric"}
    )


def find_npz(root: Path, name: str) -> Path:
    """`name` directly under the root, under root/medmnist, or anywhere below the root."""
    root = Path(root)
    for cand in (root / name, root / "medmnist" / name):
        if cand.is_file():
            return cand
    hits = sorted(root.rglob(name))
    if not hits:
        raise FileNotFoundError(f"MedMNIST file {name} not found under {root}")
    return hits[0]


def medmnist_plus(root: Path, flags: tuple[str, ...] | list[str] = ("pathmnist", "dermamnist", "organamnist"), size: int = 28) -> list[Row]:
    """MedMNIST+ flags at one size (28, 64, 128 or 224); dataset name "<flag>" or "<flag>_<size>"."""
    flags = [f.lower() for f in flags]
    for flag in flags:  # refuse unsupported flags before touching the disk
        flag_info(flag)
    rows = []
    for flag in flags:
        name = flag if int(size) == 28 else f"{flag}_{int(size)}"
        rows += npz_rows(find_npz(root, f"{name}.npz"), root, name, flag)
    return rows
