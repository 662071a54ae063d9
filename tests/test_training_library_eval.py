"""training.library_eval: precision@k and the few-shot teach path give the numbers a hand-built case fixes,
and the run fails (or says so) when its inputs or the search are wrong.

`KeyModel` is a stand-in for a ClipModel whose embeddings are known: an X-ray frame whose top half is
brighter is "pneumonia" (+e0, tilted by e2), the other way round "normal" (-e0, tilted), a colour image
(the dermoscopy decoys) exactly +e0; a text with the word "normal" is -e0, with "pneumonia" +e0. So every
precision and AUC below follows by hand. The end-to-end CLI test runs the tiny random-weight CLIP model
of tests/_models.py on .npz frames, PNGs and CT slices; nothing needs ../shared/data or the network.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import library_eval as L
from training.manifest import Row, read_manifest, write_manifest

from _models import tiny_clip_folder
from _rows import manifest_row

E = np.eye(4, dtype=np.float32)
PNEUMONIA_VEC = (E[0] + 0.3 * E[2]) / np.linalg.norm(E[0] + 0.3 * E[2])
NORMAL_VEC = (-E[0] + 0.3 * E[2]) / np.linalg.norm(-E[0] + 0.3 * E[2])


class KeyModel:
    """Known embeddings (module docstring); what the library and zero-shot scoring ask of a model."""

    model_id = "key@1"
    logit_scale = 100.0
    embed_dim = 4

    def encode_images(self, images, batch_size: int = 16) -> np.ndarray:
        out = []
        for im in images:
            a = np.asarray(im, dtype=np.float32)
            if np.abs(a[..., 0] - a[..., 1]).mean() > 5:  # colour: a decoy closer to "pneumonia" than any X-ray
                out.append(E[0])
            else:
                half = a.shape[0] // 2
                out.append(PNEUMONIA_VEC if a[:half].mean() > a[half:].mean() else NORMAL_VEC)
        return np.stack(out).astype(np.float32)

    def encode_texts(self, texts, batch_size: int = 64) -> np.ndarray:
        def one(t: str) -> np.ndarray:
            if re.search(r"\bnormal\b", t.lower()):
                return -E[0]
            return E[0] if "pneumonia" in t.lower() else E[1]

        return np.stack([one(t) for t in texts]).astype(np.float32)


def _frame(pneumonia: bool, rng) -> np.ndarray:
    top, bottom = (200, 40) if pneumonia else (40, 200)
    f = np.concatenate([np.full((14, 28), top), np.full((14, 28), bottom)]).astype(float)
    return np.clip(f + rng.normal(0, 8, f.shape), 0, 255).astype(np.uint8)  # noise: every frame its own scan


def _colour_png(path: Path, rng) -> str:
    arr = np.zeros((24, 24, 3), np.uint8)
    arr[..., 0] = rng.integers(150, 250, (24, 24))
    arr[..., 2] = rng.integers(0, 60, (24, 24))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path.name


def _ct_volume(root: Path) -> str:
    import nibabel as nib

    ct = np.full((32, 24, 4), -1000.0, np.float32)
    ct[4:28, 4:20, :] = 40.0  # soft tissue on every slice
    for z in range(4):
        ct[6:14, 6:16, z] = 100.0 + 20 * z  # every slice different: identical slices would be one scan (content hash)
    (root / "vol").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(ct.astype(np.int16), np.diag([1.5, 2.0, 3.0, 1.0])), root / "vol" / "ct.nii.gz")
    return "vol/ct.nii.gz"


def make_data(root: Path, n_train: int = 25, n_test: int = 12, decoys: int = 5, ct: bool = False) -> Path:
    """PneumoniaMNIST-like .npz (train/test, one duplicated test frame), colour 'ham10000' decoys, optional CT slices."""
    rng = np.random.default_rng(0)
    rows: list[Row] = []
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        frames, labels = [], []
        for i in range(2 * n):
            labels.append(i % 2)
            frames.append(_frame(bool(i % 2), rng))
        if split == "test":  # the same pixels twice: one scan in the library, two rows
            frames.append(frames[1].copy())
            labels.append(1)
        arrays[f"{split}_images"] = np.stack(frames)
        for i, y in enumerate(labels):
            label, frame = "pneumonia" if y else "normal", {"key": f"{split}_images", "index": i}
            rows.append(manifest_row("pneumoniamnist", f"{split}/{i}", "xray", "pm.npz", [label], f"pm/{split}/{i}", split, array=frame))
    np.savez(root / "pm.npz", **arrays)
    for i in range(decoys):
        name = _colour_png(root / "ham" / f"d{i}.png", rng)
        rows.append(manifest_row("ham10000", str(i), "dermoscopy", f"ham/{name}", ["melanoma"], f"h{i}"))
    if ct:
        path = _ct_volume(root)
        for z in range(4):
            labels = ["liver"] + (["spleen"] if z in (1, 2) else [])
            rows.append(manifest_row("ct_organs", str(z), "ct", path, labels, "ct1", slice={"plane": "axial", "index": z}))
    manifest = root / "manifest.jsonl"
    write_manifest(rows, manifest)
    return manifest


QUERIES = (
    L.Query("pneumoniamnist", ("pneumonia",), "pneumonia", "label"),
    L.Query("pneumoniamnist", ("normal",), "normal", "label"),
    L.Query("pneumoniamnist", ("pneumonia",), "chest X-ray of a child with pneumonia", "sentence"),
)


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """evaluate_library on the hand-built case (KeyModel), 5/10/20 shots plus an unteachable 1-shot."""
    root = tmp_path_factory.mktemp("known")
    rows = read_manifest(make_data(root))
    res = L.evaluate_library(
        KeyModel(), rows, root, root / "out", queries=QUERIES, teach_tasks=("pneumonia",), shots=(1, 5, 10, 20), seeds=2, log=None
    )
    return root, rows, L.finish(res)


# --------------------------------------------------------------------------- pure pieces


def test_precision_at_k_by_hand():
    assert L.precision_at_k([3, 1, 2], {1, 2}, 2) == 0.5
    assert L.precision_at_k([1, 2, 3, 4, 5], {1, 2, 9}, 5) == 0.4
    assert L.precision_at_k([3], {3}, 5, gallery=1) == 1.0  # k capped at what there is to retrieve
    assert L.precision_at_k([4, 3], {3}, 5, gallery=2) == 0.5


@pytest.mark.parametrize(
    "ranked, k, gallery, needle",
    [
        ([1, 2], 5, None, "needs 5"),  # a search that returned too little is an error, not a low precision
        ([1, 2, 3], 5, 4, "needs 4"),
        ([1, 1, 2], 3, None, "repeats"),
        ([1], 0, None, "at least 1"),
        ([], 5, 0, "empty gallery"),
    ],
)
def test_precision_at_k_refuses(ranked, k, gallery, needle):
    with pytest.raises(ValueError, match=needle):
        L.precision_at_k(ranked, {1}, k, gallery)


def test_draws_match_training_probe():
    """The draw is the one training.probe.few_shot_curve makes: k per class, all of a smaller class."""
    y = np.array([0] * 30 + [1] * 7)
    idx = L.draw(y, 10, 3)
    assert (y[idx] == 0).sum() == 10 and (y[idx] == 1).sum() == 7 and len(set(idx.tolist())) == 17
    rng = np.random.default_rng(1000 * 10 + 3)
    assert idx.tolist() == np.concatenate([rng.permutation(np.flatnonzero(y == c))[:10] for c in (0, 1)]).tolist()


# --------------------------------------------------------------------------- the known case


def test_library_holds_each_row_once_and_no_notes(known):
    root, _rows, res = known
    lib = res["library"]
    assert lib["rows"] == 2 * 12 + 1 + 5 and lib["scans"] == 2 * 12 + 5
    assert lib["rows_sharing_a_scan"] == 1 and lib["rows_sharing_a_scan_with_other_labels"] == 0 and not lib["failed"]
    from engine.library import connect, counts

    with connect(root / "out" / L.TEST_DB, create=False) as db:
        assert counts(db)["notes"] == 0
        sources = {r[0] for r in db.execute("SELECT source FROM scans").fetchall()}
        assert "pneumoniamnist/test/0" in sources and "ham10000/4" in sources


def test_text_to_scan_known_precision(known):
    _root, _rows, res = known
    q = {(r["query"], r["style"]): r for r in res["text_to_scan"]["queries"]}
    pn = q[("pneumonia", "label")]
    # mixed library: the 5 colour decoys (cosine 1) outrank the 12 pneumonia X-rays (0.958): 5 of the top 10 are right
    assert pn["p_mixed"] == 0.5 and pn["brute_mixed"] == 0.5
    # the modality filter leaves only X-rays: all 10 are pneumonia
    assert pn["p_filtered"] == 1.0 and pn["p_filtered_ensemble"] == 1.0
    assert pn["n_relevant"] == 12 and pn["gallery_mixed"] == 29 and pn["gallery_filtered"] == 24
    assert q[("normal", "label")]["p_mixed"] == 1.0 and q[("normal", "label")]["p_filtered"] == 1.0
    assert q[("chest X-ray of a child with pneumonia", "sentence")]["p_mixed"] == 0.5
    d = res["text_to_scan"]["per_dataset"]["pneumoniamnist"]
    assert d["p_mixed"] == pytest.approx(2 / 3) and d["p_filtered"] == 1.0 and d["max_brute_diff"] == 0.0


def test_scan_to_scan_known_precision(known):
    _root, _rows, res = known
    ss = res["scan_to_scan"]["per_dataset"]
    pm = ss["pneumoniamnist"]
    assert pm["n_queries"] == 24 and pm["p_class_mixed"] == 1.0 and pm["p_class_filtered"] == 1.0 and pm["p_dataset_mixed"] == 1.0
    ham = ss["ham10000"]
    # 4 other decoys, then an X-ray: 4 of 5 mixed; filtered, the gallery is the 4 others: 4 of 4
    assert ham["n_queries"] == 5 and ham["p_class_mixed"] == pytest.approx(0.8) and ham["p_class_filtered"] == 1.0
    assert res["max_brute_diff"] == 0.0


def test_teach_curve_known_auc_and_unteachable_point(known):
    root, _rows, res = known
    t = res["teach"]["tasks"]["pneumonia"]
    assert t["n_test"] == 25 and t["n_test_positive"] == 13
    assert t["zero_shot"]["auc"] == 1.0
    for k in ("5", "10", "20"):
        s = t["shots"][k]
        assert s["teach_auc"]["values"] == [1.0, 1.0] and s["reference_probe_auc"]["mean"] == 1.0 and not s["errors"]
    # one example per class cannot be taught (the library needs 2 + 2): said per draw, nothing scored
    one = t["shots"]["1"]
    assert one["teach_auc"]["values"] == [] and set(one["errors"]) == {"0", "1"}
    assert "at least 2 positive" in one["errors"]["0"]
    assert res["teach"]["train_examples_equal_to_a_test_scan"] == 0
    from engine.library import connect, list_probes, tags

    with connect(root / "out" / L.TEACH_DB, create=False) as db:
        labels = {p.label for p in list_probes(db, "key@1")}
        assert {"pneumonia 5-shot seed 0", "pneumonia 20-shot seed 1"} <= labels
        pos, neg = tags(db, "pneumonia 10-shot seed 1")
        assert len(pos) == 10 and len(neg) == 10


def test_teach_rerun_replaces_tags(known):
    """A rerun re-fits each label from its own draw, not from the draw plus the earlier run's tags."""
    root, rows, _res = known
    res = L.evaluate_library(
        KeyModel(), rows, root, root / "out", queries=QUERIES, teach_tasks=("pneumonia",), shots=(5,), seeds=1, log=None
    )
    assert res["library"]["status"] == {"cached": 29, "present": 1}  # the duplicate row: found by hash, not embedded
    from engine.library import connect, tags

    with connect(root / "out" / L.TEACH_DB, create=False) as db:
        pos, neg = tags(db, "pneumonia 5-shot seed 0")
        assert len(pos) == 5 and len(neg) == 5


