"""training.rebuild: the phases run in order from the recipe (OOD evaluation included) and the card gets the OOD table."""

from __future__ import annotations

import json

import pytest


def test_phases_run_in_order_and_the_ood_table_reaches_the_card(tmp_path, monkeypatch):
    from training import rebuild
    from training.config import RebuildConfig

    calls = []
    monkeypatch.setattr(rebuild, "_run", lambda label, fn, argv: calls.append((label, argv)))
    recipe = {"clip": ["--views", "3"], "ssl": None, "evaluate": ["--exact"]}
    args = RebuildConfig(data_root=str(tmp_path / "data"), out=str(tmp_path / "work"), seed=4)
    model_dir, eval_out = rebuild.train_and_evaluate(args, recipe, tmp_path / "work")
    assert [c[0] for c in calls] == ["recipes", "clip", "evaluate", "ood"]
    clip_argv = calls[1][1]
    assert clip_argv[-2:] == ["--views", "3"] and clip_argv[clip_argv.index("--seed") + 1] == "4"
    assert calls[3][1][0] == f"local-dir:{model_dir}" and "--exact" in calls[2][1]
    eval_out.mkdir(parents=True)
    (eval_out / "ood.md").write_text("## Out-of-distribution evaluation\n")
    extra = tmp_path / "extra.md"
    extra.write_text("## Towers\n")
    assert rebuild.card_extras({"card_extra": str(extra)}, eval_out) == "## Towers\n\n## Out-of-distribution evaluation"


def test_the_recipes_parse_and_the_candidate_differs_only_by_randomisation_and_trust():
    from training.params import parse_clip_args
    from training.rebuild import RECIPE

    shipped = json.loads(RECIPE.read_text())
    candidate = json.loads(RECIPE.with_name("candidate_dr.json").read_text())
    base = ["--manifest", "m", "--data-root", "d", "--out", "o"]
    a, b = parse_clip_args(base + shipped["clip"]), parse_clip_args(base + candidate["clip"])
    assert (a.views, a.trust, a.cache_precision) == (1, False, "fp32")
    assert (b.views, b.trust, b.cache_precision) == (3, True, "auto")
    differ = {k for k in vars(a) if getattr(a, k) != getattr(b, k)}
    assert differ == {"views", "trust", "cache_precision"}


def test_views_without_a_frozen_trunk_is_a_usage_error(tmp_path):
    from training.clip import main
    from training.config import UsageError

    with pytest.raises(UsageError, match="--frozen-trunk"):
        main(["--manifest", "m", "--data-root", "d", "--out", str(tmp_path / "run"), "--views", "2"])


def test_rows_capped_per_dataset_keep_order_and_are_seeded():
    from training.clip import _cap_per_dataset
    from training.manifest import Row

    rows = [Row(id=f"{d}/{i}", dataset=d, modality="xray", path="x", split="train", subject=str(i)) for d in ("a", "b") for i in range(10)]
    kept = _cap_per_dataset(rows, 3, seed=0)
    assert [r.dataset for r in kept].count("a") == 3 and [r.dataset for r in kept].count("b") == 3
    assert kept == sorted(kept, key=rows.index) and kept == _cap_per_dataset(rows, 3, seed=0)
    assert _cap_per_dataset(rows, 0, seed=0) == rows


def test_a_calibrate_step_fits_the_trust_block_of_the_exported_weights_before_evaluation(tmp_path, monkeypatch):
    from training import rebuild
    from training.config import RebuildConfig

    calls = []
    monkeypatch.setattr(rebuild, "_run", lambda label, fn, argv: calls.append((label, argv)))
    recipe = json.loads(rebuild.RECIPE.read_text())  # the shipped recipe: weights trained without trust, then calibrated
    args = RebuildConfig(data_root=str(tmp_path / "data"), out=str(tmp_path / "work"), seed=0)
    model_dir, _ = rebuild.train_and_evaluate(args, recipe, tmp_path / "work")
    assert [c[0] for c in calls] == ["recipes", "clip", "calibrate", "evaluate", "ood"]
    calibrate_argv = calls[2][1]
    assert calibrate_argv[0] == str(model_dir) and calibrate_argv[calibrate_argv.index("--manifest") + 1] == calls[0][1][-1]
    assert calibrate_argv[calibrate_argv.index("--max-train") + 1] == "4000"
