"""`python -m training.library_eval`: the scan library's quality numbers (issue 6 acceptance).

    python -m training.library_eval --data-root ../shared/data --out runs/library_eval \\
        [--model medlens-clip] [--seeds 5] [--manifest M] [--max-per-dataset N] [--threads 1]

Writes <out>/results.json and <out>/results.md and prints the Markdown. Exit code 2, with
one line on stderr, for a model that cannot be loaded, a manifest without test rows, or an
<out> whose library holds scans this run did not put there.

What is measured, all through the library's own code (engine.library), with one model:

1. Retrieval. The TEST split of every dataset (BreastMNIST left out: the BUSI images again)
   goes into one library, <out>/test.db, one scan per manifest row, through
   engine.library.indexing.add_scan (source = the row id), and is searched with
   engine.library.search.search, vector search only: no notes are stored and keywords=False
   (labels written as notes would let keyword search read the answer).
   - text -> scan, precision@10. Each class of each dataset gets a label query (the class
     name a user types into the labeller, e.g. "malignant") and a sentence query
     ("malignant breast lesion"), run as typed over the whole mixed library and with the
     library's modality filter; label queries also with the filter's prompt ensemble
     (search(..., ensemble=True), the option meant for label-like queries). A hit is
     relevant when the scan has the query's modality and one of its labels: a normal chest
     X-ray answers "normal chest X-ray" whichever X-ray set it came from.
   - scan -> scan, precision@5. Every test scan with a class queries the library by its id
     (search(like=id), which leaves the scan out of its own results); relevant: same dataset
     and same class, the class being the one training.evaluate uses for image -> image
     retrieval (image_label_task / Task.class_of). Also with the modality filter, and
     "same dataset" precision (does a neighbourhood stay in its source?).
   - Both are cross-checked against a brute-force ranking of the library's stored vectors
     (training.metrics.retrieval_at_k), so a filter or exclusion bug in the search shows up
     as a difference, not as a plausible number.
2. Teaching. For BUSI malignant vs rest, PneumoniaMNIST pneumonia vs normal and HAM10000
   melanoma vs nevus (training.tasks), k = 5, 10, 20 tagged examples per class drawn from the
   TRAIN split go into a second library, <out>/teach.db, and are taught with
   engine.library.teach.teach (what `medlens teach` runs); the stored probe scores the test
   scans' stored vectors (engine.library.teach.apply_probe), and AUC is computed over the
   task's test rows. Several seeds, mean and sd. Beside it: the zero-shot AUC of the same
   model on the same vectors (training.evaluate.zero_shot, the model card's scoring) and, as
   a reference, training.probe's standardised logistic regression on the same draws.

Design decisions
- Rows become engine Scans the way a user's files would. Image files are read by
  engine.io (through training.manifest.PixelLoader, which names the modality a PNG cannot
  carry); an .npz frame becomes the 2D Scan a PNG of it would give (engine.io.image2d's
  geometry); a volume slice becomes a 2D Scan of engine.views.extract_slice's slice in its
  physical units (CT: HU) with the slice's pixel size and the volume's modality, so the
  library's embedding path (store.embed_scan -> zeroshot.imaging) windows and letterboxes
  it as the app would. Whether that gives the pixels training/evaluation feed the model
  (PixelLoader) is measured per dataset (`pixel_check`), not assumed: the library windows
  each slice on its own, evaluation windows a slice with its volume's window.
- Two library files: test.db is the searched library (test rows only, so retrieval is over
  the test split alone); teach.db holds the train examples a person would tag. A probe fitted
  in teach.db is applied to test.db's vectors: same model id, same space.
- A label per (task, k, seed), its old tags removed before teaching: a rerun re-fits the same
  probe instead of adding tags to it, and each probe stays in teach.db as a record.
- Draws: k per class with numpy default_rng(1000 k + seed) from the task's train rows in
  manifest order, the scheme of training.probe.few_shot_curve over the rows training.evaluate
  gives it: the images behind the model card's few-shot table, so its numbers and these can
  be compared draw for draw.
- Cached: a row whose scan (by source) already has this model's embedding is neither read nor
  embedded again, so a rerun costs the model load, the pixel check, the searches and the probes
  (~3 min on 2 shared cores instead of ~12).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from training import metrics, probe
from training.evaluate import (
    _cap,
    _clean,
    _f,
    _table,
    image_label_task,
    load_model_or_usage,
    read_manifest_or_usage,
    run_header,
    zero_shot,
)
from training.config import UsageError, print_report  # UsageError: exit status 2 and one line on stderr
from training.manifest import ENGINE_MODALITY, PixelLoader, Row
from training.tasks import BINARY, TASKS, Task, task_rows

K_TEXT, K_SCAN = 10, 5
SHOTS = (5, 10, 20)
SEEDS = 5
TEACH_TASKS = ("busi_malignant", "pneumonia", "ham_melanoma")
SKIP_DATASETS = frozenset({"breastmnist"})  # BUSI's images again at 28 px: a second copy would pair with itself
TEST_DB, TEACH_DB = "test.db", "teach.db"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- queries


@dataclass(frozen=True)
class Query:
    dataset: str  # the test set the query was written for (the report groups by it)
    labels: tuple[str, ...]  # canonical labels; a scan of the dataset's modality with any of them is relevant
    text: str
    style: str  # "label": the class name a user types; "sentence": a description


# dataset -> [(labels, label query, sentence query)]; classes with at least ~9 test images
_QUERY_TABLE: dict[str, list[tuple[tuple[str, ...], str, str]]] = {
    "nih_cxr14": [
        (("normal",), "normal", "a normal chest X-ray"),
        (("cardiomegaly",), "cardiomegaly", "chest X-ray with an enlarged heart"),
        (("pleural effusion",), "pleural effusion", "chest X-ray showing a pleural effusion"),
        (("edema",), "edema", "chest X-ray with pulmonary edema"),
        (("atelectasis",), "atelectasis", "chest X-ray showing atelectasis"),
        (("infiltration",), "infiltration", "chest X-ray with lung infiltrates"),
    ],
    "pneumoniamnist": [
        (("pneumonia",), "pneumonia", "chest X-ray of a child with pneumonia"),
        (("normal",), "normal", "normal paediatric chest X-ray"),
    ],
    "busi": [
        (("malignant",), "malignant", "malignant breast lesion"),
        (("benign",), "benign", "benign breast mass on ultrasound"),
        (("normal",), "normal", "normal breast ultrasound with no lesion"),
    ],
    "lc25000_lung": [
        (("lung adenocarcinoma",), "lung adenocarcinoma", "H&E histopathology of lung adenocarcinoma"),
        (("benign lung tissue",), "benign lung tissue", "histology of normal lung tissue"),
        (("lung squamous cell carcinoma",), "lung squamous cell carcinoma", "H&E slide of squamous cell carcinoma of the lung"),
    ],
    "fundus_dr": [
        (("no diabetic retinopathy",), "no diabetic retinopathy", "healthy retina on a fundus photograph"),
        (("mild diabetic retinopathy",), "mild diabetic retinopathy", "fundus photograph with a few microaneurysms"),
        (("moderate diabetic retinopathy",), "moderate diabetic retinopathy", "fundus photograph with haemorrhages and hard exudates"),
        (("severe diabetic retinopathy",), "severe diabetic retinopathy", "fundus photograph with severe diabetic retinopathy"),
        (("diabetic maculopathy",), "diabetic maculopathy", "fundus photograph with exudates at the macula"),
    ],
    "ham10000": [
        (("melanoma",), "melanoma", "dermoscopy of a melanoma"),
        (("melanocytic nevus",), "melanocytic nevus", "benign mole under dermoscopy"),
        (("benign keratosis",), "benign keratosis", "seborrheic keratosis"),
        (("basal cell carcinoma",), "basal cell carcinoma", "dermoscopy of a basal cell carcinoma"),
        (("actinic keratosis",), "actinic keratosis", "actinic keratosis on sun-damaged skin"),
        (("vascular lesion",), "vascular lesion", "vascular skin lesion such as a haemangioma"),
        (("dermatofibroma",), "dermatofibroma", "dermoscopy of a dermatofibroma"),
    ],
    "ct_organs": [
        (("liver",), "liver", "CT slice showing the liver"),
        (("spleen",), "spleen", "CT slice showing the spleen"),
        (("stomach",), "stomach", "CT slice through the stomach"),
        (("vertebrae",), "vertebrae", "CT slice showing the vertebrae"),
        (("colon",), "colon", "CT slice showing the colon"),
        (("aorta",), "aorta", "CT slice showing the aorta"),
    ],
    "mr_organs": [
        (("liver",), "liver", "MRI slice showing the liver"),
        (("left kidney", "right kidney"), "kidney", "MRI slice showing the kidneys"),
        (("spleen",), "spleen", "MRI slice showing the spleen"),
        (("pancreas",), "pancreas", "MRI slice showing the pancreas"),
        (("stomach",), "stomach", "MRI slice through the stomach"),
        (("gallbladder",), "gallbladder", "MRI slice showing the gallbladder"),
    ],
}
QUERIES: tuple[Query, ...] = tuple(
    Query(ds, labels, text, style)
    for ds, entries in _QUERY_TABLE.items()
    for labels, label_q, sentence_q in entries
    for text, style in ((label_q, "label"), (sentence_q, "sentence"))
)


# --------------------------------------------------------------------------- rows -> scans


def slice_scan(volume, plane: str, index: int, volume_index: int = 0):
    """One slice of a volume as a 2D engine Scan: physical units (CT: HU), display orientation, pixel size in mm."""
    from engine.scan import Provenance, Scan
    from engine.views import extract_slice

    pixels, (row_mm, col_mm) = extract_slice(volume, plane, index, volume=volume_index)
    prov = volume.provenance
    return Scan(
        np.array(pixels, dtype=np.float32),  # a copy: extract_slice returns a view of the volume
        (row_mm, col_mm),
        np.diag([col_mm, row_mm, 1.0, 1.0]),  # 2D: x = column, y = row, as engine.io.image2d, with the real pixel size
        volume.modality,
        dict(volume.metadata),  # already de-identified by engine.io; keeps BodyPartExamined for the body-part filter
        Provenance(
            reader=f"{prov.reader} slice",
            transfer_syntax=prov.transfer_syntax,
            n_files=1,
            removed_attributes=list(prov.removed_attributes),
            burned_in_text_risk=prov.burned_in_text_risk,
        ),
    )


class RowScans:
    """Manifest row -> the engine Scan a user would index (module docstring); volumes and .npz arrays opened once."""

    def __init__(self, loader: PixelLoader):
        self.loader = loader
        self._arrays: dict[tuple[str, str], np.ndarray] = {}

    def __call__(self, row: Row):
        from engine.scan import Modality, Provenance, Scan

        if row.array is not None:
            key = (str(self.loader.resolve(row)), str(row.array["key"]))
            if key not in self._arrays:  # keep the decoded array: indexing an NpzFile re-reads it
                with np.load(key[0]) as npz:
                    self._arrays[key] = np.asarray(npz[key[1]])
            frame = np.asarray(self._arrays[key][int(row.array["index"])], dtype=np.float32)
            # what engine.io.image2d makes of a PNG of this frame, with the modality a DICOM would name
            return Scan(frame, (1.0, 1.0), np.eye(4), Modality(ENGINE_MODALITY[row.modality]), {}, Provenance(reader="npz frame"))
        # PixelLoader's volume/file cache: the same reader, and the modality a PNG or NIfTI cannot carry
        scan = self.loader._scan(self.loader.resolve(row), row.modality)
        if row.slice is None:
            return scan
        volume_index = int((row.extra or {}).get("volume", 0)) if scan.voxels.ndim == 4 else 0
        return slice_scan(scan, row.slice["plane"], int(row.slice["index"]), volume_index)


def pixel_check(rows: Sequence[Row], scans: RowScans) -> dict[str, Any]:
    """Per dataset of .npz/slice rows: does the library's model image equal PixelLoader's (what evaluation feeds)?

    File rows are skipped: both paths read them with engine.io and call the same model_image."""
    from engine.zeroshot.imaging import scan_images

    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.array is None and row.slice is None:
            continue
        ours = scan_images(scans(row), planes=("axial",))[0].pixels
        ref = scans.loader(row)
        d = out.setdefault(row.dataset, {"n": 0, "identical": 0, "mean_abs_diff": 0.0})
        d["n"] += 1
        d["identical"] += int(np.array_equal(ours, ref))
        d["mean_abs_diff"] += float(np.abs(ours.astype(np.int16) - ref.astype(np.int16)).mean())
    for d in out.values():
        d["mean_abs_diff"] /= d["n"]  # grey levels (0-255) per pixel, averaged over the rows
    return out


# --------------------------------------------------------------------------- library


def index_rows(
    db, model, rows: Sequence[Row], scans: RowScans, log: Callable[[str], None] | None = _log, what: str = ""
) -> tuple[dict[str, int], dict[str, Any]]:
    """Row id -> library scan id, each row through engine.library.indexing.add_scan with source = its id."""
    from engine.library.indexing import add_scan
    from engine.library.store import has_embedding, scan_ids_by_source

    ids: dict[str, int] = {}
    status: Counter = Counter()
    failed: dict[str, str] = {}
    t0 = time.perf_counter()
    for n, row in enumerate(rows, start=1):
        known = scan_ids_by_source(db, row.id)
        if known and has_embedding(db, known[0], model.model_id):
            ids[row.id] = known[0]  # a rerun: no pixels read, no model call
            status["cached"] += 1
            continue
        try:
            scan = scans(row)
        except Exception as exc:  # an unreadable file is counted, not fatal
            failed[row.id] = f"{type(exc).__name__}: {str(exc)[:200]}"
            continue
        ids[row.id], st = add_scan(db, scan, model, source=row.id)
        status[st] += 1  # 'present' on a first run: the same pixels as an earlier row (content hash)
        if log and (n % 200 == 0 or n == len(rows)) and status["cached"] < n:
            log(f"indexed {n}/{len(rows)} {what} rows ({time.perf_counter() - t0:.0f} s)")
    shared = len(ids) - len(set(ids.values()))
    return ids, {
        "rows": len(rows),
        "scans": len(set(ids.values())),
        "status": dict(status),
        "rows_sharing_a_scan": shared,
        "failed": failed,
        "seconds": time.perf_counter() - t0,
    }


def scan_rows_of(rows: Sequence[Row], ids: dict[str, int]) -> dict[int, Row]:
    """Library scan id -> the first row indexed as it (rows with identical pixels share one scan, and its source)."""
    out: dict[int, Row] = {}
    for row in rows:
        if row.id in ids:
            out.setdefault(ids[row.id], row)
    return out


def check_library(db, model_id: str, scan_row: dict[int, Row]) -> None:
    """The library must hold exactly this run's scans, and no notes (vector search only)."""
    from engine.library.store import counts, embeddings

    ids, _ = embeddings(db, model_id)
    extra = set(ids.tolist()) - set(scan_row)
    if extra:
        raise UsageError(
            f"the library {TEST_DB} in --out holds {len(extra)} scan(s) this manifest/selection does not name; use a fresh --out"
        )
    if counts(db)["notes"]:
        raise UsageError(f"the library {TEST_DB} holds notes; keyword search could read labels: use a fresh --out")


