"""Entry points of "Ask the scan" for the CLI and the app: the model, 3D labels, evidence in view space.

Design decisions
- `resolve_ask_model` is the one place a question-answering model source
  becomes an AskModel: None means $MEDLENS_ASK_MODEL's role is the caller's
  (the CLI and the app read it), the engine's default is the shipped
  "medlens-qformer". A missing default, an unknown name and a broken folder
  all become a ModelError that says what to do; nothing else escapes.
- `volume_labels` scores a label list with the Q-Former's image-text
  similarity over the whole volume (one encoding, no slice sampling) and
  returns a `LabelResult` (engine.zeroshot), the CLIP path's typed result:
  `aggregation` None, no per-slice scores, `scope` "volume" (or "image" for
  a 2D image), and the same trust fields (field-of-view bounds, verdicts,
  the OOD flag; "not calibrated"). `label_volume` is its `to_dict()`, so the
  labels panel's bar chart and the CLI's JSON read both paths alike. Labels
  default to the modality's preset, as label_scan.
- `evidence_view` turns an answer's `Evidence.volume_map` (the scan's own
  voxel grid) into what a viewer shows: the axial slices in slice space
  (engine.views.extract_slice: display orientation), shrunk in-plane to at
  most `max_side` pixels (the map comes from a coarse token grid, so
  nothing visible is lost; a 512x512x300 CT's map drops from 300 MB to a
  few MB, small enough to keep per user), plus the attention per *display*
  axial slice (the slider's index), which is what the per-slice chart plots.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from engine.errors import MedLensError
from engine.scan import Scan

EVIDENCE_MAX_SIDE = 128  # in-plane pixels kept of an evidence map (overlays are resized to the view anyway)
SCOPE_VOLUME = "volume"
SCOPE_IMAGE = "image"

__all__ = ["resolve_ask_model", "label_volume", "volume_labels", "EvidenceView", "evidence_view", "EVIDENCE_MAX_SIDE"]


# --------------------------------------------------------------------------- the model
def resolve_ask_model(source: Any = None):
    """An AskModel: passed through, or loaded from a source (shipped name or local-dir:/path; None = the shipped default)."""
    from engine.models import catalog

    return catalog.resolve(source, catalog.ASK)


# --------------------------------------------------------------------------- 3D zero-shot labels
def volume_labels(
    scan: Scan,
    labels: Sequence[str] | str | None = None,
    model: Any = None,
    *,
    prompt_set: str | None = None,
    volume: int = 0,
    fov_check: str | None = None,
):
    """Zero-shot labels from the Q-Former over the whole volume (2D: the image), as a LabelResult (scope "volume"/"image").

    labels: list or comma/newline-separated string; None = the default preset of the prompt set
    (`prompt_set`, else the scan's modality). A softmax needs at least two labels. Trust: the
    field-of-view check ("auto": the same Q-Former's region answer, the header and the geometry),
    verdicts, and the scan's OOD flag (AskModel.assess); the 3D labels have no calibration.
    """
    from engine.zeroshot import LabelResult, LabelScore, clean_labels, load_prompt_set
    from engine.zeroshot.trusted import bound_labels, check_fov_mode, scan_context

    pset = load_prompt_set(prompt_set or scan.modality)
    label_list = pset.default_labels if labels is None else clean_labels(labels)
    if len(label_list) < 2:
        from engine.zeroshot import PromptError

        raise PromptError("a softmax over one label always gives 1: give at least two labels")
    fov_check = check_fov_mode(fov_check)
    ask = resolve_ask_model(model)
    # volume 0 is what the model encodes of a multi-volume scan anyway: keep its cache key (the whole scan's hash)
    target = scan if scan.is_2d or not volume else scan.volume(int(volume))
    ranked = [LabelScore(r["label"], float(r["probability"]), float(r["score"])) for r in ask.label(target, list(label_list))]
    context = scan_context(scan, fov_check, ask, volume)
    bound_labels(ranked, "softmax", context, ask.trust.closed)
    return LabelResult(
        labels=ranked,
        mode="softmax",
        aggregation=None,
        per_slice=[],
        model_id=ask.name,
        inference_path="Q-Former, whole " + ("image" if scan.is_2d else "volume") + f"; encoder {ask.encoders.path_label(scan.is_2d)}",
        prompt_set=pset.key,
        logit_scale=float(ask.qformer.logit_scale.detach().exp()),
        modality=scan.modality.value,
        trust_note="not calibrated: the Q-Former's 3D labels are raw image-text similarities",
        field_of_view=None if context.fov is None else context.fov.to_dict(),
        fov_note=context.fov_note,
        ood=ask.assess(ask.encode(target), scan),
        scope=SCOPE_IMAGE if scan.is_2d else SCOPE_VOLUME,
    )


def label_volume(scan: Scan, *args: Any, **options: Any) -> dict[str, Any]:
    """`volume_labels(...).to_dict()` (the same arguments): the JSON shape of the CLIP path's labels, with `scope`."""
    return volume_labels(scan, *args, **options).to_dict()


# --------------------------------------------------------------------------- evidence for a viewer
@dataclass
class EvidenceView:
    """An answer's evidence as a viewer shows it.

    axial: (n, rows, cols) float16 in [0, 1], axial slice i in slice space (render_view's overlay),
    shrunk in-plane; for a 2D image, (1, rows, cols) of the image.
    slice_weights: attention per display axial slice (sums to 1); None for a 2D image.
    """

    axial: np.ndarray
    slice_weights: np.ndarray | None
    scan_hash: str

    @property
    def is_2d(self) -> bool:
        return self.slice_weights is None

    @property
    def n_slices(self) -> int:
        return int(self.axial.shape[0])

    @property
    def top_slice(self) -> int:
        """The display axial slice the queries attended to most (0 for a 2D image)."""
        return 0 if self.slice_weights is None else int(np.argmax(self.slice_weights))

    def overlay(self, index: int = 0) -> np.ndarray:
        """float32 (rows, cols) heat in [0, 1] of display axial slice `index` (clamped), for render_view(overlay=...)."""
        i = min(max(int(index), 0), self.n_slices - 1)
        return self.axial[i].astype(np.float32)


def _shrink(plane: np.ndarray, max_side: int) -> np.ndarray:
    from PIL import Image

    rows, cols = plane.shape
    scale = max_side / max(rows, cols)
    if scale >= 1:
        return np.asarray(plane, dtype=np.float32)
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    return np.asarray(Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F").resize(size, Image.Resampling.BILINEAR))


def evidence_view(scan: Scan, evidence, *, max_side: int = EVIDENCE_MAX_SIDE) -> EvidenceView:
    """`Evidence` of an answer about `scan` -> EvidenceView (display axial slices, per-slice attention)."""
    from engine.views import extract_slice, plane_sizes

    heat = np.nan_to_num(np.asarray(evidence.volume_map, dtype=np.float32))
    if scan.is_2d:
        if heat.ndim == 3:  # a colour image's map may carry a channel axis
            heat = heat.max(axis=-1)
        plane = np.clip(_shrink(heat, max_side), 0.0, 1.0)
        return EvidenceView(plane[None].astype(np.float16), None, scan.content_hash)
    if heat.shape != tuple(scan.volume_shape):
        raise MedLensError(f"the evidence map has shape {heat.shape}, the scan {tuple(scan.volume_shape)}: they do not belong together")
    # the map on the scan's grid, as a one-volume scan with its geometry: extract_slice orients it as the views do
    as_scan = replace(scan, voxels=heat, metadata={}, _content_hash="")
    n = plane_sizes(as_scan)["axial"][0]
    planes, sums = [], []
    for i in range(n):
        plane, _ = extract_slice(as_scan, "axial", i)
        sums.append(float(plane.mean()))
        planes.append(_shrink(plane, max_side))
    stack = np.clip(np.stack(planes), 0.0, 1.0)
    peak = float(stack.max())
    if peak > 0:
        stack = stack / peak
    weights = np.asarray(sums, dtype=np.float64)
    weights = weights / weights.sum() if weights.sum() > 0 else np.full(n, 1.0 / n)
    return EvidenceView(stack.astype(np.float16), weights.astype(np.float32), scan.content_hash)
