"""Does the model see the modality the DICOM header says? A cheap, independent out-of-distribution signal.

Design decisions
- Only a DICOM header's Modality counts as a claim (`header_modality`): a
  NIfTI's "CT" is engine.io's guess from Hounsfield-like values and a PNG
  has none, so neither can conflict with anything.
- The CLIP's guess reuses the image embeddings already computed for
  labelling (no second forward): a softmax over the "image type" label set
  of the "other" prompt set (the seven modalities, the ensembles the
  training evaluation scores modality recognition with), volumes by the
  mean of their slices' logits as labelling aggregates them, calibrated by
  the checkpoint's softmax calibration for the "other" key when it has one.
- A conflict needs confidence both ways: the model's top guess is another
  modality and it gives the header's modality less than
  `CONFLICT_MAX_P`. A model that is merely unsure is not a conflict (its
  labels carry their own "uncertain").
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.scan import Modality

CONFLICT_MAX_P = 0.1  # the model must give the header's modality less than this to contradict it
IMAGE_TYPE_SET = "image type"  # label set of assets/prompts/other.json naming the seven modalities
# the "image type" labels of the other prompt set, by the modality they name
IMAGE_TYPE_MODALITY = {
    "chest X-ray": Modality.XRAY,
    "CT scan": Modality.CT,
    "MRI scan": Modality.MR,
    "ultrasound image": Modality.US,
    "histopathology slide": Modality.PATHOLOGY,
    "fundus photograph": Modality.FUNDUS,
    "dermoscopy image": Modality.DERMOSCOPY,
}
_WORDS = {
    Modality.XRAY: "X-ray",
    Modality.CT: "CT",
    Modality.MR: "MR",
    Modality.US: "ultrasound",
    Modality.PATHOLOGY: "pathology",
    Modality.FUNDUS: "fundus photograph",
    Modality.DERMOSCOPY: "dermoscopy",
}


def header_modality(scan) -> Modality | None:
    """The modality a DICOM header states (None for NIfTI, images, and DICOM without a known modality)."""
    if not str(scan.provenance.reader).startswith("dicom") or scan.modality == Modality.OTHER:
        return None
    return scan.modality


def word(modality: Modality | str) -> str:
    m = modality if isinstance(modality, Modality) else Modality(str(modality))
    return _WORDS.get(m, m.value)


def clip_modality(clip, embeddings: np.ndarray) -> dict[Modality, float]:
    """P(modality) from a CLIP's image embeddings (one row per image; several rows: slices of one scan)."""
    from engine.zeroshot.prompts import class_embeddings, load_prompt_set

    pset = load_prompt_set("other")
    labels = list(pset.label_sets[IMAGE_TYPE_SET])
    text = class_embeddings(clip, labels, pset)
    logits = float(clip.logit_scale) * (np.asarray(embeddings, dtype=np.float64) @ np.asarray(text, dtype=np.float64).T).mean(axis=0)
    trust = getattr(clip, "trust", None)
    calibrator = trust.softmax.get("other") if trust is not None else None
    if calibrator is not None:
        probs = calibrator.choices(logits)
    else:
        z = np.exp(logits - logits.max())
        probs = z / z.sum()
    return {IMAGE_TYPE_MODALITY[label]: float(p) for label, p in zip(labels, probs) if label in IMAGE_TYPE_MODALITY}


def conflict(probabilities: dict[Modality, float], header: Modality | None, model: str = "the model") -> str | None:
    """A reason when the model confidently reads another modality than the header's (module docstring)."""
    if header is None or not probabilities or header not in IMAGE_TYPE_MODALITY.values():
        return None
    top = max(probabilities, key=probabilities.get)
    if top == header or probabilities.get(header, 0.0) >= CONFLICT_MAX_P:
        return None
    return (
        f"{model} reads this as {word(top)} ({100 * probabilities[top]:.0f}%) but the DICOM header says {word(header)} "
        f"({100 * probabilities.get(header, 0.0):.0f}% for {word(header)})"
    )


def summary(probabilities: dict[Modality, float]) -> dict[str, Any]:
    top = max(probabilities, key=probabilities.get) if probabilities else None
    return {
        "modality_guess": None if top is None else top.value,
        "modality_guess_probability": None if top is None else round(probabilities[top], 4),
    }
