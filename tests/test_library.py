"""engine.library: schema, idempotent/resumable indexing, crash safety, concurrency, vector index,
keyword search + RRF, taught labels, and no identifying value in the library file.

Most tests use `FakeModel`: a deterministic stand-in for a ClipModel (a vector
derived from the image bytes), so the database behaviour is tested without
torch; the CLI tests (test_library_cli.py) run the tiny real model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from engine.library import (
    VectorIndex,
    add_note,
    add_scan,
    apply_probe,
    connect,
    counts,
    fit_probe,
    get_scan,
    index_for,
    index_paths,
    keyword_search,
    list_probes,
    load_probe,
    rrf,
    search,
    tag,
    teach,
)
from engine.library import store
from engine.library.db import SCHEMA_VERSION, library_path
from engine.library.vectors import clear_cache

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # test_deid's PHI collector, for the privacy sweep
CT_SMALL = pydicom.data.get_testdata_file("CT_small.dcm")
MR_SMALL = pydicom.data.get_testdata_file("MR_small.dcm")
DIM = 16


class FakeModel:
    """Deterministic 'model': unit vectors from a hash of the image or text bytes."""

    def __init__(self, model_id: str = "fake@1", dim: int = DIM):
        self.model_id = model_id
        self.dim = dim

    def _vec(self, data: bytes) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(self.model_id.encode() + data).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
        return v / np.linalg.norm(v)

    def encode_images(self, images) -> np.ndarray:
        return np.stack([self._vec(np.ascontiguousarray(im).tobytes()) for im in images])

    def encode_texts(self, texts) -> np.ndarray:
        return np.stack([self._vec(str(t).encode()) for t in texts])


def make_pngs(folder: Path, n: int, start: int = 0, size: int = 16) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        path = folder / f"img{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)
        out.append(path)
    return out


def put(
    db,
    vector: np.ndarray,
    model_id: str = "fake@1",
    key: str | None = None,
    modality: str = "OTHER",
    body_part: str | None = None,
    source: str | None = None,
) -> int:
    """Insert a synthetic scan with a given embedding (no image, no model)."""
    vector = store.normalise(vector)
    key = key or hashlib.sha256(vector.tobytes() + model_id.encode()).hexdigest()
    row = {
        "content_hash": key,
        "modality": modality,
        "body_part": body_part,
        "shape": "[1]",
        "spacing": "[1]",
        "summary": "{}",
        "thumbnail": None,
        "thumbnail_note": None,
        "source": source,
        "added_at": "now",
    }
    sid, _ = store.insert_prepared(db, store.Prepared(key, row, vector, "image", model_id))
    return sid


@pytest.fixture(autouse=True)
def _fresh_index_cache():
    clear_cache()
    yield
    clear_cache()


# --------------------------------------------------------------------------- schema and file
def test_schema_pragmas_and_plain_sqlite(tmp_path):
    path = tmp_path / "lib.db"
    with connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert db.execute("PRAGMA busy_timeout").fetchone()[0] >= 10_000
        assert {"scans", "embeddings", "notes", "notes_fts", "labels", "probes", "schema_migrations"} <= set(db.table_names())
        assert db.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] == SCHEMA_VERSION
    # reopening migrates nothing twice; any sqlite3 client reads it
    with connect(path):
        pass
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_library_path_rule(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDLENS_LIBRARY", str(tmp_path / "env.db"))
    assert library_path(tmp_path / "flag.db") == tmp_path / "flag.db"
    assert library_path(None) == tmp_path / "env.db"
    monkeypatch.delenv("MEDLENS_LIBRARY")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert library_path(None) == tmp_path / "xdg" / "medlens" / "library.db"


def test_connect_without_create_refuses_missing_file(tmp_path):
    from engine.library import LibraryError

    with pytest.raises(LibraryError, match="no library"):
        with connect(tmp_path / "nope.db", create=False):
            pass
    assert not (tmp_path / "nope.db").exists()


def test_a_file_that_is_not_a_library_is_refused(tmp_path):
    from engine.library import LibraryError

    bogus = tmp_path / "notes.db"
    bogus.write_text("just text, not SQLite\n" * 100)
    with pytest.raises(LibraryError, match="not a MedLens library"):
        with connect(bogus):
            pass


def test_cascade_delete_removes_embeddings_notes_labels(tmp_path):
    with connect(tmp_path / "lib.db") as db:
        sid = put(db, np.ones(DIM))
        add_note(db, sid, "a note")
        tag(db, [sid], "x", True)
        with store.write(db):
            db.execute("DELETE FROM scans WHERE id = ?", [sid])
        assert counts(db) == {"scans": 0, "notes": 0, "embeddings": {}}
        assert db.execute("SELECT count(*) FROM labels").fetchone()[0] == 0
        assert keyword_search(db, "note") == []


# --------------------------------------------------------------------------- indexing
def test_indexing_is_idempotent_and_reports_bad_files(tmp_path):
    folder = tmp_path / "in"
    make_pngs(folder, 4)
    (folder / "notes.txt").write_text("not a scan")
    (folder / "broken.dcm").write_bytes(b"\x00" * 50)
    model = FakeModel()
    seen = []
    report = index_paths(
        [folder, CT_SMALL, MR_SMALL, tmp_path / "missing.png"],
        tmp_path / "lib.db",
        model,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert report.added == 6 and report.present == 0
    failed = dict(report.failed)
    assert set(failed) == {str(folder / "notes.txt"), str(folder / "broken.dcm"), str(tmp_path / "missing.png")}
    assert "no such file" in failed[str(tmp_path / "missing.png")]
    assert seen[0] == (0, seen[-1][1]) and seen[-1][0] == seen[-1][1]
    again = index_paths([folder, CT_SMALL, MR_SMALL], tmp_path / "lib.db", model)
    assert (again.added, again.present) == (0, 6)
    with connect(tmp_path / "lib.db") as db:
        assert counts(db)["scans"] == 6 and counts(db)["embeddings"] == {"fake@1": 6}
        ct = get_scan(db, db.execute("SELECT id FROM scans WHERE modality = 'CT'").fetchone()[0], thumbnail=True)
        assert ct["source"] == CT_SMALL and ct["shape"][-2:] == [128, 128] and ct["thumbnail_note"] is None
        assert ct["thumbnail"].startswith(b"\x89PNG") and max(Image.open(__import__("io").BytesIO(ct["thumbnail"])).size) == 128
        assert ct["summary"]["modality"] == "CT" and ct["summary"]["content_hash"] == ct["content_hash"]
        png = db.execute("SELECT source, modality FROM scans WHERE source LIKE ?", ["%img0000.png"]).fetchone()
        assert png == (str(folder / "img0000.png"), "OTHER")
    # another model: the same scans get that model's embeddings, no new scan rows
    other = index_paths([folder], tmp_path / "lib.db", FakeModel("other@2"))
    assert (other.added, other.embedded) == (0, 4)


def test_volume_embedding_is_the_renormalised_mean_of_slices(tmp_path):
    from engine.io import load
    from engine.zeroshot.imaging import scan_images

    nifti = Path(__import__("nibabel").__file__).parent / "tests" / "data" / "example4d.nii.gz"
    scan = load([nifti]).scans[0]
    model = FakeModel()
    vec, kind = store.embed_scan(scan, model)
    slices = model.encode_images([im.pixels for im in scan_images(scan, n_slices=12)])
    expected = slices.mean(axis=0)
    assert kind == "volume-mean" and 1 < len(slices) <= 12
    np.testing.assert_allclose(vec, expected / np.linalg.norm(expected), atol=1e-6)
    with connect(tmp_path / "lib.db") as db:
        sid, status = add_scan(db, scan, model, source=str(nifti))
        assert status == "added" and add_scan(db, scan, model)[1] == "present"
        assert db.execute("SELECT kind FROM embeddings WHERE scan_id = ?", [sid]).fetchone()[0] == "volume-mean"


CRASH_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path[:0] = [{tests!r}, {repo!r}]
    from test_library import FakeModel
    import engine.library.store as store

    original = store._insert_embedding

    def slow(*args, **kwargs):  # inside the transaction, between the scan row and its embedding
        time.sleep(0.02)
        return original(*args, **kwargs)

    store._insert_embedding = slow
    from engine.library import index_paths
    index_paths([{folder!r}], {db!r}, FakeModel())
    """
)


