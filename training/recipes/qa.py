"""QA manifest recipe for "Ask the scan": volume crops and 2D images -> questions with answers.

    python -m training.recipes.qa --data-root ../shared/data --out runs/qa/manifest.jsonl \\
        [--train-crops 150] [--test-crops 80] [--epi-crops 20] [--seed 0] [--only ct_organs_3d busi ...]

Rows are `training.qa_data.QARow`; questions come from the families in
assets/qa/question_families.json through `engine.ask.questions.render_question`,
so training phrasings are exactly those the app's matcher knows.

Design decisions
- CLI: its own module (`python -m training.recipes.qa`) rather than a flag
  on `python -m training.recipes`: the output is another format (QARow, not
  Row) and the QA recipe runs the 2D recipes itself, in-process.
- Volumes, split by subject. ct_organs_3d: "ts-ct-b" (the DICOM series +
  example_seg_dicom) train, "ts-ct-a" (example_ct_sm + example_seg) test,
  never trained on. The test subject is the one whose reformats are real
  images: ts-ct-b has 20 axial slices of 2 mm, so its coronal/sagittal
  slices are 40 mm strips and a crop of it holds at most 14 slices at the
  model's 3 mm; ts-ct-a's 30 slices of 3 mm (90 mm) give crops that span
  organs in all three axes. (Until issue 14 the split was the other way
  round, and the held-out figures measured crops of the thin slab.) The
  2D CLIP manifest (training/recipes/totalsegmentator.py) keeps its own
  split; the QA manifest's SUBJECT_SPLIT below overrides it for the QA rows
  of the slices. mr_organs_3d: "ts-mr-a" (example_mr_sm +
  example_seg_mr) TRAIN: it is the only abdominal MR subject, and without
  it the model would never see abdominal MR; the price is that no abdominal
  MR is left to test on (MR testing = the brain EPI series). brain_mri_3d:
  "colin27" (ch2 + AAL, structures grouped by organs.aal_structure) train;
  the dcm_qa_nih EPI series test (volume 0 of each 4D run; no label map, so
  modality and body-region questions only). dcm_qa_nih holds 8 series (GE
  mr_0004-0007: 64x64x15, Siemens mr_0003-0006: 72x72x5 mosaics), from two
  sessions of one volunteer ("DEV"); each series keeps brain_mri's subject
  id "<vendor>/<series>", and all of them are test, so the shared person
  cannot leak.
- The 2D rows of the same volumes follow the volume's split: mr_organs
  slices (test in the CLIP manifest) become train here and the brain_mri
  EPI slices (train there) become test; both keep extra["source_split"]. A
  subject is never in two splits of the QA manifest (qa_data.
  check_subject_disjoint, volume subjects checked across 2D and 3D).
- Crops: the whole volume once (crop000, zoom 1), then random boxes of
  40-100 % of each axis, zoom log-uniform in [0.8, 1.25]; seeded per
  subject. Counts are flags; EPI defaults to 20 per series because 8 series
  of one person answering only modality/region questions would otherwise
  make up 2/3 of the volume test rows.
- Organ presence in a crop: "yes" when a clear part is inside: >= 30 % of
  the organ's voxels in the subject, or >= 1 % of the crop's voxels (and at
  least MIN_VOXELS); "no" when none of it is; in between it is not asked.
  Per crop, as many "no" as "yes" questions (up to --max-presence each):
  "no" organs are drawn half from the subject's label map outside the crop
  (hard negatives), half from the modality's organ vocabulary absent from
  the whole label map (easy ones; an abdominal organ for a brain). 2D
  slices use the CLIP recipe's own presence rule (slices.py) for "yes" and
  zero pixels on the slice for "no".
- extra["organ_fraction"] (share of each organ's subject voxels inside the
  crop) and extra["crop_fraction"] (share of the crop it fills) hold every
  label-map organ, zeros included, so organ AUCs need no label map.
- Side ("which kidney, left or right?") only when exactly one of the pair
  is "yes" and the other "no"; count ("how many kidneys/lungs?") only when
  both sides are clearly in or out, and only a third of the "0" answers
  (they would otherwise be most count questions).
- 2D finding questions follow training/tasks.py exactly, and carry the task
  name in `task` where the row is one of the task's rows: pneumonia
  (PneumoniaMNIST), busi_malignant (BUSI; also its normal/benign/malignant
  diagnosis), lc25000 (tissue type), fundus_referable (tasks.REFERABLE),
  ham_melanoma (melanoma vs nevus rows; other HAM rows are asked too, with
  no task), ham7 (HAM diagnosis), nih_abnormal (NIH "any abnormality").
  BreastMNIST is left out (BUSI's images again at 28 px).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engine.ask.questions import candidates_for, load_families, render_question, vocabulary
from training.manifest import Row
from training.qa_data import QARow, check_subject_disjoint, write_qa_manifest
from training.recipes._common import recipe_parser, rel, require, run_recipe_command
from training.recipes.brain_mri import ATLAS, aal_names, epi_series
from training.recipes.organs import body_region
from training.recipes.slices import check_same_grid, load_scan, slice_label_areas
from training.recipes.totalsegmentator import FOLDER as TS, id_names
from training.tasks import HAM_DX, REFERABLE, TASKS

# presence rule (module docstring)
YES_ORGAN_SHARE = 0.30
YES_CROP_SHARE = 0.01
MIN_VOXELS = 10
CROP_MIN, CROP_MAX = 0.40, 1.00
ZOOM_MIN, ZOOM_MAX = 0.8, 1.25
MAX_PRESENCE = 4  # per crop/slice: up to this many "yes" and as many "no" organ questions
MAX_NIH_FINDINGS = 3
COUNT_ZERO_KEEP = 1 / 3  # share of "how many kidneys/lungs?" questions kept when the answer is 0

VOLUME_DATASETS = ("ct_organs_3d", "mr_organs_3d", "brain_mri_3d")
IMAGE_DATASETS = ("nih_cxr14", "pneumoniamnist", "busi", "lc25000_lung", "fundus_dr", "ham10000", "ct_organs", "mr_organs", "brain_mri")
DEFAULT = VOLUME_DATASETS + IMAGE_DATASETS
# Split of each volume subject in the QA manifest (2D slices of the subject follow it).
SUBJECT_SPLIT = {"ts-ct-a": "test", "ts-ct-b": "train", "ts-mr-a": "train", "colin27": "train"}
EPI_SPLIT = "test"
MOD_WORD = {
    "ct": "CT",
    "mr": "MRI",
    "xray": "X-ray",
    "us": "ultrasound",
    "pathology": "histopathology",
    "fundus": "fundus photograph",
    "dermoscopy": "dermoscopy",
}
# 2D body region per dataset (None: none asked; slices use the row's own body_part)
IMAGE_REGION = {"nih_cxr14": "chest", "pneumoniamnist": "chest", "busi": "breast", "fundus_dr": "eye", "ham10000": "skin"}


# --------------------------------------------------------------------------- question items
def qa_item(
    family: str, answer: str, rng: random.Random, *, task: str | None = None, for_modality: str | None = None, **slots: str
) -> dict[str, Any]:
    """One QA item with a question rendered from a random template of `family`; `for_modality`
    narrows the candidates where a family's depend on it (diagnosis)."""
    fam = load_families()[family]
    cands = list(candidates_for(family, for_modality)) if fam.closed else []
    if fam.closed and answer not in cands:
        raise ValueError(f"{family}: answer {answer!r} not among {cands}")
    item = {
        "question": render_question(family, rng, **slots),
        "answer": answer,
        "family": family,
        "closed": fam.closed,
        "candidates": cands,
    }
    if slots:
        item["slots"] = dict(slots)
    if task:
        item["task"] = task
    return item


