"""Checkpoint weights on disk: one atomic, sharded writer, one strict reader, one content-hash revision.

Design decisions
- Hugging Face's sharded safetensors layout, so any HF tool reads our
  folders: a checkpoint at most `MAX_SHARD_BYTES` is one `model.safetensors`;
  a larger one is `model-0000N-of-0000M.safetensors` plus
  `model.safetensors.index.json` ({"metadata": {"total_size": bytes},
  "weight_map": {tensor name: shard file}}). Shards stay under 10 MB because
  a Hugging Face Space rejects larger files outside Git LFS, and this
  repository has no LFS storage.
- Reading is strict: every shard the index names must exist, hold exactly
  the tensors the index assigns to it, and the total size must match; a
  stray or missing shard is a `ModelError`, never a silently partial model.
  (Whether the tensors fit the architecture is checked by the format's
  loader, as before.)
- A save is atomic: the whole folder is written into a sibling staging
  folder and swapped in with renames, so a killed trainer or a full disk
  leaves the previous checkpoint intact, never a folder with new weights and
  an old config.
- The revision is a content hash (SHA-256, 12 hex digits) of the weight
  bytes, shard after shard. For a single-file checkpoint it is the hash of
  that file, exactly what the CLIP loader always used, so embeddings already
  stored in a library under `name@revision` stay valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import torch

from engine.errors import ModelError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 8 * 1024 * 1024  # under the 10 MB a Space accepts outside Git LFS, with room for the header


def _shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_shards(state: dict[str, torch.Tensor], max_bytes: int = MAX_SHARD_BYTES) -> list[list[str]]:
    """Tensor names grouped into shards of at most `max_bytes` (a bigger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in state:
        n = _nbytes(state[name])
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_weights(folder: Path, state: dict[str, torch.Tensor], max_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write `state` into `folder` (single file or shards + index); the file names written."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    groups = plan_shards(state, max_bytes)
    if len(groups) == 1:
        save_file(state, str(folder / SINGLE))
        return [SINGLE]
    weight_map: dict[str, str] = {}
    names = []
    for i, group in enumerate(groups, 1):
        name = _shard_name(i, len(groups))
        save_file({k: state[k] for k in group}, str(folder / name))
        weight_map.update({k: name for k in group})
        names.append(name)
    index = {"metadata": {"total_size": sum(_nbytes(v) for v in state.values())}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2))
    return names + [INDEX]


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, in order (the index's shards, or the single file)."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        index = _read_index(folder)
        return [folder / name for name in sorted(set(index["weight_map"].values()))]
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    raise ModelError(f"{folder} has no {SINGLE} and no {INDEX}")


def has_weights(folder: Path) -> bool:
    return (Path(folder) / INDEX).is_file() or (Path(folder) / SINGLE).is_file()


def _read_index(folder: Path) -> dict:
    try:
        index = json.loads((folder / INDEX).read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError("empty weight_map")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{folder / INDEX} cannot be read ({exc}); the checkpoint is damaged") from None
    return index


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, from one file or from its shards (checked against the index)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / INDEX).is_file():
        if not (folder / SINGLE).is_file():
            raise ModelError(f"{folder} has config.json but no {SINGLE} (or sharded {INDEX})")
        return load_file(str(folder / SINGLE))
    index = _read_index(folder)
    expected: dict[str, set[str]] = {}
    for key, shard in index["weight_map"].items():
        expected.setdefault(shard, set()).add(key)
    strays = sorted(p.name for p in folder.glob("model-*-of-*.safetensors") if p.name not in expected)
    if strays:
        raise ModelError(f"{folder}: shard files not named by {INDEX}: {', '.join(strays[:3])}")
    state: dict[str, torch.Tensor] = {}
    for shard, keys in sorted(expected.items()):
        path = folder / shard
        if not path.is_file():
            raise ModelError(f"{folder}: shard {shard} named by {INDEX} is missing; copy the whole checkpoint folder")
        part = load_file(str(path))
        if set(part) != keys:
            extra, lost = sorted(set(part) - keys), sorted(keys - set(part))
            raise ModelError(
                f"{folder}: shard {shard} does not match {INDEX} ({len(lost)} tensors missing, e.g. {lost[:2]}; "
                f"{len(extra)} not in the index, e.g. {extra[:2]})"
            )
        state.update(part)
    total = index.get("metadata", {}).get("total_size")
    if total is not None and int(total) != sum(_nbytes(v) for v in state.values()):
        raise ModelError(f"{folder}: the shards hold {sum(_nbytes(v) for v in state.values())} bytes, {INDEX} says {total}")
    return state


def file_hash(paths: Iterable[Path]) -> str:
    """SHA-256 (12 hex digits) of the files' bytes, one after another."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


def revision(folder: Path) -> str:
    """Content hash of a checkpoint's weights (a single file hashes as it always did)."""
    return file_hash(weight_files(folder))


def write_atomically(folder: str | Path, fill: Callable[[Path], None]) -> Path:
    """Write a checkpoint folder all at once: `fill(staging)` writes every file, then the folder is swapped in."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        fill(staging)
        os.chmod(staging, 0o755)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.{os.getpid()}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(staging, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def save_checkpoint_folder(
    folder: str | Path,
    config: dict,
    state: dict[str, torch.Tensor],
    card: str = "",
    *,
    extra: Callable[[Path], None] | None = None,
    max_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """The one checkpoint writer: config.json (with its `format`), weights (sharded when large),
    MODEL_CARD.md and whatever `extra(staging)` adds, swapped in atomically."""
    if "format" not in config:
        raise ValueError("a checkpoint config names its format (engine.models.catalog.FORMATS)")

    def fill(staging: Path) -> None:
        if extra is not None:
            extra(staging)
        write_weights(staging, state, max_bytes)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        (staging / "MODEL_CARD.md").write_text(card or "# Model card\n\nNo card was written for this checkpoint.\n")

    return write_atomically(folder, fill)
