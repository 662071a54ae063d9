"""Zero-shot labels a radiologist can trust: calibration, the uncertain band, the field-of-view check, OOD flags.

Applied to every `LabelResult` (engine.zeroshot.api), from the image
embeddings the labels were scored with, so nothing is encoded twice.

Design decisions
- Calibration is the checkpoint's (engine.trust.model.ModelTrust, written
  by training/): Platt per prompt set on the present/absent logit
  scale * (cos_present - cos_absent) of the reported (aggregated) cosines,
  temperature per prompt set on scale * cosines for a softmax. A model
  without a calibration keeps its raw numbers and says "not calibrated".
- The field-of-view check (engine.trust.anatomy) bounds organ labels of
  volumes: present/absent probabilities become min(p, bound); a softmax is
  bounded the same way and renormalised over the labels, so the mass an
  impossible organ loses goes to the others in proportion. The reason is
  kept on the label ("brain: not in this abdomen field of view (...)").
- `reported_probability` is the number shown and the verdict's basis:
  calibrated (when the model is), then bounded. Labels are ranked by it.
  Verdicts: present / absent / uncertain (the calibration's band) in
  present/absent mode; in a softmax the top label is "most probable", or
  "uncertain" when its probability is below `min_top`, the others "less
  probable" (the DICOM SR's qualitative values).
- Out of distribution (engine.trust.ood): the slices' median kNN distance
  to the checkpoint's reference set, and the CLIP's own modality guess from
  the same embeddings against a DICOM header's Modality
  (engine.trust.modality). Either raises the flag; its reasons are listed.
- What a check needs of the scan (header modality, the field of view) is a
  `ScanContext`, computed while the scan is loaded (the batch runner makes
  it in its prepare step and drops the scan).
- `fov_check`: "auto" consults the volume model (the Q-Former reading the
  whole volume; $MEDLENS_ASK_MODEL or the shipped default) when one is
  installed, else falls back to the physical evidence and says so;
  "physical" uses the header and the scan's geometry only (no second
  model); "off" skips the check (raw 2D answers: not recommended).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.settings import FOV_CHECKS  # auto, physical, off; MEDLENS_FOV_CHECK picks the default
from engine.trust import ABSENT, PRESENT, UNCERTAIN, OodFlag
from engine.trust.anatomy import FieldOfView

MOST_PROBABLE, LESS_PROBABLE = "most probable", "less probable"


@dataclass
class ScanContext:
    """What the trust checks need of a scan, computed while it is loaded."""

    header_modality: Any = None  # engine.scan.Modality from a DICOM header, else None
    fov: FieldOfView | None = None  # volumes with the check on
    fov_note: str = ""  # why there is no check, or which evidence was missing


def check_fov_mode(fov_check: str | None) -> str:
    """The check to run: `fov_check`, or $MEDLENS_FOV_CHECK (default "auto") when None."""
    from engine import settings
    from engine.errors import MedLensError

    fov_check = settings.FOV_CHECK.get() if fov_check is None else fov_check
    if fov_check not in FOV_CHECKS:
        raise MedLensError(f"unknown field-of-view check {fov_check!r}; choose {', '.join(FOV_CHECKS)}")
    return fov_check


def volume_region(scan, volume_model: Any = None, volume: int = 0) -> tuple[dict[str, float], bool, str] | None:
    """The volume model's region answer for a volume: (candidate -> p, calibrated, model name); None when none is installed."""
    from engine.ask.api import resolve_ask_model
    from engine.errors import ModelError

    try:
        ask = resolve_ask_model(volume_model)
    except ModelError:
        return None
    target = scan if not volume else scan.volume(int(volume))
    enc = ask.encode(target)
    probs, calibrated = ask.region_answer(enc)
    return probs, calibrated, ask.name


def scan_context(scan, fov_check: str | None = None, volume_model: Any = None, volume: int = 0) -> ScanContext:
    """ScanContext of `scan` (module docstring: `fov_check`; None: $MEDLENS_FOV_CHECK)."""
    from engine.trust import anatomy, modality

    fov_check = check_fov_mode(fov_check)
    ctx = ScanContext(header_modality=modality.header_modality(scan))
    if scan.is_2d or fov_check == "off":
        ctx.fov_note = "field-of-view check off" if fov_check == "off" else "2D image: no field-of-view check"
        return ctx
    facts = anatomy.body_facts(scan, volume)
    region = volume_region(scan, volume_model, volume) if fov_check == "auto" else None
    if fov_check == "auto" and region is None:
        ctx.fov_note = "no volume model installed: field of view from the header and the scan's geometry only"
    if region is None:
        ctx.fov = anatomy.field_of_view(facts)
    else:
        probs, calibrated, name = region
        ctx.fov = anatomy.field_of_view(facts, probs, calibrated=calibrated, model_name=name)
    return ctx


