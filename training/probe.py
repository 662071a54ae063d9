"""Linear probe and few-shot evaluation on frozen image embeddings (LVM-Med's protocol).

Design decisions
- The probe is scikit-learn logistic regression (lbfgs) on standardised
  features, class_weight="balanced": it measures what the frozen embedding
  separates, not how well a head copes with class imbalance. Standardising
  matters because CLIP embeddings are L2-normalised, so raw coordinates are
  tiny and the useful C would depend on the embedding width.
- C is chosen from a small log grid on the validation split (AUC for binary
  tasks, balanced accuracy for multi-class); the probe trained on the train
  subset with the best C is the one tested, so the validation split only
  picks C (it is never trained on). Without a usable validation split (none,
  or a single class) C = 1.
- Label-efficiency (1 %, 10 %, 100 % of the train split) uses a stratified
  subsample with a fixed seed and at least `min_per_class` (2) images per
  class, so a 1 % subsample of a small dataset still has every class.
- Few-shot curves draw k images per class, repeat over seeds, report mean and
  std; no validation split (k-shot has none in practice), C fixed at 1.
- Binary scores are P(class 1); multi-class probabilities are placed in the
  columns of all classes, so a class missing from a small train subset gets
  probability 0 rather than shifting the columns.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from training import metrics

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
FRACTIONS = (0.01, 0.1, 1.0)


def stratified_subsample(
    y: Sequence[int], *, fraction: float | None = None, n: int | None = None, seed: int = 0, min_per_class: int = 2
) -> np.ndarray:
    """Sorted indices of a stratified random subsample of `y`.

    Exactly one of `fraction` (of each class) or `n` (total, spread over
    classes in proportion) is given. Each class keeps
    max(min_per_class, round(share)) items, capped at its size; the draw is
    numpy's default_rng(seed) permutation per class (deterministic)."""
    y = np.asarray(y)
    if (fraction is None) == (n is None):
        raise ValueError("give exactly one of fraction or n")
    total = y.size
    if n is not None:
        if n >= total:
            return np.arange(total)
        fraction = n / max(total, 1)
    if fraction >= 1.0:
        return np.arange(total)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        want = min(idx.size, max(min_per_class, int(round(fraction * idx.size))))
        keep.append(rng.permutation(idx)[:want])
    return np.sort(np.concatenate(keep)) if keep else np.arange(0)


def _pipeline(C: float, seed: int = 0):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        StandardScaler(),
        LogisticRegression(C=C, solver="lbfgs", max_iter=2000, class_weight="balanced", random_state=seed),
    )