def _committed_hashes(db_file: Path) -> set[str] | None:
    try:
        conn = sqlite3.connect(db_file, timeout=10)
        try:
            return {r[0] for r in conn.execute("SELECT content_hash FROM scans")}
        finally:
            conn.close()
    except sqlite3.OperationalError:
        return None  # not created yet


def test_kill_mid_run_leaves_a_consistent_library_and_a_rerun_finishes(tmp_path):
    total = 200
    folder = tmp_path / "many"
    make_pngs(folder, total)
    db_file = tmp_path / "lib.db"
    script = CRASH_SCRIPT.format(tests=str(Path(__file__).parent), repo=str(REPO), folder=str(folder), db=str(db_file))
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    before: set[str] = set()
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            before = _committed_hashes(db_file) or set()
            if len(before) >= 30:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"indexer ended before the kill: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / "lib.db-wal").exists()  # killed with a live write-ahead log

    with connect(db_file) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        assert db.execute("SELECT count(*) FROM embeddings e LEFT JOIN scans s ON s.id = e.scan_id WHERE s.id IS NULL").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM scans s LEFT JOIN embeddings e ON e.scan_id = s.id WHERE e.id IS NULL").fetchone()[0] == 0
        assert (
            db.execute("SELECT count(*) FROM (SELECT content_hash FROM scans GROUP BY content_hash HAVING count(*) > 1)").fetchone()[0] == 0
        )
        after = {r[0] for r in db.execute("SELECT content_hash FROM scans")}
    assert before <= after, "a committed scan was lost"
    assert len(before) <= len(after) < total, "the kill did not land mid-run"

    report = index_paths([folder], db_file, FakeModel())
    assert report.present == len(after) and report.added == total - len(after) and not report.failed
    with connect(db_file) as db:
        assert counts(db) == {"scans": total, "notes": 0, "embeddings": {"fake@1": total}}


