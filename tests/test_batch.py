"""`medlens batch` on the local engine: units by series, rows and errors, exactly-once resume (SIGKILL included), index, limits."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.batch import all_rows, plan_units
from engine.batch.worker import failure_reason

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _batch import assert_each_unit_once, canonical, png_tree, real_tree  # noqa: E402
from _cli import run_cli  # noqa: E402
from _models import tiny_clip_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    from engine.models import load_model

    folder = tiny_clip_folder(tmp_path_factory.mktemp("tiny_clip") / "model")
    source = f"local-dir:{folder}"
    # warm the one-model cache as workers load it (fast=True: a tiny tower skips the probe, text padding is cut),
    # so rows made in this process equal rows made by worker processes
    load_model(source)
    return source


@pytest.fixture(scope="module")
def tree(tmp_path_factory, request) -> Path:
    shared = None
    from conftest import SHARED_DATA

    if SHARED_DATA.is_dir():
        shared = SHARED_DATA
    return real_tree(tmp_path_factory.mktemp("archive") / "tree", shared)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDLENS_MODEL", raising=False)
    monkeypatch.delenv("MEDLENS_LIBRARY", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))


def run(capsys, *argv):
    code, out, err = run_cli(capsys, "batch", *argv)
    assert "Traceback" not in err
    return code, out, err


def planned(*sources) -> set[str]:
    return {u.fingerprint for u in plan_units([str(s) for s in sources])}


def test_units_are_series_found_from_headers(tree):
    units = {u.source: u for u in plan_units([str(tree)])}
    split = [u for u in units.values() if "series across 2 folders" in u.source]
    assert len(split) == 1 and len(split[0].members) == 5 and split[0].kind == "dicom-series"
    zipped = units[f"{tree}/archive.zip/series"]
    assert len(zipped.members) == 3 and {m.scheme for m in zipped.members} == {"zip"}
    escape = [u for u in units.values() if u.source.endswith("escape.dcm")]
    assert len(escape) == 1 and "unsafe path" in escape[0].problem
    assert not any(".hidden" in s for s in units)
    assert units[f"{tree}/dicom/CT_small.dcm"].kind == "file"  # a series of one file is a file unit
    assert len({u.fingerprint for u in units.values()}) == len(units)


def test_label_rows_bad_files_summary_and_resume(capsys, tiny, tree, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "label", tree, "--out", out, "--model", tiny, "--quiet")
    assert code == 0, err
    rows = all_rows(out)
    assert_each_unit_once(rows, planned(tree))
    by_source = {r["source"]: r for r in rows}
    bad = {name: by_source[str(tree / "bad" / name)] for name in ("readme.txt", "zeros.dcm", "empty.png", "truncated.dcm")}
    assert all(r["status"] == "error" and r["result"] is None for r in bad.values())
    assert bad["readme.txt"]["error"]["reason"] == "not a DICOM, NIfTI or image file"
    assert bad["empty.png"]["error"]["reason"] == "empty file"
    assert by_source[str(tree / "dicom" / "reportsi.dcm")]["error"]["reason"].startswith("DICOM file holds no image")
    series = by_source[f"{tree}/archive.zip/series"]
    assert series["status"] == "ok" and series["result"]["scans"][0]["shape"][0] == 3
    assert series["result"]["scans"][0]["labels"][0]["probability"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["totals"]["missing"] == 0
    assert summary["totals"]["errors"] == sum(r["status"] == "error" for r in rows) >= 7
    assert sum(summary["totals"]["failures_by_reason"].values()) == summary["totals"]["errors"]
    assert set(summary["run"]["ms_per_unit"]) == {"read", "preprocess", "model", "write"}
    assert "ok" in stdout and "error" in stdout
    # a rerun reads nothing again and writes no row
    code, stdout, err = run(capsys, "label", tree, "--out", out, "--model", tiny, "--quiet", "--json")
    again = json.loads(stdout)
    assert code == 0 and again["run"]["rows"] == 0 and again["plan"]["done_before"] == len(rows)
    assert canonical(all_rows(out)) == canonical(rows)


def test_batch_label_equals_medlens_label(capsys, tiny, tree, tmp_path):
    from engine.io import load_one
    from engine.zeroshot import label_scan

    out = tmp_path / "out"
    ct = tree / "dicom" / "CT_small.dcm"
    assert run(capsys, "label", ct, tree / "nifti", "--out", out, "--model", tiny, "--labels", "chest", "head", "--quiet")[0] == 0
    rows = {r["source"]: r for r in all_rows(out)}
    for path in (ct, tree / "nifti" / "example4d.nii.gz"):
        scan, _ = load_one([path])
        expected = label_scan(scan, ["chest", "head"], tiny).to_dict(per_slice=False)
        got = rows[str(path)]["result"]["scans"][0]
        assert [x["label"] for x in got["labels"]] == [x["label"] for x in expected["labels"]]
        assert np.allclose([x["probability"] for x in got["labels"]], [x["probability"] for x in expected["labels"]], atol=2e-5)


def test_driver_sigkill_mid_run_then_rerun_every_unit_once(capsys, tiny, tmp_path, request):
    from conftest import SHARED_DATA

    images = png_tree(tmp_path / "images", 120, SHARED_DATA if SHARED_DATA.is_dir() else None)
    out = tmp_path / "out"
    argv = [
        sys.executable,
        "-m",
        "engine.cli",
        "batch",
        "label",
        str(images),
        "--out",
        str(out),
        "--model",
        tiny,
        "--batch-size",
        "1",
        "--shard-rows",
        "1",
        "--quiet",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not list((out / "shards").glob("part-*")):
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    before = all_rows(out)
    assert 0 < len(before) < 120, len(before)  # killed mid-run: some rows, not all
    code, stdout, err = run(capsys, "label", images, "--out", out, "--model", tiny, "--quiet", "--json")
    assert code == 0, err
    rows = all_rows(out)
    assert_each_unit_once(rows, planned(images))
    assert canonical(before) == canonical([r for r in rows if r["fingerprint"] in {b["fingerprint"] for b in before}])
    assert not list(out.rglob("*.tmp"))
    assert json.loads(stdout)["complete"]


def test_a_crash_before_a_shard_is_renamed_loses_nothing(capsys, tiny, tmp_path, monkeypatch):
    import engine.batch.output as output

    images = png_tree(tmp_path / "images", 6)
    out = tmp_path / "out"
    real_replace, calls = os.replace, []

    def crashing_replace(src, dst):
        calls.append(Path(dst).name)
        if sum(c.startswith("part-") for c in calls) >= 2:  # the first shard is written, then the disk fails
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(output.os, "replace", crashing_replace)
    code, _out, err = run(capsys, "label", images, "--out", out, "--model", tiny, "--batch-size", "2", "--shard-rows", "2", "--quiet")
    assert code != 0 and "No space left" in err
    monkeypatch.setattr(output.os, "replace", real_replace)
    assert len(all_rows(out)) == 2
    assert run(capsys, "label", images, "--out", out, "--model", tiny, "--quiet")[0] == 0
    assert_each_unit_once(all_rows(out), planned(images))
    assert not list(out.rglob("*.tmp"))


def test_duplicate_content_gets_one_result(capsys, tiny, tmp_path):
    images = png_tree(tmp_path / "images", 3)
    shutil.copy(images / "img0001.png", images / "copy.png")
    out = tmp_path / "out"
    assert run(capsys, "label", images, "--out", out, "--model", tiny, "--quiet")[0] == 0
    rows = {Path(r["source"]).name: r for r in all_rows(out)}
    assert {rows["copy.png"]["status"], rows["img0001.png"]["status"]} == {"ok", "duplicate"}
    assert rows["copy.png"]["unit"] == rows["img0001.png"]["unit"]
    # the archive moved: nothing is computed again, every unit gets a row
    moved = tmp_path / "moved"
    images.rename(moved)
    code, stdout, _err = run(capsys, "label", moved, "--out", out, "--model", tiny, "--quiet", "--json")
    summary = json.loads(stdout)
    assert code == 0 and summary["run"]["duplicates"] == 4 and summary["run"]["ok"] == 0
    assert_each_unit_once(all_rows(out), planned(moved) | {r["fingerprint"] for r in rows.values()})


def test_limit_dry_run_listing_and_a_missing_listed_path(capsys, tiny, tree, tmp_path):
    listing = tmp_path / "paths.txt"
    listing.write_text(f"# scans to label\n{tree / 'dicom'}\n\n{tree / 'nifti' / 'anatomical.nii'}\n{tmp_path / 'gone.dcm'}\n")
    out = tmp_path / "out"
    code, stdout, _err = run(capsys, "label", listing, "--out", out, "--model", tiny, "--dry-run", "--json")
    plan = json.loads(stdout)["plan"]
    assert code == 0 and plan["units"] == 7 and plan["to_do"] == 7 and plan["refused"] == 1
    assert not (out / "shards").exists()  # a dry run writes nothing
    assert run(capsys, "label", listing, "--out", out, "--model", tiny, "--limit", "2", "--quiet")[0] == 1  # units left to do
    assert len(all_rows(out)) == 2
    assert run(capsys, "label", f"list:{listing}", "--out", out, "--model", tiny, "--quiet")[0] == 0
    rows = {r["source"]: r for r in all_rows(out)}
    assert len(rows) == 7 and rows[str(tmp_path / "gone.dcm")]["error"]["reason"] == "no such file or folder"


def test_each_run_is_one_audit_line_without_paths(capsys, tiny, tree, tmp_path, monkeypatch):
    from engine import audit

    log = tmp_path / "audit.jsonl"
    monkeypatch.setenv("MEDLENS_AUDIT_LOG", str(log))
    patient_folder = tmp_path / "DOE_JANE_1961"  # folders are user text: a path must never reach the log
    shutil.copytree(tree / "dicom", patient_folder)
    out = tmp_path / "out_DOE_JANE"
    assert run(capsys, "label", patient_folder, "--out", out, "--model", tiny, "--dry-run", "--quiet")[0] == 0
    assert not log.exists()  # a dry run does nothing, so records nothing
    assert run(capsys, "label", patient_folder, "--out", out, "--model", tiny, "--quiet")[0] == 0
    records, bad = audit.read(log)
    summary = json.loads((out / "summary.json").read_text())
    assert bad == 0 and [r.action for r in records] == ["batch"]
    line = records[0]
    assert line.outcome == "ok" and line.user == "local" and line.model == summary["job"]["model_id"].split("@")[0]
    assert line.detail["job"] == summary["job"]["key"] and line.detail["task"] == "label"
    assert line.detail["units"] == summary["plan"]["units"] and line.detail["ok"] == summary["totals"]["ok"] > 0
    assert "DOE" not in log.read_text() and str(tmp_path) not in log.read_text()


def test_index_writes_the_library_once(capsys, tiny, tree, tmp_path):
    from engine.io import load_one
    from engine.library import connect, counts
    from engine.library.store import embed_scan, embeddings, scan_id_by_hash
    from engine.models import load_model

    lib = tmp_path / "lib.db"
    assert (
        run(capsys, "index", tree / "dicom", tree / "nifti", "--out", tmp_path / "a", "--library", lib, "--model", tiny, "--quiet")[0] == 0
    )
    rows = [r for r in all_rows(tmp_path / "a") if r["status"] == "ok"]
    assert {s["status"] for r in rows for s in r["result"]["scans"]} == {"added"}
    with connect(lib) as db:
        assert counts(db)["scans"] == sum(len(r["result"]["scans"]) for r in rows) == 5
        scan, _ = load_one([tree / "dicom" / "CT_small.dcm"])
        sid = scan_id_by_hash(db, scan.content_hash)
        ids, vectors = embeddings(db, load_model(tiny).model_id, [sid])
        expected, _kind = embed_scan(scan, load_model(tiny))  # what `medlens index` stores
        assert float(vectors[0] @ expected) > 0.99999
    # another job folder, the same library: nothing stored twice
    assert run(capsys, "index", tree / "dicom", "--out", tmp_path / "b", "--library", lib, "--model", tiny, "--quiet")[0] == 0
    assert {s["status"] for r in all_rows(tmp_path / "b") if r["status"] == "ok" for s in r["result"]["scans"]} == {"present"}
    with connect(lib) as db:
        assert counts(db)["scans"] == 5


def test_process_pool_gives_the_same_rows(capsys, tiny, tree, tmp_path):
    # the same batches (rows are identical for identical batches; the encoder's float sums depend on batch composition)
    assert (
        run(capsys, "label", tree / "dicom", tree / "nifti", "--out", tmp_path / "one", "--model", tiny, "--batch-size", "2", "--quiet")[0]
        == 0
    )
    code, _out, err = run(
        capsys,
        "label",
        tree / "dicom",
        tree / "nifti",
        "--out",
        tmp_path / "two",
        "--model",
        tiny,
        "--workers",
        "2",
        "--batch-size",
        "2",
        "--quiet",
    )
    assert code == 0, err
    assert canonical(all_rows(tmp_path / "one")) == canonical(all_rows(tmp_path / "two"))


def test_parquet_holds_the_same_rows(capsys, tiny, tree, tmp_path):
    pytest.importorskip("pyarrow")
    assert run(capsys, "label", tree / "dicom", "--out", tmp_path / "j", "--model", tiny, "--quiet")[0] == 0
    assert run(capsys, "label", tree / "dicom", "--out", tmp_path / "p", "--model", tiny, "--format", "parquet", "--quiet")[0] == 0
    assert list((tmp_path / "p" / "shards").glob("*.parquet"))
    assert canonical(all_rows(tmp_path / "j")) == canonical(all_rows(tmp_path / "p"))


def test_bad_arguments_are_one_line(capsys, tiny, tree, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run(capsys, "label", tree / "dicom", "--out", out, "--model", tiny, "--quiet", "--limit", "1")[0] in (0, 1)
    code, _out, err = run(capsys, "label", tree / "dicom", "--out", out, "--model", tiny, "--labels", "a", "b")
    assert code == 2 and "another job" in err and err.count("\n") == 1
    code, _out, err = run(capsys, "label", tmp_path / "nowhere", "--out", tmp_path / "o2", "--model", tiny)
    assert code == 2 and "no such file or folder" in err
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text('{"format": "medlens-clip/1"}')
    code, _out, err = run(capsys, "label", tree / "dicom", "--out", tmp_path / "o5", "--model", f"local-dir:{broken}")
    assert code == 2 and "cannot load model" in err and err.count("\n") == 1
    code, _out, err = run(capsys, "label", "pacs:query", "--out", tmp_path / "o3", "--model", tiny)
    assert code == 2 and "unknown kind of SOURCE" in err
    import engine.batch.ray_engine as ray_engine

    monkeypatch.setattr(ray_engine, "ray_available", lambda: False)
    code, _out, err = run(capsys, "label", tree / "dicom", "--out", tmp_path / "o4", "--model", tiny, "--engine", "ray")
    assert code == 2 and 'pip install -e ".[scale]"' in err


def test_failure_reasons_group_files_with_the_same_problem():
    assert (
        failure_reason("/a/b.dcm: named like DICOM but has no DICOM header (no 'DICM' marker)", "/a/b.dcm")
        == "named like DICOM but has no DICOM header"
    )
    assert (
        failure_reason("no scan could be loaded from 3 files: empty file (3 files)") == "no scan could be loaded from 3 files: empty file"
    )
    assert failure_reason("x/y/slice1.dcm: cannot read file (truncated)", "x/y") == "cannot read file"


class _FakeRay:
    """What RayEngine._size asks of Ray: the cluster's resources and its nodes."""

    def __init__(self, nodes: list[float], gpus: float = 0.0):
        self._nodes, self._gpus = nodes, gpus

    def cluster_resources(self) -> dict:
        return {"CPU": float(sum(self._nodes)), **({"GPU": self._gpus} if self._gpus else {})}

    def nodes(self) -> list[dict]:
        return [{"Alive": True, "Resources": {"CPU": c}} for c in self._nodes]


