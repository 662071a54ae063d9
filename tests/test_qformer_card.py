"""The Q-Former card is written from the evaluation's numbers, each with its comparison."""

from __future__ import annotations

from training.qformer_card import card


def _results(ours: float, clip: float) -> dict:
    return {
        "3d": {"organ_presence_ct": {"n": 10, "accuracy": 0.7, "balanced_accuracy": 0.65},
               "whole_volumes": [{"subject": "s", "family": "modality", "truth": "ct", "answer": "ct", "confidence": 0.9, "correct": True}],
               "by_family": {"ct_organs_3d/modality": {"n": 4, "accuracy": 1.0}},
               "organ_auc": {"n_crops": 5, "qformer_labels": {"mean_auc": 0.6}, "qformer_yes": {"mean_auc": 0.55}, "clip_slices": {"mean_auc": 0.7}}},
        "2d": {"per_dataset": {"busi": {"n": 3, "accuracy": ours}}, "groups": {"busi: malignant?": {"n": 3, "accuracy": ours}},
               "clip_baseline": {"per_dataset": {"busi": {"accuracy": clip}}, "groups": {"busi: malignant?": {"accuracy": clip}}}},
        "open": {"ct_organs_3d/organs_in_view": {"n": 2, "exact_match": 0.5}},
        "medpix": {"n": 60, "exact_match": 0.0, "seconds": 12.0},
    }


def test_card_states_each_aim_and_its_comparison():
    config = {"qformer": {"num_query_tokens": 32, "num_hidden_layers": 4, "hidden_size": 384, "cross_attention_frequency": 2,
                          "encoder_hidden_size": 2048, "decoder_vocab": [1, 2], "frozen": ["x"]}, "volume_prep": {}, "image_size": 128}
    text = card(config, _results(0.8, 0.7), command="python -m training.rebuild_qformer", minutes=30)
    assert "missed" in text and "0.700" in text and "not for diagnosis" in text
    assert "| busi | 3 | 0.800 | 0.700 | yes |" in text
    worse = card(config, _results(0.6, 0.7), command="c", minutes=None)
    assert "NO (-0.100)" in worse


def test_card_names_the_earlier_phase_a_checkpoint_continued_from(tmp_path):
    import json

    from training.qformer import init_provenance

    first = tmp_path / "first"
    first.mkdir()
    (first / "config.json").write_text(json.dumps({"training": {"steps": 500, "out": "x", "closed_weight": 0.0}, "step": 375}))
    config = {"qformer": {"num_query_tokens": 32, "num_hidden_layers": 4, "hidden_size": 384, "cross_attention_frequency": 2,
                          "encoder_hidden_size": 2048, "decoder_vocab": [1], "frozen": []}, "volume_prep": {}, "image_size": 128,
              "training": {"steps": 650, "closed_weight": 1.0, "init": str(first)}, "init_from": init_provenance(json.loads((first / "config.json").read_text()))}
    text = card(config, _results(0.8, 0.7), command="c", minutes=None)
    assert 'Continued from the step-375 checkpoint of an earlier phase, trained with: `{"steps": 500, "closed_weight": 0.0}`' in text
