"""Inference path choice: CPU facts, decision rules for CPUs we cannot run here, parity on real images.

The decision logic is tested with injected CPU profiles (Sapphire Rapids with
AMX, AMD EPYC with AVX2 only, Ice Lake with AVX-512 VNNI, Graviton 3): the
rule that matters most, "bf16 only where the hardware computes it", must hold
on machines this suite never runs on.

Parity uses a BiomedCLIP-shaped model (ViT-B/16 + BERT-base, random weights)
on real images from ../shared/data. A random-weight model scores every label
near zero (label scores within ~0.03 of each other, adjacent gaps down to
4e-5), far below what any int8 path can resolve (score changes ~3e-3 at
cosine 0.999), so "ranked labels agree" is checked where it means something:
every pair of labels (or retrieved images) whose fp32 scores differ by more
than TAU keeps its order, the nearest-neighbour image is the same, and the
label order's Spearman correlation stays high. Image-to-image similarities
of this model are well spread (same modality ~0.9, across modalities
0.0-0.6), so the retrieval order is a strict test.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.models import fastpath
from engine.models.clip import InferencePath
from conftest import require_openvino
from engine.models.cpu import CpuProfile, cpu_profile, parse_cpuinfo

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
# the parity check runs on the images and labels the speed benchmark measures
from clip_throughput import LABELS, PICKS  # noqa: E402

TAU = 0.01  # score gap (cosine units; 1 logit at CLIP's scale 100) above which order must be kept

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni

processor\t: 2
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t\t: 1
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni
"""

EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse sse2 avx avx2 fma f16c bmi2

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
physical id\t: 0
core id\t\t: 1
flags\t\t: fpu sse sse2 avx avx2 fma f16c bmi2
"""

ICE_LAKE = """processor\t: 0
model name\t: Intel(R) Xeon(R) Processor @ 2.80GHz
physical id\t: 0
core id\t\t: 0
flags\t\t: avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bitalg
"""

GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer\t: 0x41
"""


def profile_of(text: str, machine: str = "x86_64", capability: str = "AVX2") -> CpuProfile:
    model, flags, cores = parse_cpuinfo(text)
    return CpuProfile(model=model, machine=machine, flags=frozenset(flags), capability=capability, cores=cores, logical=cores)


# --------------------------------------------------------------------------- CPU facts
def test_parse_cpuinfo_reads_model_flags_and_physical_cores():
    model, flags, cores = parse_cpuinfo(SAPPHIRE_RAPIDS)
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"amx_bf16", "amx_tile", "avx512_bf16", "avx512_vnni", "avx2"} <= flags
    assert "fpu" not in flags  # only flags of interest are kept
    assert cores == 2  # two logical CPUs share core 0 (SMT)
    model, flags, cores = parse_cpuinfo(GRAVITON3)
    assert {"bf16", "i8mm", "asimddp", "sve"} <= flags and cores == 1


def test_profiles_of_known_cpus():
    spr, epyc, icl = profile_of(SAPPHIRE_RAPIDS, capability="AVX512"), profile_of(EPYC_AVX2), profile_of(ICE_LAKE, capability="AVX512")
    arm = profile_of(GRAVITON3, machine="aarch64", capability="SVE256")
    assert spr.amx and spr.native_bf16 and spr.isa == "AMX"
    assert not epyc.native_bf16 and not epyc.vnni and epyc.isa == "AVX2"
    assert not icl.native_bf16 and icl.vnni and icl.isa == "AVX-512 VNNI"
    assert arm.is_arm and arm.native_bf16
    assert "AMD EPYC 7B12" in epyc.summary() and "avx2" in epyc.summary()


def test_this_machine_profile_degrades_gracefully():
    here = cpu_profile()
    assert here.cores >= 1 and here.logical >= here.cores and here.model
    assert here.capability == torch.backends.cpu.get_cpu_capability()
    bare = cpu_profile(cpuinfo="")  # macOS/Windows-like: no /proc/cpuinfo
    assert bare.cores >= 1 and bare.model
    assert fastpath.rule_based(bare)[0] in ("fp32", "bf16")


# --------------------------------------------------------------------------- decisions
def names(profile, **kw):
    return [n for n, _ in fastpath.candidates(profile, **kw)]


