"""engine.library owners (issue 16): one file, each scan owned by a user, sharing explicit, every read scoped in SQL.

User B can never find, read, thumbnail, tag, note or share user A's scan unless A shared it; ids
are not access control; tags and probes are per user; an old library migrates with its rows as `local`'s.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import sqlite_utils

from engine.library import (
    LibraryError,
    SearchError,
    TeachError,
    add_note,
    add_scan,
    connect,
    counts,
    fit_probe,
    get_scan,
    index_paths,
    keyword_search,
    list_probes,
    search,
    tag,
    tags,
    teach,
)
from engine.library import db as dbm
from engine.library import store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_library import FakeModel, _fresh_index_cache, make_pngs  # noqa: F401  (an autouse fixture)

A, B = "alice", "bob"
CT_SMALL = pydicom.data.get_testdata_file("CT_small.dcm")


def _scan(path):
    from engine.io import load

    return load([str(path)]).scans[0]


@pytest.fixture
def two_users(tmp_path):
    """A library where alice indexed 3 PNGs (one with a note and tags), bob 3, and both the same CT."""
    model = FakeModel()
    lib = tmp_path / "lib.db"
    a_ids = index_paths(make_pngs(tmp_path / "a", 3), lib, model, owner=A).scan_ids
    b_ids = index_paths(make_pngs(tmp_path / "b", 3, start=10), lib, model, owner=B).scan_ids
    ct = _scan(CT_SMALL)
    with connect(lib) as db:
        a_ct, _ = add_scan(db, ct, model, owner=A)
        b_ct, status = add_scan(db, ct, model, owner=B)
        add_note(db, a_ids[0], "right pleural effusion", owner=A)
        tag(db, a_ids[:2], "malignant", True, owner=A)
        tag(db, [a_ids[2], a_ct], "malignant", False, owner=A)
    assert status == "added" and a_ct != b_ct  # the same image is two rows: nobody's add touches another's
    return lib, model, a_ids + [a_ct], b_ids + [b_ct]


def test_each_user_sees_only_their_scans(two_users):
    lib, model, a_ids, b_ids = two_users
    with connect(lib) as db:
        assert {h.scan_id for h in search(db, model, "anything", k=50, owner=B)} == set(b_ids)
        assert {h.scan_id for h in search(db, model, "anything", k=50, owner=A)} == set(a_ids)
        for sid in a_ids:  # guessing ids gives nothing, and looks like a missing scan
            assert get_scan(db, sid, owner=B) is None and get_scan(db, sid, thumbnail=True, owner=B) is None
            with pytest.raises(SearchError, match="not in the library"):
                search(db, model, like=sid, owner=B)
            with pytest.raises(TeachError, match=f"no scan #{sid} in the library"):
                tag(db, [sid], "malignant", False, owner=B)
            with pytest.raises(LibraryError, match=f"no scan #{sid} in the library"):
                add_note(db, sid, "x", owner=B)
            with pytest.raises(LibraryError, match=f"no scan #{sid} in the library"):
                store.share(db, [sid], True, owner=B)
        assert keyword_search(db, "effusion", owner=B) == [] and keyword_search(db, "effusion", owner=A) != []
        assert search(db, model, "effusion", owner=B, k=50, keywords=True)  # bob's own scans by vector, never alice's note
        assert all(h.scan_id in b_ids for h in search(db, model, "effusion", owner=B, k=50))
        assert counts(db, owner=B) == {"scans": 4, "notes": 0, "embeddings": {"fake@1": 4}}
        assert counts(db, owner=A)["scans"] == 4 and counts(db, owner=A)["notes"] == 1
        assert store.facets(db, owner=B) == ([], []) and store.facets(db, owner=A)[1] == ["malignant"]
        with pytest.raises(SearchError, match="no scan is tagged"):
            search(db, model, "x", label="malignant", owner=B)
        assert tags(db, "malignant", owner=B) == ([], [])
        assert store.visible_ids(db, owner=B) == sorted(b_ids)
        # alice's tags are exactly as she left them
        assert tags(db, "malignant", owner=A) == (a_ids[:2], sorted([a_ids[2], a_ids[3]]))


def test_sharing_is_explicit_and_tags_stay_per_user(two_users):
    lib, model, a_ids, b_ids = two_users
    shared = a_ids[0]
    with connect(lib) as db:
        with pytest.raises(LibraryError, match="no scan"):
            store.share(db, [b_ids[0]], True, owner=A)  # only the owner shares
        assert store.share(db, [shared], True, owner=A) == 1
        row = get_scan(db, shared, thumbnail=True, owner=B)
        assert row is not None and row["shared"] and not row["mine"] and row["thumbnail"]
        assert shared in {h.scan_id for h in search(db, model, "anything", k=50, owner=B)}
        assert search(db, model, like=shared, k=50, owner=B)  # by its stored embedding
        assert keyword_search(db, "effusion", owner=B)[0][0] == shared  # the note goes with the scan
        # bob tags it negative: his tag, alice's positive tag unchanged
        tag(db, [shared], "malignant", False, owner=B)
        assert tags(db, "malignant", owner=B) == ([], [shared])
        assert shared in tags(db, "malignant", owner=A)[0]
        with pytest.raises(LibraryError, match="only they can change"):
            store.share(db, [shared], False, owner=B)
        with pytest.raises(LibraryError, match="no scan"):
            add_note(db, shared, "bob's note", owner=B)  # notes are the owner's
        # unsharing takes it away again, and bob's tag on it stops counting for him
        assert store.share(db, [shared], False, owner=A) == 1
        assert get_scan(db, shared, owner=B) is None and tags(db, "malignant", owner=B) == ([], [])
        assert shared not in {h.scan_id for h in search(db, model, "anything", k=50, owner=B)}


def test_probes_are_per_user(two_users):
    lib, model, a_ids, b_ids = two_users
    with connect(lib) as db:
        probe_a = fit_probe(db, "malignant", model.model_id, owner=A)
        assert probe_a.positive_ids == a_ids[:2]
        with pytest.raises(TeachError, match="has 0 positive, 0 negative"):
            fit_probe(db, "malignant", model.model_id, owner=B)  # alice's tags are not bob's
        with pytest.raises(TeachError, match="no scan"):
            teach(db, "malignant", a_ids[:2], b_ids[:2], model.model_id, owner=B)  # nor are her scans
        probe_b = teach(db, "malignant", b_ids[:2], b_ids[2:], model.model_id, owner=B)
        assert probe_b.positive_ids == b_ids[:2]
        assert [p.positive_ids for p in list_probes(db, owner=A)] == [a_ids[:2]]  # alice's probe untouched
        assert sorted(db.execute("SELECT owner FROM probes").fetchall()) == [(A,), (B,)]


def test_index_shared_and_reindex_shares(tmp_path):
    model, lib = FakeModel(), tmp_path / "lib.db"
    report = index_paths(make_pngs(tmp_path / "t", 2), lib, model)  # the CLI's default: local, private
    with connect(lib) as db:
        assert all(get_scan(db, sid, owner=A) is None for sid in report.scan_ids)
        assert db.execute("SELECT DISTINCT owner FROM scans").fetchall() == [("local",)]
    again = index_paths([tmp_path / "t"], lib, model, shared=True)
    assert again.present == 2
    with connect(lib) as db:
        assert all(get_scan(db, sid, owner=A)["shared"] for sid in report.scan_ids)


def _v1_library(path: Path) -> None:
    """A library as MedLens wrote it before owners existed (schema 1), with a scan, embedding, note and tag."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    db = sqlite_utils.Database(conn)
    with dbm.write(db):
        db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)")
        dbm._m001_initial(db)
        db.execute("INSERT INTO schema_migrations VALUES (1, '_m001_initial', 'then')")
        db.execute("PRAGMA user_version = 1")
        vec = store.to_blob(store.normalise(np.ones(16)))
        db.execute(
            "INSERT INTO scans (id, content_hash, modality, shape, spacing, summary, added_at) VALUES (7, 'ab12', 'CT', '[1]', '[1]', '{}', 't')"
        )
        db.execute("INSERT INTO embeddings (scan_id, model_id, dim, kind, vector) VALUES (7, 'fake@1', 16, 'image', ?)", [vec])
        db.execute("INSERT INTO notes (scan_id, text, added_at) VALUES (7, 'old note', 't')")
        db.execute("INSERT INTO labels VALUES (7, 'nodule', 1, 't')")
        db.execute(
            "INSERT INTO probes (label, model_id, dim, coef, intercept, n_pos, n_neg, positive_ids, negative_ids, metrics, created_at) "
            "VALUES ('nodule', 'fake@1', 16, ?, 0, 2, 2, '[]', '[]', '{}', 't')",
            [vec],
        )
    conn.close()


def test_an_old_library_migrates_keeping_everything_as_local(tmp_path):
    path = tmp_path / "old.db"
    _v1_library(path)
    with connect(path) as db:
        assert db.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] == dbm.SCHEMA_VERSION == 2
        assert db.execute("SELECT id, owner, shared FROM scans").fetchall() == [(7, "local", 0)]
        assert db.execute("SELECT count(*) FROM embeddings").fetchone()[0] == 1  # not cascaded away by the rebuild
        assert keyword_search(db, "old note") == [(7, pytest.approx(keyword_search(db, "old note")[0][1]))]
        assert tags(db, "nodule") == ([7], []) and [p.label for p in list_probes(db)] == ["nodule"]
        assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1 and db.execute("PRAGMA foreign_key_check").fetchall() == []
        assert get_scan(db, 7)["mine"] and get_scan(db, 7, owner=A) is None
        # the cascade still works on the rebuilt tables
        db.execute("DELETE FROM scans WHERE id = 7")
        assert counts(db) == {"scans": 0, "notes": 0, "embeddings": {}} and tags(db, "nodule") == ([], [])
