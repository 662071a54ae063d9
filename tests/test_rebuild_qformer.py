"""The Q-Former rebuild runs its recipe's phases in order, the second continuing from the first's best checkpoint."""

from __future__ import annotations

import json

import pytest


class _Stop(Exception):
    pass


def _calls(tmp_path, monkeypatch, recipe: dict) -> list[tuple[str, list[str]]]:
    from training import rebuild_qformer

    calls = []

    def fake_run(name, fn, argv):
        calls.append((name, list(argv)))
        if name == "evaluate":
            raise _Stop

    monkeypatch.setattr(rebuild_qformer, "_run", fake_run)
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    with pytest.raises(_Stop):
        rebuild_qformer.main(
            ["--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "work"), "--recipe", str(path), "--export", ""]
        )
    return calls


def test_continue_phase_starts_from_the_first_phase_and_is_what_gets_evaluated(tmp_path, monkeypatch):
    calls = _calls(tmp_path, monkeypatch, {"qformer": ["--steps", "5"], "qformer_continue": ["--steps", "7", "--closed-weight", "1"]})
    names = [n for n, _ in calls]
    assert names == ["qa recipe", "clip baseline", "qformer", "qformer continue", "trust", "evaluate"]
    cont = calls[3][1]
    assert cont[cont.index("--init") + 1] == str(tmp_path / "work" / "qformer" / "best")
    assert cont[-4:] == ["--steps", "7", "--closed-weight", "1"]
    # calibration and the OOD reference are fitted on the model that is then evaluated
    assert calls[4][1][0] == calls[5][1][0] == str(tmp_path / "work" / "qformer_continue" / "best")


def test_several_continued_phases_chain(tmp_path, monkeypatch):
    calls = _calls(tmp_path, monkeypatch, {"qformer": ["--steps", "5"], "qformer_continue": [["--steps", "7"], ["--steps", "9"]]})
    assert [n for n, _ in calls][2:] == ["qformer", "qformer continue", "qformer continue", "trust", "evaluate"]
    second, third = calls[3][1], calls[4][1]
    assert third[third.index("--init") + 1] == str(tmp_path / "work" / "qformer_continue" / "best")
    assert second[second.index("--seed") + 1] != third[third.index("--seed") + 1]  # each phase draws its own batches
    assert calls[6][1][0] == str(tmp_path / "work" / "qformer_continue2" / "best")


def test_one_phase_recipe_evaluates_the_first_run(tmp_path, monkeypatch):
    calls = _calls(tmp_path, monkeypatch, {"qformer": ["--steps", "5"]})
    assert [n for n, _ in calls] == ["qa recipe", "clip baseline", "qformer", "trust", "evaluate"]
    assert calls[-1][1][0] == str(tmp_path / "work" / "qformer" / "best")


def test_the_clip_baseline_is_reused_only_for_the_same_manifest(tmp_path, monkeypatch):
    from training import rebuild_qformer
    from training.evaluate import file_sha256

    calls = []
    monkeypatch.setattr(rebuild_qformer, "_run", lambda name, fn, argv: calls.append(name))
    manifest = tmp_path / "qa_manifest.jsonl"
    manifest.write_text('{"id": "a"}\n')
    (tmp_path / "clip_baseline.json").write_text(json.dumps({"manifest": {"sha256": file_sha256(manifest)}}))
    rebuild_qformer.clip_baseline(tmp_path, str(manifest), "data")
    assert calls == []  # same manifest: re-used
    manifest.write_text('{"id": "b"}\n')
    rebuild_qformer.clip_baseline(tmp_path, str(manifest), "data")
    assert calls == ["clip baseline"]  # another manifest: computed again
