"""Evaluate a Q-Former checkpoint on the held-out splits of a QA manifest.

    python -m training.qformer_eval runs/qformer/best --qa-manifest runs/qa/manifest.jsonl \\
        --data-root ../shared/data --out runs/qformer_eval [--clip-model medlens-clip]

Reports (results.json + items.jsonl, one line per scored closed question):
- 3D: organ-presence yes/no accuracy on crops of the held-out CT subject
  (ts-ct-a, the subject whose reformats are real images; and balanced
  accuracy: the recipe balances yes and no, but say it); modality and
  body-region answers on every held-out volume crop, and on each held-out
  volume as a whole; per-organ AUC over the held-out crops from (a) the
  Q-Former's 3D zero-shot labels (ITC similarity), (b) its P("yes") to "is
  the <organ> visible?", beside (c) the 2D CLIP model's slice aggregation
  (engine.zeroshot.label_scan, mean over axial slices) on the same crops;
  mean AUCs with a bootstrap interval over crops.
- 2D: closed-question accuracy per test split, answers ranked as at
  inference, on exactly the items the CLIP baseline answers
  (training/qa_baseline.py, the items with a `task`), each with a 95 %
  bootstrap interval; open questions by exact match of the normalised
  answer.
- Calibration of the closed answers (training/qformer_trust.py fits it on
  the val split): ECE and reliability tables on the test split, raw and
  calibrated, per question family and over all closed answers.
- Out-of-distribution flags (when the checkpoint carries a reference set):
  the share flagged per held-out dataset and on real files from outside
  every training source (training/qformer_trust.py: FOREIGN_FILES).
- The MedPix sample's 60 questions end to end through `AskModel.ask` (a
  smoke figure: 6 images, answers written from captions).

Design decision: held-out rows are encoded through the same token cache
as training (same code path as inference, computed once), so evaluating
thousands of questions costs Q-Former time only. A closed question's
candidates are scored once by `AskModel._candidate_scores` (the very
arithmetic the app ranks with); the answer, its probabilities and the
calibrated probabilities all derive from those scores.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from engine.ask import prompting
from engine.ask.model import AskModel
from engine.ask.questions import normalise_answer, render_question
from training import metrics
from training.qa_baseline import rule_for
from training.qa_data import QARow, load_volume_crop, medpix_items, read_qa_manifest
from training.qformer_cache import TokenCache, open_exported

FINDING_DATASETS = ("pneumoniamnist", "busi", "lc25000_lung", "ham10000", "fundus_dr")
PRESENCE_TEMPLATE = "Is the {organ} visible?"  # one fixed phrasing for the P(yes) organ scores
HELD_OUT_CT = "ts-ct-a"
RELIABILITY_BINS = 10


def _encoded(model: AskModel, caches: dict[str, TokenCache], row: QARow):
    tokens, grid = caches[row.kind].get(row)
    return model.encode_tokens(tokens[None].float(), grid)


class Scored(NamedTuple):
    scores: np.ndarray  # the candidates' mean token log-likelihoods, as AskModel ranks them
    probabilities: np.ndarray  # softmax of the scores (the uncalibrated probabilities the app shows today)


def score_candidates(model: AskModel, enc, question: str, candidates: list[str]) -> Scored:
    scores = np.asarray(model._candidate_scores(enc, prompting.qa_prompt(question), candidates), dtype=np.float64)
    p = np.exp(scores - scores.max())
    return Scored(scores, p / p.sum())


def closed_items(model: AskModel, caches, rows: list[QARow]) -> list[dict]:
    """Every closed item of the rows, answered by ranking its candidates (scores kept for calibration)."""
    out = []
    for row in rows:
        enc = None
        for item in row.qa:
            if not item["closed"] or not item.get("candidates"):
                continue
            enc = enc or _encoded(model, caches, row)
            cands = list(item["candidates"])
            scored = score_candidates(model, enc, item["question"], cands)
            best = int(np.argmax(scored.probabilities))
            rule = rule_for(row, item) if row.kind == "image" else None
            out.append(
                {
                    "id": row.id,
                    "dataset": row.dataset,
                    "kind": row.kind,
                    "subject": row.subject,
                    "family": item["family"],
                    "task": item.get("task"),
                    "group": rule[0] if rule else None,
                    "truth": item["answer"],
                    "answer": cands[best],
                    "correct": cands[best] == item["answer"],
                    "candidates": cands,
                    "truth_index": cands.index(item["answer"]),
                    "scores": [round(float(s), 5) for s in scored.scores],
                    "p_yes": float(scored.probabilities[cands.index("yes")]) if "yes" in cands else None,
                    "slots": item.get("slots") or {},
                }
            )
    return out


def open_items(model: AskModel, caches, rows: list[QARow], limit: int) -> list[dict]:
    out = []
    for row in rows:
        for item in row.qa:
            if item["closed"] or len(out) >= limit:
                continue
            enc = _encoded(model, caches, row)
            ans = model.answer_encoded(enc, item["question"], None)
            out.append(
                {
                    "dataset": row.dataset,
                    "family": item["family"],
                    "truth": item["answer"],
                    "answer": ans.answer,
                    "exact": normalise_answer(ans.answer, item["family"]) == normalise_answer(item["answer"], item["family"]),
                }
            )
    return out


def _mean(xs) -> float:
    xs = list(xs)
    return float(np.mean(xs)) if xs else float("nan")


def balanced(items: list[dict]) -> float:
    by = defaultdict(list)
    for it in items:
        by[it["truth"]].append(it["correct"])
    return _mean(_mean(v) for v in by.values())


def accuracy_summary(items: list[dict]) -> dict:
    """n, accuracy and its 95 % percentile-bootstrap interval over the items."""
    correct = np.array([int(i["correct"]) for i in items])
    lo, hi, _ = metrics.bootstrap_ci(np.ones_like(correct), correct, "accuracy") if len(correct) else (float("nan"),) * 3
    return {"n": len(items), "accuracy": _mean(correct), "ci95": [lo, hi]}


def _group(items: list[dict], keys: tuple[str, ...]) -> dict:
    by = defaultdict(list)
    for it in items:
        by[tuple(it[k] for k in keys)].append(it)
    return dict(sorted(by.items()))


# --------------------------------------------------------------------------- 3D organ AUCs
def organ_truth(row: QARow) -> dict[str, int]:
    """1: clearly in the crop, 0: none of it in the crop (the recipe's organ_status); ambiguous organs left out."""
    status = (row.extra or {}).get("organ_status", {})
    return {organ: int(st == "yes") for organ, st in status.items() if st in ("yes", "no")}


def scoreable_organs(truths: dict[str, dict[str, int]], min_each: int = 3) -> list[str]:
    organs = sorted({o for t in truths.values() for o in t})
    return [
        o
        for o in organs
        if min_each <= sum(t.get(o) == 1 for t in truths.values()) and min_each <= sum(t.get(o) == 0 for t in truths.values())
    ]


def _clip_scores(clip, root: str, row: QARow, present: list[str]) -> dict[str, float]:
    if clip is None:
        return {}
    from engine.zeroshot.api import label_scan

    result = label_scan(load_volume_crop(root, row, zoom_mode="none"), present, clip, aggregation="mean")
    return {s.label: s.score for s in result.labels}


def organ_records(model: AskModel, caches, rows: list[QARow], root: str, clip_model: str | None, organs: list[str]) -> list[dict]:
    """Per (crop, organ): the truth and the three methods' scores."""
    clip = None
    if clip_model:
        from engine.models import load_model

        clip = load_model(clip_model)
    records = []
    for crop, row in enumerate(rows):
        truth = organ_truth(row)
        present = [o for o in organs if o in truth]
        if not present:
            continue
        enc = _encoded(model, caches, row)
        with torch.inference_mode():
            text = model._text_embeddings(model.label_texts_for(row.modality, present))
            sims = model.qformer.similarity(model.qformer.image_embeddings(enc.query_states), text)[0].tolist()
        clip_scores = _clip_scores(clip, root, row, present)
        for o, s in zip(present, sims):
            question = render_question("organ_presence", template=PRESENCE_TEMPLATE, organ=o)
            p_yes = float(score_candidates(model, enc, question, ["yes", "no"]).probabilities[0])
            records.append(
                {
                    "crop": crop,
                    "organ": o,
                    "y": truth[o],
                    "qformer_labels": s,
                    "qformer_yes": p_yes,
                    **({"clip_slices": clip_scores[o]} if o in clip_scores else {}),
                }
            )
    return records


def mean_organ_auc(records: list[dict], method: str, organs: list[str]) -> tuple[float, dict[str, float]]:
    aucs = {}
    for o in organs:
        pairs = [(r["y"], r[method]) for r in records if r["organ"] == o and method in r]
        if pairs:
            auc, why = metrics.binary_auc([p[0] for p in pairs], [p[1] for p in pairs])
            if why is None:
                aucs[o] = auc
    return _mean(aucs.values()), aucs


def organ_auc_ci(records: list[dict], method: str, organs: list[str], n_resamples: int = 300, seed: int = 0) -> list[float]:
    """95 % percentile-bootstrap interval of the mean organ AUC, resampling crops (an organ's crops move together)."""
    crops = sorted({r["crop"] for r in records})
    by_crop = defaultdict(list)
    for r in records:
        by_crop[r["crop"]].append(r)
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_resamples):
        sample = [dict(r, crop=i) for i, c in enumerate(rng.choice(crops, len(crops))) for r in by_crop[c]]
        value, _ = mean_organ_auc(sample, method, organs)
        if np.isfinite(value):
            stats.append(value)
    return [float(np.quantile(stats, 0.025)), float(np.quantile(stats, 0.975))] if stats else [float("nan"), float("nan")]


