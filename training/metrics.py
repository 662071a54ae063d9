"""Evaluation metrics: pure functions of numpy arrays (no model, no I/O).

Design decisions
- AUC comes from scikit-learn's `roc_auc_score` (the reference everyone
  quotes); when y_true holds one class the AUC is undefined, so the value is
  NaN *with a reason string*, never an exception: one degenerate subset must
  not stop a whole evaluation run.
- The bootstrap re-computes AUC with a rank formula (Mann-Whitney U, ties
  averaged: the same number sklearn gives) because 1000 calls of
  `roc_auc_score` spend most of their time validating inputs.
  Percentile interval, fixed seed, resamples with one class left out are
  skipped (and counted), so the interval is reproducible run to run.
- Balanced accuracy is the mean recall over the classes present in y_true
  (sklearn's definition): a class absent from the test set neither helps nor
  hurts.
- Retrieval uses the CLIP-paper convention: "recall@k" is the fraction of
  queries with at least one relevant item among the top k (a hit rate), not
  the fraction of all relevant items retrieved. Ranking sorts by score,
  descending; ties keep gallery order (stable sort), so results are
  deterministic. Queries without any relevant item in the gallery are left
  out and counted.
- Pointing game (Zhang et al. 2016, as used for CLIP heat maps): a hit when
  the heat map's maximum falls inside the object's mask, optionally within
  `tolerance` pixels (Euclidean) of it; a map with no maximum (constant,
  e.g. all zero) is a miss, since it points nowhere.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

# --------------------------------------------------------------------------- classification


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Fraction of predictions equal to the target; NaN for no samples."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(t == p)) if t.size else float("nan")


def per_class_recall(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[int] | None = None) -> dict[int, tuple[float, int]]:
    """{class: (recall, n)} for the classes present in y_true (or `classes`; absent ones get (NaN, 0)).

    Recall of class c = correct predictions among samples whose target is c
    (the "per-class accuracy" of a multi-class table)."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    keys = sorted(set(t.tolist())) if classes is None else list(classes)
    out = {}
    for c in keys:
        sel = t == c
        n = int(sel.sum())
        out[int(c)] = (float(np.mean(p[sel] == c)) if n else float("nan"), n)
    return out