def test_searches_and_writes_run_concurrently_without_lock_errors(tmp_path):
    db_file = tmp_path / "lib.db"
    make_pngs(tmp_path / "first", 20)
    make_pngs(tmp_path / "second", 60, start=100)
    model = FakeModel()
    index_paths([tmp_path / "first"], db_file, model)
    errors: list[BaseException] = []
    done = threading.Event()

    def reader(n: int) -> None:
        try:
            while not done.is_set():
                with connect(db_file) as db:
                    hits = search(db, model, f"query {n}", k=5)
                    assert 1 <= len(hits) <= 5
                    keyword_search(db, "finding")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def note_writer() -> None:
        try:
            i = 0
            while not done.is_set():
                with connect(db_file) as db:
                    add_note(db, 1 + i % 20, f"finding number {i}")
                    tag(db, [1 + i % 20], "busy", bool(i % 2))
                i += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(4)] + [threading.Thread(target=note_writer)]
    for t in threads:
        t.start()
    try:
        report = index_paths([tmp_path / "second"], db_file, model)
    finally:
        done.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, repr(errors[:3])
    assert report.added == 60 and not report.failed
    with connect(db_file) as db:
        assert counts(db)["scans"] == 80


# --------------------------------------------------------------------------- vector index
def _brute(vectors, ids, queries, k, allowed=None):
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = q @ v.T
    out_s, out_i = [], []
    for row in scores:
        cand = [(float(s), int(i)) for s, i in zip(row, ids) if allowed is None or int(i) in allowed]
        cand.sort(key=lambda t: (-t[0], t[1]))
        out_s.append([s for s, _ in cand[:k]])
        out_i.append([i for _, i in cand[:k]])
    return np.array(out_s), np.array(out_i)


