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
with exactly the arithmetic it is used with. model (ModelTrust: what a
loaded checkpoint's "trust" block and reference file hold; ClipModel.trust,
AskModel.trust), modality (the model's modality guess against a DICOM
header), anatomy (the field-of-view check of organ labels on volumes,
assets/anatomy.json). Applying them to results: engine.zeroshot.trusted
(labels), engine.ask.model (answers), engine.library.search (hits).

The contract with training/ (a checkpoint folder):
- config.json "trust": {"present_absent", "softmax", "closed": Calibration.to_config(),
  "fitted_on": text, "ood": {"method": "knn", "k", "quantile", "file": "trust_reference.safetensors"}};
  present_absent: Platt per prompt-set key ("default" too) on scale * (cos_present - cos_absent);
  softmax: temperature per prompt-set key on scale * cosines; closed: temperature per question
  family on the candidates' scores (AskModel ranks mean token log-likelihoods).
- trust_reference.safetensors (ReferenceSet.save): float16 training embeddings in the model's
  own space. CLIP: image embeddings of training images and volume slices (ClipModel.encode_images,
  as the engine scores a volume slice by slice). Q-Former: AskModel.trust_embedding(encoded), the
  queries' mean output (engine.ask.model.ood_embedding, what training/qformer_trust.py fits).
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
    "ABSENT",
    "PRESENT",
    "UNCERTAIN",
    "Calibration",
    "Calibrator",
    "OodFlag",
    "ReferenceSet",
    "ece",
    "fit_platt",
    "fit_temperature",
    "modality_conflict",
    "reliability_table",
    "verdict",
]
