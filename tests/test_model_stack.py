"""The one model stack: sharded, atomic, strict weights (engine.models.weights) and the format-keyed loader (catalog)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch

from engine.errors import ModelError
from engine.models import catalog, weights

ROOT = Path(__file__).resolve().parents[1]


def _state(n: int = 5, numel: int = 1000) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(numel, generator=g) for i in range(n)}


def _save(folder: Path, state, max_bytes: int, fmt: str = "medlens-clip/1") -> Path:
    return weights.save_checkpoint_folder(folder, {"format": fmt}, state, "# card", max_bytes=max_bytes)


def test_small_checkpoint_is_one_file_and_its_revision_is_the_file_hash(tmp_path):
    folder = _save(tmp_path / "m", _state(), max_bytes=1 << 20)
    assert sorted(p.name for p in folder.iterdir()) == ["MODEL_CARD.md", "config.json", "model.safetensors"]
    expected = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()[:12]
    assert weights.revision(folder) == expected  # what stored library embeddings are keyed by


def test_large_checkpoint_is_sharded_in_the_hugging_face_layout_and_reads_back_exactly(tmp_path):
    state = _state()
    folder = _save(tmp_path / "m", state, max_bytes=8000)  # 4000 bytes per tensor: two per shard
    index = json.loads((folder / weights.INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    assert index["metadata"]["total_size"] == 5 * 4000
    assert not (folder / weights.SINGLE).exists()
    back = weights.read_weights(folder)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_revision_follows_the_content(tmp_path):
    a = _save(tmp_path / "a", _state(), max_bytes=8000)
    b = _save(tmp_path / "b", _state(), max_bytes=8000)
    changed = _state()
    changed["layer3.weight"][0] += 1
    c = _save(tmp_path / "c", changed, max_bytes=8000)
    assert weights.revision(a) == weights.revision(b) != weights.revision(c)


@pytest.mark.parametrize("damage", ["missing shard", "stray shard", "index lies", "size lies"])
def test_damaged_shards_are_refused(tmp_path, damage):
    folder = _save(tmp_path / "m", _state(), max_bytes=8000)
    index_path = folder / weights.INDEX
    index = json.loads(index_path.read_text())
    if damage == "missing shard":
        (folder / "model-00002-of-00003.safetensors").unlink()
    elif damage == "stray shard":
        (folder / "model-00004-of-00004.safetensors").write_bytes(b"")
    elif damage == "index lies":
        index["weight_map"]["layer0.weight"] = "model-00003-of-00003.safetensors"
        index_path.write_text(json.dumps(index))
    else:
        index["metadata"]["total_size"] += 4
        index_path.write_text(json.dumps(index))
    with pytest.raises(ModelError):
        weights.read_weights(folder)


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    folder = _save(tmp_path / "m", _state(), max_bytes=1 << 20)
    before = weights.revision(folder)

    def crash(staging: Path) -> None:
        (staging / "half-written").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        weights.save_checkpoint_folder(folder, {"format": "medlens-clip/1"}, _state(2), extra=crash)
    assert weights.revision(folder) == before and not (folder / "half-written").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no staging folder left behind


def test_every_shipped_checkpoint_is_in_the_format_table_and_listed_by_task():
    listing = catalog.shipped()
    assert {"medlens-clip", "medlens-qformer"} <= set(listing)
    assert set(catalog.shipped(catalog.CLIP)) == {n for n, m in listing.items() if m.format.task == catalog.CLIP}
    assert "medlens-qformer" in catalog.shipped(catalog.ASK) and "medlens-qformer" not in catalog.shipped(catalog.CLIP)


def test_a_newer_format_is_refused_with_a_clear_message(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format": "medlens-clip/9"}))
    with pytest.raises(ModelError, match="cannot read.*update MedLens"):
        catalog.folder_format(tmp_path)


def test_a_model_of_the_other_task_is_refused(tmp_path):
    folder = _save(tmp_path / "q", _state(1), max_bytes=1 << 20, fmt="medlens-qformer/1")
    with pytest.raises(ModelError, match="question-answering model.*not a zero-shot"):
        catalog.load(f"local-dir:{folder}", catalog.CLIP)


def test_one_cached_model_per_task(monkeypatch):
    loads = []
    monkeypatch.setattr(catalog, "_load_uncached", lambda source, task: loads.append((str(source), task)) or object())
    catalog.clear_cache()
    try:
        a = catalog.load("m1", catalog.ASK)
        assert catalog.load("m1", catalog.ASK) is a  # cached
        catalog.load("m2", catalog.CLIP, fast=False)
        assert catalog.load("m1", catalog.ASK) is a  # a CLIP load does not evict the Q-Former
        catalog.load("m3", catalog.ASK)
        assert loads == [("m1", "ask"), ("m2", "clip"), ("m3", "ask")]
    finally:
        catalog.clear_cache()


def test_every_tracked_file_is_under_10_mb():
    """A Hugging Face Space rejects files over 10 MB outside Git LFS, and this repository has no LFS storage."""
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    big = [f.decode() for f in files if f and (ROOT / f.decode()).is_file() and (ROOT / f.decode()).stat().st_size > 10 * 1000 * 1000]
    assert not big, f"files over 10 MB: {big}"
