"""Calibration and the OOD reference set of the Q-Former (training/qformer_trust.py), on hand-made cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.trust import Calibration, ReferenceSet
from training import qformer_trust


def _items(family: str, n: int, right_share: float, margin: float, seed: int = 0, kind: str = "image") -> list[dict]:
    """Two-candidate questions whose scores claim sigmoid(margin) confidence while only right_share are right."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        right = rng.random() < right_share
        truth = int(rng.integers(0, 2))
        chosen = truth if right else 1 - truth
        scores = [0.0, 0.0]
        scores[chosen] = margin
        out.append({"family": family, "kind": kind, "scores": scores, "truth_index": truth})
    return out


def test_an_overconfident_family_gets_a_temperature_above_one_and_a_lower_ece():
    val = _items("finding_yes_no", 400, right_share=0.7, margin=6.0) + _items("plane", 10, right_share=1.0, margin=1.0, seed=1)
    calibration = qformer_trust.fit_closed(val, min_family=30)
    assert set(calibration.calibrators) == {"default", "finding_yes_no"}  # plane: too few val questions, default
    assert calibration.get("finding_yes_no").temperature > 2.0
    assert calibration.get("plane") is calibration.get("default")
    report = qformer_trust.calibration_report(calibration, _items("finding_yes_no", 400, 0.7, 6.0, seed=2))
    assert report["all"]["ece_before"] > 0.25 and report["all"]["ece_after"] < 0.06
    # a calibrated answer keeps its ranking: the top candidate is unchanged, only its probability moves
    item = val[0]
    assert np.argmax(qformer_trust.calibrated(calibration, item)) == int(np.argmax(item["scores"]))


def test_candidate_lists_of_different_lengths_share_a_family():
    three = [{"family": "diagnosis", "scores": [2.0, 0.0, 0.0], "truth_index": 0}] * 20
    seven = [{"family": "diagnosis", "scores": [0.0] * 6 + [3.0], "truth_index": 1}] * 20
    calibration = qformer_trust.fit_closed(three + seven, min_family=30)
    assert "diagnosis" in calibration.calibrators and np.isfinite(calibration.get("diagnosis").temperature)
    logits, truth = qformer_trust.choices(three[:1] + seven[:1])
    assert logits.shape == (2, 7) and np.isneginf(logits[0, 3]) and truth.tolist() == [0, 1]


def test_trust_is_written_into_the_checkpoint_and_reads_back(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format": "medlens-qformer/1"}))
    calibration = qformer_trust.fit_closed(_items("finding_yes_no", 100, 0.8, 4.0), min_family=30)
    rng = np.random.default_rng(0)
    reference = ReferenceSet.fit(rng.normal(size=(50, 8)), ["xray"] * 50, rng.normal(size=(20, 8)), k=5)
    trust = qformer_trust.write_trust(tmp_path, calibration, reference, "val split, 100 questions")
    config = json.loads((tmp_path / "config.json").read_text())
    assert (
        config["trust"] == trust
        and trust["ood"]["embedding"] == "mean_query_output"
        and trust["ood"]["file"] == "trust_reference.safetensors"
    )
    again = Calibration.from_config(config["trust"]["closed"])
    assert again.get("finding_yes_no").temperature == pytest.approx(calibration.get("finding_yes_no").temperature)
    loaded = qformer_trust.load_reference(tmp_path)
    assert loaded is not None and loaded.threshold == pytest.approx(reference.threshold) and loaded.vectors.shape == (50, 8)
    qformer_trust.add_test_metrics(
        tmp_path, {"calibration": {"all": {"n": 9, "ece_before": 0.3, "ece_after": 0.1, "reliability_after": []}}}
    )
    metrics = json.loads((tmp_path / "config.json").read_text())["trust"]["closed"]["metrics"]
    assert metrics["test"] == {"n": 9, "ece_before": 0.3, "ece_after": 0.1} and "val" in metrics


def test_compare_pairs_questions_and_calls_worse_only_beyond_the_interval():
    from training.qformer_compare import compare

    def items(correct_share: float, n: int, seed: int) -> list[dict]:
        rng = np.random.default_rng(seed)
        return [
            {
                "id": f"r{i}",
                "family": "finding_yes_no",
                "slots": {"finding": "x"},
                "kind": "image",
                "dataset": "busi",
                "group": "busi: malignant?",
                "correct": bool(rng.random() < correct_share),
            }
            for i in range(n)
        ]

    old = items(0.8, 400, 0)
    same = compare(old, [dict(x) for x in old])["dataset busi"]
    assert same["difference"] == 0 and same["verdict"] == "same within CI" and same["n"] == 400
    worse = compare(old, items(0.5, 400, 1))
    assert worse["dataset busi"]["verdict"] == "worse" and worse["group busi: malignant?"]["ci95"][1] < 0
    assert compare(old, items(0.5, 400, 1)[:10])["dataset busi"]["n"] == 10  # only questions both scored are paired


def test_a_temperature_floor_keeps_calibration_from_sharpening_answers():
    underconfident = _items("modality", 200, right_share=0.98, margin=1.0)  # right 98 % while claiming 73 %
    free = qformer_trust.fit_closed(underconfident, min_family=30)
    floored = qformer_trust.fit_closed(underconfident, min_family=30, min_temperature=1.0)
    assert free.get("modality").temperature < 0.5  # left alone, the val fit sharpens
    assert floored.get("modality").temperature == pytest.approx(1.0) and floored.get("default").temperature == pytest.approx(1.0)
    overconfident = _items("finding_yes_no", 400, right_share=0.7, margin=6.0)
    assert qformer_trust.fit_closed(overconfident, min_family=30, min_temperature=1.0).get("finding_yes_no").temperature > 2.0


def test_a_fit_without_reference_set_leaves_none_of_an_earlier_one(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format": "medlens-qformer/1"}))
    calibration = qformer_trust.fit_closed(_items("finding_yes_no", 100, 0.8, 4.0), min_family=30)
    rng = np.random.default_rng(0)
    reference = ReferenceSet.fit(rng.normal(size=(50, 8)), ["xray"] * 50, rng.normal(size=(20, 8)), k=5)
    qformer_trust.write_trust(tmp_path, calibration, reference, "first fit")
    assert (tmp_path / "trust_reference.safetensors").is_file()
    trust = qformer_trust.write_trust(tmp_path, calibration, None, "second fit, no reference")
    assert "ood" not in trust and "ood" not in json.loads((tmp_path / "config.json").read_text())["trust"]
    assert not (tmp_path / "trust_reference.safetensors").exists() and qformer_trust.load_reference(tmp_path) is None
