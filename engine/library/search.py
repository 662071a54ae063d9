"""Searching the library: text -> scans, scan -> scans, keywords over notes, and their fusion.

Design decisions
- Text queries are embedded as typed (the raw query, one text embedding).
  A free-text query ("left lower lobe consolidation in a child") is already
  a sentence; pushing it through the zero-shot templates ("a chest X-ray
  showing {label}") makes garbled prompts. The prompt ensemble (the query
  through the modality's templates, averaged with the raw query and
  re-normalised) is an option, `ensemble=True`, meant for short label-like
  queries ("pneumothorax"); it uses the prompt set of the modality filter
  (or "other" without one).
- Scan -> scan: a scan that is not in the library is embedded exactly as
  indexing embeds it (store.embed_scan); a library scan id uses its stored
  embedding and is left out of its own results.
- Filters (modality, body part, taught label) become an `allowed_ids` set
  for the vector index, so k hits come back even when the filter is rare.
  The taught-label filter keeps scans whose probe says P >= 0.5, plus scans
  a person tagged positive, minus scans tagged negative (a person's tag
  overrides the probe); without a probe for the label and model, the tags
  alone decide.
- Keyword search: FTS5 over notes, BM25 order, each word quoted (a user's
  string is never FTS syntax) and words OR-ed (a scan whose note has more
  of the words ranks higher; AND would miss most notes for a sentence).
- Fusion: reciprocal rank fusion, score(d) = sum over lists 1 / (60 + rank).
  Cosine similarities and BM25 scores live on unrelated scales (BM25 is
  unbounded and depends on the corpus; cosines of one model bunch in a
  narrow band), so adding or normalising them is arbitrary; RRF uses only
  ranks, needs no tuning, and k = 60 is the value of Cormack et al. (2009)
  that damps the weight of the very top ranks. With a single list there is
  nothing to fuse: `score` is then the cosine (vector) or -BM25 (keyword),
  and `Hit.ranking` says which kind of score it is.
- Owners: every search runs for one library user (`owner`, default
  `local`). The scans they may see (their own and shared ones, selected in
  SQL) become the vector index's `allowed_ids` (None when they may see
  every scan, which keeps a single user's search unrestricted), keyword
  hits are joined to that rule in SQL, taught-label filters use their own
  tags and probes only, and a `like` id they may not see is "not in the
  library". The final rows are read through the same rule once more.
- Trust (issue 14): every hit carries an out-of-distribution flag from its
  stored embedding, computed at search time against the model's reference
  set (a checkpoint without one: not assessed) and, when the scan's
  modality came from a DICOM header, the model's modality guess from the
  same vector (engine.trust.modality). A volume's stored embedding is the
  mean of its slices', so its distance is an average slice's (slightly
  optimistic). Flags are not stored: a recalibrated model re-judges every
  hit.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import sqlite_utils

from engine.auth.users import LOCAL
from engine.errors import MedLensError
from engine.library.store import VISIBLE, embed_scan, embeddings, normalise, scan_rows, visible_ids
from engine.library.vectors import index_for
from engine.scan import Modality, Scan
from engine.trust import OodFlag

RRF_K = 60
CANDIDATES = 100  # depth of each list before fusion


class SearchError(MedLensError):
    """A search that cannot run as asked; the message says what to change."""


@dataclass
class Hit:
    scan_id: int
    score: float  # see `ranking`
    modality: str
    source: str | None
    body_part: str | None
    ranking: str = "cosine"  # "cosine" (vector only), "bm25" (keyword only, -BM25: higher is better) or "rrf" (fused)
    cosine: float | None = None  # similarity to the (first) vector query, when the scan was in a vector list
    content_hash: str | None = None  # the scan's de-identified content hash (what the audit log records)
    ood: OodFlag | None = None  # the hit is unlike the model's training data (None: not assessed)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("ood")
        return {**out, **(self.ood or OodFlag.unknown()).to_dict()}


# --------------------------------------------------------------------------- pieces
def rrf(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion of ranked id lists (best first) -> [(id, score)], best first.

    Ties are broken by the best rank an id reached in any list, then by the
    order of the lists (earlier lists first).
    """
    scores: dict[int, float] = {}
    best: dict[int, tuple[int, int]] = {}
    for li, ranking in enumerate(rankings):
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
            best[item] = min(best.get(item, (rank, li)), (rank, li))
    return sorted(scores.items(), key=lambda kv: (-kv[1], best[kv[0]]))


def _fts_query(text: str) -> str | None:
    words = re.findall(r"\w+", str(text), flags=re.UNICODE)
    if not words:
        return None
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in dict.fromkeys(words))


