"""The app shows trust (issue 14): through its API (gradio_client), with a tiny CLIP that carries a trust block.

A foreign image gets the out-of-distribution warning first in the labels panel's status and in its JSON; a
familiar one does not; the chart shows the reported (calibrated) numbers and the model says it is calibrated.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _app import running_app  # noqa: E402
from _models import tiny_clip_folder  # noqa: E402
from _trust import foreign_image, grey_image, grey_reference, write_trust  # noqa: E402

from engine.trust import Calibrator  # noqa: E402


@pytest.fixture(scope="module")
def trusted(tmp_path_factory):
    from engine.models.checkpoint import load_folder

    folder = tiny_clip_folder(tmp_path_factory.mktemp("trusted") / "model")
    write_trust(folder, softmax={"default": Calibrator("temperature", 3.0)}, reference=grey_reference(load_folder(folder)))
    return f"local-dir:{folder}"


@pytest.fixture(scope="module")
def client(tmp_path_factory, trusted):
    from gradio_client import Client

    with running_app(tmp_path_factory.mktemp("gradio_cache"), model=trusted) as (url, _demo):
        yield Client(url, verbose=False, download_files=False)


def _label_png(client, model, pixels, tmp_path, name):
    from gradio_client import handle_file
    from PIL import Image

    png = tmp_path / f"{name}.png"
    Image.fromarray(pixels).save(png)
    client.predict([handle_file(str(png))], api_name="/load_files")
    return client.predict(
        0, 0, model, "xray", "pneumonia\nnormal\npleural effusion", "softmax", "mean", ["axial"], 4, api_name="/label_scan"
    )


def test_the_labels_panel_warns_on_a_foreign_image_and_shows_calibrated_numbers(client, trusted, tmp_path):
    bar, _slices, result, _evidence, status = _label_png(client, trusted, foreign_image(), tmp_path, "foreign")
    assert result["out_of_distribution"] is True and result["ood_reasons"]
    assert status.index("Out of distribution") < status.index("calibrated on hand-made test calibration")
    assert result["calibrated"] is True
    figure = json.loads(bar["plot"] if "plot" in bar else bar["value"]["plot"])
    shown = [100 * r["reported_probability"] for r in result["labels"]][::-1]
    assert figure["data"][0]["x"] == pytest.approx(shown)  # the bars are the calibrated, reported numbers
    assert "calibrated" in figure["layout"]["title"]["text"] and "not calibrated" not in figure["layout"]["title"]["text"]
    _bar, _slices, familiar, _evidence, status = _label_png(client, trusted, grey_image(4000), tmp_path, "grey")
    assert familiar["out_of_distribution"] is False and "Out of distribution" not in status
