"""engine.models.encoder_path: the Q-Former's frozen encoders on a probed CPU path.

Decision rules are tested with injected CPU profiles (bf16 must never be
tried without bf16 hardware: emulated bf16 3D convolutions ran ~80x slower
on an AVX2 EPYC); the probe, the cache and the OpenVINO export run on a tiny
random I3ResNet (test_i3resnet's), so nothing here needs the 470 MB weights.
"""

from __future__ import annotations

import pytest
import torch

from engine.models import encoder_path
from engine.models.cpu import CpuProfile
from conftest import require_openvino
from test_i3resnet import tiny_net


def profile(flags=(), machine="x86_64", capability="AVX512"):
    return CpuProfile(model="Test CPU", machine=machine, flags=frozenset(flags), capability=capability, cores=2, logical=2)


AMX = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
VNNI = ("avx2", "avx512f", "avx512_vnni")
AVX2 = ("avx2", "fma")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLENS_FASTPATH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEDLENS_INFERENCE", raising=False)
    return tmp_path / "cache"


def test_candidates_follow_the_hardware():
    names = lambda p, ov: [n for n, _ in encoder_path.candidates(p, openvino_available=ov)]  # noqa: E731
    assert names(profile(AMX), True) == ["openvino-bf16", "bf16"]
    assert names(profile(AMX), False) == ["bf16"]
    for flags in (VNNI, AVX2):
        assert names(profile(flags, capability="AVX2"), True) == ["openvino-fp32"], "no bf16 without bf16 hardware"
        assert names(profile(flags, capability="AVX2"), False) == []
    assert names(profile(("asimd", "bf16"), machine="aarch64", capability="SVE256"), True) == ["bf16"]


def trial(name, s, cos=0.99995, cos_token=0.9999, status="probed"):
    return encoder_path.Trial(name, f"why {name}", s=s, cos=cos, cos_token=cos_token, status=status)


def test_choose_keeps_the_features_and_is_never_slower():
    fp32 = trial("fp32", 1.0, 1.0, 1.0)
    assert encoder_path.choose([fp32, trial("bf16", 0.6), trial("openvino-bf16", 0.1)])[0] == "openvino-bf16"
    name, reason = encoder_path.choose([fp32, trial("bf16", 0.95)])
    assert name == "fp32" and "1.05x" in reason
    assert encoder_path.choose([fp32, trial("openvino-bf16", 0.1, cos=0.998)])[0] == "fp32"  # bf16 needs 0.999
    assert encoder_path.choose([fp32, trial("openvino-bf16", 0.1, cos_token=0.99)])[0] == "fp32"  # and every token 0.995
    assert encoder_path.choose([fp32, trial("openvino-fp32", 0.5, cos=0.99995)])[0] == "openvino-fp32"
    assert encoder_path.choose([fp32, trial("openvino-bf16", None, status="error: ImportError")])[0] == "fp32"


def test_probe_picks_caches_and_reports(cache, monkeypatch):
    from engine.models import decisions

    monkeypatch.setattr(encoder_path, "cpu_profile", lambda: profile(AMX))
    monkeypatch.setattr(encoder_path, "candidates", lambda p: [("bf16", "test")])
    loads = []
    net = tiny_net()
    example = torch.rand(1, 1, 32, 32, 16)

    def load():
        loads.append(1)
        return net

    enc = encoder_path.fast_encoder("tiny@1", "Q-Former 3D encoder", load, lambda: example)
    probe = enc.path.details["probe"]
    assert set(probe) == {"fp32", "bf16"} and probe["bf16"]["cos"] > 0.99 and probe["fp32"]["s"] > 0
    assert enc.path.name in ("fp32", "bf16") and probe[enc.path.name]["status"] in ("probed", "chosen")
    with torch.inference_mode():
        reference = net(example)
    out = enc(example)
    assert out.dtype == torch.float32 and out.shape == reference.shape
    assert torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0) > 0.999
    [entry] = decisions.remembered()
    assert entry.model == "tiny@1" and entry.kind == "Q-Former 3D encoder" and entry.by_batch == {"1": enc.path.name}
    again = encoder_path.fast_encoder("tiny@1", "Q-Former 3D encoder", load, lambda: example)
    assert again.path.name == enc.path.name and "earlier load" in again.path.reason
    assert net.conv1.weight.dtype == torch.float32  # paths are copies


def test_forced_path_and_its_warning(cache, monkeypatch):
    monkeypatch.setattr(encoder_path, "cpu_profile", lambda: profile(VNNI))
    monkeypatch.setenv("MEDLENS_INFERENCE", "bf16")
    enc = encoder_path.fast_encoder("tiny@2", "test", tiny_net, lambda: torch.rand(1, 1, 32, 32, 16))
    assert enc.path.name == "bf16" and "forced" in enc.path.reason and "no bf16 hardware" in enc.path.reason
    monkeypatch.setenv("MEDLENS_INFERENCE", "onnx-int8")  # a 2D-only path: auto here
    monkeypatch.setattr(encoder_path, "candidates", lambda p: [])
    assert encoder_path.fast_encoder("tiny@3", "test", tiny_net, lambda: torch.rand(1, 1, 32, 32, 16)).path.name == "fp32"


@pytest.mark.parametrize("name", ["openvino-bf16", "openvino-fp32"])
def test_openvino_encoder_keeps_features_at_other_sizes(cache, monkeypatch, name):
    require_openvino()
    monkeypatch.setenv("MEDLENS_INFERENCE", name)
    net = tiny_net()
    enc = encoder_path.fast_encoder("tiny@4", "test", lambda: net, lambda: torch.rand(1, 1, 32, 32, 16), dynamic_axes=(0, 2, 3, 4))
    assert enc.path.name == name
    for shape in ((1, 1, 64, 32, 16), (1, 1, 32, 64, 48)):  # volumes arrive at many sizes: dynamic axes
        x = torch.rand(*shape)
        with torch.inference_mode():
            reference = net(x)
        out = enc(x)
        assert out.shape == reference.shape
        assert torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0) > 0.995
    assert list(cache.glob("encoder-*.xml")), "the IR is cached for the next process"


def test_ask_model_says_which_encoder_path_runs(monkeypatch):
    from engine.ask.model import FrozenEncoders

    tiny = FrozenEncoders({"type": "i3resnet-tiny"})
    assert tiny.path_label(False) == "fp32"

    class Fake:
        path = encoder_path.EncoderPath("openvino-bf16", "test")

    real = FrozenEncoders({"type": "i3resnet152"})
    monkeypatch.setattr(real, "encoder", lambda dims: Fake())
    assert real.path_label(False) == "OpenVINO bf16" and real.path_label(True) == "OpenVINO bf16"
