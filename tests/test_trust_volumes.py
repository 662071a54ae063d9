"""The impossible-organ gate on real volumes (issue 14): shipped models, ../shared/data, the CLI as a user runs it.

The TotalSegmentator abdominal CT series must not report a brain, the Colin27 brain MRI no liver, lung or kidney,
above 50 %, in either mode, and each says why. Anatomy itself (hand-made cross-sections and region answers) is
checked without data or models at the end.
"""

from __future__ import annotations

import json

import pytest

from engine.cli import main
from engine.trust import anatomy
from engine.trust.anatomy import BodyFacts, field_of_view

LABELS = ["liver", "lung", "brain", "kidney", "bone fracture"]


def _shipped():
    from engine.models import catalog

    if "medlens-clip" not in catalog.shipped(catalog.CLIP) or "medlens-qformer" not in catalog.shipped(catalog.ASK):
        pytest.skip("the shipped models are not installed")
    catalog.load("medlens-clip", catalog.CLIP, fast=False)  # warm the one-model cache: no fast-path measuring in tests


def _label(capsys, path, mode, *extra):
    code = main(["label", str(path), "--labels", *LABELS, "--mode", mode, "--fov-check", "auto", *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def _row(capsys, path, mode) -> tuple[dict, dict]:
    """The `label --json` row of a shared volume (shipped models) and its labels by name."""
    _shipped()
    [row] = [json.loads(line) for line in _label(capsys, path, mode, "--json").splitlines()]
    return row, {x["label"]: x for x in row["labels"]}


@pytest.mark.parametrize("mode", ["present-absent", "softmax"])
def test_no_brain_in_the_abdominal_ct_series(shared_data, capsys, mode):
    series = shared_data / "volumes" / "totalsegmentator" / "ct_dicom_series"
    row, by = _row(capsys, series, mode)
    assert by["brain"]["reported_probability"] < 0.5 and by["brain"]["verdict"] in ("absent", "less probable")
    assert by["brain"]["probability"] > by["brain"]["reported_probability"]  # the raw 2D answer is kept beside it
    assert row["field_of_view"]["main_region"] == "abdomen" and row["field_of_view"]["trunk_sized_slices"] > 0
    if mode == "present-absent":
        assert by["brain"]["probability"] > 0.5  # what the 2D path alone reported (issue 14: 96.7 %)
        assert "brain: not in this abdomen field of view" in by["brain"]["reasons"][0]
        # a possible organ keeps the model's (calibrated) answer: the field-of-view bound does not touch it
        assert by["liver"]["reported_probability"] == by["liver"]["calibrated_probability"] and not by["liver"]["reasons"]
        assert by["liver"]["fov_bound"] > 0.5
        text = _label(capsys, series, mode)
        assert "brain: not in this abdomen field of view" in text and "calibrated on validation splits" in text


@pytest.mark.parametrize("mode", ["present-absent", "softmax"])
def test_no_trunk_organ_in_the_brain_mri(shared_data, capsys, mode):
    row, by = _row(capsys, shared_data / "volumes" / "mricron_atlas" / "ch2.nii.gz", mode)
    for organ in ("liver", "lung", "kidney"):
        assert by[organ]["reported_probability"] < 0.5, organ
    assert row["field_of_view"]["main_region"] == "head" and row["field_of_view"]["trunk_sized_slices"] == 0
    if mode == "present-absent":
        assert by["lung"]["probability"] > 0.5  # the 2D path alone said lung present (issue 14: 61 %)
        assert any("lung: not in this head field of view" in r for r in by["lung"]["reasons"])
    else:
        assert row["labels"][0]["label"] == "brain"


# --------------------------------------------------------------------------- anatomy without models
def _facts(section_mm: float, length_mm: float, body_part: str | None = None, n: int = 12) -> BodyFacts:
    return BodyFacts([section_mm] * n, length_mm, body_part)


def _bound(fov, label):
    return fov.bound(label).bound


def test_physics_alone_excludes_a_brain_from_wide_slices_and_trunk_organs_from_narrow_ones():
    trunk = field_of_view(_facts(350, 40))
    assert _bound(trunk, "brain") <= anatomy.IMPOSSIBLE and _bound(trunk, "liver") > 0.9
    head = field_of_view(_facts(170, 170))
    assert _bound(head, "Lungs") < 0.1 and _bound(head, "left kidney") < 0.1 and _bound(head, "brain") > 0.9
    assert trunk.bound("bone fracture") is None  # a finding that names no organ is never bounded


def test_a_volume_model_that_contradicts_the_geometry_leaves_the_answer_uncertain_not_wrong():
    # a narrow (head-sized) scan the volume model reads as an abdomen, no header: neither wins outright
    conflicted = field_of_view(_facts(170, 75), {"abdomen": 0.95, "head": 0.01, "chest": 0.02, "pelvis": 0.02}, calibrated=False)
    assert 0.2 < _bound(conflicted, "brain") < 0.8 and 0.2 < _bound(conflicted, "liver") < 0.8
    # the header names the brain (the dcm_qa_nih EPI series): the brain stays, the trunk organs go
    headed = field_of_view(_facts(170, 75, "BRAIN"), {"abdomen": 0.95, "head": 0.01, "chest": 0.02, "pelvis": 0.02})
    assert _bound(headed, "brain") > 0.9 and _bound(headed, "liver") < 0.1


def test_the_length_of_the_field_of_view_limits_what_it_reaches():
    pelvis = field_of_view(_facts(350, 150), {"pelvis": 0.97, "abdomen": 0.01, "chest": 0.01, "head": 0.01}, calibrated=True)
    assert _bound(pelvis, "lung") < 0.1 and _bound(pelvis, "urinary bladder") > 0.9 and _bound(pelvis, "kidney") > 0.9
    long_ = field_of_view(_facts(350, 900), {"pelvis": 0.97, "abdomen": 0.01, "chest": 0.01, "head": 0.01}, calibrated=True)
    assert _bound(long_, "lung") > 0.9  # a whole-trunk scan reaches the chest from the pelvis


def test_header_body_parts_map_to_regions():
    table = anatomy.anatomy()
    assert table.regions_named("ABDOMEN") == ("abdomen",) and table.regions_named("CHEST_ABDOMEN") == ("chest", "abdomen")
    assert table.regions_named("PARTIALBODY") is None and table.regions_named(None) is None
    assert table.regions_named("ELBOW") == ()  # a region outside the model: named, but nothing we place


def test_a_bounded_softmax_keeps_summing_to_one_and_respects_every_bound():
    from engine.zeroshot.trusted import _bounded

    out = _bounded([0.6, 0.3, 0.1], [0.01, 0.32, None], softmax=True)
    assert sum(out) == pytest.approx(1.0) and out[0] == pytest.approx(0.01) and out[1] <= 0.32 + 1e-12
    assert out[2] == pytest.approx(1 - 0.01 - 0.32)  # the mass goes where it may
    assert _bounded([0.9, 0.8], [0.2, None], softmax=False) == [0.2, 0.8]  # present/absent: a plain upper bound
