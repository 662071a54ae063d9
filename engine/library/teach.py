"""Teaching the library a label: tags by a person, a linear probe on the model's embeddings.

Design decisions
- A person tags scans positive or negative for a label (`labels` table; a
  new tag of the same scan and label replaces the old one). Labels are
  compared case- and space-insensitively (stored lower case, single spaces).
- The probe is scikit-learn's LogisticRegression (class_weight="balanced",
  C=1.0) on the stored embeddings of one model id: a linear probe is what
  CLIP/LVM-Med report for few-shot transfer, it cannot overfit a handful of
  examples as badly as anything bigger, and "balanced" keeps 3 positives
  against 40 negatives from predicting "negative" everywhere. Fitted once
  there are >= 2 positives and >= 2 negatives.
- Stored as plain numbers (`probes`: coef float32 BLOB, intercept, the
  example ids and metrics), not a pickle: the file stays readable by any
  SQLite tool, and loading a probe executes nothing. P = sigmoid(x . coef +
  intercept) equals sklearn's predict_proba for binary problems.
- Metrics: training accuracy, and stratified cross-validated balanced
  accuracy (folds = min(5, n_pos, n_neg)) so a person sees how far a probe
  from a few examples can be trusted.
- A probe belongs to (label, model id): embeddings of another model live in
  another space, so a probe is never applied to them.
- Tags and probes belong to the library user who made them (`owner`,
  default `local`): a user may tag any scan they may see (their own, or one
  shared with them), the tag is theirs alone, and their probes are fitted
  on their own tags of scans they can still see. Another user's tags never
  change, and are never read, by anyone else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Sequence

import numpy as np
import sqlite_utils

from engine.auth.users import LOCAL
from engine.errors import MedLensError
from engine.library.db import now, write
from engine.library.store import VISIBLE
from engine.library.store import embeddings as stored_embeddings
from engine.library.store import from_blob, to_blob

MIN_PER_CLASS = 2


class TeachError(MedLensError):
    """A label cannot be taught yet; the message says what is missing."""


def normalise_label(label: str) -> str:
    text = " ".join(str(label).split()).lower()
    if not text:
        raise TeachError("a label needs some text")
    return text


@dataclass
class Probe:
    label: str
    model_id: str
    coef: np.ndarray  # (D,) float32
    intercept: float
    n_pos: int
    n_neg: int
    positive_ids: list[int] = field(default_factory=list)
    negative_ids: list[int] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, D) embeddings -> (N,) P(label)."""
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        if x.shape[1] != self.coef.shape[0]:
            raise TeachError(f"embeddings have {x.shape[1]} values, the probe for '{self.label}' expects {self.coef.shape[0]}")
        z = x @ self.coef.astype(np.float64) + self.intercept
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description: every field but the coefficients (coef, intercept), in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("coef", "intercept")}


# --------------------------------------------------------------------------- tags
def tag(db: sqlite_utils.Database, scan_ids: Iterable[int], label: str, positive: bool, *, owner: str = LOCAL) -> int:
    """`owner` tags scans they may see positive/negative for `label` (replacing their earlier tags); returns how many."""
    label = normalise_label(label)
    ids = [int(i) for i in scan_ids]
    with write(db):
        marks = ", ".join("?" for _ in ids)
        known = (
            {int(r[0]) for r in db.execute(f"SELECT id FROM scans WHERE id IN ({marks}) AND {VISIBLE}", ids + [owner]).fetchall()}
            if ids
            else set()
        )
        missing = [i for i in ids if i not in known]
        if missing:
            raise TeachError(f"no scan #{missing[0]} in the library")
        for sid in dict.fromkeys(ids):
            db.execute(
                "INSERT INTO labels (scan_id, label, positive, added_at, owner) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (scan_id, label, owner) DO UPDATE SET positive = excluded.positive, added_at = excluded.added_at",
                [sid, label, int(bool(positive)), now(), owner],
            )
    return len(set(ids))


def untag(db: sqlite_utils.Database, scan_ids: Iterable[int], label: str, *, owner: str = LOCAL) -> None:
    label = normalise_label(label)
    with write(db):
        for sid in scan_ids:
            db.execute("DELETE FROM labels WHERE scan_id = ? AND label = ? AND owner = ?", [int(sid), label, owner])


def tags(db: sqlite_utils.Database, label: str, *, owner: str = LOCAL) -> tuple[list[int], list[int]]:
    """(positive scan ids, negative scan ids) `owner` tagged for `label`, among the scans they may still see."""
    rows = db.execute(
        f"SELECT scan_id, positive FROM labels JOIN scans ON scans.id = labels.scan_id "
        f"WHERE label = ? AND labels.owner = ? AND {VISIBLE} ORDER BY scan_id",
        [normalise_label(label), owner, owner],
    ).fetchall()
    return [int(s) for s, p in rows if p], [int(s) for s, p in rows if not p]