def test_a_search_that_ranks_wrongly_is_caught(known, monkeypatch, tmp_path):
    """A search returning its hits in the wrong order shows as a brute-force difference; one returning too few raises."""
    root, rows, _res = known
    import importlib

    S = importlib.import_module("engine.library.search")  # the module: engine.library's `search` attribute is the function

    real = S.search

    def reversed_hits(*a, **kw):
        return real(*a, **{**kw, "k": 29})[::-1][: kw["k"]]

    monkeypatch.setattr(S, "search", reversed_hits)
    res = L.finish(L.evaluate_library(KeyModel(), rows, root, root / "out", queries=QUERIES, teach_tasks=(), log=None))
    assert res["max_brute_diff"] > 0.5
    monkeypatch.setattr(S, "search", lambda *a, **kw: real(*a, **kw)[:-1])
    with pytest.raises(ValueError, match="needs"):
        L.evaluate_library(KeyModel(), rows, root, root / "out", queries=QUERIES, teach_tasks=(), log=None)


def test_a_library_with_foreign_scans_is_refused(known):
    root, rows, _res = known
    only_xray = [r for r in rows if r.dataset != "ham10000"]  # the decoys are in the library but not in this selection
    with pytest.raises(L.UsageError, match="does not name"):
        L.evaluate_library(KeyModel(), only_xray, root, root / "out", queries=QUERIES, teach_tasks=(), log=None)