def keyword_search(
    db: sqlite_utils.Database, query: str, *, limit: int = CANDIDATES, allowed_ids: Iterable[int] | None = None, owner: str = LOCAL
) -> list[tuple[int, float]]:
    """Scans `owner` may see whose notes match `query` -> [(scan_id, -bm25)], best first (one entry per scan)."""
    match = _fts_query(query)
    if match is None:
        return []
    rows = db.execute(
        f"""
        SELECT notes.scan_id, min(notes_fts.rank) AS r
        FROM notes_fts JOIN notes ON notes.id = notes_fts.rowid JOIN scans ON scans.id = notes.scan_id
        WHERE notes_fts MATCH ? AND {VISIBLE}
        GROUP BY notes.scan_id
        ORDER BY r, notes.scan_id
        """,
        [match, owner],
    ).fetchall()
    allowed = None if allowed_ids is None else {int(i) for i in allowed_ids}
    out = [(int(sid), -float(r)) for sid, r in rows if allowed is None or int(sid) in allowed]
    return out[:limit]


def modality_value(text: str | Modality) -> str:
    """A user's modality word ("CT", "x-ray", "mri", "XRAY") -> the stored Modality value."""
    if isinstance(text, Modality):
        return text.value
    from engine.zeroshot.prompts import MODALITY_KEYS, PromptError, prompt_set_key

    try:
        key = prompt_set_key(str(text))
    except PromptError:
        choices = ", ".join(m.value for m in Modality)
        raise SearchError(f"unknown modality {text!r}; choose one of {choices}") from None
    return next(m.value for m, k in MODALITY_KEYS.items() if k == key)


def filter_ids(
    db: sqlite_utils.Database,
    model_id: str,
    *,
    modality: str | None = None,
    body_part: str | None = None,
    label: str | None = None,
    owner: str = LOCAL,
) -> list[int] | None:
    """Ids of the scans `owner` may see that pass the filters, or None when every scan passes."""
    if modality is None and body_part is None and label is None:
        return visible_ids(db, owner)
    where, params = [VISIBLE], [owner]
    if modality is not None:
        where.append("modality = ?")
        params.append(modality_value(modality))
    if body_part is not None:
        where.append("upper(body_part) = ?")
        params.append(" ".join(str(body_part).split()).upper())
    sql = "SELECT id FROM scans WHERE " + " AND ".join(where)
    ids = {int(r[0]) for r in db.execute(sql, params).fetchall()}
    if label is not None:
        ids &= labelled_ids(db, label, model_id, owner=owner)
    return sorted(ids)


def labelled_ids(db: sqlite_utils.Database, label: str, model_id: str, threshold: float = 0.5, *, owner: str = LOCAL) -> set[int]:
    """Scans `owner` may see with their taught label: probe P >= threshold, plus their positive tags, minus their negative ones."""
    from engine.library.teach import load_probe, normalise_label

    label = normalise_label(label)
    tags = db.execute(
        f"SELECT scan_id, positive FROM labels JOIN scans ON scans.id = labels.scan_id WHERE label = ? AND labels.owner = ? AND {VISIBLE}",
        [label, owner, owner],
    ).fetchall()
    positive = {int(s) for s, p in tags if p}
    negative = {int(s) for s, p in tags if not p}
    probe = load_probe(db, label, model_id, owner=owner)
    if probe is None:
        if not tags:
            raise SearchError(f"no scan is tagged '{label}' and no probe exists for it; teach it first (medlens teach)")
        return positive
    ids, vectors = embeddings(db, model_id, owner=owner)
    predicted = set(ids[probe.predict_proba(vectors) >= threshold].tolist()) if len(ids) else set()
    return (predicted | positive) - negative


def _text_vector(model, query: str, ensemble: bool, modality: str | None) -> np.ndarray:
    if not ensemble:
        return normalise(np.asarray(model.encode_texts([query]), dtype=np.float32)[0])
    from engine.zeroshot.prompts import ensemble as ensemble_texts
    from engine.zeroshot.prompts import load_prompt_set

    prompt_set = load_prompt_set(modality_value(modality) if modality else "other")
    return ensemble_texts(model, [[query] + prompt_set.prompts(query)])[0]


