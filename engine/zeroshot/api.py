"""Zero-shot labels: a scan (or images) + a label list -> ranked labels with probabilities.

Design decisions
- Scores are cosine similarities between L2-normalised image embeddings and
  ensembled class embeddings (engine.zeroshot.prompts); probabilities are a
  softmax over labels of `logit_scale * cosine`, with the model's own
  (learned, exp'd, clamped at 100) logit scale, as CLIP does.
- Present/absent mode (CT-CLIP): per label, a two-way softmax between the
  "present" and "absent" ensembles, i.e. sigmoid(scale * (cos_p - cos_a)),
  an independent probability per finding (they need not sum to 1).
- Volumes through a 2D model: sampled slices (engine.zeroshot.imaging) are
  scored one by one and aggregated per label, by the mean (mean of logits,
  the default) or the max (a finding seen on any slice). The aggregated
  cosine is the reported `score` and the probability is computed from it,
  so `probability == softmax(scale * score)` holds for volumes as for 2D.
  With max in present/absent mode, the slice with the largest present-absent
  margin is the one reported. Per-slice probabilities and cosines are kept.
- Ranking is by probability, ties broken by label, so it is deterministic.
- The result is a typed dataclass with `to_dict()` for JSON (CLI, app).
- Trust (issue 14, engine.zeroshot.trusted): every result carries the
  calibrated probability (when the checkpoint is calibrated), the reported
  probability (calibrated, then bounded by the field-of-view check for
  organs in volumes) with its verdict (present / absent / uncertain, or
  most probable / uncertain / less probable), the reasons a label was
  bounded, and the scan's out-of-distribution flag. `probability` and
  `score` stay the model's raw outputs; labels are ranked by the reported
  probability (the raw one when nothing changed it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from engine.errors import MedLensError
from engine.scan import Scan
from engine.trust import OodFlag
from engine.zeroshot.imaging import DEFAULT_SLICES, ModelImage, heat_to_slice, model_image, scan_images
from engine.zeroshot.prompts import (
    PromptError,
    PromptSet,
    class_embeddings,
    clean_labels,
    load_prompt_set,
    pair_embeddings,
)

SOFTMAX = "softmax"
PRESENT_ABSENT = "present-absent"
MODES = (SOFTMAX, PRESENT_ABSENT)
AGGREGATIONS = ("mean", "max")


class HeatmapUnavailable(MedLensError):
    """Evidence heat maps need engine.heatmap, which this install lacks."""


@dataclass
class LabelScore:
    label: str  # as the user typed it
    probability: float  # the model's raw probability: softmax over labels, or P(present) in present/absent mode
    score: (
        float  # cosine with the label's ensembled embedding ("present" ensemble in present/absent mode); aggregated over slices for volumes
    )
    absent_score: float | None = None  # present/absent mode: cosine with the "absent" ensemble
    calibrated_probability: float | None = None  # the checkpoint's calibration applied; None when it has none
    reported_probability: float | None = None  # what is shown: calibrated (when it is), bounded by the field of view
    verdict: str | None = None  # present / absent / uncertain; softmax: most probable / uncertain / less probable
    uncertain: bool | None = None
    fov_bound: float | None = None  # at most this likely to be in the field of view (organs in volumes)
    reasons: list[str] = field(default_factory=list)  # why the reported probability is lower than the model's

    @property
    def shown(self) -> float:
        """The probability to show: the reported one, the raw one before trust was applied."""
        return self.probability if self.reported_probability is None else self.reported_probability


@dataclass
class SliceScores:
    plane: str  # "axial" / "coronal" / "sagittal" ("image" for 2D)
    index: int  # slice index along the plane's normal (engine.views convention)
    probabilities: dict[str, float]  # label -> probability on this slice alone
    scores: dict[str, float]  # label -> cosine on this slice


@dataclass
class LabelResult:
    labels: list[LabelScore]  # ranked: highest probability first, ties by label
    mode: str  # "softmax" or "present-absent"
    aggregation: str | None  # "mean" / "max" for volumes; None for a single 2D image
    per_slice: list[SliceScores]  # one per model image of a volume (empty for 2D)
    model_id: str  # ClipModel.model_id (name@revision)
    inference_path: str  # the path that encoded these images: ClipModel.path.name_for(n) ("fp32", "openvino-bf16", ...)
    prompt_set: str  # prompt-set key used ("xray", "ct", ...)
    logit_scale: float  # the scale the probabilities were computed with
    modality: str = ""  # the scan's modality, when labelling a scan
    calibrated: bool = False  # the reported probabilities are calibrated
    trust_note: str = ""  # "not calibrated: ..." or what the calibration was fitted on
    field_of_view: dict[str, Any] | None = None  # engine.trust.anatomy.FieldOfView.to_dict() (volumes, check on)
    fov_note: str = ""  # why there is no field-of-view check, or which evidence was missing
    ood: Any = None  # engine.trust.OodFlag of the image or scan
    scope: str | None = None  # what one score describes: "volume" / "image" (the Q-Former's whole-scan labels); None: not stated

    @property
    def top(self) -> LabelScore:
        return self.labels[0]

    def probabilities(self) -> dict[str, float]:
        return {s.label: s.probability for s in self.labels}

    def to_dict(self, per_slice: bool = True, digits: int = 6) -> dict[str, Any]:
        """JSON-ready dict (floats rounded to `digits`)."""

        def r(x: float | None) -> float | None:
            return None if x is None else round(float(x), digits)

        out: dict[str, Any] = {
            "labels": [
                {
                    "label": s.label,
                    "probability": r(s.probability),
                    "score": r(s.score),
                    **({"absent_score": r(s.absent_score)} if s.absent_score is not None else {}),
                    "calibrated_probability": r(s.calibrated_probability),
                    "reported_probability": r(s.shown),
                    "verdict": s.verdict,
                    "uncertain": s.uncertain,
                    "fov_bound": r(s.fov_bound),
                    "reasons": list(s.reasons),
                }
                for s in self.labels
            ],
            "mode": self.mode,
            "aggregation": self.aggregation,
            "model": self.model_id,
            "inference_path": self.inference_path,
            "prompt_set": self.prompt_set,
            "logit_scale": r(self.logit_scale),
            "modality": self.modality,
            "n_slices": len(self.per_slice),
            "calibrated": self.calibrated,
            "trust": self.trust_note,
            "field_of_view": self.field_of_view,
            "fov_note": self.fov_note,
            **(self.ood.to_dict() if self.ood is not None else OodFlag.unknown().to_dict()),
        }
        if self.scope is not None:
            out["scope"] = self.scope
        if per_slice:
            out["per_slice"] = [
                {
                    "plane": s.plane,
                    "index": s.index,
                    "probabilities": {k: r(v) for k, v in s.probabilities.items()},
                    "scores": {k: r(v) for k, v in s.scores.items()},
                }
                for s in self.per_slice
            ]
        return out


# --------------------------------------------------------------------------- models
def resolve_model(model: Any = None):
    """A ClipModel: passed through, or loaded from a source string (None = the shipped default).

    Raises ModelError with a message saying what to do (no default installed,
    unknown name, missing folder).
    """
    from engine.models import catalog

    return catalog.resolve(model, catalog.CLIP)


# --------------------------------------------------------------------------- scoring core
def _softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # stable for large |x|


def check_mode(mode: str, aggregation: str | None, n_labels: int) -> None:
    if mode not in MODES:
        raise PromptError(f"unknown mode {mode!r}; choose {' or '.join(MODES)}")
    if aggregation is not None and aggregation not in AGGREGATIONS:
        raise PromptError(f"unknown aggregation {aggregation!r}; choose {' or '.join(AGGREGATIONS)}")
    if mode == SOFTMAX and n_labels < 2:
        raise PromptError(
            "a softmax over one label always gives 1: give at least two labels, or use present-absent mode to score a single finding"
        )


def score_embeddings(
    image_embeddings: np.ndarray,
    labels: Sequence[str],
    text_embeddings: np.ndarray | tuple[np.ndarray, np.ndarray],
    logit_scale: float,
    *,
    mode: str = SOFTMAX,
    aggregation: str | None = "mean",
    slices: Sequence[tuple[str, int]] | None = None,
) -> tuple[list[LabelScore], list[SliceScores]]:
    """The numeric core: (N, D) image embeddings x label embeddings -> (ranked scores, per-slice scores).

    text_embeddings: (L, D) class embeddings (softmax mode) or a (present,
    absent) pair of (L, D) arrays (present/absent mode). N > 1 images are
    aggregated with `aggregation`; `slices` names them (plane, index) for the
    per-slice list (empty when None).
    """
    labels = list(labels)
    img = np.asarray(image_embeddings, dtype=np.float64)
    if img.ndim != 2 or img.shape[0] == 0:
        raise MedLensError("no image to score")
    scale = float(logit_scale)
    agg = aggregation or "mean"
    absent_scores: np.ndarray | None = None
    if mode == SOFTMAX:
        cos = img @ np.asarray(text_embeddings, dtype=np.float64).T  # (N, L)
        per_prob = _softmax(scale * cos, axis=1)
        score = cos.mean(axis=0) if agg == "mean" else cos.max(axis=0)
        prob = _softmax(scale * score)
    elif mode == PRESENT_ABSENT:
        present, absent = text_embeddings  # type: ignore[misc]
        cos = img @ np.asarray(present, dtype=np.float64).T
        cos_a = img @ np.asarray(absent, dtype=np.float64).T
        per_prob = _sigmoid(scale * (cos - cos_a))
        if agg == "mean":
            score, absent_scores = cos.mean(axis=0), cos_a.mean(axis=0)
        else:
            best = np.argmax(cos - cos_a, axis=0)  # the slice where the finding is most "present"
            cols = np.arange(len(labels))
            score, absent_scores = cos[best, cols], cos_a[best, cols]
        prob = _sigmoid(scale * (score - absent_scores))
    else:
        raise PromptError(f"unknown mode {mode!r}; choose {' or '.join(MODES)}")
    ranked = [
        LabelScore(
            label=label,
            probability=float(prob[i]),
            score=float(score[i]),
            absent_score=None if absent_scores is None else float(absent_scores[i]),
        )
        for i, label in enumerate(labels)
    ]
    ranked.sort(key=lambda s: (-s.probability, s.label))
    per_slice = []
    if slices is not None:
        for n, (plane, index) in enumerate(slices):
            per_slice.append(
                SliceScores(
                    plane=plane,
                    index=int(index),
                    probabilities={label: float(per_prob[n, i]) for i, label in enumerate(labels)},
                    scores={label: float(cos[n, i]) for i, label in enumerate(labels)},
                )
            )
    return ranked, per_slice


def text_embeddings(model, labels: Sequence[str], prompt_set: PromptSet, mode: str = SOFTMAX):
    """(L, D) class embeddings (softmax) or (present, absent) pair (present/absent mode)."""
    if mode == PRESENT_ABSENT:
        return pair_embeddings(model, labels, prompt_set)
    return class_embeddings(model, labels, prompt_set)


# --------------------------------------------------------------------------- public API
def label_images(
    images: Sequence[np.ndarray] | Sequence[ModelImage],
    labels: Sequence[str] | str | None,
    model: Any = None,
    *,
    prompt_set: str | PromptSet = "other",
    mode: str = SOFTMAX,
    aggregation: str | None = "mean",
    context: Any = None,
) -> LabelResult:
    """Label uint8 images (grey HxW or RGB HxWx3) or ModelImages; several images are aggregated as slices.

    context: an engine.zeroshot.trusted.ScanContext (header modality, field of view) when the images come from a scan."""
    pset = prompt_set if isinstance(prompt_set, PromptSet) else load_prompt_set(prompt_set)
    labels = pset.default_labels if labels is None else clean_labels(labels)
    if not images:
        raise MedLensError("no image to label")
    check_mode(mode, aggregation, len(labels))
    clip = resolve_model(model)
    pixels = [im.pixels if isinstance(im, ModelImage) else np.asarray(im) for im in images]
    return label_from_embeddings(
        clip.encode_images(pixels), images, labels, clip, pset, mode=mode, aggregation=aggregation, context=context
    )


def label_from_embeddings(
    embeddings: np.ndarray,
    images: Sequence[np.ndarray] | Sequence[ModelImage],
    labels: Sequence[str],
    clip: Any,
    prompt_set: PromptSet,
    *,
    mode: str = SOFTMAX,
    aggregation: str | None = "mean",
    context: Any = None,
) -> LabelResult:
    """Labels from image embeddings already computed by `clip` (one row per image; the batch runner
    encodes the images of many scans in one call). `labels` are cleaned and checked by the caller.
    Trust (calibration, field-of-view bounds from `context`, OOD flag) is applied (engine.zeroshot.trusted)."""
    from engine.zeroshot import trusted

    # several images are slices of one study; a single ModelImage of a volume is one slice too
    is_volume = len(images) > 1 or (isinstance(images[0], ModelImage) and images[0].plane != "image")
    slices = None
    if is_volume:
        slices = [(im.plane, im.index) if isinstance(im, ModelImage) else ("image", n) for n, im in enumerate(images)]
    ranked, per_slice = score_embeddings(
        embeddings,
        labels,
        text_embeddings(clip, labels, prompt_set, mode),
        clip.logit_scale,
        mode=mode,
        aggregation=aggregation if is_volume else None,
        slices=slices,
    )
    result = LabelResult(
        labels=ranked,
        mode=mode,
        aggregation=(aggregation or "mean") if is_volume else None,
        per_slice=per_slice,
        model_id=clip.model_id,
        inference_path=_path_used(clip, len(images)),
        prompt_set=prompt_set.key,
        logit_scale=float(clip.logit_scale),
    )
    trusted.apply(result, clip, embeddings, context)
    return result


def _path_used(clip: Any, n_images: int) -> str:
    """The inference path that encoded these images (fast paths are chosen per batch-size class)."""
    path = getattr(clip, "path", None)
    if hasattr(path, "name_for"):
        return path.name_for(n_images)
    return getattr(path, "name", "fp32")


def label_scan(
    scan: Scan,
    labels: Sequence[str] | str | None = None,
    model: Any = None,
    *,
    prompt_set: str | PromptSet | None = None,
    mode: str = SOFTMAX,
    aggregation: str = "mean",
    planes: Sequence[str] = ("axial",),
    n_slices: int = DEFAULT_SLICES,
    volume: int = 0,
    fov_check: str | None = None,
    volume_model: Any = None,
) -> LabelResult:
    """Zero-shot labels for a scan.

    labels: list or comma/newline-separated string; None = the default preset
    of the prompt set. An empty list raises PromptError.
    model: a ClipModel, a source string (shipped name, hf-hub:, local-dir:),
    or None for the shipped default (ModelError when none is installed).
    prompt_set: modality key ("xray", "ct", ...); None = from scan.modality.
    Volumes: `n_slices` sampled slices per plane in `planes`, aggregated by
    `aggregation` ("mean" or "max"); per-slice scores in the result.
    fov_check: "auto" (volume model + header + geometry), "physical" or "off"
    (engine.zeroshot.trusted); volume_model: the Q-Former source for "auto"
    (None: the shipped default).
    """
    from engine.zeroshot.trusted import check_fov_mode, scan_context

    pset = prompt_set if isinstance(prompt_set, PromptSet) else load_prompt_set(prompt_set or scan.modality)
    labels = pset.default_labels if labels is None else clean_labels(labels)
    check_mode(mode, aggregation, len(labels))
    fov_check = check_fov_mode(fov_check)
    clip = resolve_model(model)
    images = scan_images(scan, planes=tuple(planes), n_slices=n_slices, volume=volume)
    context = scan_context(scan, fov_check, volume_model, volume)
    result = label_images(images, labels, clip, prompt_set=pset, mode=mode, aggregation=aggregation, context=context)
    result.modality = scan.modality.value
    return result


def evidence_map(
    scan: Scan,
    label: str,
    model: Any = None,
    *,
    prompt_set: str | PromptSet | None = None,
    plane: str = "axial",
    index: int | None = None,
    volume: int = 0,
) -> np.ndarray:
    """Where the image supports `label`: float32 (rows, cols) in [0, 1] in slice space.

    Slice space is engine.views.extract_slice's (pass it to
    render_view(..., overlay=...)); 2D scans: the image's (rows, cols).
    Needs engine.heatmap; raises HeatmapUnavailable when it is missing.
    """
    import importlib

    try:
        heatmap = importlib.import_module("engine.heatmap")
    except ImportError:
        raise HeatmapUnavailable("evidence heat maps are not available in this install (engine.heatmap is missing)") from None
    pset = prompt_set if isinstance(prompt_set, PromptSet) else load_prompt_set(prompt_set or scan.modality)
    [label] = clean_labels([label])
    clip = resolve_model(model)
    image = model_image(scan, plane, index, volume=volume)
    embedding = class_embeddings(clip, [label], pset)[0]
    heat = heatmap.image_heatmap(clip, image.pixels, embedding)
    return heat_to_slice(heat, image)


__all__ = [
    "AGGREGATIONS",
    "MODES",
    "PRESENT_ABSENT",
    "SOFTMAX",
    "HeatmapUnavailable",
    "LabelResult",
    "LabelScore",
    "SliceScores",
    "evidence_map",
    "label_from_embeddings",
    "label_images",
    "label_scan",
    "resolve_model",
    "score_embeddings",
    "text_embeddings",
]
