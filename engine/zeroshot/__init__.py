"""Zero-shot labels: prompt ensembles (data in assets/prompts), scan -> model images, scoring.

    from engine.zeroshot import label_scan
    result = label_scan(scan, ["pneumonia", "normal"], model="local-dir:/path")
    result.top.label, result.top.probability, result.to_dict()

See api.py (scoring and aggregation), prompts.py (ensembles), imaging.py
(slices a 2D model sees), trusted.py (calibration, verdicts, the
field-of-view check and OOD flags applied to every result).
"""

from engine.zeroshot.api import (
    AGGREGATIONS,
    MODES,
    PRESENT_ABSENT,
    SOFTMAX,
    HeatmapUnavailable,
    LabelResult,
    LabelScore,
    SliceScores,
    check_mode,
    evidence_map,
    label_from_embeddings,
    label_images,
    label_scan,
    resolve_model,
    score_embeddings,
    text_embeddings,
)
from engine.zeroshot.trusted import FOV_CHECKS, ScanContext, scan_context
from engine.zeroshot.imaging import ModelImage, heat_to_slice, model_image, sample_indices, scan_images
from engine.zeroshot.prompts import (
    PROMPT_SET_KEYS,
    PromptError,
    PromptSet,
    all_prompt_sets,
    class_embeddings,
    clean_labels,
    load_prompt_set,
    pair_embeddings,
    prompt_set_key,
)

__all__ = [
    "AGGREGATIONS",
    "FOV_CHECKS",
    "MODES",
    "PRESENT_ABSENT",
    "SOFTMAX",
    "PROMPT_SET_KEYS",
    "ScanContext",
    "scan_context",
    "HeatmapUnavailable",
    "LabelResult",
    "LabelScore",
    "SliceScores",
    "ModelImage",
    "PromptError",
    "PromptSet",
    "all_prompt_sets",
    "check_mode",
    "class_embeddings",
    "clean_labels",
    "evidence_map",
    "heat_to_slice",
    "label_from_embeddings",
    "label_images",
    "label_scan",
    "load_prompt_set",
    "model_image",
    "pair_embeddings",
    "prompt_set_key",
    "resolve_model",
    "sample_indices",
    "scan_images",
    "score_embeddings",
    "text_embeddings",
]