def test_ray_actors_leave_cpu_for_ray_data_fit_a_node_and_take_gpus():
    from engine.batch.ray_engine import RESERVED_CPUS, RayEngine

    two = RayEngine(workers=2)
    two._size(_FakeRay([2]))  # two actors of num_cpus=1 on 2 CPUs hung a job (the issue): never the whole node
    assert two.cpus_per_worker == 0.875 and two.threads == 1 and 2 * two.cpus_per_worker <= 2 - RESERVED_CPUS
    default = RayEngine()
    default._size(_FakeRay([2]))
    assert (default.workers, default.cpus_per_worker, default.threads) == (1, 1.75, 2)
    one = RayEngine(workers=1)
    one._size(_FakeRay([16, 16]))  # one actor asking for the cluster's 31.75 CPUs could be placed nowhere
    assert one.cpus_per_worker == 16 - RESERVED_CPUS
    gpu = RayEngine()
    gpu._size(_FakeRay([16] * 4, gpus=8))
    assert (gpu.workers, gpu.gpus) == (8, 1.0) and gpu.cpus_per_worker == round((64 - RESERVED_CPUS) / 8, 3)
    cpu_only = RayEngine(gpus_per_worker=0)
    cpu_only._size(_FakeRay([16] * 4, gpus=8))
    assert cpu_only.gpus == 0 and cpu_only.workers == 32


