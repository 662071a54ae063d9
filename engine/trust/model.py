"""What a checkpoint knows about its own reliability: its calibrations and its OOD reference set.

Design decisions
- One `ModelTrust` per loaded model (ClipModel.trust, AskModel.trust), read
  once at load time from the checkpoint's config.json "trust" block and the
  folder's `trust_reference.safetensors` (docs: the trust contract in
  engine/trust/__init__.py). The engine never fits anything: training/
  writes the block, the engine applies it.
- A model without a "trust" block (every checkpoint trained before issue
  14, and foreign ones: open_clip, UniMed-CLIP) gets `ModelTrust.none()`:
  identity calibrations, no reference set, and `note` says "not
  calibrated" so every result says so instead of looking calibrated.
- A malformed block is an error at load time (ModelError with the reason),
  not a silently uncalibrated model: a checkpoint that claims calibration
  must deliver it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from engine.trust.calibration import Calibration
from engine.trust.ood import REFERENCE_FILE, ReferenceSet

NOT_CALIBRATED = "not calibrated: raw model scores (this checkpoint carries no calibration)"


@dataclass
class ModelTrust:
    """A model's calibrations (by result kind) and its out-of-distribution reference set."""

    present_absent: Calibration = field(default_factory=Calibration)  # CLIP: Platt per prompt-set key
    softmax: Calibration = field(default_factory=Calibration)  # CLIP: temperature per prompt-set key
    closed: Calibration = field(default_factory=Calibration)  # Q-Former: temperature per question family
    reference: ReferenceSet | None = None  # training embeddings in the model's own space
    fitted_on: str = ""  # which validation splits, how many examples (training/ writes it)

    @classmethod
    def none(cls) -> "ModelTrust":
        return cls()

    @property
    def calibrated(self) -> bool:
        return self.present_absent.fitted or self.softmax.fitted or self.closed.fitted

    @property
    def note(self) -> str:
        """One line for results and the UI: what the numbers are."""
        if not self.calibrated:
            return NOT_CALIBRATED
        return f"calibrated on {self.fitted_on}" if self.fitted_on else "calibrated on validation splits"

    def summary(self) -> dict[str, Any]:
        """JSON-ready: what this model's results can be trusted with."""
        return {
            "calibrated": self.calibrated,
            "note": self.note,
            "ood_reference": self.reference is not None,
            "ood_threshold": None if self.reference is None else round(float(self.reference.threshold), 4),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None, folder: str | Path | None = None) -> "ModelTrust":
        """From a checkpoint's config (its "trust" block) and folder (the reference file); ValueError when malformed."""
        block = (config or {}).get("trust")
        if not block:
            return cls.none()
        if not isinstance(block, Mapping):
            raise ValueError("the 'trust' block of config.json must be an object")
        reference = None
        ood = block.get("ood") or {}
        if folder is not None and (ood or (Path(folder) / REFERENCE_FILE).is_file()):
            wanted = str(ood.get("file", REFERENCE_FILE))
            if wanted != REFERENCE_FILE:
                raise ValueError(f"trust.ood.file must be {REFERENCE_FILE!r} (got {wanted!r})")
            reference = ReferenceSet.load(Path(folder))
            if reference is None and ood:
                raise ValueError(f"trust.ood names {REFERENCE_FILE} but the folder has none")
            if reference is not None and ood.get("k"):
                reference.k = int(ood["k"])
        return cls(
            present_absent=Calibration.from_config(block.get("present_absent")),
            softmax=Calibration.from_config(block.get("softmax")),
            closed=Calibration.from_config(block.get("closed")),
            reference=reference,
            fitted_on=str(block.get("fitted_on", "")),
        )


def load_trust(config: Mapping[str, Any] | None, folder: str | Path | None) -> ModelTrust:
    """ModelTrust for a checkpoint being loaded; a malformed block becomes a ModelError that says what is wrong."""
    from engine.errors import ModelError

    try:
        return ModelTrust.from_config(config, folder)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        where = f"{folder}: " if folder is not None else ""
        raise ModelError(f"{where}the checkpoint's trust block (calibration / OOD reference) is malformed: {exc}") from None