def modality_items(modality: str, rng: random.Random) -> list[dict[str, Any]]:
    """ "What is the modality?" plus one "is this a <modality>?" (true or another modality, 50/50)."""
    answers = vocabulary()["manifest_modality"]
    truth = answers[modality]
    other = rng.choice([m for m in candidates_for("modality") if m != truth])
    asked = truth if rng.random() < 0.5 else other
    return [
        qa_item("modality", truth, rng, task="modality"),
        qa_item("modality_check", "yes" if asked == truth else "no", rng, modality=asked),
    ]


def presence_items(
    status: dict[str, str], subject_organs: set[str], extra_pool: list[str], rng: random.Random, max_each: int
) -> list[dict[str, Any]]:
    """Balanced organ-presence questions about the main organs (vocabulary "organs_in_view"): k "yes"
    and k "no", the "no" half from the subject's own organs outside the view (hard) and half from
    organs the subject's label map does not hold at all, or `extra_pool` (easy)."""
    main = set(vocabulary()["organs_in_view"])
    yes = sorted(o for o, s in status.items() if s == "yes" and o in main)
    hard = sorted(o for o, s in status.items() if s == "no" and o in main and o in subject_organs)
    easy = sorted(
        {o for o, s in status.items() if s == "no" and o in main and o not in subject_organs}
        | {o for o in extra_pool if o in main and o not in status}
    )
    k = min(len(yes), len(hard) + len(easy), max_each)
    if k == 0:
        return []
    n_hard = min(len(hard), max(k - len(easy), (k + 1) // 2))
    no = rng.sample(hard, n_hard) + rng.sample(easy, k - n_hard)
    items = [qa_item("organ_presence", "yes", rng, organ=o) for o in rng.sample(yes, k)]
    items += [qa_item("organ_presence", "no", rng, organ=o) for o in no]
    rng.shuffle(items)
    return items


def pair_items(status: dict[str, str], rng: random.Random) -> list[dict[str, Any]]:
    """Side and count questions for paired organs whose status is clear."""
    items = []
    for pair, spec in vocabulary()["paired_organs"].items():
        left, right = status.get(spec["left"]), status.get(spec["right"])
        if left is None or right is None or "ambiguous" in (left, right):
            continue
        n = (left == "yes") + (right == "yes")
        if n == 1:
            items.append(qa_item("side", "left" if left == "yes" else "right", rng, organ_pair=pair))
        # "0" would otherwise be most count answers (slices and crops far from the kidneys): keep a third
        if pair in ("kidney", "lung") and (n > 0 or rng.random() < COUNT_ZERO_KEEP):
            items.append(qa_item("count", str(n), rng, organ_plural=pair))
    return items


def in_view(organs) -> list[str]:
    keep = set(vocabulary()["organs_in_view"])
    return sorted(o for o in organs if o in keep)


def caption_for(modality: str, region: str | None, organs: list[str], what: str = "") -> str:
    head = f"{what or MOD_WORD[modality]}" + (f" of the {region}" if region else "")
    text = head[:1].upper() + head[1:] + "."
    if organs:
        text += f" In view: {', '.join(organs)}."
    return text


# --------------------------------------------------------------------------- volumes
@dataclass
class VolumeSpec:
    dataset: str
    subject: str
    split: str
    modality: str  # manifest code
    image: Path
    seg: Path | None = None
    names: dict[int, str] | None = None  # label id -> organ name
    vocab: str = "ct"  # organ vocabulary key of the modality ("ct", "mr", "brain")
    union: str | None = None  # a name for "any label" (the AAL atlas: "brain")
    volume: int | None = None  # 4D series: which volume
    fixed_region: str | None = None  # body region when there is no label map


def volume_specs(root: Path) -> dict[str, list[VolumeSpec]]:
    d = root / TS
    ct_names = id_names(root, "total")
    specs = {
        "ct_organs_3d": [
            VolumeSpec(
                "ct_organs_3d",
                "ts-ct-a",
                SUBJECT_SPLIT["ts-ct-a"],
                "ct",
                d / "example_ct_sm.nii.gz",
                d / "example_seg.nii.gz",
                ct_names,
                "ct",
            ),
            VolumeSpec(
                "ct_organs_3d",
                "ts-ct-b",
                SUBJECT_SPLIT["ts-ct-b"],
                "ct",
                d / "ct_dicom_series",
                d / "example_seg_dicom.nii.gz",
                ct_names,
                "ct",
            ),
        ],
        "mr_organs_3d": [
            VolumeSpec(
                "mr_organs_3d",
                "ts-mr-a",
                SUBJECT_SPLIT["ts-mr-a"],
                "mr",
                d / "example_mr_sm.nii.gz",
                d / "example_seg_mr.nii.gz",
                id_names(root, "total_mr"),
                "mr",
            ),
        ],
        "brain_mri_3d": [
            VolumeSpec(
                "brain_mri_3d",
                "colin27",
                SUBJECT_SPLIT["colin27"],
                "mr",
                root / ATLAS / "ch2.nii.gz",
                root / ATLAS / "aal.nii.gz",
                aal_names(root),
                "brain",
                union="brain",
            ),
        ]
        + [
            VolumeSpec("brain_mri_3d", f"{s.parent.name}/{s.name}", EPI_SPLIT, "mr", s, volume=0, fixed_region="head")
            for s in epi_series(root)
        ],
    }
    return specs


def random_crops(
    shape: tuple[int, int, int], n: int, rng: np.random.Generator, zoom: tuple[float, float]
) -> list[tuple[dict[str, list[int]], float]]:
    """The whole volume, then n-1 random boxes of CROP_MIN..CROP_MAX of each axis with a zoom factor."""
    out = [({a: [0, int(s)] for a, s in zip("zyx", shape)}, 1.0)]
    lo, hi = math.log(zoom[0]), math.log(zoom[1])
    for _ in range(max(0, n - 1)):
        box = {}
        for a, s in zip("zyx", shape):
            length = max(1, min(int(s), int(round(rng.uniform(CROP_MIN, CROP_MAX) * s))))
            start = int(rng.integers(0, int(s) - length + 1))
            box[a] = [start, start + length]
        out.append((box, round(float(math.exp(rng.uniform(lo, hi))), 4)))
    return out


def _status(n_in: int, total: int, crop_voxels: int) -> str:
    if n_in == 0:
        return "no"
    if n_in >= MIN_VOXELS and (n_in >= YES_ORGAN_SHARE * total or n_in >= YES_CROP_SHARE * crop_voxels):
        return "yes"
    return "ambiguous"


def _extra_pool(vocab: str) -> list[str]:
    """Organs that cannot be in a volume of this organ vocabulary although its label map lacks them:
    for the brain atlas, every chest/abdomen/pelvis organ (a brain MRI holds none)."""
    v = vocabulary()
    if vocab == "brain":
        return [o for o in v["organs"]["ct"] if o not in ("brain", "skull", "spinal cord")]
    return []


def _seed(*parts: Any) -> int:
    """A stable integer seed from strings (Python's hash() of a str changes between runs)."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:12], 16)


def volume_rows(
    root: Path,
    spec: VolumeSpec,
    n_crops: int,
    seed: int = 0,
    max_presence: int = MAX_PRESENCE,
    zoom: tuple[float, float] = (ZOOM_MIN, ZOOM_MAX),
) -> list[QARow]:
    """QA rows of `n_crops` crops of one volume (the first is the whole volume)."""
    scan = load_scan(spec.image)
    if scan.voxels.ndim == 4:
        scan = scan.volume(spec.volume or 0)
    labels = None
    if spec.seg is not None:
        seg = load_scan(spec.seg)
        check_same_grid(scan, seg, f"{spec.seg.name} vs {spec.image.name}")
        labels = np.rint(seg.voxels).astype(np.int32)
        n_ids = int(labels.max()) + 1
        totals = _organ_counts(np.bincount(labels.ravel(), minlength=n_ids), spec)
    rng = np.random.default_rng(_seed(seed, spec.dataset, spec.subject))
    rows = []
    for i, (box, z) in enumerate(random_crops(scan.voxels.shape, n_crops, rng, zoom)):
        row_id = f"{spec.dataset}/{spec.subject}/crop{i:03d}"
        prng = random.Random(_seed(seed, row_id))
        sl = tuple(slice(*box[a]) for a in "zyx")
        crop_voxels = int(np.prod([box[a][1] - box[a][0] for a in "zyx"]))
        extra: dict[str, Any] = {}
        if spec.volume is not None:
            extra["volume"] = int(spec.volume)
        qa = modality_items(spec.modality, prng)
        organs: list[str] = []
        region = spec.fixed_region
        if labels is not None:
            counts = _organ_counts(np.bincount(labels[sl].ravel(), minlength=n_ids), spec)
            status = {o: _status(counts.get(o, 0), totals[o], crop_voxels) for o in totals}
            # organs of the class set the subject's label map does not hold: absent from every crop
            status.update({o: "no" for o in set((spec.names or {}).values()) if o not in totals})
            yes = [o for o, s in status.items() if s == "yes"]
            organs = in_view(yes)
            region = "head" if spec.union else body_region({o: counts.get(o, 0) for o in yes})
            qa += presence_items(status, set(totals), _extra_pool(spec.vocab), prng, max_presence)
            qa += pair_items(status, prng)
            if organs:
                qa.append(qa_item("organs_in_view", ", ".join(organs), prng))
            extra.update(
                label_map=rel(spec.seg, root),
                organ_fraction={o: round(counts.get(o, 0) / totals[o], 5) for o in sorted(totals)},
                crop_fraction={o: round(counts.get(o, 0) / crop_voxels, 6) for o in sorted(totals)},
                organ_status={o: status[o] for o in sorted(totals)},
            )
        if region:
            qa.append(qa_item("body_region", region, prng))
        prng.shuffle(qa)
        rows.append(
            QARow(
                id=row_id,
                dataset=spec.dataset,
                split=spec.split,
                subject=spec.subject,
                modality=spec.modality,
                kind="volume",
                path=rel(spec.image, root),
                body_region=region,
                organs=organs,
                caption=caption_for(spec.modality, region, organs),
                qa=qa,
                crop=box,
                zoom=z,
                extra=extra,
            )
        )
    return rows


def _organ_counts(bincount: np.ndarray, spec: VolumeSpec) -> dict[str, int]:
    """organ -> voxel count from a label bincount (ids merged by name; organs with no voxel left out)."""
    out: dict[str, int] = {}
    for i in np.nonzero(bincount)[0]:
        name = (spec.names or {}).get(int(i)) if i else None
        if name is not None:
            out[name] = out.get(name, 0) + int(bincount[i])
    if spec.union:
        out[spec.union] = int(bincount[1:].sum())
    return out


# --------------------------------------------------------------------------- 2D images
def _source_rows(root: Path, names: list[str]) -> list[Row]:
    from training.recipes import RECIPES

    rows: list[Row] = []
    for name in names:
        rows += RECIPES[name](root)
    return rows


def _split_for(row: Row) -> str:
    """The QA split of a 2D row: its own, except slices of volume subjects, which follow the volume."""
    if row.dataset in ("ct_organs", "mr_organs", "brain_mri"):
        if row.subject in SUBJECT_SPLIT:
            return SUBJECT_SPLIT[row.subject]
        if row.dataset == "brain_mri":  # the dcm_qa_nih EPI series
            return EPI_SPLIT
    return row.split


class SliceLabels:
    """Per-slice label areas of the 2D volume rows (their label map), with the map cached."""

    def __init__(self, root: Path):
        self.root = root
        self._maps: dict[str, Any] = {}
        self._names: dict[str, dict[int, str]] = {}
        self._subject: dict[str, set[str]] = {}

    def names(self, row: Row) -> dict[int, str]:
        key = {"ct_organs": "total", "mr_organs": "total_mr", "brain_mri": "aal"}[row.dataset]
        if key not in self._names:
            self._names[key] = aal_names(self.root) if key == "aal" else id_names(self.root, key)
        return self._names[key]

    def _map(self, row: Row):
        mask = row.extra["mask"]
        if mask not in self._maps:
            self._maps[mask] = load_scan(require(self.root / mask))
            ids = np.nonzero(np.bincount(np.rint(self._maps[mask].voxels).astype(np.int64).ravel()))[0]
            names = self.names(row)
            self._subject[mask] = {names[int(i)] for i in ids if int(i) in names}
        return self._maps[mask]

    def subject_organs(self, row: Row) -> set[str]:
        """Organs with any voxel in the row's whole label map."""
        self._map(row)
        return self._subject[row.extra["mask"]] | ({"brain"} if row.dataset == "brain_mri" else set())

    def areas(self, row: Row) -> dict[str, int]:
        """organ -> pixel count on the row's slice (every organ of the label map's class set, zeros too)."""
        by_id, _n = slice_label_areas(self._map(row), row.slice["plane"], int(row.slice["index"]))
        names = self.names(row)
        out = {n: 0 for n in set(names.values())}
        for i, c in by_id.items():
            if i in names:
                out[names[i]] += c
        if row.dataset == "brain_mri":
            out["brain"] = sum(by_id.values())
        return out


def _finding_items(row: Row, rng: random.Random) -> tuple[list[dict[str, Any]], str]:
    """Dataset-specific finding questions (training/tasks.py definitions) and the caption's words."""
    labels = set(row.labels)
    ds = row.dataset
    yn = lambda b: "yes" if b else "no"  # noqa: E731
    if ds == "pneumoniamnist":
        return [qa_item("finding_yes_no", yn("pneumonia" in labels), rng, task="pneumonia", finding="pneumonia")], (
            "with pneumonia" if "pneumonia" in labels else "normal"
        )
    if ds == "nih_cxr14":
        present = sorted(labels - {"normal"})
        absent = [f for f in vocabulary()["nih_findings"] if f not in labels]
        k = min(len(present), MAX_NIH_FINDINGS)
        items = [qa_item("abnormality", yn(bool(present)), rng, task="nih_abnormal")]
        items += [qa_item("finding_yes_no", "yes", rng, finding=f) for f in rng.sample(present, k)]
        items += [qa_item("finding_yes_no", "no", rng, finding=f) for f in rng.sample(absent, max(1, k))]
        return items, ("with " + ", ".join(present) if present else "normal")
    if ds == "busi":
        (label,) = labels
        return [
            qa_item("finding_yes_no", yn(label == "malignant"), rng, task="busi_malignant", finding="malignant"),
            qa_item("diagnosis", label, rng, task="busi_malignant", for_modality="us"),
        ], {"normal": "normal breast tissue", "benign": "benign lesion", "malignant": "malignant lesion"}[label]
    if ds == "lc25000_lung":
        (label,) = labels
        return [qa_item("tissue_type", label, rng, task="lc25000")], label
    if ds == "fundus_dr":
        items = [
            qa_item("finding_yes_no", yn(bool(labels & REFERABLE)), rng, task="fundus_referable", finding="referable diabetic retinopathy")
        ]
        grades = [g for g in vocabulary()["dr_grades"] if g in labels]
        if grades:  # "advanced eye disease" rows have no grade and no maculopathy label: neither is asked
            items.append(qa_item("dr_grade", grades[0], rng))
            items.append(qa_item("finding_yes_no", yn("diabetic maculopathy" in labels), rng, finding="diabetic maculopathy"))
        return items, ", ".join(sorted(labels))
    if ds == "ham10000":
        (label,) = labels
        in_task = label in TASKS["ham_melanoma"].row_filter
        return [
            qa_item("finding_yes_no", yn(label == HAM_DX["mel"]), rng, task="ham_melanoma" if in_task else None, finding="melanoma"),
            qa_item("diagnosis", label, rng, task="ham7", for_modality="dermoscopy"),
        ], label
    return [], ""


def image_row(root: Path, row: Row, slices: SliceLabels, seed: int = 0, max_presence: int = MAX_PRESENCE) -> QARow:
    """The QA row of one 2D manifest row."""
    rng = random.Random(_seed(seed, row.id))
    split = _split_for(row)
    extra: dict[str, Any] = {}
    if split != row.split:
        extra["source_split"] = row.split
    qa = modality_items(row.modality, rng)
    organs: list[str] = []
    region = IMAGE_REGION.get(row.dataset)
    what = ""
    if row.slice is not None:
        plane = row.slice["plane"]
        qa.append(qa_item("plane", plane, rng))
        region = {"brain": "head"}.get(row.body_part or "", row.body_part)
        what = f"{plane} {MOD_WORD[row.modality]} slice"
        if (row.extra or {}).get("mask"):
            areas = slices.areas(row)
            status = {o: ("yes" if o in row.labels else "no" if areas.get(o, 0) == 0 else "ambiguous") for o in areas}
            organs = in_view(o for o, s in status.items() if s == "yes")
            vocab = {"ct_organs": "ct", "mr_organs": "mr", "brain_mri": "brain"}[row.dataset]
            qa += presence_items(status, slices.subject_organs(row), _extra_pool(vocab), rng, max_presence)
            qa += pair_items(status, rng)
            if organs:
                qa.append(qa_item("organs_in_view", ", ".join(organs), rng))
            # organ pixel counts on the slice (label-map organs present on it) and their status
            extra["organ_pixels"] = {o: areas[o] for o in sorted(areas) if areas[o]}
            extra["organ_status"] = {o: status[o] for o in sorted(status) if status[o] != "no" or areas[o]}
        elif row.dataset == "brain_mri":
            region = "head"
    items, finding_words = _finding_items(row, rng)
    qa += items
    if region:
        qa.append(qa_item("body_region", region, rng))
    rng.shuffle(qa)
    caption = _image_caption(row, region, organs, what, finding_words)
    data = Row.from_dict(json.loads(row.to_json()))  # a validated copy, in the QA split
    data.split = split
    return QARow(
        id=row.id,
        dataset=row.dataset,
        split=split,
        subject=row.subject,
        modality=row.modality,
        kind="image",
        path=row.path,
        body_region=region,
        organs=organs,
        caption=caption,
        qa=qa,
        image_row=json.loads(data.to_json()),
        extra=extra,
    )


def _image_caption(row: Row, region: str | None, organs: list[str], what: str, finding: str) -> str:
    ds = row.dataset
    if ds == "nih_cxr14":
        return f"Chest X-ray {finding}." if finding.startswith("with") else "Chest X-ray, normal."
    if ds == "pneumoniamnist":
        return f"Paediatric chest X-ray {finding}." if finding.startswith("with") else "Paediatric chest X-ray, normal."
    if ds == "busi":
        return f"Breast ultrasound: {finding}."
    if ds == "lc25000_lung":
        return f"H&E histopathology of the lung: {finding}."
    if ds == "fundus_dr":
        return f"Fundus photograph: {finding}."
    if ds == "ham10000":
        return f"Dermoscopy of a skin lesion: {finding}."
    return caption_for(row.modality, region, organs, what)


# --------------------------------------------------------------------------- build
def build_qa_rows(
    root: str | Path,
    names=None,
    *,
    train_crops: int = 150,
    test_crops: int = 80,
    epi_crops: int = 20,
    seed: int = 0,
    max_presence: int = MAX_PRESENCE,
    zoom: tuple[float, float] = (ZOOM_MIN, ZOOM_MAX),
    log: Callable[[str], None] | None = None,
) -> list[QARow]:
    """Every QA row of the named datasets (default: DEFAULT), subject-disjointness checked."""
    root = Path(root)
    names = list(names) if names else list(DEFAULT)
    unknown = [n for n in names if n not in DEFAULT]
    if unknown:
        raise KeyError(f"unknown QA dataset(s) {unknown}; known: {list(DEFAULT)}")
    rows: list[QARow] = []
    specs = volume_specs(root) if any(n in VOLUME_DATASETS for n in names) else {}
    for name in names:
        if name in VOLUME_DATASETS:
            for spec in specs[name]:
                n = epi_crops if spec.seg is None else (train_crops if spec.split == "train" else test_crops)
                rows += volume_rows(root, spec, n, seed, max_presence, zoom)
                if log:
                    log(f"{spec.dataset}/{spec.subject}: {n} crops ({spec.split})")
    image_names = [n for n in names if n in IMAGE_DATASETS]
    if image_names:
        slices = SliceLabels(root)
        for src in _source_rows(root, image_names):
            rows.append(image_row(root, src, slices, seed, max_presence))
        if log:
            log(f"2D: {sum(r.kind == 'image' for r in rows)} image rows from {', '.join(image_names)}")
    check_subject_disjoint(rows)
    return rows


def qa_counts(rows: list[QARow]) -> dict[str, Any]:
    """Rows per dataset/split, QA items per family/split and dataset/split/family, yes/no balance."""
    by_set: Counter = Counter()
    by_family: Counter = Counter()
    by_set_family: Counter = Counter()
    answers: Counter = Counter()
    for r in rows:
        by_set[(r.dataset, r.split)] += 1
        for q in r.qa:
            by_family[(q["family"], r.split)] += 1
            by_set_family[(r.dataset, r.split, q["family"])] += 1
            if q["candidates"] == ["yes", "no"]:
                answers[(q["family"], q["answer"])] += 1
    return {
        "rows": {f"{d}/{s}": n for (d, s), n in sorted(by_set.items())},
        "items": {f"{f}/{s}": n for (f, s), n in sorted(by_family.items())},
        "items_by_dataset": {f"{d}/{s}/{f}": n for (d, s, f), n in sorted(by_set_family.items())},
        "yes_no": {f"{f}/{a}": n for (f, a), n in sorted(answers.items())},
    }


def count_table(rows: list[QARow]) -> str:
    splits = ("train", "val", "test")
    sets = list(dict.fromkeys(r.dataset for r in rows))
    c = Counter((r.dataset, r.split) for r in rows)
    qc = Counter((r.dataset, r.split) for r in rows for _ in r.qa)
    lines = [f"{'dataset':<16}" + "".join(f"{s:>8}" for s in splits) + f"{'rows':>8}{'QA':>9}"]
    for d in sets:
        lines.append(
            f"{d:<16}"
            + "".join(f"{c[(d, s)]:>8}" for s in splits)
            + f"{sum(c[(d, s)] for s in splits):>8}"
            + f"{sum(qc[(d, s)] for s in splits):>9}"
        )
    lines.append(
        f"{'all':<16}" + "".join(f"{sum(c[(d, s)] for d in sets):>8}" for s in splits) + f"{len(rows):>8}" + f"{sum(qc.values()):>9}"
    )
    fam = Counter((q["family"], r.split) for r in rows for q in r.qa)
    yes = Counter((q["family"], q["answer"]) for r in rows for q in r.qa if q["candidates"] == ["yes", "no"])
    lines += ["", f"{'family':<16}" + "".join(f"{s:>8}" for s in splits) + f"{'yes':>8}{'no':>8}"]
    for f in load_families():
        if any(fam[(f, s)] for s in splits):
            lines.append(
                f"{f:<16}"
                + "".join(f"{fam[(f, s)]:>8}" for s in splits)
                + (f"{yes[(f, 'yes')]:>8}{yes[(f, 'no')]:>8}" if yes[(f, "yes")] + yes[(f, "no")] else "")
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = recipe_parser(
        "python -m training.recipes.qa", __doc__, "QA manifest to write (JSON Lines)", f"datasets (default: {' '.join(DEFAULT)})"
    )
    p.add_argument("--train-crops", type=int, default=150, help="crops per train volume (the first is the whole volume)")
    p.add_argument("--test-crops", type=int, default=80, help="crops per labelled test volume")
    p.add_argument("--epi-crops", type=int, default=20, help="crops per dcm_qa_nih EPI series (test, no label map)")
    p.add_argument("--max-presence", type=int, default=MAX_PRESENCE, help="per crop/slice: max yes (and as many no) organ questions")
    p.add_argument("--zoom", type=float, nargs=2, default=(ZOOM_MIN, ZOOM_MAX), metavar=("MIN", "MAX"), help="zoom jitter range")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    def build() -> tuple[list[QARow], Path]:
        rows = build_qa_rows(
            args.data_root,
            args.only,
            train_crops=args.train_crops,
            test_crops=args.test_crops,
            epi_crops=args.epi_crops,
            seed=args.seed,
            max_presence=args.max_presence,
            zoom=tuple(args.zoom),
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
        write_qa_manifest(rows, args.out)
        counts = args.out.with_suffix(".counts.json")
        counts.write_text(json.dumps(qa_counts(rows), indent=1) + "\n")
        return rows, counts

    return run_recipe_command(build, lambda built: f"{count_table(built[0])}\nwrote {args.out} (counts: {built[1]})")


if __name__ == "__main__":
    sys.exit(main())
