"""training.calibrate: calibration fitted per prompt set on hand-made logits, and the trust block a checkpoint carries."""

from __future__ import annotations

import json

import numpy as np

from training.calibrate import DEFAULT, Examples, evaluate_calibration, fit_calibrations, write_trust


def _overconfident(n: int, seed: int) -> Examples:
    """Present/absent logits 4x too large (true probability sigmoid(z/4)) and softmax logits 3x too large."""
    rng = np.random.default_rng(seed)
    ex = Examples()
    for _ in range(n):
        z = rng.normal(0, 2)
        ex.add_pair("us", 4 * z, int(rng.random() < 1 / (1 + np.exp(-z))))
        logits = rng.normal(0, 1.5, 3)
        p = np.exp(logits) / np.exp(logits).sum()
        ex.add_softmax("us", 3 * logits, int(rng.choice(3, p=p)))
    return ex


def test_platt_and_temperature_undo_overconfidence_and_lower_ece_on_fresh_examples():
    softmax, present_absent = fit_calibrations(_overconfident(2000, 0), "hand-made")
    pa = present_absent.get("us")
    assert pa.method == "platt" and 0.15 < pa.a < 0.35 and abs(pa.b) < 0.2  # ~1/4
    assert 2.2 < softmax.get("us").temperature < 3.8  # ~3
    assert DEFAULT in present_absent.calibrators and present_absent.get("ct") is present_absent.get(DEFAULT)
    report = evaluate_calibration(_overconfident(2000, 1), softmax, present_absent)
    for part in ("present_absent", "softmax"):
        r = report[part]["us"]
        assert r["ece_after"] < 0.05 < r["ece_before"], (part, r)
    assert report["present_absent"]["all"]["reliability_after"], "a reliability table for the card"


def test_too_few_examples_or_one_class_fit_nothing():
    ex = Examples()
    for i in range(10):
        ex.add_pair("ct", float(i), 1)
    softmax, present_absent = fit_calibrations(ex, "tiny")
    assert not softmax.fitted and not present_absent.fitted


def test_trust_block_and_reference_set_are_written_into_the_folder(tmp_path):
    from engine.trust import Calibration, ReferenceSet

    (tmp_path / "config.json").write_text(json.dumps({"format": "medlens-clip/1"}))
    softmax, present_absent = fit_calibrations(_overconfident(200, 2), "hand-made")
    rng = np.random.default_rng(0)
    ref = ReferenceSet.fit(rng.normal(size=(50, 8)), ["us"] * 50, rng.normal(size=(20, 8)))
    write_trust(tmp_path, {"softmax": softmax.to_config(), "present_absent": present_absent.to_config()}, ref)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["format"] == "medlens-clip/1"
    again = Calibration.from_config(config["trust"]["present_absent"])
    assert again.get("us").a == present_absent.get("us").a
    loaded = ReferenceSet.load(tmp_path)
    assert loaded is not None and loaded.vectors.shape == (50, 8) and abs(loaded.threshold - ref.threshold) < 1e-9
