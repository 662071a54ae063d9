"""Zero-shot API: scoring hand-checked on stubs, then end to end with a tiny CLIP on real files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from engine.errors import MedLensError, ModelError
from engine.models.clip import InferencePath
from engine.scan import Modality, Scan
from engine.views import extract_slice, render_view
from engine.zeroshot import (
    LabelResult,
    PromptError,
    evidence_map,
    heat_to_slice,
    label_images,
    label_scan,
    model_image,
    sample_indices,
    scan_images,
    score_embeddings,
)
from engine.zeroshot.prompts import parse_prompt_set

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import tiny_clip_folder  # noqa: E402

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


# --------------------------------------------------------------------------- stubs
class StubClip:
    """A fake model: fixed image embeddings in call order, text embeddings from a table."""

    def __init__(self, image_embeddings, text_table, scale=10.0):
        self.image_embeddings = np.asarray(image_embeddings, dtype=np.float32)
        self.text_table = text_table
        self.logit_scale = scale
        self.model_id = "stub@0"
        self.path = InferencePath("fp32", "stub")
        self.images_seen: list[np.ndarray] = []

    def encode_images(self, images):
        self.images_seen.extend(images)
        return self.image_embeddings[: len(images)]

    def encode_texts(self, texts):
        return np.array([self.text_table[t] for t in texts], dtype=np.float32)


def _pset():
    return parse_prompt_set(
        {
            "label_sets": {"default": ["a", "b"]},
            "templates": ["{label}"],
            "present_templates": ["{label} yes"],
            "absent_templates": ["{label} no"],
        },
        "stub",
    )


def _softmax(x):
    e = np.exp(np.asarray(x, dtype=np.float64) - np.max(x))
    return e / e.sum()


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# two slices: slice 0 is purely "a"; slice 1 leans to "b"
SLICES = np.array([[1.0, 0.0], [0.6, 0.8]])
TEXT = np.array([[1.0, 0.0], [0.0, 1.0]])


def test_softmax_single_image_uses_the_logit_scale():
    ranked, per_slice = score_embeddings(SLICES[1:], ["a", "b"], TEXT, 10.0, aggregation=None)
    expected = _softmax([6.0, 8.0])
    assert [s.label for s in ranked] == ["b", "a"]
    assert ranked[0].probability == pytest.approx(expected[1])
    assert ranked[0].score == pytest.approx(0.8) and ranked[1].score == pytest.approx(0.6)
    assert per_slice == []


def test_volume_aggregation_mean_vs_max():
    slices = [("axial", 3), ("axial", 7)]
    mean, per_slice = score_embeddings(SLICES, ["a", "b"], TEXT, 10.0, aggregation="mean", slices=slices)
    # mean cosines (0.8, 0.4): softmax(10 * .)
    assert {s.label: s.score for s in mean} == pytest.approx({"a": 0.8, "b": 0.4})
    assert mean[0].label == "a" and mean[0].probability == pytest.approx(_softmax([8.0, 4.0])[0])
    best, _ = score_embeddings(SLICES, ["a", "b"], TEXT, 10.0, aggregation="max", slices=slices)
    # max cosines (1.0, 0.8)
    assert {s.label: s.score for s in best} == pytest.approx({"a": 1.0, "b": 0.8})
    assert best[0].probability == pytest.approx(_softmax([10.0, 8.0])[0])
    # per-slice scores are the slices' own
    assert [(s.plane, s.index) for s in per_slice] == slices
    assert per_slice[0].probabilities["a"] == pytest.approx(_softmax([10.0, 0.0])[0])
    assert per_slice[1].probabilities["b"] == pytest.approx(_softmax([6.0, 8.0])[1])
    assert per_slice[1].scores == pytest.approx({"a": 0.6, "b": 0.8})


def test_present_absent_mode_hand_checked():
    present, absent = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    mean, per_slice = score_embeddings(
        SLICES, ["x"], (present, absent), 10.0, mode="present-absent", aggregation="mean", slices=[("axial", 0), ("axial", 1)]
    )
    # margins per slice: 1.0 and -0.2; mean 0.4
    assert mean[0].probability == pytest.approx(_sigmoid(4.0))
    assert mean[0].score == pytest.approx(0.8) and mean[0].absent_score == pytest.approx(0.4)
    assert per_slice[0].probabilities["x"] == pytest.approx(_sigmoid(10.0))
    assert per_slice[1].probabilities["x"] == pytest.approx(_sigmoid(-2.0))
    best, _ = score_embeddings(SLICES, ["x"], (present, absent), 10.0, mode="present-absent", aggregation="max")
    assert best[0].probability == pytest.approx(_sigmoid(10.0))  # the slice with the largest margin
    assert (best[0].score, best[0].absent_score) == pytest.approx((1.0, 0.0))


def test_present_absent_probabilities_are_independent():
    present = np.array([[1.0, 0.0], [0.0, 1.0]])
    absent = np.array([[0.0, 1.0], [1.0, 0.0]])
    ranked, _ = score_embeddings(np.array([[0.8, 0.6]]), ["p", "q"], (present, absent), 5.0, mode="present-absent", aggregation=None)
    probs = {s.label: s.probability for s in ranked}
    assert probs["p"] == pytest.approx(_sigmoid(1.0)) and probs["q"] == pytest.approx(_sigmoid(-1.0))
    assert sum(probs.values()) == pytest.approx(1.0)  # here by symmetry only
    ranked, _ = score_embeddings(np.array([[0.8, 0.6]]), ["p", "q"], (present, present), 5.0, mode="present-absent", aggregation=None)
    assert [s.probability for s in ranked] == pytest.approx([0.5, 0.5])  # no evidence either way


def test_ties_are_broken_by_label():
    ranked, _ = score_embeddings(np.array([[0.0, 0.0, 1.0]]), ["zeta", "alpha", "mid"], np.eye(3)[[0, 1, 0]], 10.0, aggregation=None)
    assert [s.label for s in ranked] == ["alpha", "mid", "zeta"]  # all cosines 0: alphabetical
    assert ranked[0].probability == ranked[1].probability == ranked[2].probability


def test_label_images_with_a_stub_model_goes_through_the_ensembles():
    stub = StubClip(SLICES, {"a": [1.0, 0.0], "b": [0.0, 1.0], "a yes": [1, 0], "a no": [0, 1], "b yes": [0, 1], "b no": [1, 0]})
    images = [np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)]
    result = label_images(images, ["a", "b"], stub, prompt_set=_pset(), aggregation="max")
    assert isinstance(result, LabelResult)
    assert result.aggregation == "max" and len(result.per_slice) == 2
    assert result.top.label == "a" and result.top.probability == pytest.approx(_softmax([10.0, 8.0])[0])
    assert result.model_id == "stub@0" and result.inference_path == "fp32" and result.prompt_set == "stub"
    one = label_images(images[:1], ["a", "b"], stub, prompt_set=_pset())
    assert one.aggregation is None and one.per_slice == []
    pa = label_images(images, ["a", "b"], stub, prompt_set=_pset(), mode="present-absent")
    assert pa.mode == "present-absent" and all(s.absent_score is not None for s in pa.labels)
    json.dumps(pa.to_dict())


def test_errors_are_clear():
    stub = StubClip(SLICES, {})
    image = [np.zeros((8, 8), np.uint8)]
    with pytest.raises(PromptError, match="no labels given"):
        label_images(image, [], stub, prompt_set=_pset())
    with pytest.raises(PromptError, match="no labels given"):
        label_images(image, " , ", stub, prompt_set=_pset())
    with pytest.raises(PromptError, match="at least two labels"):
        label_images(image, ["a"], stub, prompt_set=_pset())
    with pytest.raises(PromptError, match="unknown mode"):
        label_images(image, ["a", "b"], stub, prompt_set=_pset(), mode="bayes")
    with pytest.raises(PromptError, match="unknown aggregation"):
        label_images(image, ["a", "b"], stub, prompt_set=_pset(), aggregation="median")
    scan = Scan(np.zeros((8, 8), np.float32), (1.0, 1.0), np.eye(4), Modality.XRAY)
    with pytest.raises(ModelError, match="unknown model 'no-such-model'"):
        label_scan(scan, ["a", "b"], "no-such-model")
    with pytest.raises(ModelError, match="does not exist"):
        label_scan(scan, ["a", "b"], "local-dir:/no/such/folder")
    assert issubclass(PromptError, MedLensError)


def test_no_default_model_is_a_clear_error(installed_models):
    installed_models({})
    scan = Scan(np.zeros((8, 8), np.float32), (1.0, 1.0), np.eye(4), Modality.XRAY)
    with pytest.raises(ModelError, match="no default model installed.*--model"):
        label_scan(scan, ["a", "b"])


# --------------------------------------------------------------------------- imaging
def _ct(vol, spacing=(2.0, 1.0, 1.0)) -> Scan:
    sz, sy, sx = spacing
    return Scan(vol.astype(np.float32), spacing, np.diag([sx, sy, sz, 1.0]), Modality.CT)


def test_sampling_skips_background_slices():
    vol = np.full((30, 32, 32), -1024.0, np.float32)
    vol[5:21, 8:24, 8:24] = 40.0  # body only in slices 5..20
    scan = _ct(vol)
    indices = sample_indices(scan, "axial", 6)
    assert indices[0] == 5 and indices[-1] == 20 and len(indices) == 6
    assert indices == sorted(set(indices))
    assert sample_indices(scan, "axial", 100) == list(range(5, 21))  # never more than the extent
    assert sample_indices(_ct(np.zeros((4, 8, 8))), "axial", 3) == [0, 2, 3]  # nothing but background: whole range
    images = scan_images(scan, planes=("axial", "coronal"), n_slices=4)
    assert [im.plane for im in images] == ["axial"] * 4 + ["coronal"] * 4
    assert all(im.pixels.shape == (448, 448, 3) and im.pixels.dtype == np.uint8 for im in images)


def test_model_images_are_letterboxed_with_square_pixels():
    vol = np.full((10, 100, 50), 40.0, np.float32)  # coronal: 10 slices x 2 mm = 20 mm tall, 50 mm wide
    scan = _ct(vol)
    image = model_image(scan, "coronal", 50, size=100)
    top, left, h, w = image.box
    assert (h, w) == (40, 100) and (top, left) == (30, 0)
    assert image.pixels[:top].max() == 0 and image.pixels[top : top + h].min() > 0
    assert image.slice_shape == extract_slice(scan, "coronal", 50)[0].shape
    heat = np.zeros((100, 100), np.float32)
    heat[top : top + h, : w // 2] = 1.0  # left half of the slice
    back = heat_to_slice(heat, image)
    assert back.shape == image.slice_shape
    assert back[:, :20].min() > 0.9 and back[:, -20:].max() < 0.1


def test_colour_images_go_in_unchanged():
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.float32)
    scan = Scan(rgb, (1.0, 1.0), np.eye(4), Modality.DERMOSCOPY)
    image = model_image(scan, size=64)
    np.testing.assert_array_equal(image.pixels, rgb.astype(np.uint8))
    assert (image.plane, image.index) == ("image", 0)


def test_render_view_overlay_blends_only_where_heat_is():
    scan = _ct(np.full((4, 16, 16), 40.0))
    plain = render_view(scan, "axial", 2, 40, 400, size=64, letters=False, square=False)
    zero = render_view(scan, "axial", 2, 40, 400, size=64, letters=False, square=False, overlay=np.zeros((16, 16)))
    np.testing.assert_array_equal(plain, zero)
    heat = np.zeros((16, 16), np.float32)
    heat[:8, :8] = 1.0  # top-left quarter of the slice, in slice space
    hot = render_view(scan, "axial", 2, 40, 400, size=64, letters=False, square=False, overlay=heat)
    changed = np.any(hot != plain, axis=-1)
    assert changed[:28, :28].all() and not changed[36:, 36:].any()
    assert hot[5, 5, 0] > hot[5, 5, 2]  # warm colour
    image2d = Scan(np.full((10, 20), 100.0, np.float32), (1.0, 1.0), np.eye(4), Modality.XRAY)
    out = render_view(image2d, "image", 0, 100, 200, size=40, overlay=np.ones((5, 10)))
    assert out.shape == (20, 40, 3) and out[..., 0].mean() > out[..., 2].mean()


# --------------------------------------------------------------------------- tiny real model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    folder = tiny_clip_folder(tmp_path_factory.mktemp("tiny_clip") / "model")
    return f"local-dir:{folder}"


@pytest.fixture(scope="module")
def ct_small():
    import pydicom

    from engine.io import load_one

    return load_one([pydicom.data.get_testdata_file("CT_small.dcm")])[0]


@pytest.fixture(scope="module")
def volume():
    from engine.io import load_one

    return load_one([NIBABEL_DATA / "example4d.nii.gz"])[0]


def test_probabilities_sum_to_one_and_ranking_is_deterministic(tiny, ct_small, volume):
    labels = ["liver", "lung", "bone", "brain"]
    for scan in (ct_small, volume):
        first = label_scan(scan, labels, tiny)
        second = label_scan(scan, labels, tiny)
        assert sum(s.probability for s in first.labels) == pytest.approx(1.0, abs=1e-9)
        assert [s.label for s in first.labels] == [s.label for s in second.labels]
        assert first.to_dict() == second.to_dict()
        probs = [s.shown for s in first.labels]  # ranked by the reported probability (engine.zeroshot.trusted)
        assert probs == sorted(probs, reverse=True)
        assert sorted(s.label for s in first.labels) == sorted(labels)
        data = json.loads(json.dumps(first.to_dict()))
        assert data["mode"] == "softmax" and data["model"].startswith("local-dir:") and data["inference_path"]
    vol = label_scan(volume, labels, tiny, n_slices=5)
    assert vol.aggregation == "mean" and 1 <= len(vol.per_slice) <= 5
    for s in vol.per_slice:
        assert s.plane == "axial" and sum(s.probabilities.values()) == pytest.approx(1.0)
    assert label_scan(ct_small, labels, tiny).aggregation is None


def test_volume_mean_and_max_on_the_tiny_model(tiny, volume):
    labels = ["liver", "lung", "brain"]
    mean = label_scan(volume, labels, tiny, n_slices=4, planes=["axial", "sagittal"])
    best = label_scan(volume, labels, tiny, n_slices=4, planes=["axial", "sagittal"], aggregation="max")
    assert {s.plane for s in mean.per_slice} == {"axial", "sagittal"}
    for label in labels:
        cos = [s.scores[label] for s in mean.per_slice]
        assert next(s.score for s in mean.labels if s.label == label) == pytest.approx(np.mean(cos), abs=1e-6)
        assert next(s.score for s in best.labels if s.label == label) == pytest.approx(np.max(cos), abs=1e-6)
    scale = mean.logit_scale
    expected = _softmax([scale * s.score for s in mean.labels])
    assert [s.probability for s in mean.labels] == pytest.approx(list(expected))


def test_present_absent_on_the_tiny_model(tiny, ct_small):
    result = label_scan(ct_small, ["liver", "kidney stone", "fracture"], tiny, mode="present-absent")
    assert result.mode == "present-absent"
    for s in result.labels:
        assert 0.0 < s.probability < 1.0 and s.absent_score is not None
        assert s.probability == pytest.approx(_sigmoid(result.logit_scale * (s.score - s.absent_score)))
    single = label_scan(ct_small, ["liver"], tiny, mode="present-absent")  # one finding is fine here
    assert len(single.labels) == 1


def test_default_labels_come_from_the_modality_preset(tiny, ct_small):
    result = label_scan(ct_small, None, tiny)
    assert result.prompt_set == "ct" and result.modality == "CT"
    from engine.zeroshot import load_prompt_set

    assert sorted(s.label for s in result.labels) == sorted(load_prompt_set("ct").default_labels)
    xray = label_scan(ct_small, ["pneumonia", "normal"], tiny, prompt_set="xray")
    assert xray.prompt_set == "xray"


def test_evidence_map_is_in_slice_space(tiny, volume, ct_small):
    pytest.importorskip("engine.heatmap")
    heat = evidence_map(volume, "brain", tiny, plane="axial", index=2)
    assert heat.shape == extract_slice(volume, "axial", 2)[0].shape
    assert heat.dtype == np.float32 and 0.0 <= heat.min() and heat.max() <= 1.0
    heat2d = evidence_map(ct_small, "liver", tiny, plane="image")
    assert heat2d.shape == ct_small.voxels.shape
    view = render_view(ct_small, "image", 0, 40, 400, size=128, overlay=heat2d)
    assert view.shape[:2] == (128, 128)


def test_evidence_without_the_heatmap_module_is_a_clear_error(tiny, ct_small, monkeypatch):
    from engine.zeroshot import HeatmapUnavailable

    monkeypatch.setitem(sys.modules, "engine.heatmap", None)  # import fails
    with pytest.raises(HeatmapUnavailable, match="not available"):
        evidence_map(ct_small, "liver", tiny)