@pytest.mark.parametrize("block", [7, 65_536])
def test_vector_topk_equals_brute_force(monkeypatch, block):
    import engine.library.vectors as vectors_mod

    monkeypatch.setattr(vectors_mod, "BLOCK", block)
    rng = np.random.default_rng(1)
    vecs = rng.standard_normal((100, 24)).astype(np.float32)
    vecs[50] = vecs[10]  # an exact tie: broken by the smaller id
    ids = rng.permutation(1000)[:100] + 1
    queries = rng.standard_normal((5, 24)).astype(np.float32)
    queries[0] = vecs[10]
    index = VectorIndex.build(ids, vecs, backend="numpy")
    for k in (1, 10, 100, 500):
        scores, got = index.search(queries, k)
        want_s, want_i = _brute(vecs, ids, queries, k)
        np.testing.assert_array_equal(got, want_i)
        np.testing.assert_allclose(scores, want_s, atol=1e-5)
    allowed = set(ids[::3].tolist())
    scores, got = index.search(queries, 8, allowed_ids=allowed)
    np.testing.assert_array_equal(got, _brute(vecs, ids, queries, 8, allowed)[1])
    # float16 storage: same neighbours up to float16 rounding of the scores
    half = VectorIndex.build(ids, vecs, dtype=np.float16, backend="numpy")
    s16, i16 = half.search(queries[1:], 10)
    np.testing.assert_allclose(s16, _brute(vecs, ids, queries[1:], 10)[0], atol=3e-3)
    assert half.vectors.dtype == np.float16
    assert index.search(queries, 5, allowed_ids=[])[1].shape == (5, 0)


def test_faiss_backend_gives_the_numpy_answer(monkeypatch):
    """faiss is optional and absent here: a numpy stand-in checks the wiring and the tie re-sort."""

    class FlatIP:
        def __init__(self, d):
            self.x = np.zeros((0, d), np.float32)

        def add(self, x):
            self.x = np.concatenate([self.x, x])

        def search(self, q, k):
            s = q @ self.x.T
            order = np.argsort(-s, axis=1, kind="stable")[:, :k]  # ties by position, not by id
            return np.take_along_axis(s, order, axis=1), order

    monkeypatch.setitem(sys.modules, "faiss", type("faiss", (), {"IndexFlatIP": FlatIP}))
    rng = np.random.default_rng(2)
    vecs = rng.standard_normal((60, 8)).astype(np.float32)
    vecs[5] = vecs[40]
    ids = np.arange(60)[::-1] + 10  # ids descending: the tie must still come out by smaller id
    queries = np.vstack([vecs[40], rng.standard_normal((3, 8))]).astype(np.float32)
    fast = VectorIndex.build(ids, vecs, backend="auto")
    assert fast.backend == "faiss"
    ref = VectorIndex.build(ids, vecs, backend="numpy")
    for k in (1, 2, 7):
        np.testing.assert_array_equal(fast.search(queries, k)[1], ref.search(queries, k)[1])
    monkeypatch.delitem(sys.modules, "faiss")
    monkeypatch.setattr("engine.library.vectors._import_faiss", lambda: None)
    assert VectorIndex.build(ids, vecs, backend="auto").backend == "numpy"
    with pytest.raises(ImportError):
        VectorIndex.build(ids, vecs, backend="faiss")


