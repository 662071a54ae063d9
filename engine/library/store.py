"""Rows of the library: scans in, scans out, embeddings as float32 BLOBs.

Design decisions
- A scan is embedded the way zero-shot labelling sees it
  (engine.zeroshot.imaging.scan_images): a 2D image is one model image
  (kind 'image'); a volume is ~12 evenly spaced axial slices over its
  non-empty extent, whose L2-normalised embeddings are averaged and
  re-normalised (kind 'volume-mean'). The mean of unit vectors points at the
  volume's "typical" slice; re-normalising puts it back on the sphere so a
  cosine against text or 2D embeddings means the same thing. A 4D scan is
  embedded from its first volume.
- The embedding and the thumbnail are computed *before* the write
  transaction: model inference can take seconds, and the write lock must
  not be held while it runs (concurrent searches and indexers would wait).
- `insert_scan` writes the scan row and its embedding in one transaction,
  re-checking the content hash under the lock, so a killed or concurrent
  indexer can never leave an embedding without its scan, a scan without its
  embedding, or two rows for one image.
- Thumbnails: the middle of the non-empty axial extent (volumes) or the
  image (2D), default window, longer side 128 px, PNG. Scans flagged with a
  burned-in-text risk (ultrasound, secondary capture, XA/RF,
  BurnedInAnnotation = YES) get a thumbnail only once OCR has read their
  pixels and blanked the text it found (engine.redact, run on load):
  the thumbnail is then drawn from the same redacted pixels the viewer
  shows. When OCR did not run (no tesseract, MEDLENS_REDACT=off, OCR
  failed) they get *no* thumbnail: their pixels may show a name, a date of
  birth or an accession number, and a thumbnail would copy that text into
  the library file and every screen that lists it. The row says why
  (`thumbnail_note`). Why allowing it after redaction is safe enough:
  bench/results/redaction.md finds no PHI readable after redaction on any
  frame of deid-data's images, and none readable by OCR even on 128 px
  thumbnails of the *unredacted* images (a 1024 px frame's 15 px caption
  becomes 2 px). The embedding is kept either way: a 512-number vector is
  not readable text.
- Owners (see engine.library.db): every function that reads or writes
  scans takes `owner`, the library user acting (default `local`: the CLI
  and the single local user). Reads select only what that user may see,
  `VISIBLE` in SQL (their own rows and shared ones); writes create rows of
  theirs and change only rows of theirs. An id the user may not see is
  reported exactly like an id that does not exist.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np
import sqlite_utils

from engine.auth.users import LOCAL
from engine.library.db import LibraryError, now, write
from engine.pacs.locator import storable
from engine.scan import Scan

THUMBNAIL_SIZE = 128
VOLUME_SLICES = 12
KIND_IMAGE = "image"
KIND_VOLUME_MEAN = "volume-mean"
VISIBLE = "(scans.owner = ? OR scans.shared = 1)"  # one parameter: the viewer
NO_THUMBNAIL_BURNED_IN = (
    "not stored: the pixels may carry burned-in identifying text (ultrasound, screen capture, XA/RF or BurnedInAnnotation) "
    "that OCR did not read and remove"
)


class ImageEncoder(Protocol):
    """What the library needs of a model (engine.models.ClipModel fits)."""

    @property
    def model_id(self) -> str: ...

    def encode_images(self, images: Sequence[np.ndarray]) -> np.ndarray: ...


# --------------------------------------------------------------------------- vectors
def to_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def from_blob(blob: bytes, dim: int | None = None) -> np.ndarray:
    vec = np.frombuffer(blob, dtype="<f4").astype(np.float32)
    if dim is not None and vec.size != dim:
        raise ValueError(f"stored vector has {vec.size} values, expected {dim}")
    return vec


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


# --------------------------------------------------------------------------- what gets stored
def embed_scan(scan: Scan, model: ImageEncoder, n_slices: int = VOLUME_SLICES) -> tuple[np.ndarray, str]:
    """(D,) L2-normalised float32 embedding of a scan, and its kind ('image' or 'volume-mean')."""
    images = embedding_images(scan, n_slices)
    return pool_embeddings(model.encode_images(images), scan.is_2d)


def embedding_images(scan: Scan, n_slices: int = VOLUME_SLICES) -> list[np.ndarray]:
    """The model images whose embeddings make a scan's stored embedding (one for 2D, axial slices for volumes)."""
    from engine.zeroshot.imaging import scan_images

    return [im.pixels for im in scan_images(scan, planes=("axial",), n_slices=n_slices)]


