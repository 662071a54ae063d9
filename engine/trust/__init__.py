"""Trust: calibrated probabilities, an "uncertain" band, and out-of-distribution flags for every answer.

An answer shown to a radiologist carries, besides its value:
- a calibrated probability (engine.trust.calibration: temperature or Platt
  scaling fitted on validation splits by training/, stored in the
  checkpoint's config under `trust.calibration`);
- a verdict that says "uncertain" instead of a confident number when the
  probability falls in the model's uncertain band;
- an out-of-distribution flag (engine.trust.ood: distance to the model's
  training embeddings, stored beside the weights as `trust_reference.safetensors`,
  and a modality guess that contradicts the DICOM header).

Modules: calibration (fit, apply, ECE, reliability table), ood (reference
set, kNN distance, thresholds, flags). Both are pure numpy, small and
shared by the engine (apply) and training (fit), so a model is calibrated
with exactly the arithmetic it is used with.
"""

from engine.trust.calibration import (
    ABSENT,
    PRESENT,
    UNCERTAIN,
    Calibration,
    Calibrator,
    ece,
    fit_platt,
    fit_temperature,
    reliability_table,
    verdict,
)
from engine.trust.ood import OodFlag, ReferenceSet, modality_conflict

__all__ = [
    "ABSENT", "PRESENT", "UNCERTAIN", "Calibration", "Calibrator", "OodFlag", "ReferenceSet", "ece", "fit_platt",
    "fit_temperature", "modality_conflict", "reliability_table", "verdict",
]