# --------------------------------------------------------------------------- retrieval


def precision_at_k(ranked: Sequence[int], relevant: Iterable[int], k: int, gallery: int | None = None) -> float:
    """Relevant ids among the first k' of `ranked`, over k'; k' = min(k, gallery) (all there is to retrieve).

    Raises when the ranking is shorter than k' or repeats an id: a search that returned too
    little must not pass as a low precision."""
    if k < 1:
        raise ValueError(f"k must be at least 1 (got {k})")
    want = k if gallery is None else min(k, int(gallery))
    ranked = [int(i) for i in ranked]
    if want < 1:
        raise ValueError("empty gallery: nothing can be retrieved")
    if len(ranked) < want:
        raise ValueError(f"the ranking has {len(ranked)} item(s); precision@{k} over this gallery needs {want}")
    if len(set(ranked[:want])) != want:
        raise ValueError("the ranking repeats an item")
    rel = {int(i) for i in relevant}
    return sum(i in rel for i in ranked[:want]) / want


def _brute_precision(query: np.ndarray, vectors: np.ndarray, candidates: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """precision@k of one query by brute force over the stored vectors (training.metrics' ranking)."""
    scores = np.where(candidates, vectors @ query, -np.inf)[None, :]
    return metrics.retrieval_at_k(scores, relevant[None, :], (k,))[f"precision@{k}"]


def _modality_of(rows: Iterable[Row]) -> dict[str, str]:
    """dataset -> engine modality value (XRAY, CT, ...)."""
    return {r.dataset: ENGINE_MODALITY[r.modality] for r in rows}


def text_retrieval(db, model, queries: Sequence[Query], scan_row: dict[int, Row], k: int = K_TEXT) -> list[dict[str, Any]]:
    """One record per query: precision@k mixed / modality-filtered / filtered with the prompt ensemble."""
    from engine.library.search import search
    from engine.library.store import embeddings, normalise

    ids, vectors = embeddings(db, model.model_id)
    rows = [scan_row[int(i)] for i in ids]
    scan_modality = np.array([ENGINE_MODALITY[r.modality] for r in rows])
    ds_modality = _modality_of(scan_row.values())
    out = []
    for q in queries:
        if q.dataset not in ds_modality:
            continue
        modality = ds_modality[q.dataset]
        in_modality = scan_modality == modality
        relevant = in_modality & np.array([bool(set(r.labels) & set(q.labels)) for r in rows])
        rel_ids = set(ids[relevant].tolist())
        n_rel = int(relevant.sum())
        rec: dict[str, Any] = {
            "dataset": q.dataset,
            "style": q.style,
            "query": q.text,
            "labels": list(q.labels),
            "modality": modality,
            "n_relevant": n_rel,
            "gallery_mixed": len(ids),
            "gallery_filtered": int(in_modality.sum()),
        }
        if n_rel == 0:
            rec["skipped"] = "no relevant scan in the library"
            out.append(rec)
            continue

        def run(**kw) -> float:
            hits = search(db, model, q.text, k=k, keywords=False, **kw)
            gallery = rec["gallery_filtered"] if kw.get("modality") else rec["gallery_mixed"]
            return precision_at_k([h.scan_id for h in hits], rel_ids, k, gallery)

        rec["p_mixed"] = run()
        rec["p_filtered"] = run(modality=modality)
        if q.style == "label":
            rec["p_filtered_ensemble"] = run(modality=modality, ensemble=True)
        rec["ceiling"] = min(n_rel, k) / min(k, rec["gallery_filtered"])
        rec["chance_mixed"] = n_rel / len(ids)
        rec["chance_filtered"] = n_rel / rec["gallery_filtered"]
        # the raw query's vector as search embeds it (engine.library.search: the query as typed, normalised)
        qv = normalise(np.asarray(model.encode_texts([q.text]), dtype=np.float32)[0])
        rec["brute_mixed"] = _brute_precision(qv, vectors, np.ones(len(ids), bool), relevant, k)
        rec["brute_filtered"] = _brute_precision(qv, vectors, in_modality, relevant, k)
        out.append(rec)
    return out


def scan_retrieval(db, model, scan_row: dict[int, Row], k: int = K_SCAN, tasks: dict[str, Task] | None = None) -> dict[str, dict[str, Any]]:
    """Per dataset: each scan with a class queries the library by id; precision@k (module docstring)."""
    from engine.library.search import search
    from engine.library.store import embeddings

    tasks = tasks if tasks is not None else TASKS
    ids, vectors = embeddings(db, model.model_id)
    rows = [scan_row[int(i)] for i in ids]
    datasets = np.array([r.dataset for r in rows])
    modality = np.array([ENGINE_MODALITY[r.modality] for r in rows])
    out: dict[str, dict[str, Any]] = {}
    for ds in sorted(set(datasets.tolist())):
        task = image_label_task(ds, tasks)
        if task is None:
            out[ds] = {"skipped": "no single-label task defines classes for this dataset (multi-label organ slices)"}
            continue
        cls = np.array([task.class_of(r) if d == ds else None for r, d in zip(rows, datasets)], dtype=object)
        rec: dict[str, list] = {
            "p_class_mixed": [],
            "p_class_filtered": [],
            "p_dataset_mixed": [],
            "chance_class": [],
            "brute_class_mixed": [],
            "brute_class_filtered": [],
        }
        skipped = 0
        for qi in np.flatnonzero((datasets == ds) & (cls != None)):  # noqa: E711 (object array: elementwise)
            sid = int(ids[qi])
            same_class = (datasets == ds) & (cls == cls[qi])
            same_class[qi] = False
            if not same_class.any():
                skipped += 1  # a class with one scan: nothing to find (training.metrics skips these too)
                continue
            rel_class = set(ids[same_class].tolist())
            same_ds = datasets == ds
            same_ds[qi] = False
            in_mod = modality == modality[qi]
            in_mod[qi] = False
            others = np.ones(len(ids), bool)
            others[qi] = False
            hits = [h.scan_id for h in search(db, model, like=sid, k=k, keywords=False)]
            hits_f = [h.scan_id for h in search(db, model, like=sid, k=k, keywords=False, modality=modality[qi])]
            rec["p_class_mixed"].append(precision_at_k(hits, rel_class, k, int(others.sum())))
            rec["p_dataset_mixed"].append(precision_at_k(hits, set(ids[same_ds].tolist()), k, int(others.sum())))
            rec["p_class_filtered"].append(precision_at_k(hits_f, rel_class, k, int(in_mod.sum())))
            rec["chance_class"].append(same_class.sum() / others.sum())
            rec["brute_class_mixed"].append(_brute_precision(vectors[qi], vectors, others, same_class, k))
            rec["brute_class_filtered"].append(_brute_precision(vectors[qi], vectors, in_mod, same_class, k))
        summary = {key: float(np.mean(v)) if v else float("nan") for key, v in rec.items()}
        summary["max_brute_diff"] = max(
            (
                abs(a - b)
                for x, y in (("p_class_mixed", "brute_class_mixed"), ("p_class_filtered", "brute_class_filtered"))
                for a, b in zip(rec[x], rec[y])
            ),
            default=0.0,
        )
        out[ds] = {"classes_from": task.name, "n_queries": len(rec["p_class_mixed"]), "n_skipped": skipped, **summary}
    return out


def text_summary(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per dataset means of the per-query records (label and sentence queries together, and apart)."""
    out: dict[str, dict[str, Any]] = {}
    for ds in dict.fromkeys(r["dataset"] for r in records):
        used = [r for r in records if r["dataset"] == ds and "skipped" not in r]

        def mean(key: str, style: str | None = None) -> float:
            vals = [r[key] for r in used if key in r and (style is None or r["style"] == style)]
            return float(np.mean(vals)) if vals else float("nan")

        out[ds] = {
            "n_queries": len(used),
            "modality": used[0]["modality"] if used else None,
            "p_mixed": mean("p_mixed"),
            "p_filtered": mean("p_filtered"),
            "p_mixed_label": mean("p_mixed", "label"),
            "p_mixed_sentence": mean("p_mixed", "sentence"),
            "p_filtered_label": mean("p_filtered", "label"),
            "p_filtered_sentence": mean("p_filtered", "sentence"),
            "p_filtered_ensemble": mean("p_filtered_ensemble"),
            "ceiling": mean("ceiling"),
            "chance_mixed": mean("chance_mixed"),
            "chance_filtered": mean("chance_filtered"),
            "max_brute_diff": max(
                (abs(r[a] - r[b]) for r in used for a, b in (("p_mixed", "brute_mixed"), ("p_filtered", "brute_filtered"))), default=0.0
            ),
        }
    return out


# --------------------------------------------------------------------------- teaching


def draw(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k indices per class (all of a smaller class), drawn as training.probe.few_shot_curve draws them."""
    rng = np.random.default_rng(1000 * int(k) + int(seed))
    return np.concatenate([rng.permutation(np.flatnonzero(y == c))[:k] for c in np.unique(y)])


def teach_once(
    db, label: str, positives: Sequence[int], negatives: Sequence[int], model_id: str, test_vectors: np.ndarray
) -> tuple[np.ndarray, dict[str, Any]]:
    """Teach `label` from these examples only (earlier tags of it removed), then score the test vectors with the stored probe."""
    from engine.library.teach import apply_probe, tags, teach, untag

    old_pos, old_neg = tags(db, label)
    if old_pos or old_neg:
        untag(db, old_pos + old_neg, label)
    taught = teach(db, label, positives, negatives, model_id)
    return apply_probe(db, label, test_vectors, model_id), taught.metrics


def _reference_auc(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """training.probe's few-shot probe (standardised features, C = 1, balanced) on the same draw."""
    pipe, _C, _v = probe.fit_probe(x_train, y_train, 2)
    p = pipe.predict_proba(x_test)[:, list(pipe.classes_).index(1)]
    return metrics.binary_auc(y_test, p)[0]


def _stats(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    return {
        "mean": float(arr.mean()) if arr.size else float("nan"),
        "sd": float(arr.std(ddof=1)) if arr.size > 1 else float("nan"),  # sample sd over seeds
        "values": [float(v) for v in values],
    }


def teach_task(
    task: Task,
    train_rows: list[Row],
    test_rows: list[Row],
    test_ids: dict[str, int],
    test_db,
    teach_db,
    model,
    scans: RowScans,
    *,
    shots: Sequence[int],
    seeds: int,
    log: Callable[[str], None] | None = _log,
) -> dict[str, Any]:
    """Few-shot curve of one binary task through the teach path, beside zero-shot and training.probe's probe."""
    from engine.library.store import embeddings

    test_rows = [r for r in test_rows if r.id in test_ids]
    if not test_rows or not train_rows:
        return {"skipped": f"no {'test' if not test_rows else 'train'} rows"}
    y_test = np.array([task.target(r) for r in test_rows], dtype=int)
    sids, vecs = embeddings(test_db, model.model_id, sorted({test_ids[r.id] for r in test_rows}))
    by_id = dict(zip(sids.tolist(), vecs))
    x_test = np.stack([by_id[test_ids[r.id]] for r in test_rows])  # one row per test row (duplicates share a vector)
    zs = zero_shot(task, x_test, test_rows, y_test, model)
    y = np.array([task.target(r) for r in train_rows], dtype=int)
    plan = {(k, s): draw(y, k, s) for k in shots for s in range(seeds)}
    needed = sorted({int(i) for idx in plan.values() for i in idx})
    train_ids, report = index_rows(teach_db, model, [train_rows[i] for i in needed], scans, log, f"{task.name} train")
    out: dict[str, Any] = {
        "description": task.description,
        "n_test": len(test_rows),
        "n_test_positive": int(y_test.sum()),
        "n_train_pool": len(train_rows),
        "n_train_pool_positive": int(y.sum()),
        "train_index": report,
        "zero_shot": {"auc": zs.get("auc"), "auc_ci95": zs.get("auc_ci95")},
        "shots": {},
    }
    for k in shots:
        teach_aucs, ref_aucs, cv, errors = [], [], [], {}
        for s in range(seeds):
            idx = [int(i) for i in plan[(k, s)] if train_rows[int(i)].id in train_ids]
            pos = [train_ids[train_rows[i].id] for i in idx if y[i] == 1]
            neg = [train_ids[train_rows[i].id] for i in idx if y[i] == 0]
            try:
                p, m = teach_once(teach_db, f"{task.name} {k}-shot seed {s}", pos, neg, model.model_id, x_test)
            except Exception as exc:  # e.g. TeachError (too few examples): reported per draw, the curve goes on
                errors[str(s)] = f"{type(exc).__name__}: {str(exc)[:300]}"
                continue
            teach_aucs.append(metrics.binary_auc(y_test, p)[0])
            cv.append(m.get("cv_balanced_accuracy"))
            tids, tvec = embeddings(teach_db, model.model_id, [train_ids[train_rows[i].id] for i in idx])
            tv = dict(zip(tids.tolist(), tvec))
            ref_aucs.append(_reference_auc(np.stack([tv[train_ids[train_rows[i].id]] for i in idx]), y[idx], x_test, y_test))
        out["shots"][str(k)] = {
            "per_class": k,
            "teach_auc": _stats(teach_aucs),
            "reference_probe_auc": _stats(ref_aucs),
            "cv_balanced_accuracy": _stats(cv),
            "errors": errors,
        }
        if log:
            log(f"teach {task.name} {k}-shot: AUC {_stats(teach_aucs)['mean']:.3f} over {len(teach_aucs)} draw(s)")
    return out


def train_test_overlap(test_db, teach_db) -> int:
    """Train examples whose pixels equal a test scan's (content hash): leakage the split should exclude."""
    test = {r[0] for r in test_db.execute("SELECT content_hash FROM scans").fetchall()}
    return sum(r[0] in test for r in teach_db.execute("SELECT content_hash FROM scans").fetchall())


# --------------------------------------------------------------------------- orchestration


def select_rows(rows: list[Row], split: str, datasets: Iterable[str] | None, max_per_dataset: int | None) -> list[Row]:
    """Rows of one split (BreastMNIST left out), optionally some datasets, optionally a stratified cap per dataset."""
    keep = set(datasets) if datasets else None
    out: list[Row] = []
    for ds in dict.fromkeys(r.dataset for r in rows):
        if ds in SKIP_DATASETS or (keep is not None and ds not in keep):
            continue
        drows = [r for r in rows if r.dataset == ds and r.split == split]
        out += _cap(drows, ["|".join(sorted(r.labels)) for r in drows], max_per_dataset)
    return out


def evaluate_library(
    model,
    rows: list[Row],
    data_root: str | Path,
    out_dir: str | Path,
    *,
    queries: Sequence[Query] = QUERIES,
    teach_tasks: Sequence[str] = TEACH_TASKS,
    shots: Sequence[int] = SHOTS,
    seeds: int = SEEDS,
    datasets: Iterable[str] | None = None,
    max_per_dataset: int | None = None,
    tasks: dict[str, Task] | None = None,
    log: Callable[[str], None] | None = _log,
) -> dict[str, Any]:
    """Every number of the report (see the module docstring); libraries live in `out_dir`."""
    from engine.library import connect

    tasks = tasks if tasks is not None else TASKS
    out_dir = Path(out_dir)
    test_rows = select_rows(rows, "test", datasets, max_per_dataset)
    if not test_rows:
        raise UsageError("the manifest has no test rows for the selected datasets")
    loader = PixelLoader(data_root, size=448)  # 448: the engine's model image, so loader(row) is evaluation's pixels
    scans = RowScans(loader)
    res: dict[str, Any] = {}
    with connect(out_dir / TEST_DB) as test_db, connect(out_dir / TEACH_DB) as teach_db:
        t0 = time.perf_counter()
        test_ids, report = index_rows(test_db, model, test_rows, scans, log, "test")
        scan_row = scan_rows_of(test_rows, test_ids)
        check_library(test_db, model.model_id, scan_row)
        labels_differ = sum(set(r.labels) != set(scan_row[test_ids[r.id]].labels) for r in test_rows if r.id in test_ids)
        res["library"] = {
            "path": str(out_dir / TEST_DB),
            **report,
            "rows_sharing_a_scan_with_other_labels": labels_differ,
            "per_dataset": dict(Counter(r.dataset for r in test_rows)),
            "pixel_check": pixel_check(test_rows, scans),
        }
        t1 = time.perf_counter()
        records = text_retrieval(test_db, model, queries, scan_row)
        res["text_to_scan"] = {"k": K_TEXT, "per_dataset": text_summary(records), "queries": records}
        res["scan_to_scan"] = {"k": K_SCAN, "per_dataset": scan_retrieval(test_db, model, scan_row, tasks=tasks)}
        res["retrieval_seconds"] = time.perf_counter() - t1
        if log:
            log(f"retrieval done ({res['retrieval_seconds']:.0f} s)")
        t2 = time.perf_counter()
        res["teach"] = {"shots": list(shots), "seeds": seeds, "library": str(out_dir / TEACH_DB), "tasks": {}}
        train_all = [r for r in rows if r.split == "train"]
        for name in teach_tasks:
            task = tasks[name]
            if task.kind != BINARY:
                raise UsageError(f"teach task {name} is not binary")
            res["teach"]["tasks"][name] = teach_task(
                task,
                task_rows(task, train_all),
                task_rows(task, test_rows),
                test_ids,
                test_db,
                teach_db,
                model,
                scans,
                shots=shots,
                seeds=seeds,
                log=log,
            )
        res["teach"]["train_examples_equal_to_a_test_scan"] = train_test_overlap(test_db, teach_db)
        res["teach"]["seconds"] = time.perf_counter() - t2
        res["index_seconds"] = t1 - t0
    return res


# --------------------------------------------------------------------------- output


def _pm(stats: dict[str, Any] | None) -> str:
    if not stats or stats.get("mean") is None:
        return "n/a"
    sd = stats.get("sd")
    return f"{_f(stats['mean'])} ± {_f(sd)}" if sd is not None else _f(stats["mean"])


def to_markdown(res: dict[str, Any]) -> str:
    """The report (res after `_clean`: NaN is None)."""
    lines = _header_md(res) + _text_to_scan_md(res) + _scan_to_scan_md(res) + _teach_md(res) + _pixel_check_md(res) + _queries_md(res)
    return "\n".join(lines).rstrip() + "\n"


def _header_md(res: dict[str, Any]) -> list[str]:
    """Title, run record and what the library holds."""
    lib = res["library"]
    lines = [
        f"# Library retrieval and teaching quality: {res.get('model_id', '?')}",
        "",
        f"Split `test` of manifest sha256 `{str(res.get('manifest', {}).get('sha256', ''))[:12]}` ({res.get('manifest', {}).get('path', '')}), "
        f"{res.get('date', '')}, {res.get('cpu', '')}, {res.get('threads', '?')} thread(s), inference path {res.get('inference_path', '?')}; "
        f"wall {_f(res.get('wall_s'), 0)} s (indexing {_f(res.get('index_seconds'), 0)} s, retrieval {_f(res.get('retrieval_seconds'), 0)} s, "
        f"teaching {_f(res.get('teach', {}).get('seconds'), 0)} s). Command: `{res.get('command', '')}`.",
        "",
        f"Library: {lib['rows']} test rows -> {lib['scans']} scans ({lib['rows_sharing_a_scan']} rows share a scan with an identical "
        f"earlier row, {lib['rows_sharing_a_scan_with_other_labels']} of them with other labels; {len(lib['failed'])} unreadable), each "
        "added with `engine.library.indexing.add_scan` (source = manifest row id). Vector search only: no notes, `keywords=False`.",
        "",
    ]
    return lines


def _text_to_scan_md(res: dict[str, Any]) -> list[str]:
    """Text -> scan precision@10 per dataset, mixed and filtered."""
    ts = res["text_to_scan"]["per_dataset"]
    lines = [
        "## Text -> scan, precision@10",
        "",
        "Each class: a label query (the class name) and a sentence query, embedded as typed. *Mixed*: the whole library "
        "(all datasets, all modalities); *filtered*: `search(..., modality=...)`, the library's modality filter; *ensemble*: label "
        "queries with the filter and `ensemble=True` (the modality's prompt templates). Relevant: a scan of the query's modality "
        "with the class. Ceiling: best possible P@10 (classes with < 10 scans); chance: relevant share of the gallery.",
        "",
    ]
    lines += _table(
        [
            "dataset",
            "modality",
            "queries",
            "P@10 mixed",
            "P@10 filtered",
            "label: mixed / filtered",
            "sentence: mixed / filtered",
            "label + ensemble, filtered",
            "ceiling",
            "chance mixed / filtered",
        ],
        [
            [
                ds,
                d["modality"],
                d["n_queries"],
                _f(d["p_mixed"]),
                _f(d["p_filtered"]),
                f"{_f(d['p_mixed_label'])} / {_f(d['p_filtered_label'])}",
                f"{_f(d['p_mixed_sentence'])} / {_f(d['p_filtered_sentence'])}",
                _f(d["p_filtered_ensemble"]),
                _f(d["ceiling"]),
                f"{_f(d['chance_mixed'])} / {_f(d['chance_filtered'])}",
            ]
            for ds, d in ts.items()
        ],
    )
    means = res.get("text_to_scan", {}).get("macro", {})
    if means:
        lines += [
            f"Mean over datasets: mixed {_f(means.get('p_mixed'))}, filtered {_f(means.get('p_filtered'))}, "
            f"ensemble (filtered) {_f(means.get('p_filtered_ensemble'))}.",
            "",
        ]
    return lines


def _scan_to_scan_md(res: dict[str, Any]) -> list[str]:
    """Scan -> scan precision@5 per dataset, and the check against brute force."""
    ss = res["scan_to_scan"]["per_dataset"]
    lines = [
        "## Scan -> scan, precision@5",
        "",
        "Each test scan with a class queries the library by id (`search(like=id)`, itself left out). Relevant: same dataset and "
        "same class (classes of the task `training.evaluate` uses for image -> image retrieval). *Same dataset*: any scan of the "
        "query's dataset counts.",
        "",
    ]
    rows_md = []
    for ds, d in ss.items():
        if "skipped" in d:
            rows_md.append([ds, "", "", "n/a", "n/a", "n/a", "n/a", d["skipped"]])
        else:
            rows_md.append(
                [
                    ds,
                    d["classes_from"],
                    d["n_queries"],
                    _f(d["p_class_mixed"]),
                    _f(d["p_class_filtered"]),
                    _f(d["p_dataset_mixed"]),
                    _f(d["chance_class"]),
                    "",
                ]
            )
    lines += _table(
        [
            "dataset",
            "classes",
            "queries",
            "P@5 same class, mixed",
            "P@5 same class, filtered",
            "P@5 same dataset, mixed",
            "chance (same class)",
            "note",
        ],
        rows_md,
    )
    lines += [
        f"Search vs brute force over the stored vectors: largest per-query difference {_f(res.get('max_brute_diff'))} "
        "(0: the library's index, filters and self-exclusion rank as a full sort does).",
        "",
    ]
    return lines


def _teach_md(res: dict[str, Any]) -> list[str]:
    """Few-shot teaching AUC per task beside zero-shot and the reference probe."""
    te = res["teach"]
    lines = [
        "## Teaching: few-shot AUC on the test split",
        "",
        f"k tagged examples per class from the train split, taught with `engine.library.teach.teach` (logistic regression on the "
        f"stored embeddings, C = 1, balanced), the stored probe applied to the test scans' vectors; mean ± sd (n-1) over "
        f"{te['seeds']} draws (numpy default_rng(1000 k + seed), the draws of the model card's few-shot table). Zero-shot: the "
        f"same model on the same vectors (`training.evaluate.zero_shot`, 95% bootstrap CI). Reference: `training.probe`'s "
        f"standardised probe on the same draws.",
        "",
    ]
    trows = []
    for name, t in te["tasks"].items():
        if "skipped" in t:
            trows.append([name, "", "", *["n/a"] * (2 * len(te["shots"])), t["skipped"]])
            continue
        zs = t["zero_shot"]
        ci = zs.get("auc_ci95") or [None, None]
        trows.append(
            [
                name,
                f"{t['n_test']} ({t['n_test_positive']} pos)",
                f"{_f(zs.get('auc'))} ({_f(ci[0])}-{_f(ci[1])})",
                *[_pm(t["shots"].get(str(k), {}).get("teach_auc")) for k in te["shots"]],
                *[_pm(t["shots"].get(str(k), {}).get("reference_probe_auc")) for k in te["shots"]],
                "; ".join(f"{k}-shot seed {s}: {e}" for k, v in t["shots"].items() for s, e in v.get("errors", {}).items()),
            ]
        )
    lines += _table(
        [
            "task",
            "test n",
            "zero-shot AUC",
            *[f"teach {k}-shot" for k in te["shots"]],
            *[f"reference {k}-shot" for k in te["shots"]],
            "note",
        ],
        trows,
    )
    lines += [
        f"Train examples with the pixels of a test scan: {te.get('train_examples_equal_to_a_test_scan')}. "
        "What the person sees after teaching (cross-validated balanced accuracy on the tagged examples, mean over draws): "
        + "; ".join(
            f"{name} " + ", ".join(f"{k}-shot {_f(t['shots'][str(k)]['cv_balanced_accuracy']['mean'], 2)}" for k in te["shots"])
            for name, t in te["tasks"].items()
            if "shots" in t
        )
        + ".",
        "",
    ]
    return lines


def _pixel_check_md(res: dict[str, Any]) -> list[str]:
    """Library model images vs PixelLoader's for .npz frames and slices (nothing when none were checked)."""
    lines: list[str] = []
    pc = res["library"].get("pixel_check", {})
    if pc:
        lines += [
            "## Pixels: library vs evaluation",
            "",
            "Rows that are not plain files, as 2D Scans through the library's embedding path, against `training.manifest.PixelLoader` "
            "(what training and `training.evaluate` feed the model). An .npz frame is windowed like any grey image in the library "
            "(engine.windowing's auto window, 0.5-99.5 percentile), while PixelLoader letterboxes the raw uint8 frame; a slice is "
            "windowed on its own in the library, with its volume's window by PixelLoader (CT: the same HU preset unless the slice "
            "alone does not look like HU; MR: auto window of the slice vs of the volume).",
            "",
        ]
        lines += _table(
            ["dataset", "rows", "identical model images", "mean abs difference (grey levels)"],
            [[ds, d["n"], d["identical"], _f(d["mean_abs_diff"], 2)] for ds, d in pc.items()],
        )
    return lines


def _queries_md(res: dict[str, Any]) -> list[str]:
    """Every query with its precision."""
    lines = ["## Queries", ""]
    lines += _table(
        ["dataset", "style", "query", "relevant", "P@10 mixed", "P@10 filtered", "ensemble, filtered"],
        [
            [
                r["dataset"],
                r["style"],
                r["query"],
                r["n_relevant"],
                _f(r.get("p_mixed")),
                _f(r.get("p_filtered")),
                _f(r.get("p_filtered_ensemble")) if r["style"] == "label" else "",
            ]
            for r in res["text_to_scan"]["queries"]
        ],
    )
    return lines


def _macro(per_dataset: dict[str, dict[str, Any]], keys: Sequence[str]) -> dict[str, float]:
    out = {}
    for key in keys:
        vals = [d[key] for d in per_dataset.values() if d.get(key) is not None and np.isfinite(d[key])]
        out[key] = float(np.mean(vals)) if vals else float("nan")
    return out


def finish(res: dict[str, Any]) -> dict[str, Any]:
    """Add the summary numbers (macro means, largest brute-force difference) to a result."""
    res["text_to_scan"]["macro"] = _macro(res["text_to_scan"]["per_dataset"], ("p_mixed", "p_filtered", "p_filtered_ensemble"))
    res["scan_to_scan"]["macro"] = _macro(res["scan_to_scan"]["per_dataset"], ("p_class_mixed", "p_class_filtered", "p_dataset_mixed"))
    diffs = [d.get("max_brute_diff", 0.0) for part in ("text_to_scan", "scan_to_scan") for d in res[part]["per_dataset"].values()]
    res["max_brute_diff"] = max([d for d in diffs if d is not None] or [0.0])
    return res


def write_outputs(res: dict[str, Any], out_dir: str | Path) -> str:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = _clean(res)
    (out / "results.json").write_text(json.dumps(clean, indent=2) + "\n")
    md = to_markdown(clean)
    (out / "results.md").write_text(md)
    return md


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.library_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--out", default="runs/library_eval", help="folder for test.db, teach.db, results.json/.md (and the manifest)")
    p.add_argument("--model", default="medlens-clip", help="engine model source (shipped name, hf-hub:..., local-dir:...)")
    p.add_argument("--manifest", default=None, help="manifest to read (default <out>/manifest.jsonl, built from --data-root when missing)")
    p.add_argument("--seeds", type=int, default=SEEDS)
    p.add_argument("--shots", type=int, nargs="+", default=list(SHOTS))
    p.add_argument("--datasets", nargs="+", default=None, help="only these datasets' test rows (default: all but breastmnist)")
    p.add_argument("--max-per-dataset", type=int, default=None, help="stratified cap on each dataset's test rows (smoke runs)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    return p.parse_args(argv)


def _manifest(args: argparse.Namespace) -> Path:
    path = Path(args.manifest) if args.manifest else Path(args.out) / "manifest.jsonl"
    if path.is_file():
        return path
    if args.manifest:
        raise UsageError(f"manifest {path} not found")
    from training.recipes import build_all

    try:
        build_all(args.data_root, path)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise UsageError(f"cannot build a manifest from {args.data_root}: {exc}") from None
    return path


def run(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    t0 = time.perf_counter()
    os.environ.setdefault("MEDLENS_THREADS", str(args.threads))  # the engine's fast-path chooser sets torch's threads from it
    import torch

    torch.set_num_threads(args.threads)
    manifest = _manifest(args)
    rows = read_manifest_or_usage(manifest)
    if not select_rows(rows, "test", args.datasets, None):  # before the model load: a wrong manifest fails in a second
        raise UsageError(f"the manifest {manifest} has no test rows for the selected datasets")
    model = load_model_or_usage(args.model)  # the default (fast) inference path: what `medlens index` embeds with
    body = evaluate_library(
        model,
        rows,
        args.data_root,
        args.out,
        seeds=args.seeds,
        shots=tuple(args.shots),
        datasets=args.datasets,
        max_per_dataset=args.max_per_dataset,
    )
    res = {
        "model": args.model,
        "model_id": model.model_id,
        **run_header(model, "test", manifest, rows),
        "threads": torch.get_num_threads(),
        "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "command": "python -m training.library_eval " + " ".join(_quote(a) for a in (sys.argv[1:] if args.argv is None else args.argv)),
        **finish(body),
    }
    res["wall_s"] = time.perf_counter() - t0
    return res, write_outputs(res, args.out)


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r"[\w./:=@+-]+", arg) else json.dumps(arg)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = None if argv is None else list(argv)
    return print_report(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
