"""The 3D organ-presence linear probe: train subject -> held-out subject, per organ, from cached tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.models.volume_prep import VolumePrep
from training.organ_probe import run_probe
from training.qformer_cache import CachedTokens, TokenCache, row_key

from _rows import volume_qa_row


def _rows_and_cache(tmp_path, informative: bool):
    rng = np.random.default_rng(0)
    cache = TokenCache(tmp_path, "volume", VolumePrep(), 128, {"type": "i3resnet-tiny"})
    rows = []
    for subject, split, n in (("b", "train", 40), ("a", "test", 30)):
        for i in range(n):
            liver = bool(rng.random() < 0.5)
            status = {"liver": "yes" if liver else "no", "brain": "no", "spleen": "ambiguous"}
            crop = {"z": [0, 4 + i], "y": [0, 8], "x": [0, 8]}
            row = volume_qa_row(
                f"ct_organs_3d/{subject}/crop{i:03d}",
                "ct_organs_3d",
                subject,
                f"{subject}.nii.gz",
                crop,
                split,
                extra={"organ_status": status},
            )
            tokens = torch.tensor(rng.normal(size=(6, 16)), dtype=torch.float16)
            if informative and liver:
                tokens[2, 5] += 8.0  # one token, one channel: "the liver is here"
            cache.items[row_key(row)] = CachedTokens(tokens, (1, 2, 3))
            rows.append(row)
    return rows, cache


def test_probe_finds_an_organ_the_tokens_carry_and_only_then(tmp_path):
    rows, cache = _rows_and_cache(tmp_path, informative=True)
    result = run_probe(rows, cache)
    assert result["train_subjects"] == ["b"] and result["test_subjects"] == ["a"] and result["n_test"] == 30
    assert set(result["per_organ"]) == {"liver"}  # brain never present, spleen ambiguous: not scoreable
    assert result["per_organ"]["liver"]["auc"] > 0.95 and result["features"] == "mean + max of 16-d tokens"
    noise, cache2 = _rows_and_cache(tmp_path / "n", informative=False)
    assert run_probe(noise, cache2)["per_organ"]["liver"]["auc"] < 0.8


def test_probe_needs_both_subjects_cached(tmp_path):
    rows, cache = _rows_and_cache(tmp_path, informative=True)
    with pytest.raises(ValueError, match="both the train and test splits"):
        run_probe([r for r in rows if r.split == "train"], cache)