def pool_embeddings(embeddings: np.ndarray, is_2d: bool) -> tuple[np.ndarray, str]:
    """The stored embedding from the embeddings of `embedding_images` (the batch runner encodes many scans at once)."""
    emb = np.asarray(embeddings, dtype=np.float32)
    if is_2d:
        return normalise(emb[0]), KIND_IMAGE
    return normalise(normalise(emb).mean(axis=0)), KIND_VOLUME_MEAN


def thumbnail_png(scan: Scan, size: int = THUMBNAIL_SIZE) -> tuple[bytes | None, str | None]:
    """(PNG bytes, None), or (None, why there is none)."""
    if scan.provenance.unredacted_text_risk:
        return None, NO_THUMBNAIL_BURNED_IN
    try:
        from PIL import Image

        from engine.views import render_view
        from engine.windowing import default_window
        from engine.zeroshot.imaging import sample_indices

        center, width, _name = default_window(scan)
        index = None if scan.is_2d else sample_indices(scan, "axial", 1)[0]
        rgb = render_view(scan, "axial", index, center, width, size=size, letters=False, square=False)
        image = Image.fromarray(rgb)
        if rgb.ndim == 3 and np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
            image = image.convert("L")  # grey scans: a third of the bytes
        buf = io.BytesIO()
        image.save(buf, format="PNG", optimize=True)
        return buf.getvalue(), None
    except Exception as exc:  # a thumbnail is a convenience: never fail indexing over it
        return None, f"could not be rendered ({type(exc).__name__})"


def body_part(scan: Scan) -> str | None:
    value = scan.metadata.get("BodyPartExamined")
    text = " ".join(str(value).split()).upper() if value not in (None, "") else ""
    return text or None


@dataclass
class Prepared:
    """Everything about one scan that is computed outside the write transaction."""

    content_hash: str
    row: dict[str, Any]  # the scans row (without id)
    vector: np.ndarray
    kind: str
    model_id: str
    owner: str = LOCAL  # whose row it is (a `row` without an "owner" gets the column default, local)


def prepare(
    scan: Scan,
    model: ImageEncoder,
    source: str | None,
    *,
    with_row: bool = True,
    n_slices: int = VOLUME_SLICES,
    owner: str = LOCAL,
    shared: bool = False,
) -> Prepared:
    vector, kind = embed_scan(scan, model, n_slices=n_slices)
    row = scan_row(scan, source, owner=owner, shared=shared) if with_row else {}
    return Prepared(scan.content_hash, row, vector, kind, model.model_id, owner)


def scan_row(scan: Scan, source: str | None, *, owner: str = LOCAL, shared: bool = False) -> dict[str, Any]:
    """The scans row (without id) of a scan: de-identified summary, thumbnail (or why none), where it came from, whose."""
    thumb, note = thumbnail_png(scan)
    return {
        "content_hash": scan.content_hash,
        "modality": scan.modality.value,
        "body_part": body_part(scan),
        "shape": json.dumps(list(scan.voxels.shape)),
        "spacing": json.dumps([round(s, 6) for s in scan.spacing]),
        # Scan.summary(): de-identified metadata only (engine.deid's allow-list)
        "summary": json.dumps(scan.summary(), default=str, ensure_ascii=False),
        "thumbnail": thumb,
        "thumbnail_note": note,
        "source": None if source is None else storable(str(source)),  # a dicomweb: path is stored sealed
        "added_at": now(),
        "owner": owner,
        "shared": int(bool(shared)),
    }


# --------------------------------------------------------------------------- writes
def _insert_embedding(db: sqlite_utils.Database, scan_id: int, model_id: str, vector: np.ndarray, kind: str) -> None:
    db.execute(
        "INSERT INTO embeddings (scan_id, model_id, dim, kind, vector) VALUES (?, ?, ?, ?, ?)",
        [scan_id, model_id, int(vector.size), kind, to_blob(vector)],
    )


def insert_prepared(db: sqlite_utils.Database, prepared: Prepared) -> tuple[int, str]:
    """Write a prepared scan in one transaction -> (scan_id, status 'added' | 'present' | 'embedded').

    'present': the scan and its embedding for this model were already there;
    'embedded': the scan was there, its embedding for this model is new.
    """
    owner = prepared.row.get("owner", prepared.owner) if prepared.row else prepared.owner
    with write(db):
        row = db.execute("SELECT id FROM scans WHERE content_hash = ? AND owner = ?", [prepared.content_hash, owner]).fetchone()
        if row is None:
            if not prepared.row:
                raise ValueError("prepared without a scan row for a scan the library lacks")
            columns = list(prepared.row)
            cursor = db.execute(
                f"INSERT INTO scans ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})",
                [prepared.row[c] for c in columns],
            )
            scan_id, status = int(cursor.lastrowid), "added"
        else:
            scan_id, status = int(row[0]), "embedded"
            if has_embedding(db, scan_id, prepared.model_id):
                return scan_id, "present"
        _insert_embedding(db, scan_id, prepared.model_id, prepared.vector, prepared.kind)
    return scan_id, status


