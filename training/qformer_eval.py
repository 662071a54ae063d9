"""Evaluate a Q-Former checkpoint on the held-out splits of a QA manifest.

    python -m training.qformer_eval runs/qformer/best --qa-manifest runs/qa/manifest.jsonl \\
        --data-root ../shared/data --out runs/qformer_eval [--clip-model medlens-clip]

Reports (results.json + results.md):
- 3D: organ-presence yes/no accuracy on crops of the held-out CT subject
  (and balanced accuracy: the recipe balances yes and no, but say it);
  modality and body-region answers on every held-out volume crop, and on
  each held-out volume as a whole; per-organ AUC over the held-out crops
  from (a) the Q-Former's 3D zero-shot labels (ITC similarity), (b) its
  P("yes") to "is the <organ> visible?", beside (c) the 2D CLIP model's
  slice aggregation (engine.zeroshot.label_scan, mean over axial slices) on
  the same crops.
- 2D: closed-question accuracy per test split, answers ranked as at
  inference, on exactly the items the CLIP baseline answers
  (training/qa_baseline.py, the items with a `task`); open questions by
  exact match of the normalised answer.
- The MedPix sample's 60 questions end to end through `AskModel.ask` (a
  smoke figure: 6 images, answers written from captions).

Design decision: held-out rows are encoded through the same token cache
as training (same code path as inference, computed once), so evaluating
thousands of questions costs Q-Former time only.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from engine.ask.model import AskModel, load_ask_folder
from engine.ask.questions import normalise_answer, render_question
from training.metrics import binary_auc
from training.qa_baseline import rule_for
from training.qa_data import QARow, load_volume_crop, medpix_items, read_qa_manifest
from training.qformer_cache import TokenCache

FINDING_DATASETS = ("pneumoniamnist", "busi", "lc25000_lung", "ham10000", "fundus_dr")
PRESENCE_TEMPLATE = "Is the {organ} visible?"  # one fixed phrasing for the P(yes) organ scores


def _encoded(model: AskModel, caches: dict[str, TokenCache], row: QARow):
    tokens, grid = caches[row.kind].items[row.id]
    return model.encode_tokens(tokens[None].float(), grid)


def closed_items(model: AskModel, caches, rows: list[QARow]) -> list[dict]:
    """Every closed item of the rows, answered by ranking its candidates."""
    out = []
    for row in rows:
        enc = None
        for item in row.qa:
            if not item["closed"] or not item.get("candidates"):
                continue
            enc = enc or _encoded(model, caches, row)
            ans = model.answer_encoded(enc, item["question"], None, candidates=list(item["candidates"]))
            probs = dict(ans.candidates)
            rule = rule_for(row, item) if row.kind == "image" else None
            out.append({"id": row.id, "dataset": row.dataset, "family": item["family"], "task": item.get("task"),
                        "group": rule[0] if rule else None,
                        "truth": item["answer"], "answer": ans.answer, "correct": ans.answer == item["answer"],
                        "p_yes": probs.get("yes"), "slots": item.get("slots") or {}})
    return out


def open_items(model: AskModel, caches, rows: list[QARow], limit: int) -> list[dict]:
    out = []
    for row in rows:
        for item in row.qa:
            if item["closed"] or len(out) >= limit:
                continue
            enc = _encoded(model, caches, row)
            ans = model.answer_encoded(enc, item["question"], None)
            out.append({"dataset": row.dataset, "family": item["family"], "truth": item["answer"], "answer": ans.answer,
                        "exact": normalise_answer(ans.answer, item["family"]) == normalise_answer(item["answer"], item["family"])})
    return out


def _mean(xs) -> float:
    xs = list(xs)
    return float(np.mean(xs)) if xs else float("nan")


def balanced(items: list[dict]) -> float:
    by = defaultdict(list)
    for it in items:
        by[it["truth"]].append(it["correct"])
    return _mean(_mean(v) for v in by.values())


def organ_truth(row: QARow) -> dict[str, int]:
    """1: clearly in the crop, 0: none of it in the crop (the recipe's organ_status); ambiguous organs left out."""
    status = (row.extra or {}).get("organ_status", {})
    return {organ: int(st == "yes") for organ, st in status.items() if st in ("yes", "no")}


def organ_aucs(model: AskModel, caches, rows: list[QARow], root: str, clip_model: str | None, min_each: int = 3) -> dict:
    truths = {r.id: organ_truth(r) for r in rows}
    organs = sorted({o for t in truths.values() for o in t})
    organs = [o for o in organs if min_each <= sum(t.get(o) == 1 for t in truths.values()) and min_each <= sum(t.get(o) == 0 for t in truths.values())]
    scores: dict[str, dict[str, list[float]]] = {k: defaultdict(list) for k in ("qformer_labels", "qformer_yes", "clip_slices")}
    ys: dict[str, list[int]] = defaultdict(list)
    clip = None
    if clip_model:
        from engine.models import load_model

        clip = load_model(clip_model)
    for row in rows:
        enc = _encoded(model, caches, row)
        truth = truths[row.id]
        present = [o for o in organs if o in truth]
        if not present:
            continue
        texts = model.label_texts_for(row.modality, present)
        with torch.inference_mode():
            sims = model.qformer.similarity(model.qformer.image_embeddings(enc.query_states), model._text_embeddings(texts))[0]
        clip_scores = {}
        if clip is not None:
            from engine.zeroshot.api import label_scan

            result = label_scan(load_volume_crop(root, row, zoom_mode="none"), present, clip, aggregation="mean")
            clip_scores = {s.label: s.score for s in result.labels}
        for o, s in zip(present, sims.tolist()):
            ys[o].append(truth[o])
            scores["qformer_labels"][o].append(s)
            ans = model.answer_encoded(enc, render_question("organ_presence", template=PRESENCE_TEMPLATE, organ=o), None, candidates=["yes", "no"])
            scores["qformer_yes"][o].append(dict(ans.candidates)["yes"])
            if clip_scores:
                scores["clip_slices"][o].append(clip_scores[o])
    out: dict = {"organs": {}, "n_crops": len(rows)}
    for method, per in scores.items():
        aucs = {}
        for o in organs:
            if per.get(o):
                auc, why = binary_auc(ys[o], per[o])
                if why is None:
                    aucs[o] = auc
        out[method] = {"mean_auc": _mean(aucs.values()), "per_organ": aucs}
    out["organs"] = {o: {"present": int(sum(ys[o])), "absent": int(len(ys[o]) - sum(ys[o]))} for o in organs}
    return out


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


def main(argv=None) -> int:
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
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_ask_folder(args.model)
    cache_dir = Path(args.cache) if args.cache else Path(args.model).parent.parent / "qformer_cache"
    rows = read_qa_manifest(args.qa_manifest, splits=["test"])
    caches = {k: TokenCache(cache_dir, k, model.prep, model.image_size, model.config.get("encoder")) for k in ("image", "volume")}
    for c in caches.values():
        c.fill(rows, args.data_root)
    results: dict = {"model": args.model, "split": "test"}

    def save(partial: dict) -> None:  # after each section, so a late failure loses nothing
        (out / "results.json").write_text(json.dumps(partial, indent=2, default=float))

    volumes = [r for r in rows if r.kind == "volume"]
    vol_items = closed_items(model, caches, volumes)
    ct = [it for it in vol_items if it["dataset"].startswith("ct_") and it["family"] == "organ_presence"]
    results["3d"] = {
        "organ_presence_ct": {"n": len(ct), "accuracy": _mean(i["correct"] for i in ct), "balanced_accuracy": balanced(ct)},
        "by_family": {f"{d}/{f}": {"n": len(v), "accuracy": _mean(i["correct"] for i in v)}
                      for (d, f), v in _group(vol_items, ("dataset", "family")).items()},
        "whole_volumes": _whole_volumes(model, caches, volumes),
    }
    ct_rows = [r for r in volumes if r.dataset.startswith("ct_")]
    results["3d"]["organ_auc"] = organ_aucs(model, caches, ct_rows, args.data_root, args.clip_model or None)
    save(results)

    images = [r for r in rows if r.kind == "image"]
    img_items = closed_items(model, caches, images)
    scored = [i for i in img_items if i["group"]]  # exactly the items the CLIP baseline answers, grouped as it does
    results["2d"] = {
        "groups": {g: {"n": len(v), "accuracy": _mean(i["correct"] for i in v)} for (g,), v in _group(scored, ("group",)).items()},
        "per_dataset": {d: {"n": len(v), "accuracy": _mean(i["correct"] for i in v)}
                        for (d,), v in _group([i for i in scored if not i["group"].startswith("all:")], ("dataset",)).items()},
        "by_family": {f"{d}/{f}": {"n": len(v), "accuracy": _mean(i["correct"] for i in v)}
                      for (d, f), v in _group(img_items, ("dataset", "family")).items()},
    }
    baseline = Path(args.clip_baseline)
    if baseline.is_file():
        results["2d"]["clip_baseline"] = json.loads(baseline.read_text())
    save(results)
    opens = open_items(model, caches, images + volumes, args.open_limit)
    results["open"] = {f"{d}/{f}": {"n": len(v), "exact_match": _mean(i["exact"] for i in v)}
                       for (d, f), v in _group(opens, ("dataset", "family")).items()}
    save(results)
    results["medpix"] = medpix(model, args.data_root)
    save(results)
    print(json.dumps({k: v for k, v in results.items() if k != "medpix"}, indent=1, default=float)[:6000])
    print("medpix exact match", results["medpix"]["exact_match"])
    return 0


def _group(items: list[dict], keys: tuple[str, ...]) -> dict:
    by = defaultdict(list)
    for it in items:
        by[tuple(it[k] for k in keys)].append(it)
    return dict(sorted(by.items()))


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
            out.append({"subject": row.subject, "dataset": row.dataset, "family": family, "truth": item["answer"],
                        "answer": ans.answer, "confidence": round(ans.confidence, 3), "correct": ans.answer == item["answer"]})
    return out


if __name__ == "__main__":
    raise SystemExit(main())