def balanced_accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Mean per-class recall over the classes present in y_true."""
    recalls = [r for r, n in per_class_recall(y_true, y_pred).values() if n]
    return float(np.mean(recalls)) if recalls else float("nan")


def _one_class_reason(y_true: np.ndarray) -> str | None:
    if y_true.size == 0:
        return "no samples"
    values = np.unique(y_true)
    if values.size < 2:
        return f"only class {int(values[0])} present ({y_true.size} samples): AUC undefined"
    return None


def binary_auc(y_true: Sequence[int], y_score: Sequence[float]) -> tuple[float, str | None]:
    """(ROC AUC, None), or (NaN, reason) when y_true does not hold both 0 and 1."""
    from sklearn.metrics import roc_auc_score

    t = np.asarray(y_true).astype(int)
    reason = _one_class_reason(t)
    if reason:
        return float("nan"), reason
    return float(roc_auc_score(t, np.asarray(y_score, dtype=np.float64))), None


def rank_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """AUC by the Mann-Whitney rank formula (ties averaged): equals roc_auc_score, much cheaper.

    AUC = (sum of the positives' ranks - P(P+1)/2) / (P N). NaN with one class."""
    from scipy.stats import rankdata

    t = np.asarray(y_true).astype(bool)
    n_pos = int(t.sum())
    n_neg = t.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(y_score, dtype=np.float64))
    return float((ranks[t].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_ovr_auc(y_true: Sequence[int], probs: np.ndarray) -> tuple[float, list[int], str | None]:
    """Macro one-vs-rest AUC: the mean over classes c of AUC(y == c, probs[:, c]).

    Only classes with both positives and negatives in y_true count (returned
    as the second item); (NaN, [], reason) when none does. With every class
    present this is sklearn's roc_auc_score(multi_class="ovr", average="macro")."""
    t = np.asarray(y_true).astype(int)
    p = np.asarray(probs, dtype=np.float64)
    used, values = [], []
    for c in range(p.shape[1]):
        y = (t == c).astype(int)
        if 0 < y.sum() < y.size:
            used.append(c)
            values.append(rank_auc(y, p[:, c]))
    if not used:
        return float("nan"), [], "no class has both positive and negative samples"
    return float(np.mean(values)), used, None


def bootstrap_ci(
    y_true: Sequence[int],
    y_value: Sequence[float],
    metric: str | Callable[[np.ndarray, np.ndarray], float] = "auc",
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, int]:
    """Percentile bootstrap interval: (low, high, resamples used).

    metric "auc": y_value are scores, binary y_true; "accuracy": y_value are
    predicted labels; or a callable(y_true, y_value) -> float. Samples are
    drawn with replacement, n at a time, with numpy's default_rng(seed);
    resamples where the metric is NaN (AUC with one class) are dropped.
    (NaN, NaN, 0) when nothing is left."""
    t = np.asarray(y_true)
    v = np.asarray(y_value)
    n = t.size
    if n == 0:
        return float("nan"), float("nan"), 0
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    if metric == "accuracy":
        stats = (t[idx] == v[idx]).mean(axis=1)
    else:
        fn = rank_auc if metric == "auc" else metric
        if not callable(fn):
            raise ValueError(f"unknown bootstrap metric {metric!r}")
        stats = np.array([fn(t[i], v[i]) for i in idx], dtype=np.float64)
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return float("nan"), float("nan"), 0
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi), int(stats.size)


# --------------------------------------------------------------------------- retrieval


def retrieval_at_k(scores: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k and precision@k of a (Q, N) score matrix against a (Q, N) boolean relevance matrix.

    For query q, rank the N gallery items by scores[q] (descending, ties in
    gallery order) and take the top k' = min(k, number of items that may be
    retrieved) -- an item with score -inf is treated as not retrievable (used
    to leave a query image out of its own gallery).
    - recall@k: fraction of queries with at least one relevant item in the top k'.
    - precision@k: mean over queries of (relevant items in the top k') / k'.
    Queries with no relevant item are skipped. Returns {"recall@k": ...,
    "precision@k": ..., "n_queries": used, "n_skipped": skipped}."""
    s = np.asarray(scores, dtype=np.float64)
    rel = np.asarray(relevant, dtype=bool)
    if s.shape != rel.shape or s.ndim != 2:
        raise ValueError(f"scores {s.shape} and relevant {rel.shape} must be the same (Q, N) shape")
    keep = rel.any(axis=1)
    s, rel = s[keep], rel[keep]
    out: dict[str, float] = {"n_queries": int(keep.sum()), "n_skipped": int((~keep).sum())}
    if s.shape[0] == 0:
        for k in ks:
            out[f"recall@{k}"] = out[f"precision@{k}"] = float("nan")
        return out
    order = np.argsort(-s, axis=1, kind="stable")
    ranked_rel = np.take_along_axis(rel, order, axis=1)
    available = np.isfinite(s).sum(axis=1)  # -inf items (the query itself) cannot be retrieved
    for k in ks:
        kk = np.minimum(k, available).clip(min=1)
        top = np.arange(s.shape[1])[None, :] < kk[:, None]
        hits = (ranked_rel & top).sum(axis=1)
        out[f"recall@{k}"] = float(np.mean(hits > 0))
        out[f"precision@{k}"] = float(np.mean(hits / kk))
    return out


def image_retrieval_at_k(embeddings: np.ndarray, labels: Sequence, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image -> image retrieval within one gallery, each image in turn the query.

    Scores are dot products of the (L2-normalised) embeddings, i.e. cosines.
    The query itself is left out of its gallery; a hit is another image with
    the same label. Definitions of recall@k / precision@k as in
    `retrieval_at_k` (k capped at N - 1)."""
    e = np.asarray(embeddings, dtype=np.float64)
    lab = np.asarray(labels)
    s = e @ e.T
    np.fill_diagonal(s, -np.inf)
    rel = lab[:, None] == lab[None, :]
    np.fill_diagonal(rel, False)
    return retrieval_at_k(s, rel, ks)


# --------------------------------------------------------------------------- pointing game


def pointing_hit(heat: np.ndarray, mask: np.ndarray, tolerance: float = 0.0) -> bool:
    """Does the heat map's maximum fall inside `mask` (within `tolerance` pixels, Euclidean)?

    heat and mask share (H, W). The maximum is np.argmax's (first in row-major
    order on ties). A constant map (no maximum, e.g. all zeros) is a miss."""
    h = np.nan_to_num(np.asarray(heat, dtype=np.float64), nan=-np.inf)
    m = np.asarray(mask, dtype=bool)
    if h.shape != m.shape:
        raise ValueError(f"heat {h.shape} and mask {m.shape} differ in shape")
    if not m.any() or not np.isfinite(h).any() or float(np.nanmax(h)) <= float(np.min(h)):
        return False
    r, c = np.unravel_index(int(np.argmax(h)), h.shape)
    if m[r, c]:
        return True
    if tolerance <= 0:
        return False
    rr, cc = np.nonzero(m)
    return bool(np.min((rr - r) ** 2 + (cc - c) ** 2) <= tolerance**2)


def pointing_game(heats: Sequence[np.ndarray], masks: Sequence[np.ndarray], tolerance: float = 0.0) -> dict[str, float]:
    """{"hits", "n", "rate"} over paired heat maps and masks (rate NaN for none)."""
    hits = sum(pointing_hit(h, m, tolerance) for h, m in zip(heats, masks, strict=True))
    n = len(heats)
    return {"hits": int(hits), "n": n, "rate": hits / n if n else float("nan")}


__all__ = [
    "accuracy",
    "balanced_accuracy",
    "binary_auc",
    "bootstrap_ci",
    "image_retrieval_at_k",
    "macro_ovr_auc",
    "per_class_recall",
    "pointing_game",
    "pointing_hit",
    "rank_auc",
    "retrieval_at_k",
]