def test_candidates_follow_the_hardware():
    spr = profile_of(SAPPHIRE_RAPIDS, capability="AVX512")
    # AMX with OpenVINO: its bf16 and int8 paths and torch bf16; dynamic int8 never won there (measured), not probed
    assert names(spr, onnx_available=True, openvino_available=True, nncf_available=True) == [
        "openvino-bf16",
        "bf16",
        "openvino-int8",
        "onnx-fp32",
    ]
    assert names(spr, onnx_available=False, openvino_available=True, nncf_available=False) == ["openvino-bf16", "bf16"]
    assert names(spr, onnx_available=True, openvino_available=False, nncf_available=False) == ["bf16", "onnx-fp32", "int8", "onnx-int8"]
    assert dict(fastpath.candidates(spr, onnx_available=True, openvino_available=True, nncf_available=True))["openvino-int8"].endswith(
        "AMX-INT8"
    )
    epyc = profile_of(EPYC_AVX2)
    got = names(epyc, onnx_available=True, openvino_available=True, nncf_available=True)
    assert "bf16" not in got and "openvino-bf16" not in got, "an AVX2-only CPU emulates bf16 (10x slower on EPYC): never a candidate"
    assert got == ["openvino-fp32", "openvino-int8", "onnx-fp32", "int8", "onnx-int8"]
    assert names(epyc, onnx_available=False, openvino_available=False, nncf_available=False) == ["int8"]
    icl = profile_of(ICE_LAKE, capability="AVX512")
    assert dict(fastpath.candidates(icl, onnx_available=False, openvino_available=False, nncf_available=False)) == {"int8": "AVX-512 VNNI"}
    assert names(icl, onnx_available=True, openvino_available=True, nncf_available=True) == [
        "openvino-fp32",
        "openvino-int8",
        "onnx-fp32",
        "int8",
        "onnx-int8",
    ]
    arm = profile_of(GRAVITON3, machine="aarch64", capability="SVE256")
    assert names(arm, onnx_available=False, openvino_available=True, nncf_available=True) == ["bf16", "int8"]  # OpenVINO: x86 only here
    old = CpuProfile(model="old", machine="x86_64", flags=frozenset(), capability="DEFAULT")
    assert fastpath.candidates(old, onnx_available=True, openvino_available=True, nncf_available=True) == []


def test_rule_based_choice_without_probe():
    assert fastpath.rule_based(profile_of(SAPPHIRE_RAPIDS, capability="AVX512"))[0] == "bf16"
    assert fastpath.rule_based(profile_of(EPYC_AVX2))[0] == "fp32"
    assert fastpath.rule_based(profile_of(ICE_LAKE, capability="AVX512"))[0] == "fp32"  # int8 only when measured


def test_batch_classes_are_the_batches_the_engine_sends():
    from engine.library.store import VOLUME_SLICES
    from engine.zeroshot.imaging import DEFAULT_SLICES

    assert fastpath.PROBE_BATCHES == (1, DEFAULT_SLICES) and VOLUME_SLICES == DEFAULT_SLICES
    assert [fastpath.batch_class(n) for n in (1, 2, 3, 4, 12, 16, 64)] == [1, 1, 1, 12, 12, 12, 12]
    assert fastpath.batch_class(0) == 1 and fastpath.batch_class(5, (1, 4, 16)) == 4


def built(name, ms1, ms12, cos, status="probed", labels_ok=True):
    b = fastpath.Built(name, f"why {name}")
    b.ms, b.cos_image, b.status, b.labels_ok = {1: ms1, 12: ms12}, cos, status, labels_ok
    return b


def test_choose_per_batch_class():
    fp32 = built("fp32", 200, 150, 1.0)
    # the case: ONNX Runtime int8 best at batch 1, plain bf16 best at batch 12
    picks = fastpath.choose([fp32, built("onnx-int8", 60, 60, 0.999), built("bf16", 70, 30, 0.9999)])
    assert picks[1][0] == "onnx-int8" and picks[12][0] == "bf16"
    assert "3.3x faster than fp32 at batch 1" in picks[1][1] and "5.0x faster than fp32 at batch 12" in picks[12][1]
    # the shipped ResNet's case: bf16 slower than fp32 alone, faster in batches
    fp32 = built("fp32", 46.8, 26.0, 1.0)
    picks = fastpath.choose([fp32, built("bf16", 55.7, 16.5, 0.9995)])
    assert picks[1][0] == "fp32" and "bf16 0.84x" in picks[1][1] and picks[12][0] == "bf16"


