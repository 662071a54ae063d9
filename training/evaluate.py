"""`python -m training.evaluate MODEL`: the evaluation table a model card quotes.

    python -m training.evaluate MODEL --manifest runs/manifest.jsonl --data-root ../shared/data \\
        --out runs/eval/NAME [--split test] [--tasks pneumonia,ham7] [--probe] [--pointing] [--max-per-task N]

MODEL is any engine model source (a shipped name, hf-hub:org/repo, local-dir:/path).
Writes <out>/metrics.json (everything) and <out>/metrics.md (a table per section) and
prints the Markdown. Exit code 2, with one line on stderr, for a model that cannot be
loaded, a missing manifest, unknown task names or an empty split.

Design decisions
- Every image is embedded once (model.encode_images, batched) through
  training.manifest.PixelLoader at the engine's model-image size (448), and
  the embedding is kept in memory by row id: zero-shot, retrieval and the
  probe's test split all reuse it. The numbers describe what the app does
  with the same pixels.
- Zero-shot uses the engine's prompt ensembles (engine.zeroshot.prompts) and
  the model's own logit scale, exactly as engine.zeroshot.api scores labels.
  Binary tasks score the positive side as the *summed* softmax probability of
  the task's positive classes (BUSI: p(malignant) among normal/benign/
  malignant; fundus: moderate-or-worse grades plus maculopathy): the user
  sees these labels side by side, and summing is what "any of these" means
  under a softmax. AUC is threshold-free; "accuracy" of a binary task is at
  the argmax label (positive when the top label is a positive class).
- CT organs are multi-label: each organ is scored independently with the
  engine's present/absent pair (sigmoid of scale x (cos_present -
  cos_absent)), per slice, and AUC is computed per organ over the test
  subject's slices, only for organs both present and absent on some slice;
  the task's number is the mean over those organs, reported beside an
  organ-agnostic control (one score, the mean margin over organs, for every
  organ): presence tracks how much anatomy a slice holds, so a random tower
  already reaches ~0.85 here, and only the excess over the control is organ
  knowledge.
- 95% CIs: percentile bootstrap, 1000 resamples, seed 0 (training.metrics).
- `--max-per-task N` keeps a stratified, seeded subsample of each task's rows
  (and of each dataset for image->image retrieval), for smoke runs.
- Pointing game (`--pointing`): per (CT slice, present organ), the engine's
  heat map (engine.heatmap.image_heatmap) for the organ's class embedding on
  the model image, and whether its maximum lies inside the organ's mask. The
  mask is the row's label map (extra["mask"]) sliced by engine.views.
  extract_slice exactly as the CT is, then placed into the model image's
  letterbox box with nearest-neighbour resizing, so mask and heat map share
  pixels. The chance rate (mean mask area share of the image) is reported
  beside it. Capped (default 60 pairs, interleaved across organs) because
  each map costs a backward pass (SmoothGrad: 8 of them) per pair.
- Probe (`--probe`, training.probe): frozen embeddings of the train/val/test
  splits, logistic regression on 1 %, 10 % and 100 % of train, plus 5/10/20-
  shot curves; the train splits are the slow part, `--probe-max-train` caps them.
- Rows whose pixels cannot be read are dropped and counted under "errors"
  (ids only: manifests hold nothing identifying), not fatal: one bad file
  must not lose an hour of embedding.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from engine.models.cpu import cpu_profile
from training import metrics, probe
from training.config import UsageError, print_report  # UsageError: a problem with the command line or its inputs: exit code 2, one line
from training import tasks as tasks_mod
from training.manifest import PixelLoader, Row, read_manifest
from training.tasks import BINARY, MULTICLASS, MULTILABEL, MODALITY_LABELS, Task, task_rows

KS = (1, 5, 10)
IMAGE_SIZE = 448  # engine.zeroshot.imaging.MODEL_IMAGE_SIZE: what the app feeds a 2D model
POINTING_MAX = 60
SEED = 0

# TotalSegmentator class names (class_names.json "total") per ct_organs organ, used when a
# row carries a mask path but no id list.
TOTALSEG_PATTERNS = {
    "liver": r"liver",
    "spleen": r"spleen",
    "left kidney": r"kidney_left",
    "right kidney": r"kidney_right",
    "stomach": r"stomach",
    "pancreas": r"pancreas",
    "gallbladder": r"gallbladder",
    "heart": r"heart(_.*)?",
    "left lung": r"lung_.*_left",
    "right lung": r"lung_.*_right",
    "aorta": r"aorta",
    "vertebrae": r"vertebrae_.*",
    "colon": r"colon",
    "small bowel": r"small_bowel",
    "urinary bladder": r"urinary_bladder",
}
MASK_ID_KEYS = ("mask_ids", "organ_ids", "label_ids", "totalseg_ids")  # recipes/slices.py writes "mask_ids"
GRID_TOL_MM = 1e-3  # label map and image affines must agree this well (as recipes/slices.check_same_grid)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- embeddings


class EmbeddingCache:
    """Row id -> L2-normalised image embedding, each row embedded once."""

    def __init__(self, model, loader: PixelLoader, batch_size: int = 32, log: Callable[[str], None] | None = _log):
        self.model = model
        self.loader = loader
        self.batch_size = int(batch_size)
        self.log = log
        self.vectors: dict[str, np.ndarray] = {}
        self.errors: dict[str, str] = {}  # row id -> why its pixels could not be read
        self.seconds = 0.0

    def embed(self, rows: Sequence[Row], what: str = "") -> tuple[np.ndarray, list[Row]]:
        """(N, D) embeddings of the rows that could be read, and those rows (order kept)."""
        todo = [r for r in dict((r.id, r) for r in rows).values() if r.id not in self.vectors and r.id not in self.errors]
        if todo:
            t0 = time.perf_counter()
            for start in range(0, len(todo), self.batch_size):
                chunk, pixels = [], []
                for row in todo[start : start + self.batch_size]:
                    try:
                        pixels.append(self.loader(row))
                        chunk.append(row)
                    except Exception as exc:  # unreadable file: counted, not fatal
                        self.errors[row.id] = f"{type(exc).__name__}: {str(exc)[:200]}"
                if pixels:
                    for row, vec in zip(chunk, self.model.encode_images(pixels, batch_size=self.batch_size)):
                        self.vectors[row.id] = vec
                done = min(start + self.batch_size, len(todo))
                if self.log and (done == len(todo) or (start // self.batch_size) % 10 == 9):
                    self.log(f"embedded {done}/{len(todo)} {what} images ({time.perf_counter() - t0:.0f} s)")
            self.seconds += time.perf_counter() - t0
        kept = [r for r in rows if r.id in self.vectors]
        if not kept:
            return np.zeros((0, int(getattr(self.model, "embed_dim", 0) or 0)), np.float32), []
        return np.stack([self.vectors[r.id] for r in kept]), kept


# --------------------------------------------------------------------------- helpers


def _targets(task: Task, rows: Sequence[Row]) -> tuple[list[Row], np.ndarray, int]:
    """Rows with a valid target, their targets, and how many were dropped (ambiguous labels)."""
    kept, ys = [], []
    for row in rows:
        try:
            ys.append(task.target(row))
            kept.append(row)
        except ValueError:
            pass
    return kept, np.asarray(ys, dtype=int), len(rows) - len(kept)


def _cap(rows: list[Row], strata: Sequence[Any], limit: int | None, seed: int = SEED) -> list[Row]:
    """A stratified, seeded subsample of at most ~`limit` rows (every stratum keeps at least one)."""
    if not limit or len(rows) <= limit:
        return rows
    codes = {s: i for i, s in enumerate(dict.fromkeys(strata))}
    idx = probe.stratified_subsample([codes[s] for s in strata], n=limit, seed=seed, min_per_class=1)
    return [rows[i] for i in idx]


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _ci(lo_hi_n: tuple[float, float, int]) -> list[float]:
    return [lo_hi_n[0], lo_hi_n[1]]


def _text_embeddings(model, task: Task, pair: bool = False):
    from engine.zeroshot.prompts import class_embeddings, load_prompt_set, pair_embeddings

    pset = load_prompt_set(task.prompt_modality)
    return pair_embeddings(model, task.classes, pset) if pair else class_embeddings(model, task.classes, pset)


def _task_rows(task: Task, rows: list[Row], max_per_task: int | None) -> tuple[list[Row], np.ndarray | None, int]:
    """The (capped) rows a task is evaluated on, their targets (None for multi-label), rows dropped."""
    trows = task_rows(task, rows)
    if task.kind == MULTILABEL:
        return _cap(trows, ["all"] * len(trows), max_per_task), None, 0
    trows, y, dropped = _targets(task, trows)
    capped = _cap(trows, y.tolist(), max_per_task)
    if len(capped) != len(trows):
        keep = {r.id for r in capped}
        y = np.asarray([t for r, t in zip(trows, y) if r.id in keep], dtype=int)
    return capped, y, dropped


# --------------------------------------------------------------------------- zero-shot


def zero_shot(task: Task, emb: np.ndarray, rows: Sequence[Row], y: np.ndarray | None, model) -> dict[str, Any]:
    """Zero-shot metrics of one task on its rows' embeddings (see the module docstring)."""
    scale = float(model.logit_scale)
    out: dict[str, Any] = {"kind": task.kind, "classes": list(task.classes), "prompt_set": task.prompt_modality, "n": len(rows)}
    if task.kind == MULTILABEL:
        out.update(_organ_presence(task, emb, rows, model))
        return out
    probs = _softmax(scale * (emb @ _text_embeddings(model, task).T))
    out.update(_binary_zero_shot(task, y, probs) if task.kind == BINARY else _multiclass_zero_shot(task, y, probs))
    return out