# --------------------------------------------------------------------------- the search
def search(
    db: sqlite_utils.Database,
    model,
    query: str | None = None,
    *,
    like: Scan | int | None = None,
    k: int = 10,
    modality: str | None = None,
    body_part: str | None = None,
    label: str | None = None,
    keywords: bool = True,
    ensemble: bool = False,
    owner: str = LOCAL,
) -> list[Hit]:
    """Hits for a text `query` and/or a scan `like` (a Scan, or a library scan id), best first.

    model: the ClipModel whose embeddings are searched (its model_id scopes
    the index). keywords: also match `query` against notes (FTS5) and fuse.
    modality / body_part / label: filters. Several lists (text vector, scan
    vector, keywords) are fused by RRF; one list keeps its own score.
    owner: the library user searching; only scans they may see are found.
    """
    if query is not None and not str(query).strip():
        query = None
    if query is None and like is None:
        raise SearchError("nothing to search for: give a text query or a scan to compare with")
    if k < 1:
        raise SearchError(f"k must be at least 1 (got {k})")
    model_id = model.model_id
    allowed = filter_ids(db, model_id, modality=modality, body_part=body_part, label=label, owner=owner)
    exclude: set[int] = set()

    queries: list[np.ndarray] = []
    if query is not None:
        queries.append(_text_vector(model, str(query), ensemble, modality))
    if like is not None:
        if isinstance(like, Scan):
            queries.append(embed_scan(like, model)[0])
        else:
            ids, vectors = embeddings(db, model_id, [int(like)], owner=owner)
            if not len(ids):
                raise SearchError(f"scan #{like} has no embedding for model {model_id} (not in the library, or indexed with another model)")
            queries.append(vectors[0])
            exclude.add(int(like))

    index = index_for(db, model_id)
    lists: list[tuple[str, list[int]]] = []  # (kind, ids best first)
    cosines: dict[int, float] = {}
    keyword_scores: dict[int, float] = {}
    depth = max(CANDIDATES, k) + len(exclude)
    if len(index):
        scores, ids = index.search(np.stack(queries), depth, allowed_ids=allowed)
        for qi in range(len(queries)):
            lists.append(("cosine", [int(i) for i in ids[qi] if int(i) not in exclude]))
            if qi == 0:
                cosines = {int(i): float(s) for s, i in zip(scores[qi], ids[qi])}
    if keywords and query is not None:
        found = [(sid, s) for sid, s in keyword_search(db, str(query), limit=depth, allowed_ids=allowed, owner=owner) if sid not in exclude]
        keyword_scores = dict(found)
        lists.append(("bm25", [sid for sid, _ in found]))
    lists = [(kind, ids) for kind, ids in lists if ids]
    if not lists:
        return []
    if len(lists) == 1:
        ranking, only = lists[0]
        table = cosines if ranking == "cosine" else keyword_scores
        scored = [(sid, table[sid]) for sid in only[:k]]
    else:
        ranking = "rrf"
        scored = rrf([ids for _, ids in lists])[:k]
    return _hits(db, model, scored, ranking, cosines, owner)


def _hits(
    db: sqlite_utils.Database, model, scored: list[tuple[int, float]], ranking: str, cosines: dict[int, float], owner: str
) -> list[Hit]:
    """Hits of the scored ids that `owner` may still see, with their rows and OOD flags."""
    rows = scan_rows(db, [sid for sid, _ in scored], owner=owner)
    flags = hit_flags(db, model, rows, owner)
    return [
        Hit(
            scan_id=sid,
            score=float(score),
            modality=rows[sid]["modality"],
            source=rows[sid]["source"],
            body_part=rows[sid]["body_part"],
            ranking=ranking,
            cosine=cosines.get(sid),
            content_hash=rows[sid]["content_hash"],
            ood=flags.get(sid),
        )
        for sid, score in scored
        if sid in rows  # a scan deleted (or unshared) between the index read and now
    ]


def hit_flags(db: sqlite_utils.Database, model, rows: dict[int, dict[str, Any]], owner: str = LOCAL) -> dict[int, OodFlag]:
    """scan id -> OodFlag from its stored embedding (module docstring: Trust)."""
    from engine.trust import modality as modalities

    if not rows:
        return {}
    ids, vectors = embeddings(db, model.model_id, list(rows), owner=owner)
    trust = getattr(model, "trust", None)
    reference = None if trust is None else trust.reference
    can_guess = getattr(model, "logit_scale", None) is not None
    out = {}
    for sid, vector in zip(ids.tolist(), vectors):
        row = rows[int(sid)]
        reasons, checks = [], []
        header = (
            Modality(row["modality"])
            if str(row.get("reader") or "").startswith("dicom") and row["modality"] != Modality.OTHER.value
            else None
        )
        if header is not None and can_guess:
            checks.append("header modality")
            reason = modalities.conflict(modalities.clip_modality(model, vector[None]), header, f"the model {model.model_id}")
            reasons += [reason] if reason else []
        out[int(sid)] = OodFlag.assess(reference, vector if reference is not None else None, reasons, checks)
    return out