def test_choose_never_slower_and_never_below_parity():
    fp32 = built("fp32", 200, 190, 1.0)
    # AVX2-only EPYC forced through bf16 would be 10x slower; int8 a little faster, below the noise margin
    paths = [fp32, built("bf16", 2066, 1900, 0.9999), built("int8", 210, 180, 0.998)]
    picks = fastpath.choose(paths)
    assert {name for name, _ in picks.values()} == {"fp32"} and "no path beat fp32" in picks[1][1]
    assert paths[1].status.startswith("passed") and paths[2].status.startswith("passed")  # kept the answer, not faster
    assert fastpath.choose([fp32, built("int8", 50, 40, 0.99)])[1][0] == "fp32"  # fast but wrong
    assert fastpath.choose([fp32, built("bf16", 50, 40, 0.998)])[1][0] == "fp32"  # bf16 needs 0.999
    assert fastpath.choose([fp32, built("int8", 50, 40, 0.996)])[1][0] == "int8"  # int8 needs 0.995
    assert fastpath.choose([fp32, built("openvino-int8", 50, 40, 0.996)])[12][0] == "openvino-int8"
    assert fastpath.choose([fp32, built("openvino-bf16", 50, 40, 0.9985)])[12][0] == "fp32"
    # static int8 calibrated on the generic scans, not the user's, needs a margin over 0.995 on the held-out ones
    generic = built("openvino-int8", 50, 40, 0.996)
    generic.min_cosine = fastpath.MIN_COSINE["openvino-int8"] + fastpath.GENERIC_INT8_MARGIN
    assert fastpath.choose([fp32, generic])[12][0] == "fp32" and "< 0.997" in generic.status
    generic.cos_image, generic.status = 0.9984, "probed"
    assert fastpath.choose([fp32, generic])[12][0] == "openvino-int8"
    flipped = built("openvino-int8", 50, 40, 0.999, labels_ok=False)
    assert fastpath.choose([fp32, flipped])[1][0] == "fp32" and "ranked labels changed" in flipped.status
    assert fastpath.choose([fp32, built("onnx-int8", 0, 0, None, status="error: ImportError")])[1][0] == "fp32"


def test_order_flips_counts_only_separated_labels():
    ref = np.array([[0.30, 0.20, 0.195, 0.10]])
    assert fastpath.order_flips(ref, ref) == 0
    assert fastpath.order_flips(ref, np.array([[0.30, 0.19, 0.20, 0.10]])) == 0  # 0.005 apart in fp32: a tie
    assert fastpath.order_flips(ref, np.array([[0.19, 0.20, 0.195, 0.10]])) == 2  # first now below the second and third
    assert fastpath.order_flips(ref, ref[:, ::-1].copy()) == 5


def test_static_int8_is_judged_on_images_it_was_not_calibrated_on():
    pixels = torch.randn(6, 4)
    exact = lambda x: x  # noqa: E731

    def wrong_on(parity):  # flips the sign of the rows with index % 2 == parity
        return lambda x: torch.stack([-row if i % 2 == parity else row for i, row in enumerate(x)])

    def cosine(name, forward):
        paths = [fastpath.Built("fp32", "ref"), fastpath.Built(name, "test")]
        fastpath._check_parity(paths, {"fp32": exact, name: forward}, pixels, None, chunk=6)
        return paths[1].cos_image

    # openvino-int8 was calibrated on the even rows: only the odd (held-out) ones count
    assert cosine("openvino-int8", wrong_on(0)) > 0.999 and cosine("openvino-int8", wrong_on(1)) < 0
    assert cosine("bf16", wrong_on(0)) < 0 and cosine("bf16", wrong_on(1)) < 0  # other paths: every row


def test_dispatch_runs_each_batch_on_its_class_path():
    calls = []
    forward = fastpath.BatchDispatch({1: lambda x: calls.append(("a", len(x))) or x, 12: lambda x: calls.append(("b", len(x))) or x})
    for n in (1, 3, 4, 16):
        forward(torch.zeros(n, 3, 8, 8))
    assert calls == [("a", 1), ("a", 3), ("b", 4), ("b", 16)]
    path = InferencePath("1: fp32 | 12: openvino-bf16", "x", by_batch={1: "fp32", 12: "openvino-bf16"})
    assert path.name_for(1) == "fp32" and path.name_for(12) == "openvino-bf16"
    assert path.name_for(33) == "openvino-bf16 + fp32"  # chunks of 16, 16 and 1
    assert InferencePath("bf16").name_for(5) == "bf16"


