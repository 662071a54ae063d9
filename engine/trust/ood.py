"""Out-of-distribution flags: is this image unlike anything the model was trained on?

Design decisions
- Distance to the training data in the model's own embedding space: the
  mean cosine distance to the k nearest of a reference set of L2-normalised
  training embeddings (a subsample, float16, stored beside the weights as
  `trust_reference.safetensors`; a few thousand vectors keep it under a few
  MB). kNN distance needs no density model and is the strong simple
  baseline of the OOD literature (Sun et al. 2022, "Out-of-distribution
  detection with deep nearest neighbors").
- The threshold is a quantile (default the 99th percentile) of the same
  score on held-out in-distribution validation images, fitted by training/
  and stored with the set: by construction about 1% of in-distribution
  images are flagged, and the card reports the flag rate on the OOD set.
- A second, independent signal for DICOM: the model's modality guess
  contradicts the header's Modality (engine.trust.modality.conflict, with
  a confidence rule; `modality_conflict` here is the bare comparison).
  Either signal raises the flag; the reasons are listed for the user.
- A volume is scored slice by slice (the 2D model saw slices in training)
  and its median slice distance counts: one odd slice (the table, the
  vertex) does not flag a scan, a scan of odd slices does. A stored
  library embedding of a volume is the mean of its slices': its score is
  that of an average slice (slightly optimistic, said where it is used).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REFERENCE_FILE = "trust_reference.safetensors"
DEFAULT_K = 10
DEFAULT_QUANTILE = 0.99


@dataclass
class OodFlag:
    """What the engine says about one image or scan.

    out_of_distribution: True with reasons; False when checks ran and none fired; None when nothing
    could be checked (no reference set in the checkpoint and no DICOM header modality)."""

    out_of_distribution: bool | None
    score: float | None  # kNN cosine distance (higher: further from the training data); None when unknown
    threshold: float | None
    reasons: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # what was checked: "reference set", "header modality"

    @classmethod
    def unknown(cls) -> "OodFlag":
        return cls(None, None, None, [], [])

    @classmethod
    def assess(
        cls, reference: "ReferenceSet | None", query: np.ndarray | None, reasons: list[str] | None = None, checks: list[str] | None = None
    ) -> "OodFlag":
        """The flag from a reference set (when the checkpoint has one) and other checks' reasons."""
        checks = list(checks or [])
        if reference is not None and query is not None:
            flag = reference.flag(query, reasons)
            flag.checks = ["reference set", *checks]
            return flag
        reasons = list(reasons or [])
        return cls(True if reasons else (False if checks else None), None, None, reasons, checks)

    def to_dict(self) -> dict:
        return {
            "out_of_distribution": self.out_of_distribution,
            "ood_score": None if self.score is None else round(self.score, 4),
            "ood_threshold": None if self.threshold is None else round(self.threshold, 4),
            "ood_reasons": list(self.reasons),
            "ood_checks": list(self.checks),
        }


@dataclass
class ReferenceSet:
    """L2-normalised training embeddings [N, D] (with their modality names) and the flag threshold."""

    vectors: np.ndarray
    modalities: list[str]
    threshold: float
    k: int = DEFAULT_K

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """Mean cosine distance of each query [M, D] (normalised here) to its k nearest references."""
        q = np.asarray(queries, dtype=np.float32)
        q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
        sims = q @ self.vectors.astype(np.float32).T
        k = min(self.k, sims.shape[1])
        top = np.partition(sims, -k, axis=1)[:, -k:]
        return 1.0 - top.mean(axis=1)

    def flag(self, query: np.ndarray, extra_reasons: list[str] | None = None) -> OodFlag:
        """Query [D] (one image), or [M, D] (the slices of one scan: their median score counts)."""
        score = float(np.median(self.scores(np.atleast_2d(query))))
        reasons = list(extra_reasons or [])
        if score > self.threshold:
            reasons.insert(0, f"unlike the images this model was trained on (distance {score:.3f} > {self.threshold:.3f})")
        return OodFlag(bool(reasons), score, self.threshold, reasons)

    # --- fitting and storage ----------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        train: np.ndarray,
        modalities: list[str],
        held_out: np.ndarray,
        *,
        k: int = DEFAULT_K,
        quantile: float = DEFAULT_QUANTILE,
        max_vectors: int = 4000,
        seed: int = 0,
    ) -> "ReferenceSet":
        """Subsample the training embeddings and set the threshold at `quantile` of held-out in-distribution scores."""
        train = np.asarray(train, dtype=np.float32)
        train = train / np.maximum(np.linalg.norm(train, axis=-1, keepdims=True), 1e-12)
        if len(train) > max_vectors:
            keep = np.sort(np.random.default_rng(seed).choice(len(train), max_vectors, replace=False))
            train, modalities = train[keep], [modalities[i] for i in keep]
        ref = cls(train.astype(np.float16), list(modalities), threshold=float("inf"), k=k)
        ref.threshold = float(np.quantile(ref.scores(held_out), quantile))
        return ref

    def save(self, folder: Path) -> Path:
        from safetensors.numpy import save_file

        path = Path(folder) / REFERENCE_FILE
        save_file(
            {"vectors": self.vectors.astype(np.float16)},
            str(path),
            metadata={"threshold": repr(self.threshold), "k": str(self.k), "modalities": "\n".join(self.modalities)},
        )
        return path

    @classmethod
    def load(cls, folder: Path) -> "ReferenceSet | None":
        path = Path(folder) / REFERENCE_FILE
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
            vectors = fh.get_tensor("vectors")
        return cls(
            vectors,
            (meta.get("modalities") or "").split("\n") if meta.get("modalities") else [],
            float(meta.get("threshold", "inf")),
            int(meta.get("k", DEFAULT_K)),
        )


def modality_conflict(predicted: str | None, header: str | None) -> str | None:
    """A reason when the model's modality guess contradicts the DICOM header's (None when they agree or either is unknown)."""
    if not predicted or not header:
        return None
    p, h = predicted.strip().upper(), header.strip().upper()
    if p == h or "OTHER" in (p, h):
        return None
    return f"the model reads this as {predicted} but the DICOM header says {header}"
