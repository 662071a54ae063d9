"""One model stack: checkpoint formats, the shipped listing, one cached `load`, one `resolve` with user errors.

Design decisions (the way HF keys models by `model_type` and nanochat keeps
one checkpoint manager)
- A checkpoint folder says what it is in `config.json`'s `format`
  ("medlens-clip/1", "medlens-qformer/1"). `FORMATS` is the one table of
  formats: which task a format serves and which function loads it. Adding a
  model kind is one row here plus its loader. The check is exact: a
  `medlens-*` format this version does not list is refused with a message
  ("written by a newer MedLens"), never loaded half-way.
- Tasks: `CLIP` models label scans and embed them for the library; `ASK`
  models (Q-Formers) answer questions and label volumes. The app's pickers
  and `medlens models` list `shipped(task)`.
- Foreign folders are CLIP models too: an open_clip folder (BiomedCLIP
  downloaded elsewhere) or a UniMed-CLIP `.pt`; hub sources load through
  `engine.models.hub_clip` (online only).
- One model per task per process (the last one asked for): a 2-core laptop
  cannot hold several ViT-Bs, while the app needs a CLIP and a Q-Former at
  once. Loading is serialised by one lock.
- `resolve(source, task)` is what the CLI, the app and training call: it
  passes a loaded model through, takes None as the task's default, and
  turns any failure into a `ModelError` a person can act on.
- Weights on disk (sharding, strict reads, atomic saves, content-hash
  revisions) are engine.models.weights.
"""

from __future__ import annotations

import importlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import MedLensError, ModelError
from engine.models.source import HF_HUB, LOCAL_DIR, ModelSource, parse_source
from engine.settings import assets_dir

CLIP = "clip"  # zero-shot labels, library embeddings
ASK = "ask"  # question answering, 3D labels (Q-Former)
TASKS = (CLIP, ASK)
DEFAULTS = {CLIP: "medlens-clip", ASK: "medlens-qformer"}
TASK_WORDS = {CLIP: "zero-shot (CLIP)", ASK: "question-answering"}
ENV_HINT = {CLIP: "MEDLENS_MODEL", ASK: "MEDLENS_ASK_MODEL"}


@dataclass(frozen=True)
class CheckpointFormat:
    """One kind of checkpoint folder this version reads."""

    name: str  # config.json "format"
    task: str  # CLIP or ASK
    loader: str  # "module:function" taking (folder, name) -> model, imported when first used
    description: str

    def load(self, folder: Path, name: str):
        module, function = self.loader.split(":")
        return getattr(importlib.import_module(module), function)(folder, name=name)


FORMATS: dict[str, CheckpointFormat] = {
    f.name: f
    for f in (
        CheckpointFormat("medlens-clip/1", CLIP, "engine.models.checkpoint:load_folder", "MedLens CLIP (open_clip config + weights)"),
        CheckpointFormat("medlens-qformer/1", ASK, "engine.ask.model:load_ask_folder", "MedLens Q-Former over a frozen encoder"),
    )
}
FOREIGN_CLIP = CheckpointFormat("foreign-clip", CLIP, "engine.models.checkpoint:load_folder", "open_clip folder or UniMed-CLIP .pt")


@dataclass(frozen=True)
class ShippedModel:
    name: str
    folder: Path
    format: CheckpointFormat
    config: dict[str, Any]

    @property
    def licence(self) -> str:
        return str(self.config.get("licence", ""))

    @property
    def note(self) -> str:
        return str(self.config.get("note", ""))


# --------------------------------------------------------------------------- formats
def read_config(folder: Path) -> dict[str, Any] | None:
    """config.json as a dict, or None when the folder has none (or it is not JSON)."""
    try:
        data = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def folder_format(folder: str | Path) -> CheckpointFormat | None:
    """The format a folder holds; None when it holds no model this version knows."""
    folder = Path(folder)
    config = read_config(folder)
    name = str((config or {}).get("format", ""))
    if name in FORMATS:
        return FORMATS[name]
    if name.startswith("medlens-"):
        known = ", ".join(FORMATS)
        raise ModelError(
            f"{folder} holds a '{name}' checkpoint, which this version of MedLens cannot read (it reads {known}); update MedLens"
        )
    if (folder / "open_clip_config.json").is_file() or any(folder.glob("*.pt")):
        return FOREIGN_CLIP
    return None