# --------------------------------------------------------------------------- apply_best on a tiny model
@pytest.fixture
def tiny(tmp_path, monkeypatch):
    from _models import tiny_clip_folder

    from engine.models.checkpoint import load_folder

    monkeypatch.setenv("MEDLENS_FASTPATH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEDLENS_INFERENCE", raising=False)
    monkeypatch.delenv("MEDLENS_THREADS", raising=False)
    return load_folder(tiny_clip_folder(tmp_path / "tiny"))


def test_small_models_skip_the_probe(tiny):
    path = fastpath.apply_best(tiny)
    assert path.name == "fp32" and "small image tower" in path.reason
    assert tiny.path is path and "probe" not in path.details
    assert fastpath.describe(tiny).startswith("fp32 (small image tower")


def test_text_padding_is_cut_without_changing_embeddings(tiny):
    texts = ["pneumonia", "a chest x-ray showing a large left-sided pleural effusion"]
    before = tiny.encode_texts(texts)
    fastpath.apply_best(tiny)
    assert tiny.path.details["text"].startswith("fp32, padding cut")
    after = tiny.encode_texts(texts)  # set_inference cleared the text cache
    np.testing.assert_allclose(after, before, atol=1e-5)
    calls = []
    original = tiny.model.encode_text
    tiny.model.encode_text = lambda tokens: calls.append(tokens.shape) or original(tokens)
    try:
        fastpath.apply_best(tiny)
        tiny.encode_texts(["effusion"])
    finally:
        del tiny.model.encode_text
    assert calls[-1][1] < 64  # context 64, cut to the prompt


def test_probe_runs_and_keeps_fp32_model_intact(tiny, monkeypatch):
    # the cheap torch paths only (the OpenVINO ones have their own test): the probe's logic is what is tested here
    monkeypatch.setattr(fastpath, "candidates", lambda profile, **kw: [("int8", "test"), ("bf16", "test")])
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    images = [np.full((80, 80), 40 * i, np.uint8) for i in range(3)]
    reference = tiny.encode_images(images)
    path = fastpath.apply_best(tiny, min_image_params=0)
    probe, by_batch = path.details["probe"], path.details["by_batch"]
    assert probe["fp32"]["status"] == "probed" and set(probe) == {"fp32", "int8", "bf16"}
    assert set(probe["int8"]["ms_per_image"]) == {"1", "12"} and set(probe["int8"]["cpu_ms_per_image"]) == {"1", "12"}
    assert "label-order flips" in probe["int8"]["labels"] and "bundled" in path.details["calibration"]
    assert set(by_batch) == {"1", "12"} and path.details["threads"] == torch.get_num_threads()
    for b, chosen in by_batch.items():  # whatever won a class beat fp32 there and kept parity
        if chosen["path"] != "fp32":
            assert probe[chosen["path"]]["speedup"][b] >= fastpath.MIN_SPEEDUP
            assert probe[chosen["path"]]["cos_image"] >= fastpath.MIN_COSINE[chosen["path"]]
            assert probe[chosen["path"]]["status"].startswith("chosen for batch")
    out = tiny.encode_images(images)
    assert (out * reference).sum(1).min() >= 0.99
    for k, v in tiny.model.state_dict().items():  # the fp32 model is untouched: heatmaps need it
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), k
    pixels = tiny.image_tensor(images[:1]).requires_grad_(True)
    tiny.encode_image_tensor(pixels).sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    monkeypatch.setattr(fastpath, "probe", None)  # a second load must not probe
    again = fastpath.apply_best(tiny, min_image_params=0)  # decision remembered on disk
    assert again.name == path.name and again.by_batch == path.by_batch and "earlier load" in again.reason
    assert again.details["by_batch"] == by_batch


def test_a_cached_static_int8_decision_reuses_the_ir_it_judged(tiny, monkeypatch):
    require_openvino(int8=True)
    from engine.models import openvino_path

    monkeypatch.setattr(fastpath, "candidates", lambda profile, **kw: [("openvino-int8", "test")])
    monkeypatch.setattr(fastpath, "choose", lambda results, **kw: {b: ("openvino-int8", "test") for b in fastpath.PROBE_BATCHES})
    quantised, original = [], openvino_path.quantize_ir
    monkeypatch.setattr(openvino_path, "quantize_ir", lambda *a, **kw: quantised.append(a[2]) or original(*a, **kw))
    first = fastpath.apply_best(tiny, min_image_params=0)
    assert first.name == "openvino-int8" and len(quantised) == 1
    again = fastpath.apply_best(tiny, min_image_params=0)  # the next process: the decision and its IR from the cache
    assert "earlier load" in again.reason and len(quantised) == 1, "the cached decision quantised again on other images"