# --------------------------------------------------------------------------- CLI, tiny random model


def test_cli_tiny_model_end_to_end(tmp_path, monkeypatch, capsys):
    from engine.models import load_model

    monkeypatch.setenv("MEDLENS_THREADS", "1")
    threads = torch.get_num_threads()
    folder = tiny_clip_folder(tmp_path / "model")
    load_model(f"local-dir:{folder}", fast=False)  # warm the one-model cache: no fast-path measuring in tests
    root = tmp_path / "data"
    root.mkdir()
    manifest = make_data(root, n_train=6, n_test=4, decoys=3, ct=True)
    argv = [
        "--data-root",
        str(root),
        "--out",
        str(tmp_path / "out"),
        "--model",
        f"local-dir:{folder}",
        "--manifest",
        str(manifest),
        "--seeds",
        "2",
        "--shots",
        "2",
        "3",
    ]
    try:
        assert L.main(argv) == 0
        md = capsys.readouterr().out
        first = json.loads((tmp_path / "out" / "results.json").read_text())
        assert L.main(argv) == 0  # rerun: every scan from the library, same numbers
        second = json.loads((tmp_path / "out" / "results.json").read_text())
        md2 = capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    assert "## Text -> scan, precision@10" in md and "## Teaching: few-shot AUC on the test split" in md
    assert first["library"]["scans"] == 8 + 3 + 4 and second["library"]["status"]["cached"] == 15
    assert second["text_to_scan"]["per_dataset"] == first["text_to_scan"]["per_dataset"]
    assert first["max_brute_diff"] == 0.0
    pc = first["library"]["pixel_check"]
    assert pc["ct_organs"] == {"n": 4, "identical": 4, "mean_abs_diff": 0.0}  # CT slices in HU: the pixels evaluation sees
    assert pc["pneumoniamnist"]["n"] == 9
    t = first["teach"]["tasks"]
    assert "no test rows" in t["busi_malignant"]["skipped"] and len(t["pneumonia"]["shots"]["3"]["teach_auc"]["values"]) == 2
    assert (tmp_path / "out" / "results.md").read_text() == md2.rstrip("\n") + "\n"  # what was printed is what was written


def test_cli_exit_2_without_test_rows(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    write_manifest([Row(id="a", dataset="busi", modality="us", path="x.png", split="train", subject="s")], manifest)
    assert L.main(["--manifest", str(manifest), "--out", str(tmp_path / "o"), "--model", "no-such-model-anywhere"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no test rows" in err[0]
