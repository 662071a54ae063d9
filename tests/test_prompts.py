"""Prompt ensembles: the assets load, labels find their classes, averaging is what UniMed-CLIP does."""

from __future__ import annotations

import numpy as np
import pytest

from engine.scan import Modality
from engine.zeroshot.prompts import (
    PROMPT_SET_KEYS,
    PromptError,
    all_prompt_sets,
    class_embeddings,
    clean_labels,
    ensemble,
    load_prompt_set,
    pair_embeddings,
    parse_prompt_set,
    prompt_set_key,
)


class StubText:
    """encode_texts from a fixed table (vectors need not be normalised: ensembling normalises)."""

    def __init__(self, table: dict[str, list[float]]):
        self.table = table
        self.calls: list[list[str]] = []

    def encode_texts(self, texts):
        self.calls.append(list(texts))
        return np.array([self.table[t] for t in texts], dtype=np.float32)


def _set(**overrides):
    data = {
        "title": "Test",
        "label_sets": {"default": ["cat", "dog"]},
        "templates": ["A {label}", "B {label}"],
        "present_templates": ["{label} is present"],
        "absent_templates": ["no {label}"],
        "classes": {
            "dog": {"aliases": ["canine"], "descriptions": ["a dog barking"]},
            "normal": {"prompts": ["all is well", "nothing here"]},
        },
    }
    data.update(overrides)
    return parse_prompt_set(data, "test")


def test_every_modality_has_a_valid_prompt_set():
    sets = all_prompt_sets()
    assert [ps.key for ps in sets] == list(PROMPT_SET_KEYS)
    assert set(PROMPT_SET_KEYS) == {"xray", "ct", "mr", "us", "pathology", "fundus", "dermoscopy", "other"}
    for ps in sets:
        assert ps.label_sets and all(ps.label_sets.values())
        assert len(ps.templates) >= 4, f"{ps.key}: an ensemble needs several phrasings"
        assert all("{label}" in t for t in ps.templates + ps.present_templates + ps.absent_templates)
        for labels in ps.label_sets.values():
            for label in labels:
                prompts = ps.prompts(label)
                assert len(prompts) >= 3, (ps.key, label)
                assert not any(p.lower().startswith("a photo of") for p in prompts)
                present, absent = ps.pair_prompts(label)
                assert present and absent and not set(present) & set(absent)


def test_presets_cover_the_named_datasets():
    assert {"pneumonia", "pleural effusion", "cardiomegaly", "normal"} <= set(load_prompt_set("xray").label_sets["chest findings"])
    assert load_prompt_set("us").label_sets["breast lesion"] == ("normal", "benign", "malignant")
    assert len(load_prompt_set("dermoscopy").label_sets["HAM10000"]) == 7
    assert len(load_prompt_set("pathology").label_sets["lung (LC25000)"]) == 3
    assert len(load_prompt_set("fundus").label_sets["DR grade"]) == 5
    assert "liver" in load_prompt_set("ct").label_sets["organs"]


def test_user_labels_get_the_templates_and_presets_their_descriptions():
    ps = _set()
    assert ps.prompts("ferret") == ["A ferret", "B ferret"]
    assert ps.prompts("Dog") == ["A dog", "B dog", "a dog barking"]  # case-insensitive match, class name in templates
    assert ps.prompts("canine") == ps.prompts("dog")  # alias
    assert ps.prompts("normal") == ["all is well", "nothing here"]  # full sentences replace templates
    assert ps.prompts("big_cat") == ["A big cat", "B big cat"]  # underscores read as spaces
    xray = load_prompt_set("xray")
    assert xray.prompts("effusion") == xray.prompts("pleural effusion")
    assert any("costophrenic" in p for p in xray.prompts("pleural effusion"))
    assert load_prompt_set("dermoscopy").prompts("mel") == load_prompt_set("dermoscopy").prompts("melanoma")


