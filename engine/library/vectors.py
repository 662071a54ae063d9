"""Exact nearest-neighbour search over L2-normalised vectors, behind one small interface.

Design decisions
- Exact, brute force, numpy: for a library of up to a few hundred thousand
  512-d vectors a (Q, N) matrix product is milliseconds to tens of
  milliseconds on a laptop, needs no training, and is exactly right. Scores
  are inner products, i.e. cosines (vectors are L2-normalised on the way in).
- Top-k per block with `argpartition` (O(N), not a full sort), then only
  the k candidates are sorted; the database is scanned in blocks so the
  (Q, block) score matrix stays small for big libraries and many queries.
  Ties are broken by the smaller id, so results are deterministic and equal
  to a brute-force sort by (-score, id).
- Storage float32 by default; float16 halves memory (scores are computed in
  float32 block by block; cosines move by ~1e-3, which can swap near-ties).
- faiss (optional, not a dependency): imported lazily; `IndexFlatIP` is the
  same exact inner-product search, its results are re-sorted by the same
  (-score, id) rule. Used only for float32 storage without an `allowed_ids`
  restriction; anything else, or faiss missing, falls back to numpy.
- The index is a cache, never the source of truth: `index_for(db, model_id)`
  builds it from the `embeddings` rows of one model id (one index per model:
  embeddings of different models live in different spaces and never mix)
  and keeps it while (count, max(id)) of that model's rows is unchanged.
  Embedding ids are AUTOINCREMENT (never reused), so any insert raises
  max(id) and any delete lowers count: the key changes whenever the set does.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterable

import numpy as np

BLOCK = 65_536  # database rows scored at once
_CACHE_SIZE = 4


class VectorIndex:
    """ids (N,) int64 + vectors (N, D), searched by inner product."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, backend: str = "numpy"):
        self.ids = ids
        self.vectors = vectors
        self.backend = backend
        self._faiss = None

    # --- construction --------------------------------------------------------------
    @classmethod
    def build(cls, ids: Iterable[int], vectors: np.ndarray, *, dtype=np.float32, backend: str = "auto") -> "VectorIndex":
        """Index `vectors` (N, D) under `ids` (N,). Vectors are re-normalised; dtype float32 or float16.

        backend: "numpy", "faiss" (error if missing) or "auto" (faiss when importable, else numpy).
        """
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64).reshape(-1)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.size == 0:
            vectors = vectors.reshape(0, vectors.shape[1] if vectors.ndim == 2 else 0)
        if vectors.ndim != 2 or vectors.shape[0] != ids.shape[0]:
            raise ValueError(f"need ids (N,) and vectors (N, D); got {ids.shape} and {vectors.shape}")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ids must be unique")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float16):
            raise ValueError("storage dtype must be float32 or float16")
        index = cls(ids, np.ascontiguousarray(vectors.astype(dtype)), backend="numpy")
        if backend not in ("numpy", "faiss", "auto"):
            raise ValueError("backend must be numpy, faiss or auto")
        if backend != "numpy" and dtype == np.float32 and len(ids):
            faiss = _import_faiss()
            if faiss is None and backend == "faiss":
                raise ImportError("faiss is not installed (pip install faiss-cpu), or use backend='numpy'")
            if faiss is not None:
                flat = faiss.IndexFlatIP(index.vectors.shape[1])
                flat.add(index.vectors)
                index._faiss, index.backend = flat, "faiss"
        return index

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1]) if self.vectors.ndim == 2 else 0

    # --- search --------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, allowed_ids: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product for each query -> (scores (Q, k') float32, ids (Q, k') int64).

        k' = min(k, number of candidates); rows sorted by score descending,
        ties by id ascending. `allowed_ids` restricts the candidates (filters).
        """
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or (len(self) and queries.shape[1] != self.dim):
            raise ValueError(f"queries must be (Q, {self.dim}); got {queries.shape}")
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        rows = None
        if allowed_ids is not None:
            allowed = np.fromiter((int(i) for i in allowed_ids), dtype=np.int64)
            rows = np.nonzero(np.isin(self.ids, allowed))[0]
        n = len(self) if rows is None else rows.size
        k = max(0, min(int(k), n))
        q = queries.shape[0]
        if k == 0:
            return np.zeros((q, 0), np.float32), np.zeros((q, 0), np.int64)
        if self._faiss is not None and rows is None:
            return self._search_faiss(queries, k)
        return self._search_numpy(queries, k, rows)

    def _search_numpy(self, queries: np.ndarray, k: int, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        n = len(self) if rows is None else rows.size
        best_scores = np.full((queries.shape[0], 0), -np.inf, np.float32)
        best_ids = np.zeros((queries.shape[0], 0), np.int64)
        for start in range(0, n, BLOCK):
            sel = slice(start, min(n, start + BLOCK)) if rows is None else rows[start : start + BLOCK]
            block = self.vectors[sel].astype(np.float32, copy=False)
            scores = queries @ block.T  # (Q, B)
            ids = np.broadcast_to(self.ids[sel], scores.shape)
            # keep the union of the running best and this block's k best, then cut to k
            if scores.shape[1] > k:
                # k-th largest by score; ties at the boundary are kept by taking k+ties below
                part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
                kth = np.take_along_axis(scores, part, axis=1).min(axis=1, keepdims=True)
                keep = scores >= kth  # includes every tie with the k-th score
                scores, ids = _ragged(scores, ids, keep)
            best_scores = np.concatenate([best_scores, scores], axis=1)
            best_ids = np.concatenate([best_ids, ids], axis=1)
            best_scores, best_ids = _top_sorted(best_scores, best_ids, k)
        return best_scores.astype(np.float32), best_ids

    def _search_faiss(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # ask for extra neighbours so ties at the boundary can be re-ordered by id like numpy does
        extra = min(len(self), k + 16)
        scores, positions = self._faiss.search(np.ascontiguousarray(queries, dtype=np.float32), extra)
        valid = positions >= 0
        ids = np.where(valid, self.ids[np.clip(positions, 0, None)], np.iinfo(np.int64).max)
        scores = np.where(valid, scores, -np.inf).astype(np.float32)
        return _top_sorted(scores, ids, k)


def _ragged(scores: np.ndarray, ids: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of kept entries, padded with -inf (rows keep different numbers of ties)."""
    width = int(keep.sum(axis=1).max())
    out_s = np.full((scores.shape[0], width), -np.inf, np.float32)
    out_i = np.full((scores.shape[0], width), np.iinfo(np.int64).max, np.int64)
    for r in range(scores.shape[0]):
        cols = np.nonzero(keep[r])[0]
        out_s[r, : cols.size] = scores[r, cols]
        out_i[r, : cols.size] = ids[r, cols]
    return out_s, out_i