def organ_aucs(model: AskModel, caches, rows: list[QARow], root: str, clip_model: str | None, min_each: int = 3) -> dict:
    organs = scoreable_organs({r.id: organ_truth(r) for r in rows}, min_each)
    records = organ_records(model, caches, rows, root, clip_model, organs)
    out: dict = {"n_crops": len(rows), "organs": {}}
    for method in ("qformer_labels", "qformer_yes", "clip_slices"):
        mean, per = mean_organ_auc(records, method, organs)
        out[method] = {"mean_auc": mean, "per_organ": per, "ci95": organ_auc_ci(records, method, organs) if per else [None, None]}
    for o in organs:
        ys = [r["y"] for r in records if r["organ"] == o]
        out["organs"][o] = {"present": int(sum(ys)), "absent": int(len(ys) - sum(ys))}
    return out


# --------------------------------------------------------------------------- calibration and OOD on the test split
def calibration_section(model: AskModel, items: list[dict]) -> dict:
    """ECE and reliability tables of the closed answers, raw and with the checkpoint's fitted temperatures."""
    from training.qformer_trust import calibration_report, closed_calibration

    return calibration_report(closed_calibration(model.config), items, bins=RELIABILITY_BINS)


def ood_section(model: AskModel, caches, rows: list[QARow], folder: Path) -> dict | None:
    from training.qformer_trust import foreign_flags, held_out_flags, load_reference

    reference = load_reference(folder)
    if reference is None:
        return None
    return {"held_out": held_out_flags(model, caches, rows, reference), "foreign": foreign_flags(model, reference)}