def _probabilities(pipe, x: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, n_classes) probabilities, columns by class index (0 for classes the probe never saw)."""
    p = pipe.predict_proba(x)
    out = np.zeros((x.shape[0], n_classes), dtype=np.float64)
    for j, c in enumerate(pipe.classes_):
        out[:, int(c)] = p[:, j]
    return out


def score(y_true: np.ndarray, probs: np.ndarray, binary: bool) -> dict[str, float]:
    """Test metrics of class probabilities: binary -> auc, accuracy, balanced accuracy; multi-class adds macro AUC."""
    y_true = np.asarray(y_true).astype(int)
    pred = np.argmax(probs, axis=1)
    out = {"accuracy": metrics.accuracy(y_true, pred), "balanced_accuracy": metrics.balanced_accuracy(y_true, pred), "n": int(y_true.size)}
    if binary:
        out["auc"], reason = metrics.binary_auc(y_true, probs[:, 1])
    else:
        out["macro_auc"], _, reason = metrics.macro_ovr_auc(y_true, probs)
    if reason:
        out["auc_note"] = reason
    return out


def _val_metric(y: np.ndarray, probs: np.ndarray, binary: bool) -> float:
    if binary:
        return metrics.rank_auc(y, probs[:, 1])
    return metrics.balanced_accuracy(y, np.argmax(probs, axis=1))


def fit_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    n_classes: int,
    val_x: np.ndarray | None = None,
    val_y: np.ndarray | None = None,
    *,
    grid: Sequence[float] = C_GRID,
    seed: int = 0,
):
    """(fitted pipeline, chosen C, validation metric or NaN). C from `grid` on the validation split, else 1."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    binary = n_classes == 2
    has_val = val_x is not None and val_y is not None and len(val_y) > 0 and np.unique(val_y).size > 1
    best = (None, 1.0, float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter is generous; a near-converged probe is fine
        for C in grid if has_val else [1.0]:
            pipe = _pipeline(C, seed).fit(train_x, train_y)
            v = _val_metric(val_y, _probabilities(pipe, val_x, n_classes), binary) if has_val else float("nan")
            # strictly better only: ties keep the smaller C (the stronger regulariser)
            if best[0] is None or (np.isfinite(v) and (not np.isfinite(best[2]) or v > best[2])):
                best = (pipe, float(C), float(v))
    return best


def linear_probe(
    train_x: np.ndarray,
    train_y: Sequence[int],
    val_x: np.ndarray | None,
    val_y: Sequence[int] | None,
    test_x: np.ndarray,
    test_y: Sequence[int],
    n_classes: int,
    *,
    fractions: Sequence[float] = FRACTIONS,
    seed: int = 0,
    grid: Sequence[float] = C_GRID,
) -> dict[str, dict]:
    """Probe trained on each fraction of the train split, tested on the test split.

    Returns {"1%": {"n_train", "C", "val", "auc"|"macro_auc", "accuracy", "balanced_accuracy", "n"}, ...}.
    A subsample with a single class cannot train a classifier: it is
    reported with a "skipped" reason instead."""
    train_y = np.asarray(train_y).astype(int)
    test_y = np.asarray(test_y).astype(int)
    val_y_arr = None if val_y is None else np.asarray(val_y).astype(int)
    out = {}
    for frac in fractions:
        key = f"{frac * 100:g}%"
        idx = stratified_subsample(train_y, fraction=frac, seed=seed)
        if np.unique(train_y[idx]).size < 2:
            out[key] = {"n_train": int(idx.size), "skipped": "fewer than two classes in the train subset"}
            continue
        pipe, C, v = fit_probe(train_x[idx], train_y[idx], n_classes, val_x, val_y_arr, grid=grid, seed=seed)
        res = score(test_y, _probabilities(pipe, test_x, n_classes), n_classes == 2)
        out[key] = {"n_train": int(idx.size), "C": float(C), "val": float(v), **res}
    return out


def few_shot_curve(
    train_emb: np.ndarray,
    train_y: Sequence[int],
    test_emb: np.ndarray,
    test_y: Sequence[int],
    shots: Sequence[int] = (5, 10, 20),
    seeds: int = 5,
    *,
    n_classes: int | None = None,
    C: float = 1.0,
) -> dict[int, dict]:
    """k-shot linear probes: k train images per class (all of a class when it has fewer), `seeds` draws each.

    The metric is AUC for two classes, accuracy otherwise (LVM-Med's few-shot
    tables). Returns {k: {"metric", "mean", "std", "values" (one per seed),
    "n_train" (of the first draw)}}; std is the population std over seeds."""
    train_y = np.asarray(train_y).astype(int)
    test_y = np.asarray(test_y).astype(int)
    n_classes = int(n_classes or max(train_y.max(initial=0), test_y.max(initial=0)) + 1)
    binary = n_classes == 2
    classes = np.unique(train_y)
    out: dict[int, dict] = {}
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    for k in shots:
        values, n_train = [], None
        for s in range(seeds):
            rng = np.random.default_rng(1000 * int(k) + s)
            idx = np.concatenate([rng.permutation(np.flatnonzero(train_y == c))[:k] for c in classes])
            n_train = n_train if n_train is not None else int(idx.size)
            if np.unique(train_y[idx]).size < 2:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                pipe = _pipeline(C, s).fit(train_emb[idx], train_y[idx])
            probs = _probabilities(pipe, test_emb, n_classes)
            res = score(test_y, probs, binary)
            values.append(res["auc"] if binary else res["accuracy"])
        arr = np.asarray(values, dtype=np.float64)
        out[int(k)] = {
            "metric": "auc" if binary else "accuracy",
            "mean": float(np.nanmean(arr)) if arr.size else float("nan"),
            "std": float(np.nanstd(arr)) if arr.size else float("nan"),
            "values": [float(v) for v in arr],
            "n_train": n_train,
        }
    return out


__all__ = ["C_GRID", "FRACTIONS", "few_shot_curve", "fit_probe", "linear_probe", "score", "stratified_subsample"]
