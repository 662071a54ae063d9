"""Calibration: from a model's raw logits to probabilities that mean what they say.

Design decisions
- Two maps, both one or two numbers, fitted on validation splits only:
  temperature scaling for softmax choices (p = softmax(logits / T)) and
  Platt scaling for independent present/absent findings
  (p = sigmoid(a * logit + b), where logit = scale * (cos_present - cos_absent)).
  A temperature is Platt with b = 0, so one `Calibrator` holds either:
  `a = 1/T`. Few parameters, because validation sets here are hundreds of
  examples, not millions (Guo et al. 2017: temperature scaling is the
  robust choice; histogram binning overfits small sets).
- Calibrators are keyed (prompt set for CLIP present/absent, question
  family for the Q-Former, ...) with a "default" fallback; an uncalibrated
  model uses the identity and says so (`Calibration.fitted` is False).
- Fitting minimises the negative log-likelihood with scipy (L-BFGS on
  log T, or on (a, b) with a tiny L2 pull towards the identity so that a
  degenerate validation set cannot produce an absurd map).
- The uncertain band: a binary probability inside [low, high] (default
  0.35-0.65) is reported as "uncertain"; a softmax top answer below
  `min_top` (default 0.5) likewise, and a two-way choice (yes/no) whose top
  answer is inside the band. These are properties of the model's
  calibration, stored with it; an uncalibrated model uses the defaults on
  its raw probabilities (and its results say "not calibrated").
- ECE: equal-width bins over the predicted probability of the chosen class
  (binary: of the positive class, as reliability diagrams draw it), the
  weighted mean |accuracy - confidence|.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np

PRESENT, ABSENT, UNCERTAIN = "present", "absent", "uncertain"
DEFAULT_KEY = "default"
DEFAULT_BAND = (0.35, 0.65)
DEFAULT_MIN_TOP = 0.5


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


@dataclass(frozen=True)
class Calibrator:
    """p = sigmoid(a * logit + b) for binary logits; softmax(a * logits) for choices (b unused there)."""

    method: str = "identity"  # "identity", "temperature" or "platt"
    a: float = 1.0
    b: float = 0.0
    n: int = 0  # validation examples it was fitted on

    def binary(self, logits: np.ndarray | float) -> np.ndarray:
        return _sigmoid(self.a * np.asarray(logits, dtype=np.float64) + self.b)

    def choices(self, logits: np.ndarray) -> np.ndarray:
        return _softmax(self.a * np.asarray(logits, dtype=np.float64), axis=-1)

    @property
    def temperature(self) -> float:
        return 1.0 / self.a if self.a else float("inf")


IDENTITY = Calibrator()


@dataclass
class Calibration:
    """A model's calibrators by key ("default" as fallback) and its uncertain band."""

    calibrators: dict[str, Calibrator] = field(default_factory=dict)
    band: tuple[float, float] = DEFAULT_BAND
    min_top: float = DEFAULT_MIN_TOP
    metrics: dict[str, Any] = field(default_factory=dict)  # ECE before/after, split, counts (the card quotes them)

    @property
    def fitted(self) -> bool:
        return bool(self.calibrators)

    def get(self, key: str | None) -> Calibrator:
        if key is not None and key in self.calibrators:
            return self.calibrators[key]
        return self.calibrators.get(DEFAULT_KEY, IDENTITY)

    def verdict(self, probability: float) -> str:
        return verdict(probability, self.band)

    def choice_uncertain(self, top: float, n_choices: int) -> bool:
        """A choice among `n_choices` is uncertain when its top probability is low: inside the band's upper
        edge for two choices (a yes/no is a binary finding), below `min_top` for more."""
        return bool(top <= self.band[1]) if n_choices == 2 else bool(top < self.min_top)

    def to_config(self) -> dict[str, Any]:
        return {
            "calibrators": {k: asdict(c) for k, c in self.calibrators.items()},
            "band": list(self.band),
            "min_top": self.min_top,
            "metrics": self.metrics,
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "Calibration":
        cfg = dict(cfg or {})
        calibrators = {str(k): Calibrator(**v) for k, v in (cfg.get("calibrators") or {}).items()}
        band = tuple(float(x) for x in cfg.get("band", DEFAULT_BAND))
        if len(band) != 2 or not 0.0 <= band[0] <= band[1] <= 1.0:
            raise ValueError(f"uncertain band {band} must be two probabilities, low <= high")
        return cls(calibrators, (band[0], band[1]), float(cfg.get("min_top", DEFAULT_MIN_TOP)), dict(cfg.get("metrics") or {}))


def verdict(probability: float, band: tuple[float, float] = DEFAULT_BAND) -> str:
    """PRESENT above the band, ABSENT below it, UNCERTAIN inside it."""
    low, high = band
    if probability > high:
        return PRESENT
    if probability < low:
        return ABSENT
    return UNCERTAIN


# --------------------------------------------------------------------------- fitting
def fit_platt(logits: np.ndarray, labels: np.ndarray, *, l2: float = 1e-3) -> Calibrator:
    """Platt scaling of binary logits against 0/1 labels (NLL, L-BFGS, a small pull towards a=1, b=0)."""
    from scipy.optimize import minimize

    x = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if x.size == 0 or y.min() == y.max():
        return Calibrator("identity", n=int(x.size))  # nothing to learn from one class

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = params
        z = a * x + b
        p = _sigmoid(z)
        nll = np.mean(np.logaddexp(0.0, z) - y * z) + l2 * ((a - 1.0) ** 2 + b**2)
        g = p - y
        return float(nll), np.array([np.mean(g * x) + 2 * l2 * (a - 1.0), np.mean(g) + 2 * l2 * b])

    res = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    return Calibrator("platt", float(res.x[0]), float(res.x[1]), int(x.size))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> Calibrator:
    """Temperature scaling: logits [N, C] (or binary logits [N] with 0/1 labels) against the right class."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).astype(int).ravel()
    if z.size == 0:
        return Calibrator("identity")
    if z.ndim == 1:  # binary: two classes with logits (0, z)
        z = np.stack([np.zeros_like(z), z], axis=1)

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        s = s - s.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(s).sum(axis=1)) - s[np.arange(len(y)), y]))

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return Calibrator("temperature", float(1.0 / np.exp(res.x)), 0.0, int(len(y)))


# --------------------------------------------------------------------------- measuring
def ece(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error. Binary: probabilities [N] of the positive class and 0/1 labels;
    choices: probabilities [N, C] and class indices (confidence = top probability)."""
    table = reliability_table(probabilities, labels, n_bins)
    n = sum(row["count"] for row in table)
    return float(sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in table) / n) if n else 0.0


def reliability_table(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> list[dict[str, float]]:
    """Rows (low, high, count, confidence, accuracy) of equal-width bins: the data of a reliability plot."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim == 2:
        conf = p.max(axis=1)
        hit = (p.argmax(axis=1) == y.astype(int)).astype(np.float64)
    else:
        conf, hit = p.ravel(), y.astype(np.float64).ravel()
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        mask = which == b
        if mask.any():
            rows.append(
                {
                    "low": float(edges[b]),
                    "high": float(edges[b + 1]),
                    "count": int(mask.sum()),
                    "confidence": float(conf[mask].mean()),
                    "accuracy": float(hit[mask].mean()),
                }
            )
    return rows