def medpix(model: AskModel, root: str) -> dict:
    from engine.io import load_one

    items = medpix_items(root)
    rows, exact, start = [], 0, time.time()
    for it in items:
        scan, _ = load_one([str(it.image)])
        ans = model.ask(scan, it.question, with_evidence=False)
        hit = normalise_answer(ans.answer) == normalise_answer(it.answer)
        exact += hit
        rows.append({"question": it.question, "answer": ans.answer, "truth": it.answer[:120], "exact": hit})
    return {"n": len(items), "exact_match": exact / max(1, len(items)), "seconds": round(time.time() - start, 1), "items": rows}


# --------------------------------------------------------------------------- sections
def section_3d(model: AskModel, caches, volumes: list[QARow], root: str, clip_model: str | None) -> tuple[dict, list[dict]]:
    items = closed_items(model, caches, volumes)
    ct = [it for it in items if it["dataset"].startswith("ct_") and it["family"] == "organ_presence"]
    result = {
        "held_out_ct_subject": HELD_OUT_CT,
        "organ_presence_ct": {**accuracy_summary(ct), "balanced_accuracy": balanced(ct)},
        "by_family": {f"{d}/{f}": accuracy_summary(v) for (d, f), v in _group(items, ("dataset", "family")).items()},
        "whole_volumes": _whole_volumes(model, caches, volumes),
        "organ_auc": organ_aucs(model, caches, [r for r in volumes if r.dataset.startswith("ct_")], root, clip_model),
    }
    return result, items


