"""training.ood: the committed OOD manifest, its summary arithmetic, and the command's errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from training import ood

REPO = Path(__file__).resolve().parents[1]


def test_manifest_parses_from_allowed_sources_and_resolves_installed_files():
    items = ood.read_items()
    assert len(items) >= 20 and len({i.id for i in items}) == len(items)
    assert {i.source for i in items} <= set(ood.SOURCES)  # a closed list: packages kept for the independent check are not in it
    mods = {i.modality for i in items}
    assert {"ct", "mr", "us", "xray", ood.FOREIGN} <= mods
    pydicom_items = [i for i in items if i.source == "pydicom"]
    root = ood.source_root("pydicom", None)
    assert root is not None and all((root / i.path).is_file() for i in pydicom_items)
    assert all((root / i.path).resolve().is_relative_to(root.resolve()) for i in pydicom_items)  # pydicom's own files only
    assert ood.source_root("shared-data", None) is None


def test_a_source_outside_the_closed_list_is_refused():
    with pytest.raises(ValueError, match="source"):
        ood.OodItem.from_dict({"id": "x", "source": "somewhere", "path": "a.dcm", "modality": "ct"})


def _result(mid: str, true: str, probs: dict, organs=None, present=(), impossible=(), flag=None):
    item = ood.OodItem(mid, "pydicom", "x", true, tuple(present), tuple(impossible))
    full = {k: 0.0 for k in ood.MODALITY_LABELS} | probs
    return ood.ItemResult(item, "CT", 1, full, None, organs or {}, None, 0.2 if flag is not None else None, flag)


def test_summary_counts_accuracy_impossible_organs_and_flags():
    results = [
        _result("a", "ct", {"ct": 0.9, "mr": 0.1}, {"liver": 0.9, "brain": 0.8}, ["liver"], ["brain"], flag=False),
        _result("b", "us", {"fundus": 0.7, "us": 0.3}, flag=True),
        _result("c", "us", {"us": 0.6, "ct": 0.4}, flag=False),
        _result("d", ood.FOREIGN, {"ct": 0.99}, flag=True),
    ]
    s = ood.summarise(results)
    assert s["modality"]["n"] == 3 and s["modality"]["accuracy"] == pytest.approx(2 / 3)
    assert s["modality"]["per_modality"]["us"]["accuracy"] == 0.5 and s["modality"]["min_per_modality"] == 0.5
    o = s["organ_sanity"]["raw"]
    assert (o["impossible_called_present"], o["impossible"], o["present_called_present"]) == (1, 1, 1)
    assert s["ood_flags"] == {"foreign_n": 1, "foreign_flagged": 1, "known_n": 3, "known_flagged": 1}
    md = ood.to_markdown({"summary": s, "items": [r.to_dict() for r in results], "skipped": []})
    assert "| us | 2 | 0.500 |" in md and "!brain 0.80" in md


def test_evaluate_ood_with_an_unknown_model_is_exit_2_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "training.evaluate", "no-such-model", "--ood", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: cannot load model 'no-such-model'") and "Traceback" not in proc.stderr
    assert not (tmp_path / "ood.json").exists()
