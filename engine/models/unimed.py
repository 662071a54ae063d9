"""UniMed-CLIP checkpoints onto upstream open_clip (no vendored fork).

The released `.pt` files are training checkpoints: {'epoch', 'name',
'state_dict', 'optimizer', ...}, keys prefixed `module.` (DDP), the text tower
named `text_encoder.` (the fork's attribute) where upstream says `text.`.
Facts: docs/clip_checkpoints.md.

Loading stays `weights_only=True`: the optimizer state pickles numpy scalars,
which are allow-listed explicitly rather than unpickling arbitrary code.
"""

from __future__ import annotations

import codecs
from pathlib import Path

import numpy as np
import torch

from engine.errors import ModelError

_DROP_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")


def _numpy_safe_globals() -> list:
    names = [np.dtype, codecs.encode]
    core = getattr(np, "_core", None) or np.core
    names.append(core.multiarray.scalar)
    names.extend(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool"))
    return names


def read_unimed_checkpoint(path: str | Path) -> dict:
    """The raw checkpoint dict, unpickled with weights_only=True (numpy scalars allowed)."""
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{Path(path).name}: not a readable UniMed-CLIP checkpoint ({str(exc).splitlines()[0][:200]})") from None


def convert_unimed_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """UniMed fork names -> upstream open_clip CustomTextCLIP names."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state, dict):
        raise ModelError("checkpoint holds no state dict")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not torch.is_tensor(value):
            continue
        if key.startswith("module."):
            key = key[len("module.") :]
        if key.startswith("text_encoder."):
            key = "text." + key[len("text_encoder.") :]
        if key.endswith(_DROP_SUFFIXES):
            continue
        out[key] = value
    return out


def unimed_architecture(state: dict[str, torch.Tensor]) -> str:
    """Which shipped architecture config fits these weights."""
    width = state.get("visual.conv1.weight")
    if width is None:
        raise ModelError("not a UniMed-CLIP state dict: no visual.conv1.weight")
    return "unimed-clip-vit-l14-336" if width.shape[0] == 1024 else "unimed-clip-vit-b16"