def test_class_embedding_is_the_renormalised_mean_of_normalised_prompts():
    ps = _set()
    stub = StubText(
        {
            "A cat": [1.0, 0.0, 0.0],
            "B cat": [0.6, 0.8, 0.0],
            "A dog": [0.0, 0.0, 5.0],
            "B dog": [0.0, 2.0, 0.0],
            "a dog barking": [0.0, 0.0, 1.0],
        }
    )
    emb = class_embeddings(stub, ["cat", "dog"], ps)
    # cat: mean of (1,0,0) and (0.6,0.8,0) = (0.8,0.4,0) -> /|.| = (2,1,0)/sqrt(5)
    np.testing.assert_allclose(emb[0], np.array([2.0, 1.0, 0.0]) / np.sqrt(5.0), atol=1e-6)
    # dog: normalised (0,0,1), (0,1,0), (0,0,1) -> mean (0,1/3,2/3) -> (0,1,2)/sqrt(5)
    np.testing.assert_allclose(emb[1], np.array([0.0, 1.0, 2.0]) / np.sqrt(5.0), atol=1e-6)
    assert emb.dtype == np.float32 and emb.shape == (2, 3)
    assert len(stub.calls) == 1  # every prompt of every label in one batch


def test_ensemble_encodes_repeated_prompts_once():
    stub = StubText({"x": [1.0, 0.0], "y": [0.0, 1.0]})
    emb = ensemble(stub, [["x", "y"], ["x"]])
    assert stub.calls == [["x", "y"]]
    np.testing.assert_allclose(emb, [[np.sqrt(0.5), np.sqrt(0.5)], [1.0, 0.0]], atol=1e-6)


def test_present_absent_pairs():
    ps = _set()
    assert ps.pair_prompts("ferret") == (["ferret is present"], ["no ferret"])
    assert ps.pair_prompts("canine") == (["dog is present", "a dog barking"], ["no dog"])
    stub = StubText({"ferret is present": [3.0, 0.0], "no ferret": [0.0, 1.0]})
    present, absent = pair_embeddings(stub, ["ferret"], ps)
    np.testing.assert_allclose(present, [[1.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(absent, [[0.0, 1.0]], atol=1e-6)


def test_clean_labels():
    assert clean_labels("pneumonia, normal\n  pleural   effusion ;normal") == ["pneumonia", "normal", "pleural effusion"]
    assert clean_labels(["A", "a", " b "]) == ["A", "b"]
    for empty in ([], "", " , \n", None, ["", "  "]):
        with pytest.raises(PromptError, match="no labels given"):
            clean_labels(empty)


def test_prompt_set_keys():
    assert prompt_set_key(Modality.XRAY) == "xray"
    assert prompt_set_key(Modality.CT) == "ct"
    assert prompt_set_key("X-ray") == "xray"
    assert prompt_set_key("MR") == "mr" and prompt_set_key("mri") == "mr"
    assert prompt_set_key(None) == "other"
    with pytest.raises(PromptError, match="unknown modality"):
        prompt_set_key("../../etc/passwd")


def test_malformed_prompt_sets_are_rejected():
    with pytest.raises(PromptError, match="no \\{label\\} slot"):
        _set(templates=["a picture"])
    with pytest.raises(PromptError, match="empty"):
        _set(absent_templates=[])
    with pytest.raises(PromptError, match="label set"):
        _set(label_sets={})


def test_prompt_dir_override(tmp_path, monkeypatch):
    import json

    (tmp_path / "xray.json").write_text(
        json.dumps(
            {
                "label_sets": {"only": ["a", "b"]},
                "templates": ["T {label}"],
                "present_templates": ["{label} yes"],
                "absent_templates": ["{label} no"],
            }
        )
    )
    monkeypatch.setenv("MEDLENS_PROMPTS", str(tmp_path))
    assert load_prompt_set("xray").default_labels == ["a", "b"]
    assert load_prompt_set("ct").key == "ct"  # others still come from the repository