def section_2d(model: AskModel, caches, images: list[QARow], baseline: Path) -> tuple[dict, list[dict]]:
    items = closed_items(model, caches, images)
    scored = [i for i in items if i["group"]]  # exactly the items the CLIP baseline answers, grouped as it does
    result = {
        "groups": {g: accuracy_summary(v) for (g,), v in _group(scored, ("group",)).items()},
        "per_dataset": {
            d: accuracy_summary(v) for (d,), v in _group([i for i in scored if not i["group"].startswith("all:")], ("dataset",)).items()
        },
        "by_family": {f"{d}/{f}": accuracy_summary(v) for (d, f), v in _group(items, ("dataset", "family")).items()},
    }
    if baseline.is_file():
        result["clip_baseline"] = json.loads(baseline.read_text())
    return result, items


def _whole_volumes(model: AskModel, caches, volumes: list[QARow]) -> list[dict]:
    """Modality and body region of each held-out volume's whole-volume row (the recipe's first crop is the whole volume)."""
    out = []
    seen = set()
    for row in volumes:
        if row.subject in seen or not row.id.endswith("crop000"):
            continue
        seen.add(row.subject)
        enc = _encoded(model, caches, row)
        for family in ("modality", "body_region"):
            item = next((i for i in row.qa if i["family"] == family), None)
            if item is None:
                continue
            ans = model.answer_encoded(enc, item["question"], None, candidates=list(item["candidates"]))
            out.append(
                {
                    "subject": row.subject,
                    "dataset": row.dataset,
                    "family": family,
                    "truth": item["answer"],
                    "answer": ans.answer,
                    "confidence": round(ans.confidence, 3),
                    "correct": ans.answer == item["answer"],
                }
            )
    return out


def write_items(path: Path, items: list[dict]) -> None:
    from training.config import write_jsonl

    write_jsonl(path, items)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--qa-manifest", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--cache", default=None)
    p.add_argument("--clip-model", default="medlens-clip", help="2D slice-aggregation baseline ('' to skip)")
    p.add_argument("--clip-baseline", default="runs/qa/clip_baseline.json", help="training/qa_baseline.py output")
    p.add_argument("--open-limit", type=int, default=300)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--skip-medpix", action="store_true", help="leave out the MedPix smoke run")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache) if args.cache else Path(args.model).parent.parent / "qformer_cache"
    model, caches = open_exported(args.model, cache_dir, args.threads)
    rows = read_qa_manifest(args.qa_manifest, splits=["test"])
    for c in caches.values():
        c.fill(rows, args.data_root)
    results: dict = {"model": args.model, "split": "test"}

    def save(partial: dict) -> None:  # after each section, so a late failure loses nothing
        (out / "results.json").write_text(json.dumps(partial, indent=2, default=float))

    volumes, images = [r for r in rows if r.kind == "volume"], [r for r in rows if r.kind == "image"]
    results["3d"], vol_items = section_3d(model, caches, volumes, args.data_root, args.clip_model or None)
    save(results)
    results["2d"], img_items = section_2d(model, caches, images, Path(args.clip_baseline))
    write_items(out / "items.jsonl", vol_items + img_items)
    results["calibration"] = calibration_section(model, vol_items + img_items)
    save(results)
    results["ood"] = ood_section(model, caches, rows, Path(args.model))
    opens = open_items(model, caches, images + volumes, args.open_limit)
    results["open"] = {
        f"{d}/{f}": {"n": len(v), "exact_match": _mean(i["exact"] for i in v)} for (d, f), v in _group(opens, ("dataset", "family")).items()
    }
    save(results)
    if not args.skip_medpix:
        results["medpix"] = medpix(model, args.data_root)
        save(results)
    print(json.dumps({k: v for k, v in results.items() if k not in ("medpix", "calibration")}, indent=1, default=float)[:6000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
