"""`python -m training.qa_baseline`: the zero-shot CLIP model answering the QA manifest's closed 2D questions.

    python -m training.qa_baseline --manifest runs/qa/manifest.jsonl --data-root ../shared/data \\
        --out runs/qa/clip_baseline.json [--model medlens-clip] [--split test] [--max-per-dataset N]

The yardstick for the Q-Former: the same test questions, answered by the
shipped 2D CLIP model through the engine's zero-shot machinery (prompt
ensembles, the model's logit scale), exactly as training/evaluate.py scores
its tasks, and with its helpers (EmbeddingCache, text embeddings, softmax).

Design decisions
- A question is answered by ranking the zero-shot classes of the
  training/tasks.py task it follows: "is there pneumonia?" -> "yes" when
  pneumonia is the top class of the pneumonia task's (normal, pneumonia);
  "is the lesion malignant?" -> "yes" when malignant tops BUSI's (normal,
  benign, malignant); multi-class questions (BUSI diagnosis, HAM10000
  diagnosis, LC25000 tissue type) answer the argmax class. Binary answers
  are the argmax (a user sees the top label), not a tuned threshold.
- Questions with no task get the nearest zero-shot equivalent, stated in
  the table's `rule`: NIH findings -> (normal, finding) with the X-ray
  prompts; "any abnormality?" -> nih_abnormal; DR grade -> the five grades;
  maculopathy -> (no maculopathy, diabetic maculopathy); melanoma on non-
  nevus HAM lesions -> melanoma tops the 7 HAM classes; modality -> the
  modality task; "is this a CT?" -> the modality task's top class is CT;
  organ presence on CT slices -> present/absent prompt pair (CT-CLIP style,
  as evaluate.py's ct_organs). Plane and body-region questions have no
  zero-shot counterpart in tasks.py and are not scored.
- Every image is embedded once at the engine's 448 px model image; the
  model runs exact fp32 by default (`--fast` for the engine's fast path),
  as the model card's evaluation does (training/shipped.json: --exact).
- Each row's "majority" accuracy (always answering the group's most common
  true answer) is reported beside it: on skewed questions it is the number
  to beat.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engine.ask.questions import vocabulary
from training import metrics
from training.evaluate import IMAGE_SIZE, EmbeddingCache, _softmax, _text_embeddings, file_sha256
from training.manifest import PixelLoader
from training.qa_data import QARow, read_qa_manifest
from training.tasks import DR_GRADES, HAM_DX, MODALITY_LABELS, MULTICLASS, MULTILABEL, TASKS, Task

SUMMARY_DATASETS = ("pneumoniamnist", "busi", "lc25000_lung", "ham10000", "fundus_dr", "nih_cxr14", "ct_organs", "*")


def _task(name: str, classes: tuple[str, ...], prompts: str, kind: str = MULTICLASS) -> Task:
    return Task(name, ("*",), kind, classes, prompts)


NIH_TASK = {f: _task(f"nih_{f}", ("normal", f), "xray") for f in vocabulary()["nih_findings"]}
DR_TASK = _task("dr_grade", tuple(DR_GRADES), "fundus")
MACULOPATHY_TASK = _task("maculopathy", ("no maculopathy", "diabetic maculopathy"), "fundus")
CT_ORGAN_TASK = Task("ct_organs", ("*",), MULTILABEL, tuple(vocabulary()["organs"]["ct"]), "ct")
MODALITY_ANSWER = {code: vocabulary()["manifest_modality"][code] for code in MODALITY_LABELS}  # "mr" -> "mri"


class Scorer:
    """Zero-shot class probabilities per image for each task, computed once per task."""

    def __init__(self, model, cache: EmbeddingCache):
        self.model = model
        self.cache = cache
        self._text: dict[str, np.ndarray] = {}
        self._pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def probs(self, task: Task, row_id: str) -> np.ndarray:
        if task.name not in self._text:
            self._text[task.name] = _text_embeddings(self.model, task)
        logits = float(self.model.logit_scale) * (self.cache.vectors[row_id][None, :] @ self._text[task.name].T)
        return _softmax(logits)[0]

    def top(self, task: Task, row_id: str) -> str:
        return task.classes[int(np.argmax(self.probs(task, row_id)))]

    def present(self, organ: str, row_id: str) -> bool:
        if CT_ORGAN_TASK.name not in self._pairs:
            self._pairs[CT_ORGAN_TASK.name] = _text_embeddings(self.model, CT_ORGAN_TASK, pair=True)
        present, absent = self._pairs[CT_ORGAN_TASK.name]
        j = CT_ORGAN_TASK.classes.index(organ)
        emb = self.cache.vectors[row_id]
        return float(emb @ present[j]) > float(emb @ absent[j])


def rule_for(row: QARow, item: dict[str, Any]) -> tuple[str, str, Callable[[Scorer, str], str]] | None:
    """(group name, rule text, answer function) for a closed 2D question the baseline can answer."""
    fam, task = item["family"], item.get("task")
    slots = item.get("slots", {})
    yn = lambda b: "yes" if b else "no"  # noqa: E731
    if fam == "finding_yes_no" and task in ("pneumonia", "busi_malignant", "ham_melanoma", "fundus_referable"):
        t = TASKS[task]
        return (
            f"{row.dataset}: {slots['finding']}? ({task})",
            f"top class of {task} in {sorted(t.positive)}",
            lambda s, rid: yn(s.top(t, rid) in t.positive),
        )
    if fam == "finding_yes_no" and row.dataset == "ham10000" and slots.get("finding") == "melanoma":
        t = TASKS["ham7"]
        return ("ham10000: melanoma? (other lesions)", "melanoma tops the 7 HAM classes", lambda s, rid: yn(s.top(t, rid) == HAM_DX["mel"]))
    if fam == "finding_yes_no" and row.dataset == "fundus_dr" and slots.get("finding") == "diabetic maculopathy":
        return (
            "fundus_dr: maculopathy?",
            "top of (no maculopathy, diabetic maculopathy)",
            lambda s, rid: yn(s.top(MACULOPATHY_TASK, rid) == "diabetic maculopathy"),
        )
    if fam == "finding_yes_no" and row.dataset == "nih_cxr14":
        t = NIH_TASK[slots["finding"]]
        return (
            "nih_cxr14: <finding>? (14 NIH findings)",
            "finding tops (normal, finding), X-ray prompts",
            lambda s, rid: yn(s.top(t, rid) != "normal"),
        )
    if fam == "abnormality" and task == "nih_abnormal":
        t = TASKS["nih_abnormal"]
        return (
            "nih_cxr14: any abnormality? (nih_abnormal)",
            "abnormal tops (normal, abnormal)",
            lambda s, rid: yn(s.top(t, rid) == "abnormal"),
        )
    if fam in ("diagnosis", "tissue_type") and task in ("busi_malignant", "ham7", "lc25000"):
        t = TASKS[task]
        return (f"{row.dataset}: {fam} ({task}, {len(t.classes)} classes)", f"argmax of {task}'s classes", lambda s, rid: s.top(t, rid))
    if fam == "dr_grade":
        return ("fundus_dr: DR grade (5 grades)", "argmax of the 5 DR grades", lambda s, rid: s.top(DR_TASK, rid))
    if fam == "modality":
        t = TASKS["modality"]
        label_to_answer = {MODALITY_LABELS[c]: MODALITY_ANSWER[c] for c in MODALITY_LABELS}
        return ("all: modality (7)", "argmax of the modality task", lambda s, rid: label_to_answer[s.top(t, rid)])
    if fam == "modality_check":
        t = TASKS["modality"]
        label_to_answer = {MODALITY_LABELS[c]: MODALITY_ANSWER[c] for c in MODALITY_LABELS}
        asked = slots["modality"]
        return (
            "all: is this a <modality>?",
            "the modality task's top class is the one asked",
            lambda s, rid: yn(label_to_answer[s.top(t, rid)] == asked),
        )
    if fam == "organ_presence" and row.modality == "ct" and slots.get("organ") in CT_ORGAN_TASK.classes:
        organ = slots["organ"]
        return (
            "ct_organs: organ present? (slices)",
            "cos(present prompts) > cos(absent prompts), CT prompts",
            lambda s, rid: yn(s.present(organ, rid)),
        )
    return None


def _subsample(rows: list[QARow], limit: int | None, seed: int = 0) -> list[QARow]:
    """At most `limit` rows per dataset, a seeded random subset (None: all)."""
    if not limit:
        return rows
    rng = np.random.default_rng(seed)
    by: dict[str, list[QARow]] = defaultdict(list)
    for r in rows:
        by[r.dataset].append(r)
    keep = set()
    for rs in by.values():
        idx = rng.permutation(len(rs))[:limit]
        keep |= {rs[i].id for i in idx}
    return [r for r in rows if r.id in keep]


def baseline(
    model, rows: list[QARow], data_root: str | Path, *, batch_size: int = 32, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Accuracy of the zero-shot answers per question group (module docstring), plus per-dataset totals."""
    plan = [
        (r, item, rule)
        for r in rows
        if r.kind == "image"
        for item in r.qa
        if item["closed"]
        for rule in [rule_for(r, item)]
        if rule is not None
    ]
    needed = {r.id: r.manifest_row() for r, _i, _rule in plan}
    loader = PixelLoader(data_root, size=IMAGE_SIZE)
    cache = EmbeddingCache(model, loader, batch_size=batch_size, log=log)
    cache.embed(list(needed.values()), "QA test")
    scorer = Scorer(model, cache)
    groups: dict[str, dict[str, Any]] = {}
    for row, item, (name, rule, answer) in plan:
        if row.id not in cache.vectors:
            continue
        g = groups.setdefault(name, {"rule": rule, "truth": [], "pred": [], "datasets": set()})
        g["truth"].append(item["answer"])
        g["pred"].append(answer(scorer, row.id))
        g["datasets"].add(row.dataset)
    table: dict[str, Any] = {}
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name in sorted(groups):
        g = groups[name]
        truth, pred = np.asarray(g["truth"]), np.asarray(g["pred"])
        codes = {a: i for i, a in enumerate(sorted(set(truth) | set(pred)))}
        t, p = np.asarray([codes[a] for a in truth]), np.asarray([codes[a] for a in pred])
        values, counts = np.unique(truth, return_counts=True)
        lo, hi, _n = metrics.bootstrap_ci(t, p, "accuracy")
        table[name] = {
            "n": int(truth.size),
            "accuracy": metrics.accuracy(t, p),
            "accuracy_ci95": [lo, hi],
            "balanced_accuracy": metrics.balanced_accuracy(t, p),
            "majority_accuracy": float(counts.max() / truth.size),
            "majority_answer": str(values[counts.argmax()]),
            "rule": g["rule"],
            "datasets": sorted(g["datasets"]),
        }
        if set(codes) <= {"yes", "no"}:
            table[name]["true_yes_rate"] = float(np.mean(truth == "yes"))
            table[name]["pred_yes_rate"] = float(np.mean(pred == "yes"))
        for d in g["datasets"]:
            if not name.startswith("all:"):
                totals[d][0] += int((truth == pred).sum())
                totals[d][1] += int(truth.size)
    per_dataset = {d: {"n": n, "accuracy": c / n} for d, (c, n) in sorted(totals.items())}
    return {
        "groups": table,
        "per_dataset": per_dataset,
        "images": len(cache.vectors),
        "errors": len(cache.errors),
        "embed_seconds": cache.seconds,
    }


