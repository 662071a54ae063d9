"""engine.audit: one JSON line per action, append-only, concurrency-safe, no PHI; `medlens audit` reads it;
the CLI's label / ask / index / search / teach and the app's events write it."""

from __future__ import annotations

import json
import multiprocessing
import re
import stat
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from engine import audit
from engine.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))

HASH = "ab" * 32
CT_SMALL = pydicom.data.get_testdata_file("CT_small.dcm")


@pytest.fixture
def log_file(monkeypatch, tmp_path) -> Path:
    path = tmp_path / "logs" / "audit.jsonl"
    monkeypatch.setenv("MEDLENS_AUDIT_LOG", str(path))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --------------------------------------------------------------------------- the record
def test_a_record_is_one_checked_json_line(log_file):
    class Model:
        name, revision = "medlens-clip", "3f2a"

    audit.record("label", user="alice", model=Model(), scans=[HASH], detail={"series": 2, "status": "added"})
    audit.record("search", user="hf:bob", model="shipped:medlens-clip@9c1", results=[HASH], outcome=audit.DENIED)
    first, second = lines(log_file)
    assert set(first) == {"time", "user", "action", "outcome", "model", "revision", "scans", "results", "detail"}
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", first["time"])
    assert (first["user"], first["action"], first["outcome"], first["model"], first["revision"]) == (
        "alice",
        "label",
        "ok",
        "medlens-clip",
        "3f2a",
    )
    assert first["scans"] == [HASH] and first["detail"] == {"series": 2, "status": "added"}
    assert (second["model"], second["revision"], second["outcome"]) == ("shipped:medlens-clip", "9c1", "denied")
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600 and stat.S_IMODE(log_file.parent.stat().st_mode) == 0o700


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(scans=["/home/doe/john.dcm"]),  # a path is not a content hash
        dict(scans=["DOE^JOHN"]),
        dict(results=["patient_DOE_JOHN_1970.png"]),
        dict(detail={"label": "John Doe nodule"}),  # user text never goes into detail
        dict(detail={"query": ["a", "list"]}),
    ],
)
def test_names_paths_and_free_text_are_refused(log_file, kwargs):
    with pytest.raises(ValueError):
        audit.record("label", user="alice", **kwargs)
    assert not log_file.exists()


def test_recorded_writes_the_error_class_never_its_message(log_file):
    from engine.scan import ScanError

    with pytest.raises(ScanError):
        with audit.recorded("load", user="local") as entry:
            entry.scan(HASH)
            raise ScanError("patient_DOE_JOHN_1970.dcm: not a DICOM file")
    (rec,) = lines(log_file)
    assert rec["outcome"] == "error:ScanError" and rec["scans"] == [HASH]
    assert "DOE" not in log_file.read_text()


def test_off_writes_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDLENS_AUDIT_LOG", "off")
    assert audit.log_path() is None
    assert audit.record("load", user="local").action == "load"
    assert list(tmp_path.rglob("*.jsonl")) == []