# --------------------------------------------------------------------------- applying it
def _calibrated(result, clip) -> list[float] | None:
    """Calibrated probabilities in result.labels order, or None when the model has no calibration for this mode."""
    trust = getattr(clip, "trust", None)
    if trust is None:
        return None
    scale = float(result.logit_scale)
    if result.mode == "present-absent":
        if not trust.present_absent.fitted:
            return None
        cal = trust.present_absent.get(result.prompt_set)
        return [float(cal.binary(scale * (s.score - (s.absent_score or 0.0)))) for s in result.labels]
    if not trust.softmax.fitted:
        return None
    cal = trust.softmax.get(result.prompt_set)
    return [float(p) for p in cal.choices(np.array([scale * s.score for s in result.labels]))]


def _bounded(values: list[float], bounds: list[float | None], softmax: bool) -> list[float]:
    """Each value at most its bound; a softmax keeps summing to 1, the mass taken from bounded labels going to the
    others in proportion to their probability, none of them pushed over its own bound (water-filling)."""
    limit = [1.0 if b is None else float(b) for b in bounds]
    out = [min(float(v), lim) for v, lim in zip(values, limit)]
    if not softmax:
        return out
    for _ in range(len(out)):
        lost = 1.0 - sum(out)
        free = [i for i, (v, lim) in enumerate(zip(out, limit)) if v < lim - 1e-12]
        weight = sum(out[i] for i in free)
        if lost <= 1e-12 or not free or weight <= 0:
            break
        for i in free:
            out[i] = min(limit[i], out[i] + lost * out[i] / weight)
    return out


def apply(result, clip, embeddings: np.ndarray, context: ScanContext | None = None) -> None:
    """Fill `result`'s trust fields in place (module docstring); labels re-ranked by reported probability."""
    context = context or ScanContext()
    trust = getattr(clip, "trust", None)
    calibration = (trust.present_absent if result.mode == "present-absent" else trust.softmax) if trust is not None else None
    calibrated = _calibrated(result, clip)
    base = calibrated or [s.probability for s in result.labels]
    bounds = [context.fov.bound(s.label) if context.fov is not None else None for s in result.labels]
    reported = _bounded(base, [None if b is None else b.bound for b in bounds], softmax=result.mode != "present-absent")
    for s, c, r, b in zip(result.labels, calibrated or [None] * len(base), reported, bounds):
        s.calibrated_probability, s.reported_probability = c, float(r)
        s.fov_bound = None if b is None else b.bound
        lowered = b is not None and b.bound < (c if c is not None else s.probability)
        s.reasons = [b.reason] if lowered and b.bound <= (calibration.band[1] if calibration is not None else 0.65) else []
    result.labels.sort(key=lambda s: (-s.reported_probability, s.label))
    set_verdicts(result.labels, result.mode, calibration)
    result.calibrated = calibrated is not None
    result.trust_note = trust.note if trust is not None else "not calibrated"
    result.field_of_view = None if context.fov is None else context.fov.to_dict()
    result.fov_note = context.fov_note
    result.ood = assess(clip, embeddings, context)


def set_verdicts(labels, mode: str, calibration=None) -> None:
    """Verdict and uncertain flag of each (ranked) label from its reported probability (module docstring)."""
    from engine.trust import Calibration

    calibration = calibration or Calibration()
    for rank, s in enumerate(labels):
        if mode == "present-absent":
            s.verdict = calibration.verdict(s.reported_probability)
            s.uncertain = s.verdict == UNCERTAIN
        elif rank == 0:
            s.uncertain = bool(s.reported_probability < calibration.min_top)
            s.verdict = UNCERTAIN if s.uncertain else MOST_PROBABLE
        else:
            s.verdict, s.uncertain = LESS_PROBABLE, False


def assess(clip, embeddings: np.ndarray, context: ScanContext) -> OodFlag:
    """The OOD flag of one image or scan from its (slice) embeddings."""
    from engine.trust import modality

    reasons, checks = [], []
    guess: dict = {}
    if context.header_modality is not None:
        checks.append("header modality")
        guess = modality.clip_modality(clip, embeddings)
        reason = modality.conflict(guess, context.header_modality, f"the model {getattr(clip, 'name', '')}".strip())
        reasons += [reason] if reason else []
    trust = getattr(clip, "trust", None)
    reference = None if trust is None else trust.reference
    return OodFlag.assess(reference, np.asarray(embeddings) if reference is not None else None, reasons, checks)


def bound_labels(labels, mode: str, context: ScanContext, calibration=None) -> None:
    """Field-of-view bounds, ranking and verdicts for labels with no calibration step (the Q-Former's 3D labels)."""
    bounds = [context.fov.bound(s.label) if context.fov is not None else None for s in labels]
    reported = _bounded([s.probability for s in labels], [None if b is None else b.bound for b in bounds], softmax=mode != "present-absent")
    for s, r, b in zip(labels, reported, bounds):
        s.reported_probability, s.fov_bound = float(r), None if b is None else b.bound
        s.reasons = [b.reason] if b is not None and b.bound < s.probability and b.bound <= 0.65 else []
    labels.sort(key=lambda s: (-s.reported_probability, s.label))
    set_verdicts(labels, mode, calibration)


__all__ = [
    "ABSENT",
    "FOV_CHECKS",
    "PRESENT",
    "ScanContext",
    "apply",
    "assess",
    "bound_labels",
    "check_fov_mode",
    "scan_context",
    "set_verdicts",
]