def to_markdown(res: dict[str, Any]) -> str:
    lines = [
        f"# Zero-shot CLIP baseline on the QA {res['split']} questions",
        "",
        f"Model `{res['model']}`, {res['images']} images embedded at {IMAGE_SIZE} px; {res['subsample']}.",
        "",
        "| question group | n | accuracy (95% CI) | balanced acc. | majority acc. | rule |",
        "|---|---|---|---|---|---|",
    ]
    for name, g in res["groups"].items():
        ci = g["accuracy_ci95"]
        lines.append(
            f"| {name} | {g['n']} | {g['accuracy']:.3f} ({ci[0]:.3f}-{ci[1]:.3f}) | {g['balanced_accuracy']:.3f} | "
            f"{g['majority_accuracy']:.3f} ({g['majority_answer']}) | {g['rule']} |"
        )
    lines += [
        "",
        "Per dataset (all scored closed questions of the dataset, modality questions excluded):",
        "",
        "| dataset | n | accuracy |",
        "|---|---|---|",
    ]
    lines += [f"| {d} | {v['n']} | {v['accuracy']:.3f} |" for d, v in res["per_dataset"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.qa_baseline", description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", default="runs/qa/manifest.jsonl", type=Path)
    p.add_argument("--data-root", required=True, type=Path)
    p.add_argument("--out", default="runs/qa/clip_baseline.json", type=Path, help="JSON table (a .md beside it)")
    p.add_argument("--model", default="medlens-clip", help="engine model source (default: the shipped model)")
    p.add_argument("--split", default="test")
    p.add_argument("--max-per-dataset", type=int, default=None, help="seeded subsample of image rows per dataset")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--fast", action="store_true", help="the engine's fast inference path instead of exact fp32")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if not args.manifest.is_file():
        print(f"error: manifest {args.manifest} not found (python -m training.recipes.qa builds it)", file=sys.stderr)
        return 2
    rows = _subsample(read_qa_manifest(args.manifest, splits=[args.split], kinds=["image"]), args.max_per_dataset)
    if not rows:
        print(f"error: no image rows in split {args.split!r}", file=sys.stderr)
        return 2
    from engine.models import load_model

    model = load_model(args.model, fast=args.fast)
    body = baseline(model, rows, args.data_root, batch_size=args.batch_size, log=lambda m: print(m, file=sys.stderr, flush=True))
    res = {
        "model": model.model_id,
        "source": args.model,
        "split": args.split,
        "fast": args.fast,
        "manifest": {"path": str(args.manifest), "sha256": file_sha256(args.manifest)},
        "subsample": f"at most {args.max_per_dataset} image rows per dataset (seeded)"
        if args.max_per_dataset
        else "all image rows of the split",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **body,
    }
    res["wall_s"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, sort_keys=False) + "\n")
    md = to_markdown(res)
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