def test_a_log_that_cannot_be_written_does_not_stop_the_action(monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MEDLENS_AUDIT_LOG", str(blocker / "audit.jsonl"))  # a folder that is a file
    audit.record("load", user="local")
    assert "cannot append to the audit log" in caplog.text


def _append_many(path: str, tag: int, n: int) -> None:
    import os

    os.environ["MEDLENS_AUDIT_LOG"] = path
    from engine import audit as a

    for i in range(n):
        a.record("index", user=f"p{tag}", scans=[f"{i:064x}"], detail={"i": i, "padding": "x" * 60})


def test_concurrent_appends_from_threads_and_processes_never_interleave(log_file):
    per, threads, procs = 150, 6, 3
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_append_many, args=(str(log_file), 100 + p, per)) for p in range(procs)]
    for w in workers:
        w.start()
    pool = [threading.Thread(target=_append_many, args=(str(log_file), t, per)) for t in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    records = lines(log_file)  # every line parses: none was torn or interleaved
    assert len(records) == per * (threads + procs)
    for who in {r["user"] for r in records}:
        assert sorted(r["detail"]["i"] for r in records if r["user"] == who) == list(range(per))


# --------------------------------------------------------------------------- medlens audit
def test_medlens_audit_filters(capsys, log_file):
    audit.record("load", user="alice", scans=[HASH])
    audit.record("label", user="alice", scans=[HASH], model="m@1")
    audit.record("label", user="bob", scans=["cd" * 32])
    assert main(["audit", "--user", "alice", "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [json.loads(x)["action"] for x in out] == ["load", "label"]
    assert main(["audit", "--action", "label", "--scan", "cdcd"]) == 0
    out = capsys.readouterr().out
    assert "bob" in out and "alice" not in out and "1 record(s)" in out
    assert main(["audit", "--since", "2999-01-01", "--json"]) == 0 and capsys.readouterr().out == ""
    assert main(["audit", "--since", "2000-01-01T00:00Z", "--json"]) == 0 and len(capsys.readouterr().out.splitlines()) == 3
    assert main(["audit", "--since", "yesterday"]) == 2 and "--since" in capsys.readouterr().err
    log_file.write_text(log_file.read_text() + "{torn\n")
    assert main(["audit"]) == 0 and "1 unreadable line" in capsys.readouterr().err


def test_medlens_audit_without_a_log(capsys, log_file):
    assert main(["audit"]) == 2 and "no audit log" in capsys.readouterr().err


# --------------------------------------------------------------------------- the CLI writes it
def _pngs(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        path = folder / f"DOE_JOHN_{i}.png"  # a file name that must never reach the log
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        out.append(path)
    return out


def test_cli_commands_write_one_line_per_action(capsys, log_file, tmp_path, tiny):
    from engine.models import load_model

    load_model(tiny, fast=False)  # no fast-path measuring in tests
    pngs = _pngs(tmp_path / "cases", 4)
    lib = tmp_path / "lib.db"
    assert main(["index", str(tmp_path / "cases"), "--library", str(lib), "--model", tiny, "--quiet"]) == 0
    assert main(["search", "a chest radiograph", "--library", str(lib), "--model", tiny, "--json"]) == 0
    assert main(["teach", "nodule", "--positive", "1", "2", "--negative", "3", "4", "--library", str(lib), "--model", tiny]) == 0
    assert main(["label", str(pngs[0]), str(tmp_path / "missing.png"), "--labels", "a", "b", "--model", tiny]) == 0
    capsys.readouterr()
    records = lines(log_file)
    assert [(r["action"], r["outcome"]) for r in records] == [
        ("index", "ok"),
        ("search", "ok"),
        ("teach", "ok"),
        ("label", "ok"),
        ("label", "error:ScanError"),
    ]
    assert all(r["user"] == "local" for r in records)
    index, search, teach, label, failed = records
    assert len(index["scans"]) == 4 and index["detail"]["added"] == 4 and index["model"] and index["revision"]
    assert len(search["results"]) == 4 and search["scans"] == []
    assert teach["detail"] == {"positives": 2, "negatives": 2}
    assert label["scans"] == [index["scans"][0]] and failed["scans"] == []
    assert "DOE" not in log_file.read_text() and str(tmp_path) not in log_file.read_text()


# --------------------------------------------------------------------------- the app writes it, without PHI
def test_app_events_leave_no_phi_in_the_audit_log(server, tiny, log_file, tmp_path, monkeypatch):
    """Real deid-data DICOM with PHI through the app (load, label, add, tag, search), then the log's bytes are searched."""
    import test_deid as td
    from gradio_client import Client, handle_file

    if td.DEID_DIR is None:
        pytest.skip("deid-data is not installed")
    monkeypatch.setenv("MEDLENS_LIBRARY", str(tmp_path / "lib.db"))
    url, _cache, _demo = server
    client = Client(url, verbose=False, download_files=False)
    values: dict[str, str] = {}
    files = sorted(td.DEID_DIR.rglob("*.dcm"))[:8]
    loaded = 0
    for i, path in enumerate(files):
        datasets = td._datasets(path)
        values.update(td.identifying_values(datasets))
        name = str(getattr(datasets[0], "PatientName", "") or f"case{i}")
        upload = tmp_path / "up" / f"{i}" / (re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".dcm")  # the patient's name as file name
        upload.parent.mkdir(parents=True)
        upload.write_bytes(path.read_bytes())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                client.predict([handle_file(str(upload))], api_name="/load_files")
            except Exception:
                continue  # a file the viewer refuses is still one audit line (error class only)
        loaded += 1
        client.predict(0, 0, tiny, "auto", "finding\nnormal", "softmax", "mean", ["axial"], 2, api_name="/label_scan")
        client.predict(0, tiny, api_name="/library_add")
        client.predict(0, tiny, "Doe nodule", api_name="/library_tag_positive")
        client.predict("John Doe", True, 0, tiny, "any", "any", "any", 5, api_name="/library_search")
    assert loaded >= 3 and len(values) > 20
    records = lines(log_file)
    actions = {r["action"] for r in records}
    assert {"load", "label", "add", "tag", "search"} <= actions
    assert all(r["user"] == "local" for r in records)
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for r in records for h in r["scans"] + r["results"])
    assert sum(1 for r in records if r["action"] == "load" and r["outcome"] == "ok" and r["scans"]) == loaded
    text = log_file.read_bytes().decode("latin-1")
    problems = td.leaks(values, text)
    assert not problems, "; ".join(sorted(set(problems)))
    for word in ("Doe", "nodule", "John", ".dcm", str(tmp_path)):
        assert word.lower() not in text.lower()


def test_app_ask_lines_carry_the_signed_in_user_also_through_a_suggestion(log_file, tmp_path):
    """ask_suggested calls the ask handler inside its own event: the line must name the same user, once."""
    from types import SimpleNamespace

    from _ask import tiny_ask_folder

    from app.ask_panel import make_ask, make_ask_suggested
    from app.handlers import ScanSession
    from engine.io import load

    model = f"local-dir:{tiny_ask_folder(tmp_path / 'ask')}"
    path = _pngs(tmp_path / "in", 1)[0]
    session = ScanSession(scans=load([str(path)]).scans)
    carol = SimpleNamespace(username="carol")
    args = (session, 0, 0, model, "Is the liver visible?", 0, 40.0, 400.0, False, 20)
    make_ask({model})(*args, request=carol)
    make_ask_suggested({model})(*args, request=carol)
    records = lines(log_file)
    assert [(r["user"], r["action"], r["outcome"]) for r in records] == [("carol", "ask", "ok")] * 2
    assert all(r["scans"] == [session.scans[0].content_hash] and r["model"] for r in records)
    assert "liver" not in log_file.read_text()  # the question is free text: never recorded
