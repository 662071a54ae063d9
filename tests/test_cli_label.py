"""`medlens label` and `medlens models`: one model load, JSON Lines per PATH, clean failures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import pydicom
import pytest


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import run_cli  # noqa: E402
from _models import tiny_clip_folder  # noqa: E402

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
CT_SMALL = str(PYDICOM_FILES / "CT_small.dcm")
NIFTI = str(NIBABEL_DATA / "example4d.nii.gz")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    folder = tiny_clip_folder(tmp_path_factory.mktemp("tiny_clip") / "model")
    return f"local-dir:{folder}"


@pytest.fixture(autouse=True)
def _no_env_model(monkeypatch):
    monkeypatch.delenv("MEDLENS_MODEL", raising=False)


def test_label_json_lines_one_per_path_and_bad_paths_go_on(capsys, tiny, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a scan\n")
    code, out, err = run_cli(capsys, "label", CT_SMALL, bad, NIFTI, "--labels", "liver", "lung", "brain tissue", "--model", tiny, "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in rows] == [CT_SMALL, str(bad), NIFTI]  # input order kept
    good = [r for r in rows if "labels" in r]
    errors = [r for r in rows if "error" in r]
    assert len(good) == 2 and len(errors) == 1
    assert set(errors[0]) == {"path", "error"} and "notes.txt" in errors[0]["error"]
    for row in good:
        labels = row["labels"]
        assert [x["label"] for x in labels] and sorted(x["label"] for x in labels) == ["brain tissue", "liver", "lung"]
        assert {"label", "probability", "score"} <= set(labels[0])
        assert sum(x["probability"] for x in labels) == pytest.approx(1.0, abs=1e-5)
        shown = [x["reported_probability"] for x in labels]  # ranked by what is reported (engine.zeroshot.trusted)
        assert shown == sorted(shown, reverse=True)
    assert good[0]["aggregation"] is None and good[1]["aggregation"] == "mean"  # 2D image vs volume
    assert "Traceback" not in err


def test_label_is_deterministic_and_text_output_is_readable(capsys, tiny):
    argv = ("label", CT_SMALL, "--labels", "liver", "lung", "--model", tiny, "--json")
    first = run_cli(capsys, *argv)[1]
    assert first == run_cli(capsys, *argv)[1]
    code, out, err = run_cli(capsys, "label", NIFTI, "--labels", "liver", "lung", "--model", tiny, "--aggregate", "max", "--slices", "3")
    assert code == 0, err
    assert "max over slices" in out and "%" in out and "cosine" in out


def test_label_per_slice_and_present_absent(capsys, tiny):
    code, out, err = run_cli(
        capsys, "label", NIFTI, "--labels", "edema", "--mode", "present-absent", "--model", tiny, "--json", "--per-slice", "--slices", "4"
    )
    assert code == 0, err
    row = json.loads(out)
    assert row["mode"] == "present-absent" and len(row["per_slice"]) == 4
    assert {"plane", "index", "probabilities", "scores"} <= set(row["per_slice"][0])


def test_all_bad_paths_exit_2(capsys, tiny):
    code, out, err = run_cli(capsys, "label", "/no/such/a.dcm", "/no/such/b.nii", "--labels", "a", "b", "--model", tiny, "--json")
    assert code == 2
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2 and all(set(r) == {"path", "error"} for r in rows)
    assert len(err.strip().splitlines()) == 1 and "no PATH could be labelled" in err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--labels", "a", "b", "--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--labels", "a", "b", "--model", "local-dir:/no/such/folder"], "does not exist"),
        (["--labels", "", " ", "--model", "no-such-model"], "no labels given"),
        (["--labels", "only-one", "--model", "no-such-model"], "at least two labels"),
        (["--labels", "a", "b", "--model", "no-such-model", "--modality", "nonsense"], "unknown modality"),
        (["--labels"], "expected at least one argument"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, needle):
    code, out, err = run_cli(capsys, "label", CT_SMALL, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err


def test_without_model_and_no_default_installed(capsys, installed_models):
    installed_models({})
    code, out, err = run_cli(capsys, "label", CT_SMALL, "--labels", "a", "b")
    assert code == 2
    assert "no default model installed" in err and "--model" in err


def test_models_lists_entries(capsys):
    code, out, err = run_cli(capsys, "models")
    assert code == 0
    assert "biomedclip" in out and "unimed-clip-b16" in out and "local-dir:" in out
    code, out, _ = run_cli(capsys, "models", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert {"biomedclip", "unimed-clip-b16"} <= {r["name"] for r in rows}
    assert all({"name", "source", "where", "available_offline", "default"} <= set(r) for r in rows)


def test_models_lists_a_shipped_checkpoint(capsys, installed_models, tmp_path):
    folder = tmp_path / "medlens-clip"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"format": "medlens-clip/1", "licence": "Apache-2.0", "note": "test"}))
    installed_models({"medlens-clip": folder})
    code, out, _ = run_cli(capsys, "models", "--json")
    rows = {r["name"]: r for r in map(json.loads, out.splitlines())}
    assert rows["medlens-clip"]["default"] is True and rows["medlens-clip"]["available_offline"] is True


# --------------------------------------------------------------------------- real data
def test_label_real_files(capsys, tiny, shared_data):
    xray = sorted((shared_data / "xray" / "nih_cxr14_1000" / "images").glob("*.png"))[0]
    series = shared_data / "volumes" / "totalsegmentator" / "ct_dicom_series"
    code, out, err = run_cli(
        capsys, "label", xray, "--labels", "normal", "pneumonia", "cardiomegaly", "--modality", "xray", "--model", tiny, "--json"
    )
    assert code == 0, err
    row = json.loads(out)
    assert row["prompt_set"] == "xray" and row["aggregation"] is None
    assert sum(x["probability"] for x in row["labels"]) == pytest.approx(1.0, abs=1e-5)
    code, out, err = run_cli(capsys, "label", series, "--model", tiny, "--json", "--per-slice")
    assert code == 0, err
    row = json.loads(out)
    assert row["modality"] == "CT" and row["prompt_set"] == "ct" and row["aggregation"] == "mean"
    assert 1 < len(row["per_slice"]) <= 12 and all(s["plane"] == "axial" for s in row["per_slice"])
    assert sum(x["probability"] for x in row["labels"]) == pytest.approx(1.0, abs=1e-5)