def test_embeddings_of_two_models_never_mix(tmp_path):
    rng = np.random.default_rng(3)
    with connect(tmp_path / "lib.db") as db:
        a_ids = [put(db, rng.standard_normal(DIM), model_id="a@1") for _ in range(5)]
        b_ids = [put(db, rng.standard_normal(8), model_id="b@1") for _ in range(4)]
        index_a, index_b = index_for(db, "a@1"), index_for(db, "b@1")
        assert sorted(index_a.ids.tolist()) == a_ids and index_a.dim == DIM
        assert sorted(index_b.ids.tolist()) == b_ids and index_b.dim == 8
        hits = search(db, FakeModel("b@1", dim=8), "anything", k=50, keywords=False)
        assert sorted(h.scan_id for h in hits) == b_ids
        # the cached index follows the table: a new row is seen, the model scoping holds
        assert index_for(db, "a@1") is index_a
        new = put(db, rng.standard_normal(DIM), model_id="a@1")
        assert new in index_for(db, "a@1").ids and new not in index_for(db, "b@1").ids


# --------------------------------------------------------------------------- keywords and fusion
def test_rrf_by_hand():
    fused = rrf([[1, 2, 3], [3, 1]])
    assert [i for i, _ in fused] == [1, 3, 2]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62) and fused[1][1] == pytest.approx(1 / 63 + 1 / 61)
    assert fused[2][1] == pytest.approx(1 / 62)


def test_keyword_search_and_fusion_order(tmp_path):
    model = FakeModel()
    q = model.encode_texts(["effusion"])[0]
    rng = np.random.default_rng(4)
    r1, r2 = rng.standard_normal(DIM), rng.standard_normal(DIM)
    with connect(tmp_path / "lib.db") as db:
        a = put(db, q, modality="XRAY", body_part="CHEST")  # cosine 1
        b = put(db, q + 0.3 * r1 / np.linalg.norm(r1), modality="XRAY", body_part="CHEST")
        c = put(db, q + 3.0 * r2 / np.linalg.norm(r2), modality="CT")
        add_note(db, a, "normal study, clear lungs")
        add_note(db, b, "small effusion at the right base, otherwise normal heart and mediastinum")
        add_note(db, c, "large effusion; effusion also on the left")
        # keyword ranking: c (tf 2, short) before b; a has no match; FTS syntax in the query is inert
        assert [sid for sid, _ in keyword_search(db, "effusion")] == [c, b]
        assert keyword_search(db, 'effusion" OR NEAR(') != []
        vector_only = search(db, model, "effusion", keywords=False)
        assert [h.scan_id for h in vector_only] == [a, b, c] and vector_only[0].ranking == "cosine"
        assert vector_only[0].score == pytest.approx(1.0, abs=1e-5)
        # fused: a = 1/61; b = 1/62 + 1/62; c = 1/63 + 1/61  ->  c, b, a
        fused = search(db, model, "effusion")
        assert [h.scan_id for h in fused] == [c, b, a] and fused[0].ranking == "rrf"
        assert fused[0].score == pytest.approx(1 / 63 + 1 / 61) and fused[0].cosine is not None
        assert {"scan_id", "score", "modality", "source", "body_part"} <= set(fused[0].to_dict())
        # filters
        assert [h.scan_id for h in search(db, model, "effusion", modality="x-ray")] == [b, a]
        assert [h.scan_id for h in search(db, model, "effusion", body_part="chest")] == [b, a]
        # scan -> scan by library id: itself left out
        like = search(db, model, like=a, k=5)
        assert [h.scan_id for h in like] == [b, c]
        # keywords only match when no vectors exist for the model
        kw = search(db, FakeModel("unindexed@0"), "effusion")
        assert [h.scan_id for h in kw] == [c, b] and kw[0].ranking == "bm25"


