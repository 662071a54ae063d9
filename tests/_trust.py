"""Hand-made trust for tiny test checkpoints: a "trust" block in config.json and a reference set beside the weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.trust import Calibration, Calibrator
from engine.trust.ood import REFERENCE_FILE, ReferenceSet


def write_trust(
    folder: Path,
    *,
    present_absent: dict[str, Calibrator] | None = None,
    softmax: dict[str, Calibrator] | None = None,
    closed: dict[str, Calibrator] | None = None,
    reference: ReferenceSet | None = None,
) -> Path:
    """Add a trust block (as training/ writes it, engine/trust contract) and optionally a reference set to a checkpoint folder."""
    config_path = Path(folder) / "config.json"
    config = json.loads(config_path.read_text())
    block = {"fitted_on": "hand-made test calibration"}
    for key, calibrators in (("present_absent", present_absent), ("softmax", softmax), ("closed", closed)):
        if calibrators:
            block[key] = Calibration(dict(calibrators)).to_config()
    if reference is not None:
        reference.save(Path(folder))
        block["ood"] = {"method": "knn", "k": reference.k, "quantile": 0.99, "file": REFERENCE_FILE}
    config["trust"] = block
    config_path.write_text(json.dumps(config, indent=1))
    from engine.models import catalog

    catalog.clear_cache()  # a model loaded before the block was written must not be served from the cache
    return Path(folder)


def grey_image(seed: int, size: int = 64) -> np.ndarray:
    """One of a family of grey, smooth, X-ray-like test images (uint8)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    img = 120 + 60 * np.sin(x / (5 + 5 * rng.random()) + 6 * rng.random()) * np.cos(y / (6 + 4 * rng.random()))
    return np.clip(img + rng.normal(0, 8, (size, size)), 0, 255).astype(np.uint8)


def foreign_image(size: int = 64) -> np.ndarray:
    """An image nothing like the grey family: saturated magenta and green stripes (uint8 RGB)."""
    img = np.zeros((size, size, 3), np.uint8)
    img[::8] = [255, 0, 255]
    img[:, ::4, 1] = 255
    return img


def grey_reference(clip, n_train: int = 40, n_held: int = 20, k: int = 5) -> ReferenceSet:
    """A reference set of the grey family in `clip`'s space, thresholded on held-out grey images."""
    train = clip.encode_images([grey_image(i) for i in range(n_train)])
    held = clip.encode_images([grey_image(1000 + i) for i in range(n_held)])
    return ReferenceSet.fit(train, ["xray"] * n_train, held, k=k, quantile=0.99)
