"""`medlens ask`: questions about scans with a tiny random Q-Former (no downloads), JSON Lines, clean failures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pydicom
import pytest


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import run_cli  # noqa: E402
from _ask import tiny_ask_folder  # noqa: E402
from _series import synthetic_ct_series, zip_files  # noqa: E402

CT_SMALL = str(Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm")  # a 2D CT image
CLOSED = "Is the liver visible?"
MODALITY = "What is the imaging modality?"


@pytest.fixture(scope="module")
def tiny(tiny_ask) -> str:
    """This file's model is the tiny Q-Former (conftest's tiny_ask)."""
    return tiny_ask


@pytest.fixture(scope="module")
def tiny_3d_only(tmp_path_factory) -> str:
    return f"local-dir:{tiny_ask_folder(tmp_path_factory.mktemp('tiny_ask_3d') / 'model', supports_2d=False)}"


@pytest.fixture(scope="module")
def ct_zip(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("ct")
    return str(zip_files(synthetic_ct_series(folder / "series", n_slices=6, marker=False), folder / "ct.zip"))


@pytest.fixture(autouse=True)
def _no_env_model(monkeypatch):
    monkeypatch.delenv("MEDLENS_ASK_MODEL", raising=False)


def rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_json_one_object_per_question_one_model_load_one_encoding(capsys, tiny, ct_zip, monkeypatch):
    import engine.ask.model as ask_model

    loads, encodings = [], []
    real_load, real_tokens = ask_model.load_ask_folder, ask_model.AskModel.encoder_tokens
    from engine.models import catalog

    catalog.clear_cache()  # a fresh process' cache
    monkeypatch.setattr(ask_model, "load_ask_folder", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    monkeypatch.setattr(ask_model.AskModel, "encoder_tokens", lambda self, scan: encodings.append(1) or real_tokens(self, scan))
    code, out, err = run_cli(
        capsys, "ask", ct_zip, CLOSED, "--question", MODALITY, "--question", "Which organs are in view?", "--model", tiny, "--json"
    )
    assert code == 0, err
    got = rows(out)
    assert [r["question"] for r in got] == [CLOSED, MODALITY, "Which organs are in view?"]
    for row in got:
        assert row["path"] == ct_zip and isinstance(row["answer"], str) and row["answer"]
        assert 0.0 <= row["confidence"] <= 1.0
    closed, modality, open_ = got
    trust = {"calibrated_confidence", "verdict", "uncertain", "trust", "out_of_distribution", "ood_score", "ood_threshold", "ood_reasons"}
    assert set(closed) == {"path", "question", "answer", "confidence", "candidates", "redaction"} | trust
    assert closed["calibrated_confidence"] is None and closed["trust"].startswith("not calibrated")  # no trust block
    assert closed["verdict"] in (closed["answer"], "uncertain") and isinstance(closed["uncertain"], bool)
    assert sorted(c["answer"] for c in closed["candidates"]) == ["no", "yes"]
    assert sum(c["probability"] for c in closed["candidates"]) == pytest.approx(1.0, abs=1e-3)
    assert closed["answer"] == closed["candidates"][0]["answer"] and closed["confidence"] == closed["candidates"][0]["probability"]
    assert "ct" in [c["answer"] for c in modality["candidates"]]
    assert set(open_) == {"path", "question", "answer", "confidence", "redaction"} | trust  # open question: no candidates
    assert open_["uncertain"] is None and "not a calibrated" in open_["trust"]  # a generated answer is never called calibrated
    assert len(loads) == 1 and len(encodings) == 1  # one model load, the scan encoded once for three questions
    assert "Traceback" not in err


def test_bad_path_and_good_paths_in_one_call(capsys, tiny, ct_zip, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a scan\n")
    code, out, err = run_cli(capsys, "ask", ct_zip, bad, "/no/such/scan.dcm", CT_SMALL, CLOSED, "--model", tiny, "--json")
    assert code == 2  # something failed
    got = rows(out)
    assert [r["path"] for r in got] == [ct_zip, str(bad), "/no/such/scan.dcm", CT_SMALL]  # input order kept
    assert set(got[1]) == {"path", "error"} and "notes.txt" in got[1]["error"]
    assert set(got[2]) == {"path", "error"} and "no such file" in got[2]["error"]
    assert got[0]["answer"] in ("yes", "no") and got[3]["answer"] in ("yes", "no")  # the 2D image too (supports_2d)
    assert "Traceback" not in err


def test_all_bad_paths_exit_2_with_one_stderr_line(capsys, tiny):
    code, out, err = run_cli(capsys, "ask", "/no/such/a.dcm", "/no/such/b.nii", CLOSED, "--model", tiny, "--json")
    assert code == 2
    assert all(set(r) == {"path", "error"} for r in rows(out)) and len(rows(out)) == 2
    assert len(err.strip().splitlines()) == 1 and "no question could be answered" in err


@pytest.mark.parametrize(
    "question, needle",
    [("", "the question is empty"), ("   \n\t ", "the question is empty"), ("x" * 10_000, "the limit is 500 characters")],
)
def test_empty_and_too_long_questions_are_one_line_errors_before_any_load(capsys, question, needle, ct_zip, monkeypatch):
    import engine.ask.api as api

    monkeypatch.setattr(api, "resolve_ask_model", lambda *a: pytest.fail("no model is loaded for a question that cannot be asked"))
    code, out, err = run_cli(capsys, "ask", ct_zip, question, "--json")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err
    assert len(err) < 400  # the 10,000 characters are not echoed back


def test_a_bad_question_among_good_ones(capsys, tiny, ct_zip):
    code, out, err = run_cli(capsys, "ask", ct_zip, CLOSED, "--question", "", "--question", "y" * 10_000, "--model", tiny, "--json")
    assert code == 2
    good, empty, long = rows(out)
    assert good["answer"] in ("yes", "no")
    assert set(empty) == {"path", "question", "error"} and "empty" in empty["error"]
    assert set(long) == {"path", "question", "error"} and "500 characters" in long["error"]


def test_non_english_questions_get_an_open_answer(capsys, tiny, ct_zip):
    questions = ["¿Se ve el hígado en esta imagen?", "这张图片里能看到肝脏吗？"]
    code, out, err = run_cli(capsys, "ask", ct_zip, questions[0], "--question", questions[1], "--model", tiny, "--json")
    assert code == 0, err
    got = rows(out)
    assert [r["question"] for r in got] == questions
    for row in got:
        assert isinstance(row["answer"], str) and row["answer"]
        assert 0.0 <= row["confidence"] <= 1.0 and "candidates" not in row  # no English family matched: an open answer
    assert all(q in out for q in questions)  # UTF-8 in the JSON, not \\u escapes


def test_2d_image_to_a_3d_only_model_is_a_path_error(capsys, tiny_3d_only, ct_zip):
    code, out, err = run_cli(capsys, "ask", CT_SMALL, ct_zip, CLOSED, "--question", MODALITY, "--model", tiny_3d_only, "--json")
    assert code == 2
    got = rows(out)
    assert got[0] == {"path": CT_SMALL, "error": got[0]["error"]} and "3D volumes only" in got[0]["error"]
    assert [r["question"] for r in got[1:]] == [CLOSED, MODALITY]  # the volume is still answered
    code, out, err = run_cli(capsys, "ask", CT_SMALL, CLOSED, "--model", tiny_3d_only)
    assert code == 2 and "3D volumes only" in err and "Traceback" not in err


def test_plain_output_is_readable(capsys, tiny, ct_zip):
    code, out, err = run_cli(capsys, "ask", ct_zip, CLOSED, "--question", "Which organs are in view?", "--model", tiny)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"{ct_zip}: CT volume 6x128x128") and "model local-dir:" in lines[0]
    assert f"Q: {CLOSED}" in out and "Q: Which organs are in view?" in out
    assert out.count("A: ") == 2 and "confidence" in out and "generated" in out
    candidates = [line.split() for line in lines if line.strip().endswith(("%  yes", "%  no"))]
    assert sorted(c[1] for c in candidates) == ["no", "yes"]  # the closed question's candidate probabilities
    assert sum(float(c[0].rstrip("%")) for c in candidates) == pytest.approx(100, abs=0.05)
    assert all(line == line.rstrip() for line in lines)


def test_folder_and_4d_nifti(capsys, tiny, tmp_path):
    import nibabel as nib

    folder = tmp_path / "series"
    synthetic_ct_series(folder, n_slices=4, marker=False)
    nifti = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    code, out, err = run_cli(capsys, "ask", folder, nifti, MODALITY, "--model", tiny, "--json")
    assert code == 0, err
    assert [r["path"] for r in rows(out)] == [str(folder), str(nifti)]
    code, out, err = run_cli(capsys, "ask", nifti, MODALITY, "--model", tiny)
    assert code == 0 and "series of 2 volumes (the first is asked about)" in out


@pytest.mark.parametrize(
    "model, needle",
    [
        (None, "the question-answering model 'medlens-qformer' is not installed"),
        ("medlens-qformer", "is not installed"),
        ("no-such-qformer", "unknown question-answering model 'no-such-qformer'"),
        ("local-dir:/no/such/folder", "is not a MedLens Q-Former checkpoint"),
    ],
)
def test_model_problems_are_one_line(capsys, installed_models, ct_zip, model, needle):
    installed_models({})
    code, out, err = run_cli(capsys, "ask", ct_zip, CLOSED, *(["--model", model] if model else []), "--json")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err
    if model is None:
        assert "--model local-dir:" in err


def test_env_model_is_the_default(capsys, monkeypatch, tiny, ct_zip):
    monkeypatch.setenv("MEDLENS_ASK_MODEL", tiny)
    code, out, err = run_cli(capsys, "ask", ct_zip, CLOSED, "--json")
    assert code == 0, err
    assert rows(out)[0]["answer"] in ("yes", "no")


def test_missing_question_is_a_usage_error(capsys, ct_zip):
    code, out, err = run_cli(capsys, "ask", ct_zip)
    assert code == 2 and "QUESTION" in err and len(err.strip().splitlines()) == 1


def test_models_lists_question_answering_models(capsys, installed_models, tiny):
    installed_models({})
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and "question answering" in out and "'medlens-qformer' is not installed" in out
    folder = Path(tiny.split(":", 1)[1])
    root = installed_models({"medlens-qformer": folder})
    folder = root / "models" / "medlens-qformer"
    code, out, _ = run_cli(capsys, "models")
    assert "medlens-qformer (default)" in out and str(folder) in out
    code, out, _ = run_cli(capsys, "models", "--json")
    by_name = {r["name"]: r for r in rows(out)}
    qformer = by_name["medlens-qformer"]
    assert qformer["task"] == "ask" and qformer["default"] is True and qformer["where"] == str(folder)
    assert qformer["available_offline"] is True and qformer["note"] == "tiny random test model"
    assert by_name["biomedclip"]["task"] == "label"