# --------------------------------------------------------------------------- reads
def scan_id_by_hash(db: sqlite_utils.Database, content_hash: str, *, owner: str = LOCAL) -> int | None:
    """The id of `owner`'s own row for this content hash (shared rows of others are not theirs to add to)."""
    row = db.execute("SELECT id FROM scans WHERE content_hash = ? AND owner = ?", [content_hash, owner]).fetchone()
    return None if row is None else int(row[0])


def has_embedding(db: sqlite_utils.Database, scan_id: int, model_id: str) -> bool:
    return db.execute("SELECT 1 FROM embeddings WHERE scan_id = ? AND model_id = ?", [scan_id, model_id]).fetchone() is not None


def scan_ids_by_source(db: sqlite_utils.Database, source: str, *, owner: str = LOCAL) -> list[int]:
    stored = storable(str(source))
    rows = db.execute("SELECT id FROM scans WHERE source = ? AND owner = ? ORDER BY id", [stored, owner]).fetchall()
    return [int(r[0]) for r in rows]


def visible_ids(db: sqlite_utils.Database, owner: str = LOCAL) -> list[int] | None:
    """Ids of the scans `owner` may see, or None when they may see every scan (no restriction needed)."""
    if db.execute("SELECT 1 FROM scans WHERE owner != ? AND shared = 0 LIMIT 1", [owner]).fetchone() is None:
        return None
    return [int(r[0]) for r in db.execute(f"SELECT id FROM scans WHERE {VISIBLE} ORDER BY id", [owner]).fetchall()]


def get_scan(db: sqlite_utils.Database, scan_id: int, *, thumbnail: bool = False, owner: str = LOCAL) -> dict[str, Any] | None:
    """One scans row `owner` may see, as a dict (JSON columns decoded; `mine`: theirs); the PNG only when asked."""
    columns = "id, content_hash, modality, body_part, shape, spacing, summary, thumbnail_note, source, added_at, shared"
    if thumbnail:
        columns += ", thumbnail"
    cursor = db.execute(f"SELECT {columns}, owner = ? AS mine FROM scans WHERE id = ? AND {VISIBLE}", [owner, int(scan_id), owner])
    row = cursor.fetchone()
    if row is None:
        return None
    out = dict(zip([d[0] for d in cursor.description], row))
    for key in ("shape", "spacing", "summary"):
        out[key] = json.loads(out[key])
    out["shared"], out["mine"] = bool(out["shared"]), bool(out["mine"])
    return out


def _reader(summary: str | None) -> str | None:
    """The reader of a stored summary ("dicom-series", "nifti", ...): whether its modality came from a DICOM header."""
    try:
        return json.loads(summary or "{}").get("reader")
    except (ValueError, AttributeError):
        return None


def scan_rows(db: sqlite_utils.Database, scan_ids: Sequence[int], *, owner: str = LOCAL) -> dict[int, dict[str, Any]]:
    """id -> {modality, body_part, source, content_hash, reader} for the scans among `scan_ids` that `owner` may see."""
    out: dict[int, dict[str, Any]] = {}
    ids = [int(i) for i in scan_ids]
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        cursor = db.execute(
            f"SELECT id, modality, body_part, source, content_hash, summary FROM scans WHERE id IN ({', '.join('?' for _ in chunk)}) AND {VISIBLE}",
            chunk + [owner],
        )
        for sid, modality, part, source, content_hash, summary in cursor.fetchall():
            out[int(sid)] = {
                "modality": modality,
                "body_part": part,
                "source": source,
                "content_hash": content_hash,
                "reader": _reader(summary),
            }
    return out