def _organ_presence(task: Task, emb: np.ndarray, rows: Sequence[Row], model) -> dict[str, Any]:
    """Multi-label zero-shot: per-organ AUC of the present-minus-absent prompt margin, with its controls."""
    present, absent = _text_embeddings(model, task, pair=True)
    margin = emb @ present.T - emb @ absent.T  # sigmoid(scale * margin) = P(present); AUC needs only the order
    # Control: one organ-agnostic score (the mean margin over all organs) ranks the slices for
    # every organ. Organ presence follows how much anatomy a slice holds, and the present-minus-
    # absent directions share a "present" component, so per-organ AUC can sit far from 0.5 without
    # any organ knowledge (a random tiny tower: 0.85, control 0.85, on the TotalSegmentator test
    # subject); only AUC above the control shows that the model tells organs apart.
    agnostic = margin.mean(axis=1)
    # Second scoring, reported beside it: plain similarity to the organ's prompt ensemble (what a
    # user ranking slices by one label gets); it needs no understanding of negated captions.
    similarity = emb @ _text_embeddings(model, task).T
    organs, aucs, controls, skipped, sims = {}, [], [], {}, []
    for j, organ in enumerate(task.classes):
        yy = np.asarray([organ in r.labels for r in rows], dtype=int)
        auc, reason = metrics.binary_auc(yy, margin[:, j])
        if reason:
            skipped[organ] = "never present" if yy.sum() == 0 else ("present on every slice" if yy.all() else reason)
            continue
        control, _ = metrics.binary_auc(yy, agnostic)
        sim_auc, _ = metrics.binary_auc(yy, similarity[:, j])
        sims.append(sim_auc)
        organs[organ] = {
            "auc": auc,
            "n_present": int(yy.sum()),
            "n": int(yy.size),
            "ci95": _ci(metrics.bootstrap_ci(yy, margin[:, j], "auc")),
            "control_auc": control,
            "similarity_auc": sim_auc,
        }
        aucs.append(auc)
        controls.append(control)
    return dict(
        scoring="present-absent",
        per_organ=organs,
        skipped_organs=skipped,
        mean_auc=float(np.mean(aucs)) if aucs else float("nan"),
        mean_control_auc=float(np.mean(controls)) if controls else float("nan"),
        n_organs=len(aucs),
        mean_similarity_auc=float(np.mean(sims)) if sims else float("nan"),
    )


