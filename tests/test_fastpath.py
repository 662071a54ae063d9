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
from engine.models.cpu import CpuProfile, cpu_profile, parse_cpuinfo

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

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
def test_candidates_follow_the_hardware():
    spr = profile_of(SAPPHIRE_RAPIDS, capability="AVX512")
    names = [n for n, _ in fastpath.candidates(spr, onnx_available=True)]
    assert names[0] == "bf16" and "int8" in names and "onnx-int8" in names
    epyc = profile_of(EPYC_AVX2)
    names = [n for n, _ in fastpath.candidates(epyc, onnx_available=True)]
    assert "bf16" not in names, "an AVX2-only CPU emulates bf16 (10x slower on EPYC): never a candidate"
    assert names == ["int8", "onnx-int8"]
    assert [n for n, _ in fastpath.candidates(epyc, onnx_available=False)] == ["int8"]
    icl = profile_of(ICE_LAKE, capability="AVX512")
    assert dict(fastpath.candidates(icl, onnx_available=False)) == {"int8": "AVX-512 VNNI"}
    arm = profile_of(GRAVITON3, machine="aarch64", capability="SVE256")
    assert [n for n, _ in fastpath.candidates(arm, onnx_available=False)] == ["bf16", "int8"]
    old = CpuProfile(model="old", machine="x86_64", flags=frozenset(), capability="DEFAULT")
    assert fastpath.candidates(old, onnx_available=True) == []


def test_rule_based_choice_without_probe():
    assert fastpath.rule_based(profile_of(SAPPHIRE_RAPIDS, capability="AVX512"))[0] == "bf16"
    assert fastpath.rule_based(profile_of(EPYC_AVX2))[0] == "fp32"
    assert fastpath.rule_based(profile_of(ICE_LAKE, capability="AVX512"))[0] == "fp32"  # int8 only when measured


def built(name, ms1, ms4, cos, status="probed"):
    b = fastpath.Built(name, f"why {name}")
    b.ms, b.cos_image, b.status = {1: ms1, 4: ms4}, cos, status
    return b


def test_choose_fastest_path_that_keeps_the_answer():
    fp32 = built("fp32", 200, 190, 1.0)
    name, reason = fastpath.choose([fp32, built("int8", 140, 95, 0.998), built("onnx-int8", 120, 100, 0.999)])
    assert name == "onnx-int8" and "1.7x" in reason  # best of the worst-case speed-ups (190/100 vs 200/120)
    # AMX: bf16 wins by far; int8 fails parity
    name, reason = fastpath.choose([fp32, built("bf16", 50, 30, 0.9999), built("int8", 140, 95, 0.990)])
    assert name == "bf16" and "cosine 0.9999" in reason


def test_choose_never_slower_and_never_below_parity():
    fp32 = built("fp32", 200, 190, 1.0)
    # AVX2-only EPYC forced through bf16 would be 10x slower; int8 faster at batch 16 only
    paths = [fp32, built("bf16", 2066, 1900, 0.9999), built("int8", 210, 120, 0.998)]
    name, reason = fastpath.choose(paths)
    assert name == "fp32" and "no path beat fp32" in reason
    assert paths[1].status.startswith("rejected") and paths[2].status.startswith("rejected")
    # fast but wrong
    name, _ = fastpath.choose([fp32, built("int8", 50, 40, 0.99)])
    assert name == "fp32"
    # bf16 needs 0.999, int8 0.995
    assert fastpath.choose([fp32, built("bf16", 50, 40, 0.998)])[0] == "fp32"
    assert fastpath.choose([fp32, built("int8", 50, 40, 0.996)])[0] == "int8"
    # a path that failed to build is skipped
    assert fastpath.choose([fp32, built("onnx-int8", 0, 0, None, status="error: ImportError")])[0] == "fp32"


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