def test_a_model_moved_to_a_device_encodes_the_same(tiny):
    from engine.batch.tasks import _on_device
    from engine.models.checkpoint import load_folder

    model = load_folder(tiny.split(":", 1)[1])  # its own copy: the process's cached model stays as it is
    images = [np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(3)]
    before, text_before = model.encode_images(images), model.encode_texts(["chest", "head"])
    _on_device(model, "cpu")
    assert model.path.name == "cpu-fp32"
    assert np.allclose(model.encode_images(images), before, atol=1e-6)
    assert np.allclose(model.encode_texts(["chest", "head"]), text_before, atol=1e-6)


def test_ask_answers_every_question_about_every_scan(capsys, tree, tmp_path):
    from _ask import tiny_ask_folder

    model = f"local-dir:{tiny_ask_folder(tmp_path / 'qformer')}"
    out = tmp_path / "out"
    questions = ["Is the liver visible?", "What is the imaging modality?"]
    code, _out, err = run(
        capsys,
        "ask",
        tree / "nifti",
        tree / "dicom" / "CT_small.dcm",
        tree / "bad" / "zeros.dcm",
        "--out",
        out,
        "--model",
        model,
        "--question",
        questions[0],
        "--question",
        questions[1],
        "--quiet",
    )
    assert code == 0, err
    rows = {Path(r["source"]).name: r for r in all_rows(out)}
    assert rows["zeros.dcm"]["status"] == "error"
    for name in ("example4d.nii.gz", "anatomical.nii", "CT_small.dcm"):
        answers = rows[name]["result"]["scans"][0]["answers"]
        assert [a["question"] for a in answers] == questions and all(a["answer"] and 0 <= a["confidence"] <= 1 for a in answers)
    code, _out, err = run(capsys, "ask", tree / "nifti", "--out", tmp_path / "o2", "--model", model, "--question", " ")
    assert code == 2 and err.count("\n") == 1


def test_dicom_files_without_a_series_uid_are_one_series_per_folder(tmp_path):
    import pydicom

    from _series import synthetic_ct_series

    files = synthetic_ct_series(tmp_path / "blank", n_slices=4, marker=False)
    for file in files:  # de-identified exports often blank the UID; engine.io reads such a folder as one series
        ds = pydicom.dcmread(file)
        ds.SeriesInstanceUID = ""
        ds.save_as(file)
    (tmp_path / "other").mkdir()
    shutil.copy(files[0], tmp_path / "other" / "alone.dcm")
    units = {u.source: u for u in plan_units([str(tmp_path)])}
    assert units[str(tmp_path / "blank")].kind == "dicom-series" and len(units[str(tmp_path / "blank")].members) == 4
    assert units[str(tmp_path / "other" / "alone.dcm")].kind == "file"