def _binary_zero_shot(task: Task, y: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """AUC of the summed softmax of the positive classes; accuracy of the top class falling among them."""
    pos = [i for i, c in enumerate(task.classes) if c in task.positive]
    p_pos = probs[:, pos].sum(axis=1)
    pred = np.isin(probs.argmax(axis=1), pos).astype(int)
    auc, reason = metrics.binary_auc(y, p_pos)
    out = dict(
        positive=sorted(task.positive),
        n_positive=int(y.sum()),
        auc=auc,
        auc_ci95=_ci(metrics.bootstrap_ci(y, p_pos, "auc")),
        accuracy=metrics.accuracy(y, pred),
        accuracy_ci95=_ci(metrics.bootstrap_ci(y, pred, "accuracy")),
        balanced_accuracy=metrics.balanced_accuracy(y, pred),
    )
    if reason:
        out["auc_note"] = reason
    return out


def _multiclass_zero_shot(task: Task, y: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Top-1 accuracy, macro one-vs-rest AUC and per-class recall (per modality for the modality task)."""
    top = probs.argmax(axis=1)
    macro, used, reason = metrics.macro_ovr_auc(y, probs)
    recall = metrics.per_class_recall(y, top, range(len(task.classes)))
    out = dict(
        accuracy=metrics.accuracy(y, top),
        accuracy_ci95=_ci(metrics.bootstrap_ci(y, top, "accuracy")),
        balanced_accuracy=metrics.balanced_accuracy(y, top),
        macro_auc=macro,
        macro_auc_classes=[task.classes[i] for i in used],
        per_class={task.classes[c]: {"accuracy": r, "n": n} for c, (r, n) in recall.items()},
    )
    if reason:
        out["auc_note"] = reason
    if task.name == "modality":
        names = list(MODALITY_LABELS)
        out["per_modality"] = {names[c]: {"accuracy": r, "n": n} for c, (r, n) in recall.items() if n}
    return out


# --------------------------------------------------------------------------- retrieval


def text_to_image(task: Task, emb: np.ndarray, rows: Sequence[Row], model) -> dict[str, Any]:
    """Each class of the task is a text query (its prompt ensemble); a hit is an image of that class."""
    text = _text_embeddings(model, task)
    relevant = np.asarray([[task.has_class(r, c) for r in rows] for c in task.classes], dtype=bool)
    res = metrics.retrieval_at_k(text @ emb.T, relevant, KS)
    res["n_gallery"] = len(rows)
    return res


def image_label_task(dataset: str, tasks: dict[str, Task]) -> Task | None:
    """The task whose classes define "same class" for image->image retrieval in `dataset`:
    single-label tasks over all the dataset's rows first, then the one with most classes."""
    cands = [t for t in tasks.values() if dataset in t.datasets and t.kind in (BINARY, MULTICLASS) and t.name != "modality"]
    cands.sort(key=lambda t: (bool(t.row_filter), -len(t.classes)))
    return cands[0] if cands else None


# --------------------------------------------------------------------------- pointing game


def _mask_ids(row: Row, organ: str, root: Path) -> list[int]:
    extra = row.extra or {}
    for key in MASK_ID_KEYS:
        table = extra.get(key)
        if isinstance(table, dict) and organ in table:
            ids = table[organ]
            return [int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]
    # no id table: TotalSegmentator's class_names.json beside the label map
    mask = extra.get("mask")
    pattern = TOTALSEG_PATTERNS.get(organ)
    if not mask or not pattern:
        return []
    path = Path(mask) if Path(mask).is_absolute() else root / mask
    names_file = path.parent / "class_names.json"
    if not names_file.is_file():
        return []
    table = json.loads(names_file.read_text())
    group = extra.get("class_set") or ("total_mr" if row.modality == "mr" else "total")
    names = table.get(group, {})
    return sorted(int(i) for i, name in names.items() if re.fullmatch(pattern, str(name)))


class MaskLoader:
    """Organ masks in model-image pixels: (size, size) bool, aligned with PixelLoader's image of the row."""

    def __init__(self, loader: PixelLoader):
        self.loader = loader
        self._maps: dict[str, Any] = {}

    def _label_scan(self, path: Path):
        key = str(path)
        if key not in self._maps:
            from engine.io import load_one

            if len(self._maps) >= 2:
                self._maps.pop(next(iter(self._maps)))
            self._maps[key] = load_one([path])[0]
        return self._maps[key]

    def __call__(self, row: Row, ids: Sequence[int], image=None) -> np.ndarray:
        """The mask of label ids `ids` on the row's slice. `image`: the row's ModelImage if already made."""
        from PIL import Image

        from engine.views import extract_slice

        if row.slice is None or not (row.extra or {}).get("mask"):
            raise ValueError(f"row {row.id}: no slice or no extra['mask'] label map")
        image = image or self.loader.model_image(row)
        mask_path = Path(row.extra["mask"])
        label_scan = self._label_scan(mask_path if mask_path.is_absolute() else self.loader.root / mask_path)
        scan = self.loader._scan(self.loader.resolve(row), row.modality)  # cached by the loader: no second read
        # same grid or nothing: a label map of another volume can share the in-plane shape
        if tuple(label_scan.volume_shape) != tuple(scan.volume_shape) or not np.allclose(
            label_scan.affine, scan.affine, rtol=0, atol=GRID_TOL_MM
        ):
            raise ValueError(f"row {row.id}: the label map's grid {label_scan.volume_shape} differs from the image's {scan.volume_shape}")
        labels, _mm = extract_slice(label_scan, row.slice["plane"], int(row.slice["index"]))
        if tuple(labels.shape[:2]) != tuple(image.slice_shape):
            raise ValueError(f"row {row.id}: label map slice {labels.shape[:2]} differs from the image slice {image.slice_shape}")
        sel = np.isin(np.rint(np.asarray(labels)).astype(np.int64), np.asarray(list(ids), dtype=np.int64))
        top, left, h, w = image.box
        size = image.pixels.shape[0]
        small = Image.fromarray(sel.astype(np.uint8) * 255)
        if small.size != (w, h):
            small = small.resize((w, h), Image.Resampling.NEAREST)  # labels must not blend
        out = np.zeros((size, size), dtype=bool)
        out[top : top + h, left : left + w] = np.asarray(small) > 127
        return out


def _organ_targets(
    task: Task, rows: Sequence[Row], root: Path, planes: tuple[str, ...]
) -> tuple[dict[str, list[tuple[Row, list[int]]]], set[str]]:
    """({organ: [(slice row, label-map ids)]}, organs present on some slice but without mask ids)."""
    by_organ: dict[str, list[tuple[Row, list[int]]]] = {}
    no_ids: set[str] = set()
    for row in rows:
        # Axial slices only (the plane the app shows and samples by default): the held-out CT series
        # has 20 slices, so its coronal/sagittal reformats are 40 mm strips whose organ masks cover
        # ~1 % of a letterboxed model image, far below the resolution of any heat map.
        if planes and (row.slice or {}).get("plane", "axial") not in planes:
            continue
        for organ in task.classes:
            if organ in row.labels:
                ids = _mask_ids(row, organ, root)
                if ids and (row.extra or {}).get("mask"):
                    by_organ.setdefault(organ, []).append((row, ids))
                else:
                    no_ids.add(organ)
    return by_organ, no_ids


def _round_robin(by_organ: dict[str, list[tuple[Row, list[int]]]], max_pairs: int, seed: int) -> list[tuple[str, Row, list[int]]]:
    """Up to max_pairs (organ, row, ids), shuffled per organ and taken in turn: no organ fills the budget alone."""
    rng = np.random.default_rng(seed)
    queues = {o: [pairs[i] for i in rng.permutation(len(pairs))] for o, pairs in by_organ.items()}
    pairs: list[tuple[str, Row, list[int]]] = []
    while queues and len(pairs) < max_pairs:
        for organ in list(queues):
            if len(pairs) >= max_pairs:
                break
            row, ids = queues[organ].pop()
            pairs.append((organ, row, ids))
            if not queues[organ]:
                del queues[organ]
    return pairs


def pointing_game(
    task: Task,
    rows: Sequence[Row],
    model,
    loader: PixelLoader,
    *,
    max_pairs: int = POINTING_MAX,
    tolerance: float = 0.0,
    seed: int = SEED,
    log=_log,
    planes: tuple[str, ...] = ("axial",),
) -> dict[str, Any]:
    """Pointing game over (slice, present organ) pairs of a multi-label CT task (module docstring)."""
    from engine.heatmap import image_heatmap, resolve_method

    by_organ, no_ids = _organ_targets(task, rows, loader.root, planes)
    pairs = _round_robin(by_organ, max_pairs, seed)
    text = dict(zip(task.classes, _text_embeddings(model, task)))
    masks = MaskLoader(loader)
    per: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    t0 = time.perf_counter()
    for n, (organ, row, ids) in enumerate(pairs):
        try:
            image = loader.model_image(row)
            mask = masks(row, ids, image)
        except Exception as exc:
            errors[f"{row.id}:{organ}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            continue
        if not mask.any():  # the organ is listed but invisible after letterboxing (a sliver): no target
            errors[f"{row.id}:{organ}"] = "empty mask on the model image"
            continue
        heat = image_heatmap(model, image.pixels, text[organ])
        hit = metrics.pointing_hit(heat, mask, tolerance)
        d = per.setdefault(organ, {"hits": 0, "n": 0, "mask_fraction": []})
        d["hits"] += int(hit)
        d["n"] += 1
        d["mask_fraction"].append(float(mask.mean()))
        if log and (n + 1) % 10 == 0:
            log(f"pointing {n + 1}/{len(pairs)} ({time.perf_counter() - t0:.0f} s)")
    hits = sum(d["hits"] for d in per.values())
    total = sum(d["n"] for d in per.values())
    fractions = [f for d in per.values() for f in d["mask_fraction"]]
    for d in per.values():
        d["rate"] = d["hits"] / d["n"]
        d["chance"] = float(np.mean(d.pop("mask_fraction")))
    return {
        "method": resolve_method(model),
        "planes": list(planes),
        "tolerance_px": tolerance,
        "image_size": loader.size,
        "hits": hits,
        "n": total,
        "rate": hits / total if total else float("nan"),
        "chance": float(np.mean(fractions)) if fractions else float("nan"),
        "per_organ": per,
        "organs_without_mask_ids": sorted(no_ids),
        "errors": errors,
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- probe


def probe_task(
    task: Task,
    rows_by_split: dict[str, list[Row]],
    cache: EmbeddingCache,
    *,
    test_rows: list[Row],
    y_test: np.ndarray,
    max_train: int | None,
    max_per_task: int | None,
) -> dict[str, Any]:
    """Linear probe at 1/10/100 % of train, and few-shot curves, for one single-label task."""
    n_classes = 2 if task.kind == BINARY else len(task.classes)
    tr_rows, y_tr, _ = _targets(task, task_rows(task, rows_by_split.get("train", [])))
    tr_rows = _cap(tr_rows, y_tr.tolist(), max_train)
    va_rows, y_va, _ = _targets(task, task_rows(task, rows_by_split.get("val", [])))
    va_rows = _cap(va_rows, y_va.tolist(), max_per_task)
    x_tr, tr_rows = cache.embed(tr_rows, f"{task.name} train")
    x_va, va_rows = cache.embed(va_rows, f"{task.name} val")
    x_te, kept = cache.embed(test_rows, f"{task.name} test")
    y_tr = np.asarray([task.target(r) for r in tr_rows], dtype=int)
    y_va = np.asarray([task.target(r) for r in va_rows], dtype=int)
    y_te = np.asarray([task.target(r) for r in kept], dtype=int)
    out: dict[str, Any] = {
        "n_train": len(tr_rows),
        "n_val": len(va_rows),
        "n_test": len(kept),
        "metric": "auc" if task.kind == BINARY else "accuracy",
    }
    if len(tr_rows) == 0 or np.unique(y_tr).size < 2:
        out["skipped"] = "train split has fewer than two classes"
        return out
    out["fractions"] = probe.linear_probe(
        x_tr, y_tr, x_va if len(va_rows) else None, y_va if len(va_rows) else None, x_te, y_te, n_classes, seed=SEED
    )
    out["few_shot"] = {
        str(k): v for k, v in probe.few_shot_curve(x_tr, y_tr, x_te, y_te, shots=(5, 10, 20), seeds=5, n_classes=n_classes).items()
    }
    m = out["metric"]
    full, tenth = out["fractions"].get("100%", {}), out["fractions"].get("10%", {})
    out["gap_100_10"] = full.get(m, float("nan")) - tenth.get(m, float("nan"))
    return out


# --------------------------------------------------------------------------- orchestration


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def evaluate(
    model,
    rows: list[Row],
    data_root: str | Path,
    *,
    split: str = "test",
    tasks: dict[str, Task] | None = None,
    task_names: Iterable[str] | None = None,
    do_probe: bool = False,
    do_pointing: bool = False,
    max_per_task: int | None = None,
    probe_max_train: int | None = None,
    pointing_max: int = POINTING_MAX,
    pointing_tolerance: float = 0.0,
    batch_size: int = 32,
    log: Callable[[str], None] | None = _log,
) -> dict[str, Any]:
    """All metrics of `model` (a ClipModel) on the manifest `rows`; returns the metrics.json dict
    (without the run header: see `run`). `tasks` defaults to training.tasks.TASKS."""
    tasks = _select_tasks(dict(tasks if tasks is not None else tasks_mod.TASKS), task_names)
    by_split: dict[str, list[Row]] = {}
    for r in rows:
        by_split.setdefault(r.split, []).append(r)
    test = by_split.get(split, [])
    if not test:
        raise UsageError(f"the manifest has no rows in split {split!r} (splits: {', '.join(sorted(by_split)) or 'none'})")
    loader = PixelLoader(data_root, size=IMAGE_SIZE)
    cache = EmbeddingCache(model, loader, batch_size=batch_size, log=log)
    # embed the union of every task's rows in one pass (a row shared by two tasks is embedded once)
    plan = {name: _task_rows(t, test, max_per_task) for name, t in tasks.items()}
    cache.embed([r for rows_, _, _ in plan.values() for r in rows_], split)

    out: dict[str, Any] = {"zero_shot": {}, "retrieval": {"text_to_image": {}, "image_to_image": {}}, "skipped": {}}
    kept_rows = _zero_shot_tasks(out, tasks, plan, cache, model, split, log)
    _image_to_image(out["retrieval"]["image_to_image"], tasks, test, cache, max_per_task)
    if do_probe:
        out["probe"] = _probes(out["zero_shot"], tasks, kept_rows, by_split, cache, probe_max_train, max_per_task, log)
    if do_pointing:
        out["pointing"] = {
            name: pointing_game(task, kept_rows[name][0], model, loader, max_pairs=pointing_max, tolerance=pointing_tolerance, log=log)
            for name, task in tasks.items()
            if task.kind == MULTILABEL and name in kept_rows
        }
    calibration = calibration_on(model, test, cache)
    if calibration is not None:
        out["calibration"] = calibration
    out["embedding"] = {
        "images": len(cache.vectors),
        "seconds": cache.seconds,
        "image_size": IMAGE_SIZE,
        "batch_size": batch_size,
        "errors": len(cache.errors),
        "error_examples": dict(list(cache.errors.items())[:10]),
    }
    return out


def _select_tasks(tasks: dict[str, Task], task_names: Iterable[str] | None) -> dict[str, Task]:
    """The named tasks in the order named (all of `tasks` when none are); an unknown name is a UsageError."""
    if not task_names:
        return tasks
    wanted = list(task_names)
    unknown = [n for n in wanted if n not in tasks]
    if unknown:
        raise UsageError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(tasks)}")
    return {n: tasks[n] for n in wanted}


def _zero_shot_tasks(
    out: dict[str, Any], tasks: dict[str, Task], plan: dict, cache: EmbeddingCache, model, split: str, log
) -> dict[str, tuple[list[Row], np.ndarray | None]]:
    """Zero-shot and text -> image retrieval of every task into `out`; returns each task's readable rows and targets."""
    kept_rows: dict[str, tuple[list[Row], np.ndarray | None]] = {}
    for name, task in tasks.items():
        trows, y, dropped = plan[name]
        emb, kept = cache.embed(trows)
        if y is not None and len(kept) != len(trows):
            keep = {r.id for r in kept}
            y = np.asarray([t for r, t in zip(trows, y) if r.id in keep], dtype=int)
        if not kept:
            out["skipped"][name] = f"no readable {split} rows for datasets {', '.join(task.datasets)}"
            continue
        kept_rows[name] = (kept, y)
        res = zero_shot(task, emb, kept, y, model)
        if dropped:
            res["dropped_ambiguous"] = dropped
        out["zero_shot"][name] = res
        out["retrieval"]["text_to_image"][name] = text_to_image(task, emb, kept, model)
        if log:
            log(f"zero-shot {name}: n={len(kept)}")
    t2i = [v for v in out["retrieval"]["text_to_image"].values() if v["n_queries"]]
    if t2i:
        out["retrieval"]["text_to_image_mean"] = {f"recall@{k}": float(np.mean([v[f"recall@{k}"] for v in t2i])) for k in KS}
    return kept_rows


def _image_to_image(out: dict[str, Any], tasks: dict[str, Task], test: list[Row], cache: EmbeddingCache, max_per_task: int | None) -> None:
    """Image -> image retrieval per dataset of the selected tasks (the modality task's "*" names none), into `out`."""
    datasets = sorted({r.dataset for name, t in tasks.items() if t.datasets != ("*",) for r in task_rows(t, test)})
    for dataset in datasets:
        task = image_label_task(dataset, tasks)
        if task is None:
            out[dataset] = {"skipped": "no single-label task defines classes for this dataset"}
            continue
        drows = [r for r in test if r.dataset == dataset]
        drows = [r for r in drows if task.class_of(r) is not None]
        drows = _cap(drows, [task.class_of(r) for r in drows], max_per_task)
        emb, kept = cache.embed(drows, dataset)
        if len(kept) < 2:
            out[dataset] = {"skipped": "fewer than two images"}
            continue
        res = metrics.image_retrieval_at_k(emb, [task.class_of(r) for r in kept], KS)
        out[dataset] = {"classes_from": task.name, "n_gallery": len(kept), **res}


def _probes(
    zero_shots: dict[str, Any],
    tasks: dict[str, Task],
    kept_rows: dict[str, tuple[list[Row], np.ndarray | None]],
    by_split: dict[str, list[Row]],
    cache: EmbeddingCache,
    probe_max_train: int | None,
    max_per_task: int | None,
    log,
) -> dict[str, Any]:
    """Linear probes of the single-label tasks (not modality), each beside its zero-shot number."""
    out = {}
    for name, task in tasks.items():
        if task.kind not in (BINARY, MULTICLASS) or name == "modality" or name not in kept_rows:
            continue
        test_rows, y_test = kept_rows[name]
        res = probe_task(task, by_split, cache, test_rows=test_rows, y_test=y_test, max_train=probe_max_train, max_per_task=max_per_task)
        res["zero_shot"] = zero_shots[name].get(res["metric"], float("nan"))
        out[name] = res
        if log:
            log(f"probe {name}: n_train={res['n_train']}")
    return out


def calibration_on(model, rows: Sequence[Row], cache: EmbeddingCache) -> dict[str, Any] | None:
    """ECE before/after the checkpoint's own calibration on these rows (None for a model without a "trust" block)."""
    from training import calibrate

    trust = calibrate.trust_of(getattr(model, "config", None) or {})
    kept = [r for r in rows if r.id in cache.vectors]
    if trust is None or not kept:
        return None
    emb = np.stack([cache.vectors[r.id] for r in kept])
    return calibrate.evaluate_calibration(calibrate.collect(model, emb, kept), *trust)


# --------------------------------------------------------------------------- output


def _clean(obj: Any, digits: int = 6) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, floats rounded."""
    if isinstance(obj, dict):
        return {str(k): _clean(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v, digits) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return round(f, digits) if math.isfinite(f) else None
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist(), digits)
    return obj


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _ci_text(v: Any, ci: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if ci and all(c is not None and math.isfinite(c) for c in ci):
        return f"{v:.3f} ({ci[0]:.3f}-{ci[1]:.3f})"
    return f"{v:.3f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def headline_metrics(res: dict[str, Any]) -> dict[str, float]:
    """{task: its headline number}: AUC (binary), accuracy (multi-class), mean organ AUC (multi-label)."""
    out = {}
    for name, r in res.get("zero_shot", {}).items():
        key = {BINARY: "auc", MULTICLASS: "accuracy", MULTILABEL: "mean_auc"}[r["kind"]]
        v = r.get(key)
        out[name] = float("nan") if v is None else float(v)
    return out


def to_markdown(res: dict[str, Any], *, top: int = 1, title: bool = True) -> str:
    """The Markdown tables of a metrics dict (before or after `_clean`).

    top: heading level of the title; sections are one level below. A model card
    embedding this under its own "## Evaluation" wants top=2, title=False."""
    h2, h3 = "#" * (top + 1), "#" * (top + 2)
    lines = [f"{'#' * top} Evaluation of {res.get('model', '?')}", ""] if title else []
    lines += [
        f"Split `{res.get('split')}`, manifest sha256 `{str(res.get('manifest', {}).get('sha256', ''))[:12]}`, "
        f"{res.get('date', '')}, {res.get('cpu', '')}, wall {_f(res.get('wall_s'), 0)} s; "
        f"{res.get('embedding', {}).get('images', 0)} images embedded at {res.get('embedding', {}).get('image_size', IMAGE_SIZE)} px.",
        "",
    ]
    if res.get("zero_shot", {}):
        lines += _zero_shot_md(res["zero_shot"], h2, h3)
    lines += _retrieval_md(res.get("retrieval", {}), h2)
    if res.get("probe"):
        lines += _probe_md(res["probe"], h2, h3)
    for name, r in (res.get("pointing") or {}).items():
        lines += _pointing_md(name, r, h2)
    if res.get("calibration"):
        from training.calibrate import calibration_markdown

        lines += calibration_markdown(res["calibration"], f"{h2} Calibration on the {res.get('split', 'test')} split (fitted on val)")
    return "\n".join(lines).rstrip() + "\n"


def _zero_shot_row(name: str, r: dict[str, Any]) -> list[Any]:
    """task, kind, n, AUC, accuracy, balanced accuracy: the AUC cell says how each kind is scored."""
    if r["kind"] == MULTILABEL:
        return [
            name,
            r["kind"],
            r["n"],
            f"{_f(r.get('mean_auc'))} (mean of {r.get('n_organs', 0)} organ(s); control {_f(r.get('mean_control_auc'))}; similarity scoring {_f(r.get('mean_similarity_auc'))})",
            "",
            "",
        ]
    auc = _ci_text(r.get("auc"), r.get("auc_ci95")) if r["kind"] == BINARY else _f(r.get("macro_auc"))
    return [name, r["kind"], r["n"], auc, _ci_text(r.get("accuracy"), r.get("accuracy_ci95")), _f(r.get("balanced_accuracy"))]


def _zero_shot_md(zs: dict[str, Any], h2: str, h3: str) -> list[str]:
    lines = [
        f"{h2} Zero-shot",
        "",
        "AUC: binary tasks (summed softmax of the positive classes); macro one-vs-rest for multi-class; "
        "mean over organs (present/absent scoring) for multi-label. 95% bootstrap CIs in parentheses.",
        "",
    ]
    lines += _table(["task", "kind", "n", "AUC", "accuracy", "balanced accuracy"], [_zero_shot_row(n, r) for n, r in zs.items()])
    mod = zs.get("modality", {}).get("per_modality")
    if mod:
        lines += [f"{h3} Modality recognition, per modality", ""]
        lines += _table(["modality", "n", "accuracy"], [[m, d["n"], _f(d["accuracy"])] for m, d in mod.items()])
    for name, r in zs.items():
        if r["kind"] == MULTILABEL:
            lines += _per_organ_md(name, r, h3)
    return lines


def _per_organ_md(name: str, r: dict[str, Any], h3: str) -> list[str]:
    lines = [f"{h3} {name}: per-organ AUC (slices of the held-out subject)", ""]
    lines += [
        "Control: the same organ-agnostic score (mean present-absent margin over all organs) for every organ; "
        "slices holding more anatomy hold more organs, so the control can be far from 0.5 even for a random model: "
        "organ knowledge is the AUC above it.",
        "",
    ]
    lines += _table(
        ["organ", "present / slices", "AUC (95% CI)", "control AUC", "similarity AUC"],
        [
            [o, f"{d['n_present']}/{d['n']}", _ci_text(d["auc"], d.get("ci95")), _f(d.get("control_auc")), _f(d.get("similarity_auc"))]
            for o, d in r["per_organ"].items()
        ],
    )
    if r.get("skipped_organs"):
        lines += ["Not evaluable: " + ", ".join(f"{o} ({why})" for o, why in r["skipped_organs"].items()) + ".", ""]
    return lines


def _retrieval_md(ret: dict[str, Any], h2: str) -> list[str]:
    lines: list[str] = []
    if ret.get("text_to_image"):
        lines += [
            f"{h2} Retrieval: text -> image",
            "",
            "Query: each class's prompt ensemble; hit: an image of that class among the top k of the task's test images.",
            "",
        ]
        lines += _table(
            ["task", "queries", "gallery", *[f"R@{k}" for k in KS], "P@10"],
            [
                [n, r["n_queries"], r.get("n_gallery", ""), *[_f(r.get(f"recall@{k}")) for k in KS], _f(r.get("precision@10"))]
                for n, r in ret["text_to_image"].items()
            ],
        )
        mean = ret.get("text_to_image_mean")
        if mean:
            lines += ["Mean over tasks: " + ", ".join(f"R@{k} {_f(mean[f'recall@{k}'])}" for k in KS) + ".", ""]
    if ret.get("image_to_image"):
        lines += [
            f"{h2} Retrieval: image -> image",
            "",
            "Each test image queries the rest of its dataset's test split (itself left out); hit: a same-class image in the top k.",
            "",
        ]
        rows = []
        for d, r in ret["image_to_image"].items():
            if "skipped" in r:
                rows.append([d, "", "", *["" for _ in KS], "", r["skipped"]])
            else:
                rows.append([d, r["classes_from"], r["n_gallery"], *[_f(r.get(f"recall@{k}")) for k in KS], _f(r.get("precision@10")), ""])
        lines += _table(["dataset", "classes", "images", *[f"R@{k}" for k in KS], "P@10", "note"], rows)
    return lines


def _probe_md(pr: dict[str, Any], h2: str, h3: str) -> list[str]:
    lines = [
        f"{h2} Linear probe (frozen image embeddings)",
        "",
        "Logistic regression on standardised embeddings, C from a grid on val, class_weight balanced; trained on 1/10/100 % of train (stratified, seed 0).",
        "",
    ]
    rows = []
    for n, r in pr.items():
        fr = r.get("fractions", {})
        m = r["metric"]
        rows.append(
            [
                n,
                m,
                _f(r.get("zero_shot")),
                *[_f(fr.get(k, {}).get(m)) for k in ("1%", "10%", "100%")],
                _f(r.get("gap_100_10")),
                r["n_train"],
                r.get("skipped", ""),
            ]
        )
    lines += _table(["task", "metric", "zero-shot", "1%", "10%", "100%", "gap 100-10", "train n (100%)", "note"], rows)
    lines += [f"{h3} Few-shot (k images per class, mean ± std over 5 draws)", ""]
    rows = []
    for n, r in pr.items():
        fs = r.get("few_shot", {})
        rows.append([n, r["metric"], *[f"{_f(fs[k]['mean'])} ± {_f(fs[k]['std'])}" if k in fs else "n/a" for k in ("5", "10", "20")]])
    return lines + _table(["task", "metric", "5-shot", "10-shot", "20-shot"], rows)


def _pointing_md(name: str, r: dict[str, Any], h2: str) -> list[str]:
    lines = [
        f"{h2} Pointing game: {name} ({r['method']} heat maps, {'/'.join(r.get('planes') or ['all'])} slices, tolerance {r['tolerance_px']} px)",
        "",
        "Hit: the heat map's maximum lies inside the organ's mask on the model image. Chance: mean share of the image the mask covers.",
        "",
    ]
    rows = [[o, d["n"], d["hits"], _f(d["rate"]), _f(d["chance"])] for o, d in r["per_organ"].items()]
    rows.append(["**all**", r["n"], r["hits"], _f(r["rate"]), _f(r["chance"])])
    return lines + _table(["organ", "pairs", "hits", "rate", "chance"], rows)


def write_outputs(res: dict[str, Any], out_dir: str | Path) -> str:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = _clean(res)
    (out / "metrics.json").write_text(json.dumps(clean, indent=2, sort_keys=False) + "\n")
    md = to_markdown(clean)
    (out / "metrics.md").write_text(md)
    return md


# --------------------------------------------------------------------------- CLI


def _default_name(source: str) -> str:
    tail = source.rstrip("/").split("/")[-1].split(":")[-1] or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", tail)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description="Evaluate a CLIP-style model on a manifest's test split.")
    p.add_argument("model", help="engine model source: shipped name, hf-hub:org/repo or local-dir:/path")
    p.add_argument("--manifest", default="runs/manifest.jsonl")
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--out", default=None, help="output folder (default runs/eval/<model name>)")
    p.add_argument("--split", default="test")
    p.add_argument("--tasks", nargs="+", default=None, help="task names (space or comma separated); default all")
    p.add_argument("--probe", action="store_true", help="linear probe at 1/10/100%% of train, and few-shot curves")
    p.add_argument("--probe-max-train", type=int, default=None, help="cap the train images per task for the probe")
    p.add_argument("--pointing", action="store_true", help="pointing game on CT organ masks")
    p.add_argument("--pointing-max", type=int, default=POINTING_MAX, help="slice/organ pairs (default %(default)s)")
    p.add_argument("--pointing-tolerance", type=float, default=0.0, help="pixels (model image) a hit may miss the mask by")
    p.add_argument("--max-per-task", type=int, default=None, help="stratified cap on each task's test rows (smoke runs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--exact", action="store_true", help="fp32 forwards (skip the engine's fast inference path)")
    p.add_argument("--ood", action="store_true", help="the out-of-distribution evaluation (training.ood) instead of the manifest's splits")
    args = p.parse_args(argv)
    if args.tasks:
        args.tasks = [t for item in args.tasks for t in item.split(",") if t.strip()]
    return args


# The command-line settings metrics.json records, in its order, each with the evaluate() keyword it
# is passed as (None: not an evaluate() option; --exact picks the model's inference path instead).
RECORDED_SETTINGS = {
    "tasks": "task_names",
    "probe": "do_probe",
    "probe_max_train": "probe_max_train",
    "pointing": "do_pointing",
    "pointing_max": "pointing_max",
    "pointing_tolerance": "pointing_tolerance",
    "max_per_task": "max_per_task",
    "batch_size": "batch_size",
    "exact": None,
}


def read_manifest_or_usage(manifest: Path) -> list[Row]:
    """The manifest's rows; a malformed manifest is a UsageError (one line, exit 2), not a traceback."""
    try:
        return read_manifest(manifest)
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"manifest {manifest} is malformed: {exc}") from None


def load_model_or_usage(source: str, **options: Any):
    """engine.models.load_model(source, **options); any failure is a UsageError naming its first line."""
    try:
        from engine.models import load_model

        return load_model(source, **options)
    except Exception as exc:
        raise UsageError(f"cannot load model {source!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def run_header(model, split: str, manifest: Path, rows: Sequence[Row]) -> dict[str, Any]:
    """What a results file records about its run: inference path, split, manifest (path, sha256, rows), date and CPU."""
    return {
        "inference_path": getattr(getattr(model, "path", None), "name", "fp32"),
        "split": split,
        "manifest": {"path": str(manifest), "sha256": file_sha256(manifest), "rows": len(rows)},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_profile().model,
    }


def run(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    t0 = time.perf_counter()
    manifest = Path(args.manifest)
    if not manifest.is_file():
        raise UsageError(f"manifest {manifest} not found (build one with the recipes in training/recipes)")
    rows = read_manifest_or_usage(manifest)
    model = load_model_or_usage(args.model, fast=not args.exact)
    options = {keyword: getattr(args, name) for name, keyword in RECORDED_SETTINGS.items() if keyword}
    body = evaluate(model, rows, args.data_root, split=args.split, **options)
    res = {
        "model": model.model_id,
        "source": args.model,
        **run_header(model, args.split, manifest, rows),
        "settings": {name: getattr(args, name) for name in RECORDED_SETTINGS},
        **body,
    }
    res["wall_s"] = time.perf_counter() - t0
    out_dir = Path(args.out) if args.out else Path("runs/eval") / _default_name(args.model)
    md = write_outputs(res, out_dir)
    res["out"] = str(out_dir)
    return res, md


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ood:
        from training import ood

        out = args.out or Path("runs/ood") / _default_name(args.model)
        return print_report(lambda: ood.run(args.model, data_root=args.data_root, out=out, exact=args.exact))
    return print_report(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