def embeddings(
    db: sqlite_utils.Database, model_id: str, scan_ids: Sequence[int] | None = None, *, owner: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 (N,), vectors float32 (N, D)) stored for `model_id`, optionally only for `scan_ids`.

    owner: only scans that user may see; None reads every row (the vector index, a cache of all of
    them, restricted per search by visible ids).
    """
    sql = "SELECT scan_id, dim, vector FROM embeddings WHERE model_id = ?"
    params: list[Any] = [model_id]
    if owner is not None:
        sql = f"SELECT scan_id, dim, vector FROM embeddings JOIN scans ON scans.id = embeddings.scan_id WHERE model_id = ? AND {VISIBLE}"
        params.append(owner)
    rows: list = []
    if scan_ids is None:
        rows = db.execute(sql + " ORDER BY scan_id", params).fetchall()
    else:
        ids = [int(i) for i in scan_ids]
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            rows += db.execute(sql + f" AND scan_id IN ({', '.join('?' for _ in chunk)})", params + chunk).fetchall()
        rows.sort(key=lambda r: r[0])
    if not rows:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    dims = {int(r[1]) for r in rows}
    if len(dims) != 1:
        raise ValueError(f"embeddings of model {model_id} have several sizes {sorted(dims)}; the library is inconsistent")
    ids_out = np.array([int(r[0]) for r in rows], dtype=np.int64)
    vectors = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4").reshape(len(rows), dims.pop()).astype(np.float32)
    return ids_out, vectors


def add_note(db: sqlite_utils.Database, scan_id: int, text: str, *, owner: str = LOCAL) -> int:
    """Attach a free-text note (report, finding) to one of `owner`'s scans; searchable by keyword. Returns the note id."""
    text = str(text).strip()
    if not text:
        raise LibraryError("a note needs some text")
    with write(db):
        if db.execute("SELECT 1 FROM scans WHERE id = ? AND owner = ?", [int(scan_id), owner]).fetchone() is None:
            raise LibraryError(f"no scan #{scan_id} in the library")
        cursor = db.execute("INSERT INTO notes (scan_id, text, added_at) VALUES (?, ?, ?)", [int(scan_id), text, now()])
    return int(cursor.lastrowid)


def share(db: sqlite_utils.Database, scan_ids: Sequence[int], shared: bool, *, owner: str = LOCAL) -> int:
    """Share (or stop sharing) scans of `owner` with every other user; returns how many changed.

    Only the owner may: an id that is not theirs raises LibraryError (as if it did not exist when
    they cannot see it, naming the owner's right when it is someone else's shared scan).
    """
    ids = [int(i) for i in scan_ids]
    with write(db):
        for sid in ids:
            row = db.execute(f"SELECT owner = ? FROM scans WHERE id = ? AND {VISIBLE}", [owner, sid, owner]).fetchone()
            if row is None:
                raise LibraryError(f"no scan #{sid} in the library")
            if not row[0]:
                raise LibraryError(f"scan #{sid} was shared by another user; only they can change its sharing")
        changed = 0
        for sid in ids:
            changed += db.execute(
                "UPDATE scans SET shared = ? WHERE id = ? AND owner = ? AND shared != ?", [int(shared), sid, owner, int(shared)]
            ).rowcount
    return changed


def content_hashes(db: sqlite_utils.Database, scan_ids: Sequence[int], *, owner: str = LOCAL) -> list[str]:
    """The content hashes of the scans among `scan_ids` that `owner` may see, in the order given."""
    rows = scan_rows(db, scan_ids, owner=owner)
    return [rows[int(i)]["content_hash"] for i in scan_ids if int(i) in rows]


def facets(db: sqlite_utils.Database, *, owner: str = LOCAL) -> tuple[list[str], list[str]]:
    """(body parts of the scans `owner` may see, labels `owner` tagged or taught), for filter choices."""
    parts = [
        r[0]
        for r in db.execute(
            f"SELECT DISTINCT body_part FROM scans WHERE body_part IS NOT NULL AND {VISIBLE} ORDER BY 1", [owner]
        ).fetchall()
    ]
    labels = [
        r[0]
        for r in db.execute(
            "SELECT label FROM labels WHERE owner = ? UNION SELECT label FROM probes WHERE owner = ? ORDER BY 1", [owner, owner]
        ).fetchall()
    ]
    return parts, labels


def counts(db: sqlite_utils.Database, *, owner: str = LOCAL) -> dict[str, Any]:
    """What `owner` may see of the library: scans, notes, and embeddings per model id."""
    join = f"JOIN scans ON scans.id = {{table}}.scan_id WHERE {VISIBLE}"
    per_model = dict(
        db.execute(
            f"SELECT model_id, count(*) FROM embeddings {join.format(table='embeddings')} GROUP BY model_id ORDER BY model_id", [owner]
        ).fetchall()
    )
    return {
        "scans": int(db.execute(f"SELECT count(*) FROM scans WHERE {VISIBLE}", [owner]).fetchone()[0]),
        "notes": int(db.execute(f"SELECT count(*) FROM notes {join.format(table='notes')}", [owner]).fetchone()[0]),
        "embeddings": {str(k): int(v) for k, v in per_model.items()},
    }