# --------------------------------------------------------------------------- probes
def fit_probe(db: sqlite_utils.Database, label: str, model_id: str, *, owner: str = LOCAL) -> Probe:
    """Fit and store `owner`'s probe for `label` on `model_id`'s embeddings of the scans they tagged."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    label = normalise_label(label)
    pos_tagged, neg_tagged = tags(db, label, owner=owner)
    ids, x = stored_embeddings(db, model_id, pos_tagged + neg_tagged, owner=owner)
    positive = set(pos_tagged)
    pos_ids = [int(i) for i in ids if int(i) in positive]
    neg_ids = [int(i) for i in ids if int(i) not in positive]
    if len(pos_ids) < MIN_PER_CLASS or len(neg_ids) < MIN_PER_CLASS:
        unembedded = len(pos_tagged) + len(neg_tagged) - len(ids)
        extra = f"; {unembedded} tagged scan(s) have no embedding for model {model_id} (index them with this model)" if unembedded else ""
        raise TeachError(
            f"'{label}' needs at least {MIN_PER_CLASS} positive and {MIN_PER_CLASS} negative examples to fit a probe "
            f"(has {len(pos_ids)} positive, {len(neg_ids)} negative){extra}; the tags are kept, add more"
        )
    y = np.array([1 if int(i) in positive else 0 for i in ids])
    clf = LogisticRegression(class_weight="balanced", C=1.0, max_iter=1000)
    clf.fit(x, y)
    folds = min(5, len(pos_ids), len(neg_ids))
    cv = cross_val_score(
        LogisticRegression(class_weight="balanced", C=1.0, max_iter=1000),
        x,
        y,
        cv=StratifiedKFold(n_splits=folds, shuffle=True, random_state=0),
        scoring="balanced_accuracy",
    )
    metrics = {
        "train_accuracy": round(float(clf.score(x, y)), 4),
        "cv_balanced_accuracy": round(float(cv.mean()), 4),
        "cv_folds": int(folds),
    }
    probe = Probe(
        label=label,
        model_id=model_id,
        coef=clf.coef_[0].astype(np.float32),
        intercept=float(clf.intercept_[0]),
        n_pos=len(pos_ids),
        n_neg=len(neg_ids),
        positive_ids=pos_ids,
        negative_ids=neg_ids,
        metrics=metrics,
        created_at=now(),
    )
    with write(db):
        db.execute(
            """
            INSERT INTO probes (label, model_id, dim, coef, intercept, n_pos, n_neg, positive_ids, negative_ids, metrics, created_at, owner)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (label, model_id, owner) DO UPDATE SET
                dim = excluded.dim, coef = excluded.coef, intercept = excluded.intercept, n_pos = excluded.n_pos,
                n_neg = excluded.n_neg, positive_ids = excluded.positive_ids, negative_ids = excluded.negative_ids,
                metrics = excluded.metrics, created_at = excluded.created_at
            """,
            [
                label,
                model_id,
                int(probe.coef.size),
                to_blob(probe.coef),
                probe.intercept,
                probe.n_pos,
                probe.n_neg,
                json.dumps(pos_ids),
                json.dumps(neg_ids),
                json.dumps(metrics),
                probe.created_at,
                owner,
            ],
        )
    return probe


def teach(
    db: sqlite_utils.Database, label: str, positives: Sequence[int], negatives: Sequence[int], model_id: str, *, owner: str = LOCAL
) -> Probe:
    """`owner` tags `positives` / `negatives` for `label`, then fits and stores their probe (TeachError when too few)."""
    overlap = set(map(int, positives)) & set(map(int, negatives))
    if overlap:
        raise TeachError(f"scan #{min(overlap)} is given as both positive and negative for '{normalise_label(label)}'")
    if positives:
        tag(db, positives, label, True, owner=owner)
    if negatives:
        tag(db, negatives, label, False, owner=owner)
    return fit_probe(db, label, model_id, owner=owner)


def _probe_from_row(row: dict[str, Any]) -> Probe:
    return Probe(
        label=row["label"],
        model_id=row["model_id"],
        coef=from_blob(row["coef"], int(row["dim"])),
        intercept=float(row["intercept"]),
        n_pos=int(row["n_pos"]),
        n_neg=int(row["n_neg"]),
        positive_ids=json.loads(row["positive_ids"]),
        negative_ids=json.loads(row["negative_ids"]),
        metrics=json.loads(row["metrics"]),
        created_at=row["created_at"],
    )


def load_probe(db: sqlite_utils.Database, label: str, model_id: str, *, owner: str = LOCAL) -> Probe | None:
    rows = list(db.query("SELECT * FROM probes WHERE label = ? AND model_id = ? AND owner = ?", [normalise_label(label), model_id, owner]))
    return _probe_from_row(rows[0]) if rows else None


def list_probes(db: sqlite_utils.Database, model_id: str | None = None, *, owner: str = LOCAL) -> list[Probe]:
    """`owner`'s stored probes (of one model id, or all), by label."""
    if model_id is None:
        rows = db.query("SELECT * FROM probes WHERE owner = ? ORDER BY label, model_id", [owner])
    else:
        rows = db.query("SELECT * FROM probes WHERE model_id = ? AND owner = ? ORDER BY label", [model_id, owner])
    return [_probe_from_row(r) for r in rows]


def apply_probe(db: sqlite_utils.Database, label: str, embeddings: np.ndarray, model_id: str, *, owner: str = LOCAL) -> np.ndarray:
    """P(label) by `owner`'s probe for (N, D) embeddings of `model_id` (e.g. the scan on screen) -> (N,) float32."""
    probe = load_probe(db, label, model_id, owner=owner)
    if probe is None:
        raise TeachError(f"no probe for '{normalise_label(label)}' with model {model_id}; teach it first")
    return probe.predict_proba(embeddings)
