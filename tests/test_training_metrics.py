"""training.metrics and training.probe: values worked out by hand on small arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training import metrics as M
from training import probe as P


def test_accuracy_and_balanced_accuracy():
    # class 0: 2 of 3 right; class 1: 1 of 1 right -> accuracy 3/4, balanced (2/3 + 1)/2 = 5/6
    y, pred = [0, 0, 0, 1], [0, 0, 1, 1]
    assert M.accuracy(y, pred) == pytest.approx(0.75)
    assert M.balanced_accuracy(y, pred) == pytest.approx(5 / 6)
    assert M.per_class_recall(y, pred) == {0: (pytest.approx(2 / 3), 3), 1: (1.0, 1)}
    r = M.per_class_recall(y, pred, classes=[0, 1, 2])
    assert r[2][1] == 0 and math.isnan(r[2][0])
    assert math.isnan(M.accuracy([], []))


def test_binary_auc_by_hand():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: pairs won 0.35>0.1, 0.8>0.1, 0.8>0.4 -> 3/4
    auc, reason = M.binary_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert auc == pytest.approx(0.75) and reason is None
    # a tie counts one half: positives 0.5, 0.8 vs negatives 0.1, 0.5 -> (1 + 0.5 + 1 + 1) / 4
    assert M.binary_auc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.8])[0] == pytest.approx(0.875)
    assert M.rank_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.5, 0.5, 0.8])) == pytest.approx(0.875)
    auc, reason = M.binary_auc([1, 1, 1], [0.2, 0.3, 0.4])
    assert math.isnan(auc) and "only class 1" in reason
    assert math.isnan(M.rank_auc(np.array([0, 0]), np.array([0.1, 0.2])))


def test_rank_auc_matches_sklearn_on_random_scores():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(size=200) + y, 1)  # rounding makes ties
    assert M.rank_auc(y, s) == pytest.approx(roc_auc_score(y, s))


def test_macro_ovr_auc_by_hand():
    y = [0, 1, 2, 2]
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.2, 0.5], [0.1, 0.6, 0.3]])
    # class 0: 0.6 beats 0.2, 0.3, 0.1 -> 1; class 1: 0.5 beats 0.3, 0.2, not 0.6 -> 2/3;
    # class 2: 0.5 beats 0.1, 0.3; 0.3 beats 0.1, ties 0.3 -> 3.5/4
    value, used, reason = M.macro_ovr_auc(y, probs)
    assert value == pytest.approx((1 + 2 / 3 + 0.875) / 3) and used == [0, 1, 2] and reason is None
    # a class absent from y_true is left out (class 2 here)
    value, used, _ = M.macro_ovr_auc([0, 1], probs[:2])
    assert used == [0, 1] and value == pytest.approx(1.0)


def test_bootstrap_ci():
    # perfectly right predictions: every resample has accuracy 1 and (when both classes are drawn) AUC 1
    y = np.array([0, 1] * 10)
    lo, hi, n = M.bootstrap_ci(y, y, "accuracy")
    assert (lo, hi, n) == (1.0, 1.0, 1000)
    lo, hi, n = M.bootstrap_ci(y, y.astype(float), "auc")
    assert (lo, hi) == (1.0, 1.0) and 990 <= n <= 1000  # resamples with one class are dropped
    # a noisy score: the interval holds the point estimate, is reproducible, and narrows with n
    rng = np.random.default_rng(0)
    yy = rng.integers(0, 2, 300)
    s = rng.normal(size=300) + yy
    auc = M.rank_auc(yy, s)
    a = M.bootstrap_ci(yy, s, "auc")
    assert a[0] < auc < a[1] and a == M.bootstrap_ci(yy, s, "auc")
    small = M.bootstrap_ci(yy[:60], s[:60], "auc")
    assert (small[1] - small[0]) > (a[1] - a[0])
    assert math.isnan(M.bootstrap_ci([], [], "auc")[0])


def test_retrieval_at_k_by_hand():
    scores = np.array([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.1, 0.7], [0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.0, 0.0]])
    relevant = np.array([[0, 0, 1, 0], [1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=bool)
    # q0 ranks 0, 2, 3, 1: first hit at 2.  q1 ranks 1, 3, 0, 2: hits at 2 and 3.
    # q2 has nothing relevant: skipped.  q3 ties 0 and 1: gallery order keeps 0 first, hit at 2.
    r = M.retrieval_at_k(scores, relevant, ks=(1, 2, 3))
    assert r["n_queries"] == 3 and r["n_skipped"] == 1
    assert r["recall@1"] == 0.0 and r["recall@2"] == 1.0 and r["recall@3"] == 1.0
    assert r["precision@1"] == 0.0
    assert r["precision@2"] == pytest.approx(0.5)
    assert r["precision@3"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 3) / 3)


def test_image_retrieval_leaves_the_query_out():
    e = np.array([[1, 0], [0.8, 0.6], [0, 1], [0.6, 0.8]])
    labels = ["a", "b", "b", "a"]
    # cosines: e0 -> e1 .8, e3 .6, e2 0 (same class e3 at rank 2); e1 -> e3 .96, e0 .8, e2 .6 (rank 3);
    # e2 -> e3 .8, e1 .6 (rank 2); e3 -> e1 .96, e2 .8, e0 .6 (rank 3). One same-class image each.
    r = M.image_retrieval_at_k(e, labels, ks=(1, 2, 3, 10))
    assert r["recall@1"] == 0.0 and r["recall@2"] == 0.5 and r["recall@3"] == 1.0
    assert r["precision@3"] == pytest.approx(1 / 3)
    # k beyond the gallery (3 other images) is capped at it: the query itself never counts
    assert r["recall@10"] == 1.0 and r["precision@10"] == pytest.approx(1 / 3)


def test_pointing_hit_and_game():
    heat = np.zeros((5, 5))
    heat[2, 3] = 1.0
    inside = np.zeros((5, 5), bool)
    inside[1:4, 3:5] = True
    left = np.zeros((5, 5), bool)
    left[2, 1] = True  # 2 px left of the maximum
    assert M.pointing_hit(heat, inside)
    assert not M.pointing_hit(heat, left)
    assert M.pointing_hit(heat, left, tolerance=2)
    assert not M.pointing_hit(heat, left, tolerance=1.9)
    assert not M.pointing_hit(np.zeros((5, 5)), inside)  # a flat map points nowhere
    assert not M.pointing_hit(heat, np.zeros((5, 5), bool))
    g = M.pointing_game([heat, heat, np.zeros((5, 5))], [inside, left, inside])
    assert g == {"hits": 1, "n": 3, "rate": pytest.approx(1 / 3)}
    with pytest.raises(ValueError):
        M.pointing_hit(heat, np.zeros((4, 4), bool))


# --------------------------------------------------------------------------- probe


def _blobs(n: int, seed: int, dim: int = 16, sep: float = 3.0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(n, dim))
    x[:, 0] += np.where(y == 1, sep, -sep)
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


def test_stratified_subsample():
    y = np.array([0] * 90 + [1] * 10)
    idx = P.stratified_subsample(y, fraction=0.01, seed=0)
    assert sorted(np.bincount(y[idx]).tolist()) == [2, 2]  # at least two per class
    idx10 = P.stratified_subsample(y, fraction=0.1, seed=0)
    assert np.bincount(y[idx10]).tolist() == [9, 2]
    assert np.array_equal(idx10, P.stratified_subsample(y, fraction=0.1, seed=0))
    assert len(P.stratified_subsample(y, fraction=1.0)) == 100
    assert len(P.stratified_subsample(y, n=20, seed=1)) == 20


def test_probe_separable_and_random():
    xtr, ytr = _blobs(200, 0)
    xva, yva = _blobs(60, 1)
    xte, yte = _blobs(100, 2)
    res = P.linear_probe(xtr, ytr, xva, yva, xte, yte, 2)
    assert set(res) == {"1%", "10%", "100%"}
    assert res["100%"]["auc"] == 1.0 and res["100%"]["n_train"] == 200
    assert res["1%"]["n_train"] == 4 and res["100%"]["C"] in P.C_GRID
    rng = np.random.default_rng(5)
    noise = P.linear_probe(xtr, rng.integers(0, 2, 200), xva, rng.integers(0, 2, 60), xte, rng.integers(0, 2, 100), 2)
    assert abs(noise["100%"]["auc"] - 0.5) < 0.15


def test_probe_multiclass_without_val():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 4
    y = np.arange(150) % 3
    x = centres[y] + rng.normal(size=(150, 8))
    res = P.linear_probe(x[:100], y[:100], None, None, x[100:], y[100:], 3, fractions=(1.0,))
    assert res["100%"]["C"] == 1.0 and res["100%"]["accuracy"] > 0.9 and "macro_auc" in res["100%"]


def test_few_shot_curve_shape():
    xtr, ytr = _blobs(100, 0)
    xte, yte = _blobs(40, 1)
    curve = P.few_shot_curve(xtr, ytr, xte, yte, shots=(5, 10, 20), seeds=5)
    assert list(curve) == [5, 10, 20]
    for k, c in curve.items():
        assert c["metric"] == "auc" and len(c["values"]) == 5 and c["n_train"] == 2 * k
        assert c["mean"] > 0.75 and c["std"] >= 0
