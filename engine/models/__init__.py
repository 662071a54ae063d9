"""Models: one factory for every CLIP-style model MedLens can load.

`load_model(source)` takes a shipped name, `hf-hub:org/repo` or
`local-dir:/path` and returns a `ClipModel`. One model is kept per process
(the last one asked for): a 2-core laptop cannot hold several ViT-Bs, and the
app and CLI use one model at a time.
"""

from __future__ import annotations

import threading

from engine.errors import ModelError
from engine.models.clip import ClipModel, InferencePath
from engine.models.registry import DEFAULT_MODEL, KNOWN_HUB, list_models, shipped_models
from engine.models.source import LOCAL_DIR, SHIPPED, ModelSource, parse_source

__all__ = ["ClipModel", "InferencePath", "ModelError", "ModelSource", "load_model", "list_models", "parse_source", "DEFAULT_MODEL"]

_cache: dict[str, ClipModel] = {}
_lock = threading.Lock()


def _load_uncached(source: ModelSource) -> ClipModel:
    from engine.models import checkpoint

    if source.kind == LOCAL_DIR:
        return checkpoint.load_folder(source.identifier, name=str(source))
    if source.kind == SHIPPED:
        shipped = shipped_models()
        if source.identifier in shipped:
            return checkpoint.load_folder(shipped[source.identifier], name=source.identifier)
        if source.identifier in KNOWN_HUB:
            return _load_hub(KNOWN_HUB[source.identifier].repo, name=source.identifier)
        known = ", ".join(list(shipped) + list(KNOWN_HUB)) or "none"
        raise ModelError(f"unknown model '{source.identifier}' (known: {known}; or use hf-hub:org/repo, local-dir:/path)")
    return _load_hub(source.identifier, name=str(source))


def _load_hub(repo: str, name: str) -> ClipModel:
    """Online path: open_clip repos through open_clip, UniMed .pt through our mapping."""
    from engine.models import checkpoint

    hub = next((h for h in KNOWN_HUB.values() if h.repo == repo), None)
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        if hub is not None and hub.file:
            pt = hf_hub_download(repo, hub.file)
            arch = checkpoint.architecture(hub.architecture)
            return checkpoint.load_unimed(pt, text_dir=None, name=name) if arch else None
        folder = snapshot_download(repo, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.bin"])
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(
            f"cannot fetch {repo} from the Hugging Face hub ({type(exc).__name__}); offline, download it elsewhere "
            "and use local-dir:/path/to/folder"
        ) from None
    return checkpoint.load_folder(folder, name=name)


def load_model(source: str | None = None, *, fast: bool = True) -> ClipModel:
    """The model for `source` (default: the shipped default), loaded once per process."""
    parsed = parse_source(source or DEFAULT_MODEL)
    key = str(parsed)
    with _lock:
        if key in _cache:
            return _cache[key]
        _cache.clear()  # one model per process
        model = _load_uncached(parsed)
        if fast:
            try:
                from engine.models import fastpath
            except ImportError:
                fastpath = None
            if fastpath is not None:
                fastpath.apply_best(model)
        _cache[key] = model
        return model