def shipped(task: str | None = None) -> dict[str, ShippedModel]:
    """Checkpoint folders under <assets>/models, by name (only `task`'s when given)."""
    root = assets_dir() / "models"
    if not root.is_dir():
        return {}
    out = {}
    for folder in sorted(root.iterdir()):
        config = read_config(folder)
        fmt = FORMATS.get(str((config or {}).get("format", "")))
        if fmt is not None and (task is None or fmt.task == task):
            out[folder.name] = ShippedModel(folder.name, folder, fmt, config or {})
    return out


# --------------------------------------------------------------------------- loading
_cache: dict[str, tuple[str, Any]] = {}  # task -> (source key, model)
_lock = threading.Lock()


def clear_cache() -> None:
    with _lock:
        _cache.clear()


def _load_folder(folder: Path, task: str, name: str):
    if not folder.is_dir():
        if task == ASK:
            raise ModelError(f"{folder} is not a MedLens Q-Former checkpoint: the folder does not exist")
        raise ModelError(f"model folder {folder} does not exist")
    fmt = folder_format(folder)
    if fmt is None:
        if task == ASK:
            raise ModelError(f"{folder} is not a MedLens Q-Former checkpoint (config.json with format medlens-qformer/1)")
        fmt = FOREIGN_CLIP  # its loader says what it expected to find
    if fmt.task != task:
        raise ModelError(f"{folder} holds a {TASK_WORDS[fmt.task]} model ({fmt.name}), not a {TASK_WORDS[task]} model")
    return fmt.load(folder, name)


def _load_uncached(source: ModelSource, task: str):
    if source.kind == LOCAL_DIR:
        return _load_folder(Path(source.identifier), task, str(source))
    if source.kind == HF_HUB:
        if task != CLIP:
            raise ModelError(f"'{source}': {TASK_WORDS[task]} models load from a shipped name or local-dir:/path, not the hub")
        from engine.models.hub_clip import load_hub

        return load_hub(source.identifier, name=str(source))
    listing = shipped(task)
    if source.identifier in listing:
        return _load_folder(listing[source.identifier].folder, task, source.identifier)
    if task == CLIP:
        from engine.models.registry import KNOWN_HUB

        if source.identifier in KNOWN_HUB:
            from engine.models.hub_clip import load_hub

            return load_hub(KNOWN_HUB[source.identifier].repo, name=source.identifier)
        known = list(listing) + list(KNOWN_HUB)
        raise ModelError(
            f"unknown model '{source.identifier}' (known: {', '.join(known) or 'none'}; or use hf-hub:org/repo, local-dir:/path)"
        )
    raise ModelError(
        f"unknown {TASK_WORDS[task]} model '{source.identifier}' (known: {', '.join(listing) or 'none installed'}; or local-dir:/path)"
    )


def load(source: str | None, task: str = CLIP, *, fast: bool = True):
    """The model for `source` (default: the task's shipped default), loaded once per process and task.

    CLIP models get the fastest CPU inference path that keeps their answers (engine.models.fastpath)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}")
    parsed = parse_source(source or DEFAULTS[task])
    key = str(parsed)
    with _lock:
        cached = _cache.get(task)
        if cached is not None and cached[0] == key:
            return cached[1]
        _cache.pop(task, None)  # one model per task: free the old one before loading the next
        model = _load_uncached(parsed, task)
        if fast and task == CLIP:
            try:
                from engine.models import fastpath
            except ImportError:
                fastpath = None
            if fastpath is not None:
                fastpath.apply_best(model)
        _cache[task] = (key, model)
        return model


def resolve(source: Any = None, task: str = CLIP):
    """A model: passed through when already loaded, else loaded from a source string (None = the task's default).

    Every failure is a ModelError saying what to do (no default installed, unknown
    name, missing folder, a broken checkpoint)."""
    if source is not None and not isinstance(source, str):
        return source
    text = (source or "").strip() or DEFAULTS[task]
    if text == DEFAULTS[task] and text not in shipped(task):
        expected = assets_dir() / "models" / text
        if task == CLIP:
            raise ModelError(
                f"no default model installed (expected {expected}); choose one: pass --model NAME (see `medlens models`) "
                "or local-dir:/path/to/checkpoint, or set MEDLENS_MODEL for the app"
            )
        raise ModelError(
            f"the {TASK_WORDS[task]} model '{text}' is not installed (expected {expected}); "
            f"pass --model local-dir:/path/to/qformer-checkpoint (see `medlens models`), or set {ENV_HINT[task]} for the app"
        )
    try:
        return load(text, task)
    except MedLensError:
        raise
    except Exception as exc:  # a broken checkpoint must read as a model problem, not a crash
        what = "model" if task == CLIP else f"{TASK_WORDS[task]} model"
        raise ModelError(f"cannot load {what} '{text}': {type(exc).__name__}: {str(exc)[:300]}") from None