def test_probe_runs_and_keeps_fp32_model_intact(tiny):
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    images = [np.full((80, 80), 40 * i, np.uint8) for i in range(3)]
    reference = tiny.encode_images(images)
    path = fastpath.apply_best(tiny, min_image_params=0)
    probe = path.details["probe"]
    assert probe["fp32"]["status"] == "probed" and set(probe) >= {"fp32", "int8"}
    assert path.name in fastpath.PATHS and path.details["threads"] == torch.get_num_threads()
    if path.name != "fp32":  # whatever won must have beaten fp32 at both batch sizes and kept parity
        assert all(s >= fastpath.MIN_SPEEDUP for s in probe[path.name]["speedup"].values())
        assert probe[path.name]["cos_image"] >= fastpath.MIN_COSINE[path.name]
    out = tiny.encode_images(images)
    assert (out * reference).sum(1).min() >= 0.99
    for k, v in tiny.model.state_dict().items():  # the fp32 model is untouched: heatmaps need it
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), k
    pixels = tiny.image_tensor(images[:1]).requires_grad_(True)
    tiny.encode_image_tensor(pixels).sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    again = fastpath.apply_best(tiny, min_image_params=0)  # decision remembered on disk
    assert again.name == path.name and "earlier load" in again.reason


@pytest.mark.parametrize("mode", ["int8", "bf16", "fp32", "onnx-int8"])
def test_forced_paths(tiny, monkeypatch, mode):
    if mode == "onnx-int8" and not fastpath._onnx_available():
        pytest.skip("onnxruntime/onnx not installed")
    monkeypatch.setenv("MEDLENS_INFERENCE", mode)
    path = fastpath.apply_best(tiny)
    assert path.name == mode and "forced by MEDLENS_INFERENCE" in path.reason
    if mode == "bf16" and not cpu_profile().native_bf16:
        assert "no bf16 hardware" in path.reason
    emb = tiny.encode_images([np.zeros((64, 64, 3), np.uint8)])
    assert emb.dtype == np.float32 and abs(np.linalg.norm(emb) - 1) < 1e-4


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
    tiny.set_inference(InferencePath("int8", "x", {"isa": "AVX-512 VNNI", "speedup": 1.63, "cos_image": 0.99912}))
    assert fastpath.describe(tiny) == "int8 dynamic (AVX-512 VNNI, 1.6x faster than fp32 on probe, cosine 0.9991)"


# --------------------------------------------------------------------------- parity on real images (ViT-B/16 + BERT-base)
def real_images(shared: Path) -> tuple[list[np.ndarray], list[str]]:
    from PIL import Image

    picks = [
        ("xray/nih_cxr14_1000/images", "*.png"),
        ("ultrasound/busi/images", "*/*.png"),
        ("pathology/lc25000_lung/images", "*.jpeg"),
        ("dermatology/ham10000/images", "*.jpg"),
    ]
    images, names = [], []
    for folder, pattern in picks:
        files = sorted((shared / folder).glob(pattern))
        files = [f for f in files if "mask" not in f.name][:2]
        if len(files) < 2:
            pytest.skip(f"{folder} has too few images")
        for f in files:
            images.append(np.asarray(Image.open(f).convert("RGB")))
            names.append(f"{folder.split('/')[0]}/{f.name}")
    return images, names


LABELS = [
    "pneumonia",
    "a normal chest x-ray",
    "a benign breast mass on ultrasound",
    "a malignant breast tumour",
    "lung adenocarcinoma",
    "benign lung tissue",
    "melanoma",
    "a melanocytic nevus",
]


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
@pytest.mark.parametrize("mode", ["int8", "onnx-int8", "bf16"])
def test_parity_on_real_images(vitb, mode):
    if mode == "onnx-int8" and not fastpath._onnx_available():
        pytest.skip("onnxruntime/onnx not installed")
    clip, images, names, reference, ref_text = vitb
    profile = cpu_profile()
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
    clip, images, names, reference, _ = vitb
    monkeypatch.delenv("MEDLENS_INFERENCE", raising=False)
    try:
        path = fastpath.apply_best(clip)
        probe = path.details["probe"]
        assert "bf16" in probe if cpu_profile().native_bf16 else "bf16" not in probe
        if path.name != "fp32":
            assert all(s >= fastpath.MIN_SPEEDUP for s in probe[path.name]["speedup"].values())
            emb = clip.encode_images(images)
            assert (emb * reference).sum(1).min() >= fastpath.MIN_COSINE[path.name]
        text = fastpath.describe(clip)
        assert text.startswith(fastpath.LABELS[path.name])
    finally:
        clip.set_inference(InferencePath())