def test_bf16_keeps_a_resnet_stem_and_first_stage_in_fp32():
    import timm

    class Tower(torch.nn.Module):  # open_clip's TimmModel layout: .trunk, then a head
        def __init__(self):
            super().__init__()
            self.trunk = timm.create_model("resnet18", pretrained=False, num_classes=0)
            self.head = torch.nn.Linear(512, 8)

        def forward(self, x):
            return self.head(self.trunk(x))

    torch.manual_seed(0)
    tower = Tower().eval()
    twin = fastpath._bf16_twin(tower)
    dtypes = {name: next(getattr(twin.trunk, name).parameters()).dtype for name in ("conv1", "layer1", "layer2", "layer4")}
    assert dtypes == {"conv1": torch.float32, "layer1": torch.float32, "layer2": torch.bfloat16, "layer4": torch.bfloat16}
    assert twin.head.weight.dtype == torch.float32 and next(tower.parameters()).dtype == torch.float32  # the original untouched
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        out, ref = twin(x), tower(x)
    assert out.dtype == torch.float32 and torch.nn.functional.cosine_similarity(out, ref).min() > 0.99
    whole = fastpath._bf16_twin(torch.nn.Sequential(torch.nn.Linear(4, 4)))  # no stages (a ViT): bf16 whole, float in and out
    assert next(whole.parameters()).dtype == torch.bfloat16 and whole(torch.rand(1, 4)).dtype == torch.float32


def test_a_chosen_openvino_path_keeps_its_compiled_model_and_a_probe_does_not(tiny, monkeypatch):
    require_openvino()
    from engine.models import decisions, openvino_path

    monkeypatch.setattr(fastpath, "candidates", lambda profile, **kw: [("openvino-fp32", "test")])
    monkeypatch.setattr(fastpath, "choose", lambda results, **kw: {b: ("openvino-fp32", "test") for b in fastpath.PROBE_BATCHES})
    compiled = openvino_path.compiled_cache(decisions.cache_dir())
    first = fastpath.apply_best(tiny, min_image_params=0)
    assert first.name == "openvino-fp32" and not (compiled.exists() and any(compiled.iterdir())), "a probe left compiled blobs"
    images = [np.zeros((64, 64, 3), np.uint8), np.full((64, 64), 200, np.uint8)]
    expected = tiny.encode_images(images)
    again = fastpath.apply_best(tiny, min_image_params=0)  # the next process: the cached decision compiles once, into the cache
    assert "earlier load" in again.reason and any(compiled.iterdir())
    blobs = sorted(compiled.iterdir())
    third = fastpath.apply_best(tiny, min_image_params=0)  # and the one after imports it: the same numbers, no new blob
    assert "earlier load" in third.reason and sorted(compiled.iterdir()) == blobs
    assert np.allclose(tiny.encode_images(images), expected, atol=1e-5)


def test_a_cached_decision_with_a_path_per_batch_class_builds_each_on_its_first_batch(tiny, monkeypatch, caplog):
    monkeypatch.setattr(fastpath, "candidates", lambda profile, **kw: [("int8", "test"), ("bf16", "test")])
    monkeypatch.setattr(fastpath, "choose", lambda results, **kw: {1: ("int8", "test"), 12: ("bf16", "test")})
    fastpath.apply_best(tiny, min_image_params=0)  # the probe: decides and remembers one path per class
    built, original = [], fastpath.build_path
    monkeypatch.setattr(fastpath, "build_path", lambda clip, name, *a, **kw: built.append(name) or original(clip, name, *a, **kw))
    again = fastpath.apply_best(tiny, min_image_params=0)  # the next process
    assert "earlier load" in again.reason and again.by_batch == {1: "int8", 12: "bf16"}
    assert built == [], "a path was built before any image came"
    image = np.full((64, 64), 120, np.uint8)
    one = tiny.encode_images([image])
    assert built == ["int8"]
    tiny.encode_images([image] * 12, batch_size=12)
    tiny.encode_images([image] * 12, batch_size=12)
    assert built == ["int8", "bf16"], "each path is built once, on the first batch of its class"
    assert np.allclose(one, tiny.encode_images([image]))

    # a path that cannot be built any more runs fp32 for its class, and says so
    monkeypatch.setattr(fastpath, "build_path", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("runtime gone")))
    fastpath.apply_best(tiny, min_image_params=0)
    with torch.inference_mode():
        reference = torch.nn.functional.normalize(tiny.model.encode_image(tiny.image_tensor([image])), dim=-1).numpy()
    with caplog.at_level("WARNING", logger=fastpath.log.name):
        assert np.allclose(tiny.encode_images([image]), reference, atol=1e-6)
    assert "int8 could not be built (runtime gone)" in caplog.text