# --------------------------------------------------------------------------- teaching
def test_probe_learns_separable_embeddings_and_round_trips(tmp_path):
    rng = np.random.default_rng(5)
    direction = np.zeros(DIM, np.float32)
    direction[0] = 1.0

    def sample(positive: bool, n: int) -> np.ndarray:
        x = rng.standard_normal((n, DIM)).astype(np.float32) * 0.3
        x[:, 0] += 1.0 if positive else -1.0
        return x

    with connect(tmp_path / "lib.db") as db:
        pos = [put(db, v) for v in sample(True, 6)]
        neg = [put(db, v) for v in sample(False, 6)]
        held_pos, held_neg = [put(db, v) for v in sample(True, 10)], [put(db, v) for v in sample(False, 10)]
        from engine.library import TeachError

        with pytest.raises(TeachError, match="at least 2 positive"):
            teach(db, "Nodule", pos[:1], neg, "fake@1")
        probe = teach(db, "Nodule", pos, neg, "fake@1")
        assert (probe.n_pos, probe.n_neg) == (6, 6) and probe.metrics["train_accuracy"] == 1.0
        stored = load_probe(db, "  nodule ", "fake@1")
        np.testing.assert_allclose(stored.coef, probe.coef)
        assert stored.intercept == pytest.approx(probe.intercept) and stored.positive_ids == pos
        assert [p.label for p in list_probes(db, "fake@1")] == ["nodule"] and list_probes(db, "other@1") == []
        ids, x = store.embeddings(db, "fake@1", held_pos + held_neg)
        p = apply_probe(db, "nodule", x, "fake@1")
        truth = np.isin(ids, held_pos)
        assert np.mean((p >= 0.5) == truth) >= 0.9
        # sklearn agrees with the stored numbers
        from sklearn.linear_model import LogisticRegression

        tr_ids, tr_x = store.embeddings(db, "fake@1", pos + neg)
        clf = LogisticRegression(class_weight="balanced", C=1.0, max_iter=1000).fit(tr_x, np.isin(tr_ids, pos))
        np.testing.assert_allclose(p, clf.predict_proba(x)[:, 1], atol=1e-5)
        # as a search filter: probe P >= 0.5, tagged positives in, tagged negatives out
        hits = search(db, FakeModel(), "anything", k=100, label="NODULE", keywords=False)
        got = {h.scan_id for h in hits}
        assert set(pos) <= got and not (got & set(neg))
        assert len(got & set(held_pos)) >= 9 and len(got & set(held_neg)) <= 1
        # another model's embeddings are not the probe's business
        assert load_probe(db, "nodule", "other@1") is None
        refit = fit_probe(db, "nodule", "fake@1")
        assert db.execute("SELECT count(*) FROM probes").fetchone()[0] == 1 and refit.n_pos == 6


# --------------------------------------------------------------------------- privacy
def test_no_identifying_value_anywhere_in_the_library_file(tmp_path, monkeypatch):
    import test_deid as td

    # without OCR, burned-in-risk scans keep no thumbnail (with OCR they are redacted first: tests/test_redaction.py)
    monkeypatch.setenv("MEDLENS_TESSERACT", str(tmp_path / "no-tesseract"))

    if td.DEID_DIR is None:
        pytest.skip("deid-data is not installed")
    files = sorted(p for p in td.DEID_DIR.rglob("*.dcm"))
    values: dict[str, str] = {}
    folder = tmp_path / "in"
    folder.mkdir()
    for i, path in enumerate(files):  # neutral names: the user's own path is not PHI the engine leaked
        values.update(td.identifying_values(td._datasets(path)))
        shutil.copyfile(path, folder / f"{i:03d}.dcm")
    assert len(values) > 50  # the check below means something
    db_file = tmp_path / "lib.db"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = index_paths([folder], db_file, FakeModel())
        # also what `medlens search` would print
        with connect(db_file) as db:
            hits = search(db, FakeModel(), "patient", k=50)
            rows = [get_scan(db, h.scan_id) for h in hits]
            flagged = db.execute("SELECT count(*) FROM scans WHERE thumbnail IS NULL AND thumbnail_note LIKE '%burned-in%'").fetchone()[0]
    assert report.added >= 10 and flagged >= 1
    problems = td.leaks(values, json.dumps([h.to_dict() for h in hits] + rows, default=str))
    for suffix in ("", "-wal", "-shm"):
        file = Path(str(db_file) + suffix)
        if file.exists():
            problems += [f"{file.name}: {p}" for p in td.leaks(values, file.read_bytes().decode("latin-1"))]
    assert not problems, "; ".join(sorted(set(problems)))
