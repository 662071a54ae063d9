"""`medlens index / search / teach` with the tiny real model: exit codes, JSON Lines, one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import run_cli  # noqa: E402
from _models import tiny_clip_folder  # noqa: E402

CT_SMALL = pydicom.data.get_testdata_file("CT_small.dcm")
MR_SMALL = pydicom.data.get_testdata_file("MR_small.dcm")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    from engine.models import load_model

    folder = tiny_clip_folder(tmp_path_factory.mktemp("tiny_clip") / "model")
    source = f"local-dir:{folder}"
    load_model(source, fast=False)  # warm the one-model cache: no fast-path measuring in tests
    return source


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDLENS_MODEL", raising=False)
    monkeypatch.delenv("MEDLENS_LIBRARY", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))  # a forgotten --library never reaches $HOME


@pytest.fixture()
def pngs(tmp_path) -> Path:
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(4):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    (folder / "readme.txt").write_text("not a scan\n")
    return folder


def run(capsys, *argv):
    code, out, err = run_cli(capsys, *argv)
    assert "Traceback" not in err
    return code, out, err


def test_index_summary_bad_files_and_rerun(capsys, tiny, tmp_path, pngs):
    lib = tmp_path / "lib.db"
    code, out, err = run(capsys, "index", pngs, CT_SMALL, MR_SMALL, "--library", lib, "--model", tiny)
    assert code == 0, err
    assert out.startswith("6 added, 0 already present, 1 failed") and str(lib) in out and out.count("\n") == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medlens: skipped ") and "readme.txt" in lines[0]
    code, out, err = run(capsys, "index", pngs, CT_SMALL, MR_SMALL, "--library", lib, "--model", tiny, "--json")
    assert code == 0
    summary = json.loads(out)
    assert (summary["added"], summary["present"], summary["failed"]) == (0, 6, 1)
    # nothing loadable: exit 2, one line per problem, no traceback
    code, out, err = run(capsys, "index", pngs / "readme.txt", tmp_path / "missing.dcm", "--library", lib, "--model", tiny)
    assert code == 2 and out.startswith("0 added")
    assert [line.split(":")[0] for line in err.strip().splitlines()] == ["medlens"] * 3


def test_index_uses_medlens_library_env(capsys, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLENS_LIBRARY", str(tmp_path / "env.db"))
    code, out, err = run(capsys, "index", CT_SMALL, "--model", tiny)
    assert code == 0 and (tmp_path / "env.db").exists() and str(tmp_path / "env.db") in out


def test_search_json_lines_filters_and_like(capsys, tiny, tmp_path, pngs):
    lib = tmp_path / "lib.db"
    assert run(capsys, "index", pngs, CT_SMALL, MR_SMALL, "--library", lib, "--model", tiny)[0] == 0
    code, out, err = run(capsys, "search", "a chest CT", "--library", lib, "--model", tiny, "--json", "--k", "3")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    ood = {"out_of_distribution", "ood_score", "ood_threshold", "ood_reasons"}  # the hit's trust flag (issue 14)
    assert len(rows) == 3 and all(set(r) == {"scan_id", "score", "modality", "source"} | ood for r in rows)
    assert all(r["out_of_distribution"] is None for r in rows)  # PNGs (no header) and a model without a reference set: not assessed
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    code, out, _ = run(capsys, "search", "anything", "--modality", "ct", "--library", lib, "--model", tiny, "--json")
    assert code == 0 and [json.loads(line)["source"] for line in out.splitlines()] == [CT_SMALL]
    code, out, _ = run(capsys, "search", "--like", CT_SMALL, "--library", lib, "--model", tiny, "--json", "--k", "2")
    top = json.loads(out.splitlines()[0])
    assert code == 0 and top["source"] == CT_SMALL and top["score"] == pytest.approx(1.0, abs=1e-4)
    code, out, _ = run(capsys, "search", "anything", "--library", lib, "--model", tiny)
    assert code == 0 and "hit(s); score: cosine similarity" in out.splitlines()[-1]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["search", "x"], "no library"),  # a missing library is not created by a search
        (["search", "--k", "3"], "give a text QUERY"),
        (["search", "x", "--k", "0"], "--k must be at least 1"),
        (["search", "x", "--modality", "banana"], "unknown modality"),
        (["teach", "x", "--positive", "1"], "required"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, tiny, tmp_path, argv, needle):
    lib = tmp_path / "lib.db"
    if argv[0] == "search" and needle != "no library":
        assert run(capsys, "index", CT_SMALL, "--library", lib, "--model", tiny)[0] == 0
    code, out, err = run(capsys, *argv, "--library", lib, "--model", tiny)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    if needle == "no library":
        assert not lib.exists()


def test_teach_by_path_and_id_then_filter(capsys, tiny, tmp_path, pngs):
    lib = tmp_path / "lib.db"
    assert run(capsys, "index", pngs, "--library", lib, "--model", tiny)[0] == 0
    p = sorted(pngs.glob("*.png"))
    # too few examples: exit 2, one line, the tags are kept
    code, out, err = run(capsys, "teach", "Colour noise", "--positive", p[0], "--negative", p[1], "--library", lib, "--model", tiny)
    assert code == 2 and "at least 2 positive and 2 negative" in err and len(err.strip().splitlines()) == 1
    # paths already indexed (p0..p3 are scans 1..4) are found by source; CT_SMALL is new: indexed on the way (#5)
    code, out, err = run(
        capsys,
        "teach",
        "colour noise",
        "--positive",
        p[0],
        p[2],
        "--negative",
        p[1],
        CT_SMALL,
        "--library",
        lib,
        "--model",
        tiny,
        "--json",
    )
    assert code == 0, err
    probe = json.loads(out)
    assert probe["label"] == "colour noise" and (probe["n_pos"], probe["n_neg"]) == (2, 2)
    assert {"train_accuracy", "cv_balanced_accuracy"} <= set(probe["metrics"])
    # library scan ids; tags accumulate: positives {1, 3, 4}, negatives {2, 5}
    code, out, err = run(capsys, "teach", "colour noise", "--positive", "4", "--negative", "#2", "--library", lib, "--model", tiny)
    assert code == 0 and out.startswith("probe 'colour noise'") and "3 positive, 2 negative" in out
    code, out, err = run(capsys, "search", "noise", "--label", "colour noise", "--library", lib, "--model", tiny, "--json")
    assert code == 0, err
    found = {json.loads(line)["scan_id"] for line in out.splitlines()}
    assert {1, 3, 4} <= found and not found & {2, 5}  # a person's tags override the probe
    code, out, err = run(capsys, "teach", "x", "--positive", "999", "--negative", "1", "--library", lib, "--model", tiny)
    assert code == 2 and "no scan #999" in err