def _top_sorted(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the k best by (-score, id)."""
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def _import_faiss():
    try:
        import faiss  # type: ignore[import-not-found]
    except ImportError:
        return None
    return faiss


# --------------------------------------------------------------------------- cache, rebuilt from the database
_cache: "OrderedDict[tuple, tuple[tuple[int, int], VectorIndex]]" = OrderedDict()
_cache_lock = threading.Lock()


def index_for(db, model_id: str, *, dtype=np.float32, backend: str = "auto") -> VectorIndex:
    """The vector index of one model's embeddings in the library `db`, rebuilt when they change."""
    from engine.library.db import db_path
    from engine.library.store import embeddings

    stamp_row = db.execute("SELECT count(*), coalesce(max(id), 0) FROM embeddings WHERE model_id = ?", [model_id]).fetchone()
    stamp = (int(stamp_row[0]), int(stamp_row[1]))
    key = (db_path(db), model_id, np.dtype(dtype).str, backend)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] == stamp:
            _cache.move_to_end(key)
            return hit[1]
    # read the rows and the stamp in one snapshot, so the stamp describes exactly what was read
    in_txn = db.conn.in_transaction
    if not in_txn:
        db.conn.execute("BEGIN")
    try:
        stamp_row = db.execute("SELECT count(*), coalesce(max(id), 0) FROM embeddings WHERE model_id = ?", [model_id]).fetchone()
        stamp = (int(stamp_row[0]), int(stamp_row[1]))
        ids, vectors = embeddings(db, model_id)
    finally:
        if not in_txn:
            db.conn.execute("COMMIT")
    index = VectorIndex.build(ids, vectors, dtype=dtype, backend=backend)
    with _cache_lock:
        _cache[key] = (stamp, index)
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return index


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()
