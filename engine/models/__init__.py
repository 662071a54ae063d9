"""Models: CLIP-style models behind `ClipModel`, loaded through the one model stack (engine.models.catalog).

`load_model(source)` takes a shipped name, `hf-hub:org/repo` or
`local-dir:/path` and returns a `ClipModel` (one kept per process).
"""

from __future__ import annotations

from engine.errors import ModelError
from engine.models import catalog
from engine.models.clip import ClipModel, InferencePath
from engine.models.registry import DEFAULT_MODEL, KNOWN_HUB, list_models, shipped_models
from engine.models.source import ModelSource, parse_source

__all__ = [
    "ClipModel",
    "InferencePath",
    "ModelError",
    "ModelSource",
    "load_model",
    "list_models",
    "parse_source",
    "DEFAULT_MODEL",
    "KNOWN_HUB",
    "shipped_models",
]


def load_model(source: str | None = None, *, fast: bool = True) -> ClipModel:
    """The CLIP model for `source` (default: the shipped default), loaded once per process."""
    return catalog.load(source, catalog.CLIP, fast=fast)
