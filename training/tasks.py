"""Evaluation tasks: which test rows, which zero-shot labels, which target.

Design decision: a task names the labels a user would type (the classes of
the engine's prompt sets in assets/prompts) and scores them with the
engine's own prompt ensembles, so the numbers describe what a user of the
app gets, not a prompt tuned for the benchmark. Captions the model was
trained on come from training/captions.py, written separately.

Binary tasks score the positive side as the summed softmax probability of
the positive classes among `classes` (e.g. BUSI: p(malignant) against
benign and normal), and report AUC as UniMed-CLIP does; multi-class tasks
report accuracy and balanced accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from training.manifest import Row

BINARY, MULTICLASS, MULTILABEL = "binary", "multiclass", "multilabel"

# NIH ChestX-ray14 finding names -> canonical names (the xray prompt set's where it has them).
# The large abdominal organs: the CT organ task's first classes and the markers of an abdominal slice
# (training/recipes/organs.py), named once so the two cannot drift apart.
ABDOMINAL_ORGANS = ("liver", "spleen", "left kidney", "right kidney", "stomach", "pancreas", "gallbladder")

NIH_FINDINGS = {
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Consolidation": "consolidation",
    "Edema": "edema",
    "Effusion": "pleural effusion",
    "Emphysema": "emphysema",
    "Fibrosis": "fibrosis",
    "Hernia": "hernia",
    "Infiltration": "infiltration",
    "Mass": "mass",
    "Nodule": "nodule",
    "Pleural_Thickening": "pleural thickening",
    "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax",
    "No Finding": "normal",
}
HAM_DX = {
    "nv": "melanocytic nevus",
    "mel": "melanoma",
    "bkl": "benign keratosis",
    "bcc": "basal cell carcinoma",
    "akiec": "actinic keratosis",
    "vasc": "vascular lesion",
    "df": "dermatofibroma",
}
LC25000 = {
    "adenocarcinoma": "lung adenocarcinoma",
    "benign": "benign lung tissue",
    "squamous cell carcinoma": "lung squamous cell carcinoma",
}
DR_GRADES = [
    "no diabetic retinopathy",
    "mild diabetic retinopathy",
    "moderate diabetic retinopathy",
    "severe diabetic retinopathy",
    "proliferative diabetic retinopathy",
]
REFERABLE = {
    "moderate diabetic retinopathy",
    "severe diabetic retinopathy",
    "proliferative diabetic retinopathy",
    "diabetic maculopathy",
    "advanced eye disease",
}
# Modality names as the "other" prompt set spells them (the user's "image type" label set).
MODALITY_LABELS = {
    "xray": "chest X-ray",
    "ct": "CT scan",
    "mr": "MRI scan",
    "us": "ultrasound image",
    "pathology": "histopathology slide",
    "fundus": "fundus photograph",
    "dermoscopy": "dermoscopy image",
}


@dataclass(frozen=True)
class Task:
    name: str
    datasets: tuple[str, ...]  # manifest datasets whose test rows it uses
    kind: str  # BINARY | MULTICLASS | MULTILABEL
    classes: tuple[str, ...]  # zero-shot labels, scored with the prompt set of `prompt_modality`
    prompt_modality: str  # assets/prompts key: xray, ct, mr, us, pathology, fundus, dermoscopy, other
    positive: frozenset[str] = field(default_factory=frozenset)  # BINARY: classes counted positive
    row_filter: frozenset[str] = field(default_factory=frozenset)  # keep rows with any of these labels (empty: all)
    description: str = ""

    def rows(self, rows: list[Row]) -> list[Row]:
        out = [r for r in rows if r.dataset in self.datasets]
        if self.row_filter:
            out = [r for r in out if set(r.labels) & self.row_filter]
        return out

    def target(self, row: Row) -> int:
        """BINARY: 1/0; MULTICLASS: index into `classes` (modality task: by row.modality)."""
        if self.name == "modality":
            return list(MODALITY_LABELS).index(row.modality)
        labels = set(row.labels)
        if self.kind == BINARY:
            if self.name == "nih_abnormal":
                return int(labels != {"normal"})
            if self.name == "fundus_referable":
                return int(bool(labels & REFERABLE))
            return int(bool(labels & self.positive))
        if self.kind == MULTICLASS:
            hits = [i for i, c in enumerate(self.classes) if c in labels]
            if len(hits) != 1:
                raise ValueError(f"row {row.id}: expected one of {self.classes}, has {row.labels}")
            return hits[0]
        raise ValueError(f"task {self.name}: target() is for binary/multiclass tasks")

    def has_class(self, row: Row, cls: str) -> bool:
        """Is zero-shot class `cls` of this task true of `row`? (retrieval relevance: a text query
        `cls` is answered correctly by this image). Modality task: the row's modality; "abnormal"
        of nih_abnormal: any finding; otherwise `cls` is among the row's labels."""
        if self.name == "modality":
            return MODALITY_LABELS.get(row.modality) == cls
        if self.name == "nih_abnormal" and cls == "abnormal":
            return set(row.labels) != {"normal"}
        return cls in row.labels

    def class_of(self, row: Row) -> int | None:
        """Index of the first of `classes` true of `row` (has_class), or None: the row's class for
        image-to-image retrieval (BUSI normal/benign/malignant, not just malignant vs rest)."""
        return next((i for i, c in enumerate(self.classes) if self.has_class(row, c)), None)


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            "modality",
            ("*",),
            MULTICLASS,
            tuple(MODALITY_LABELS.values()),
            "other",
            description="modality recognition over the seven modalities, all test rows",
        ),
        Task(
            "pneumonia",
            ("pneumoniamnist",),
            BINARY,
            ("normal", "pneumonia"),
            "xray",
            frozenset({"pneumonia"}),
            description="PneumoniaMNIST pneumonia vs normal (AUC)",
        ),
        Task(
            "busi_malignant",
            ("busi",),
            BINARY,
            ("normal", "benign", "malignant"),
            "us",
            frozenset({"malignant"}),
            description="BUSI malignant vs rest (AUC)",
        ),
        Task(
            "nih_abnormal",
            ("nih_cxr14",),
            BINARY,
            ("normal", "abnormal"),
            "other",
            frozenset({"abnormal"}),
            description="NIH ChestX-ray14 normal vs any finding at 64 px (AUC)",
        ),
        Task("lc25000", ("lc25000_lung",), MULTICLASS, tuple(LC25000.values()), "pathology", description="LC25000 lung 3-class (accuracy)"),
        Task(
            "fundus_referable",
            ("fundus_dr",),
            BINARY,
            (
                "no diabetic retinopathy",
                "mild diabetic retinopathy",
                "moderate diabetic retinopathy",
                "severe diabetic retinopathy",
                "proliferative diabetic retinopathy",
                "diabetic maculopathy",
            ),
            "fundus",
            frozenset(
                {
                    "moderate diabetic retinopathy",
                    "severe diabetic retinopathy",
                    "proliferative diabetic retinopathy",
                    "diabetic maculopathy",
                }
            ),
            description="fundus referable DR (moderate or worse, or any maculopathy) vs not (AUC)",
        ),
        Task(
            "ham_melanoma",
            ("ham10000",),
            BINARY,
            ("melanocytic nevus", "melanoma"),
            "dermoscopy",
            frozenset({"melanoma"}),
            row_filter=frozenset({"melanoma", "melanocytic nevus"}),
            description="HAM10000 melanoma vs nevus (AUC)",
        ),
        Task("ham7", ("ham10000",), MULTICLASS, tuple(HAM_DX.values()), "dermoscopy", description="HAM10000 7-class (accuracy)"),
        Task(
            "ct_organs",
            ("ct_organs",),
            MULTILABEL,
            (
                *ABDOMINAL_ORGANS,
                "heart",
                "left lung",
                "right lung",
                "aorta",
                "vertebrae",
                "colon",
                "small bowel",
                "urinary bladder",
            ),
            "ct",
            description="CT organ presence on slices of a held-out subject (mean AUC over organs present and absent)",
        ),
    ]
}


def task_rows(task: Task, rows: list[Row]) -> list[Row]:
    if task.datasets == ("*",):
        return list(rows)
    return task.rows(rows)