def test_decisions_are_listed_for_models_speed(tiny, monkeypatch, capsys):
    from engine.cli import main
    from engine.models.decisions import remembered

    monkeypatch.setattr(fastpath, "candidates", lambda profile, **kw: [("int8", "test")])
    path = fastpath.apply_best(tiny, min_image_params=0)
    [entry] = remembered()
    assert entry.model == tiny.model_id and entry.kind == "CLIP image tower" and entry.current
    assert entry.by_batch == {b: v["path"] for b, v in path.details["by_batch"].items()}
    assert main(["models", "--speed"]) == 0
    out = capsys.readouterr().out
    assert tiny.model_id in out and "batch 1: " in out and "batch 12: " in out and "CLIP image tower" in out
    assert main(["models", "--speed", "--json"]) == 0
    import json

    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["model"] == tiny.model_id and set(row["paths"]) == {"batch 1", "batch 12"}


def test_a_changed_path_construction_is_probed_again(tiny, monkeypatch):
    monkeypatch.setattr(fastpath, "candidates", lambda profile, **kw: [])
    fastpath.apply_best(tiny, min_image_params=0)
    assert "earlier load" in fastpath.apply_best(tiny, min_image_params=0).reason
    monkeypatch.setattr(fastpath, "FASTPATH_VERSION", fastpath.FASTPATH_VERSION + 1)
    assert "earlier load" not in fastpath.apply_best(tiny, min_image_params=0).reason


@pytest.mark.parametrize("mode", ["int8", "bf16", "fp32", "onnx-fp32", "onnx-int8", "openvino-bf16", "openvino-fp32", "openvino-int8"])
def test_forced_paths(tiny, monkeypatch, mode):

    if mode.startswith("onnx") and not fastpath._onnx_available():
        pytest.skip("onnxruntime/onnx not installed")
    if mode.startswith("openvino"):
        require_openvino(int8=mode.endswith("int8"))
    monkeypatch.setenv("MEDLENS_INFERENCE", mode)
    path = fastpath.apply_best(tiny)
    assert path.name == mode and "forced by MEDLENS_INFERENCE" in path.reason
    if mode in ("bf16", "openvino-bf16") and not cpu_profile().native_bf16:
        assert "no bf16 hardware" in path.reason
    emb = tiny.encode_images([np.zeros((64, 64, 3), np.uint8), np.full((64, 64), 200, np.uint8)])
    assert emb.dtype == np.float32 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    if mode != "openvino-int8":  # an int8 tiny random model may well fail parity: that is reported, not asserted
        assert path.details["probe"][mode]["cos_image"] >= 0.99


def test_threads_override(tiny, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("MEDLENS_THREADS", "1")
    try:
        assert fastpath.apply_best(tiny).details["threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_failure_falls_back_to_fp32(tiny, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("simulated")

    monkeypatch.setattr(fastpath, "build_path", broken)
    path = fastpath.apply_best(tiny, min_image_params=0)
    assert path.name == "fp32" and "simulated" in path.reason
    assert tiny.encode_images([np.zeros((64, 64), np.uint8)]).shape == (1, 32)


def test_describe_names_path_isa_speed_and_cosine(tiny):
    same = {
        "isa": "AMX",
        "by_batch": {
            "1": {"path": "openvino-bf16", "speedup": 4.52, "cos_image": 0.99991},
            "12": {"path": "openvino-bf16", "speedup": 5.41, "cos_image": 0.99991},
        },
    }
    tiny.set_inference(InferencePath("openvino-bf16", "x", same))
    assert fastpath.describe(tiny) == "OpenVINO bf16 (AMX; 4.5x at batch 1, 5.4x at batch 12 faster than fp32 on probe, cosine 0.9999)"
    mixed = {
        "isa": "AMX",
        "by_batch": {
            "1": {"path": "fp32", "speedup": 1.0, "cos_image": 1.0},
            "12": {"path": "bf16", "speedup": 1.63, "cos_image": 0.99912},
        },
    }
    tiny.set_inference(InferencePath("1: fp32 | 12: bf16", "x", mixed, by_batch={1: "fp32", 12: "bf16"}))
    assert (
        fastpath.describe(tiny) == "batch 1: fp32; batch 12: bf16 weights (AMX; 1.6x at batch 12 faster than fp32 on probe, cosine 0.9991)"
    )


def test_label_result_names_the_path_that_ran(tiny, monkeypatch):
    from engine.zeroshot import label_images

    calls = {"a": 0, "b": 0}
    one = lambda x: calls.__setitem__("a", calls["a"] + 1) or tiny.model.encode_image(x)  # noqa: E731
    many = lambda x: calls.__setitem__("b", calls["b"] + 1) or tiny.model.encode_image(x)  # noqa: E731
    tiny.set_inference(
        InferencePath("1: fp32 | 12: bf16", "x", {}, by_batch={1: "fp32", 12: "bf16"}), fastpath.BatchDispatch({1: one, 12: many})
    )
    image = np.full((64, 64), 90, np.uint8)
    assert label_images([image], ["a", "b"], tiny).inference_path == "fp32" and calls == {"a": 1, "b": 0}
    assert label_images([image] * 12, ["a", "b"], tiny).inference_path == "bf16" and calls == {"a": 1, "b": 1}


def test_openvino_telemetry_stays_off(tmp_path):
    """Importing NNCF through openvino_path writes nothing under HOME (its telemetry would) and leaves CI alone."""
    import subprocess

    require_openvino(int8=True)
    code = (
        "import os; from engine.models import openvino_path as o\n"
        "with o.quiet_nncf() as nncf: import nncf.telemetry.wrapper as w; print(type(w.telemetry).__name__)\n"
        "print(os.environ.get('CI'), os.environ.get('NNCF_CI'))"
    )
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    env.pop("CI", None)
    env.pop("NNCF_CI", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["MagicMock", "None", "None"]
    assert list(tmp_path.iterdir()) == [], "nothing may be written under HOME (no ~/intel client id)"


def test_openvino_keeps_the_stem_convolution_out_of_bf16(tmp_path):
    """The first convolution of an IR saved with precise_stem runs in its own precision under a bf16 hint,
    the rest in bf16 (where the CPU computes bf16); without the mark the stem is bf16 too."""
    import xml.etree.ElementTree as ET

    from engine.models import openvino_path
    from engine.models.cpu import cpu_profile

    require_openvino()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3)).eval()
    x = torch.rand(2, 3, 24, 24)
    runs = {}
    for precise in (True, False):
        xml = openvino_path.save_ir(net, x[:1], tmp_path / f"m{precise}.xml", precise_stem=precise)
        convs = [el for el in ET.parse(xml).getroot().iter("layer") if el.get("type") == "Convolution"]
        marked = [any(a.get("name") == "DisablePrecisionConversion" for a in el.iter("attribute")) for el in convs]
        assert marked == [precise, False]
        forward = openvino_path.OpenVinoForward(xml, "bf16", 1)
        with torch.no_grad():
            assert torch.nn.functional.cosine_similarity(forward(x).flatten(1), net(x).flatten(1)).min() > 0.999
        precisions = openvino_path.runtime_precisions(forward)
        runs[precise] = (
            {v for k, v in precisions.items() if k.startswith("/fn/fn.0/Conv")},
            {v for k, v in precisions.items() if k.startswith("/fn/fn.2/Conv")},
        )
    if cpu_profile().native_bf16:
        (stem, rest), (plain_stem, _) = runs[True], runs[False]
        assert "bf16" not in stem and "bf16" in rest and "bf16" in plain_stem, runs


# --------------------------------------------------------------------------- parity on real images (ViT-B/16 + BERT-base)
def real_images(shared: Path) -> tuple[list[np.ndarray], list[str]]:
    from PIL import Image

    images, names = [], []
    for folder, pattern in PICKS:
        files = sorted((shared / folder).glob(pattern))
        files = [f for f in files if "mask" not in f.name][:2]
        if len(files) < 2:
            pytest.skip(f"{folder} has too few images")
        for f in files:
            images.append(np.asarray(Image.open(f).convert("RGB")))
            names.append(f"{folder.split('/')[0]}/{f.name}")
    return images, names


@pytest.fixture(scope="module")
def vitb(shared_data, tmp_path_factory):
    from _biomedclip_shape import biomedclip_shaped

    cache = tmp_path_factory.mktemp("fastpath-cache")
    old = os.environ.get("MEDLENS_FASTPATH_CACHE")
    os.environ["MEDLENS_FASTPATH_CACHE"] = str(cache)
    try:
        clip, _ = biomedclip_shaped(seed=0, text_dir=tmp_path_factory.mktemp("bert-base"))
        images, names = real_images(shared_data)
        clip.set_inference(InferencePath())
        reference = clip.encode_images(images)
        texts = clip.encode_texts(LABELS)
        yield clip, images, names, reference, texts
    finally:
        if old is None:
            os.environ.pop("MEDLENS_FASTPATH_CACHE", None)
        else:
            os.environ["MEDLENS_FASTPATH_CACHE"] = old


def order_violations(ref_scores: np.ndarray, scores: np.ndarray, tau: float = TAU) -> list[tuple[int, int]]:
    """Pairs (i, j) with ref_scores[i] > ref_scores[j] + tau whose order the fast path reversed."""
    bad = []
    for i in range(len(ref_scores)):
        for j in range(len(ref_scores)):
            if ref_scores[i] > ref_scores[j] + tau and scores[i] <= scores[j]:
                bad.append((i, j))
    return bad


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.mark.shared
@pytest.mark.parametrize("mode", ["int8", "onnx-int8", "onnx-fp32", "bf16", "openvino-bf16", "openvino-fp32"])
def test_parity_on_real_images(vitb, mode):

    if mode.startswith("onnx") and not fastpath._onnx_available():
        pytest.skip("onnxruntime/onnx not installed")
    if mode.startswith("openvino"):
        require_openvino()
    clip, images, names, reference, ref_text = vitb
    profile = cpu_profile()
    if mode == "openvino-bf16" and not profile.native_bf16:
        pytest.skip("no bf16 hardware: OpenVINO would emulate it")
    path = fastpath.build_path(clip, mode, profile, why="parity test")
    try:
        clip.set_inference(InferencePath(mode, "parity test"), path.image_forward, fastpath.trimmed_text_forward(clip))
        emb = clip.encode_images(images[:4] if mode == "bf16" and not profile.native_bf16 else images)  # emulated bf16 is slow
        text = clip.encode_texts(LABELS)
    finally:
        clip.set_inference(InferencePath())
    need = fastpath.MIN_COSINE[mode]
    ref = reference[: len(emb)]
    cos = (emb * ref).sum(1)
    assert cos.min() >= need, dict(zip(names, np.round(cos, 5)))
    assert (text * ref_text).sum(1).min() >= need

    # labels: order kept wherever fp32 separates two labels by more than TAU; ranks correlate
    ref_scores, scores = ref @ ref_text.T, emb @ text.T
    for k in range(len(emb)):
        assert not order_violations(ref_scores[k], scores[k]), (names[k], ref_scores[k], scores[k])
    assert np.mean([spearman(ref_scores[k], scores[k]) for k in range(len(emb))]) >= 0.9
    # retrieval: same nearest neighbour, same order wherever fp32 separates neighbours by > TAU
    ref_sim, sim = ref @ ref.T, emb @ emb.T
    np.fill_diagonal(ref_sim, -2)
    np.fill_diagonal(sim, -2)
    assert (ref_sim.argmax(1) == sim.argmax(1)).all()
    for k in range(len(emb)):
        assert not order_violations(ref_sim[k], sim[k]), names[k]


@pytest.mark.shared
def test_auto_choice_on_vit_b_is_never_slower(vitb, monkeypatch):
    """The full probe on a real-size model: per batch class, the path that runs beat fp32 there and keeps
    the answer on real images the probe never saw (../shared/data's, not the bundled calibration set)."""
    clip, images, names, reference, _ = vitb
    monkeypatch.delenv("MEDLENS_INFERENCE", raising=False)
    try:
        path = fastpath.apply_best(clip)
        probe = path.details["probe"]
        assert ("bf16" in probe) == cpu_profile().native_bf16
        for b, chosen in path.details["by_batch"].items():
            name = chosen["path"]
            if name != "fp32":
                assert probe[name]["speedup"][b] >= fastpath.MIN_SPEEDUP
            batch = images[: int(b)]
            emb = clip.encode_images(batch, batch_size=int(b))
            assert clip.path.name_for(len(batch)) == name
            assert (emb * reference[: len(batch)]).sum(1).min() >= fastpath.MIN_COSINE[name], (b, name)
        assert fastpath.describe(clip)
    finally:
        clip.set_inference(InferencePath())
