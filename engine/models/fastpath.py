"""Pick the fastest CPU inference path that keeps the answer, per machine and per batch size, and say which.

`apply_best(clip_model)` is called by `load_model`. It
1. reads the CPU (`engine.models.cpu.cpu_profile`) and sets torch's threads
   to the physical cores this process may use (MEDLENS_THREADS overrides);
2. lists the paths this CPU makes worth trying (`candidates`):
   - `bf16`: a bf16 copy of the image tower, only where the hardware computes
     bf16 (AMX, AVX512-BF16, ARM BF16). Without it torch emulates bf16 and is
     2-10x *slower* than fp32 (measured: AMD EPYC AVX2 10x, Ice Lake AVX-512
     without BF16 about 2x), so such a CPU never gets it from `auto`. A
     ResNet-style trunk keeps its stem and first stage in fp32 (`_bf16_twin`);
   - `openvino-bf16` (bf16 CPUs) / `openvino-fp32` (other x86): the tower
     exported once to an OpenVINO IR and compiled with that precision hint;
     `openvino-int8`: the same IR quantised by NNCF (static, SmoothQuant off)
     on real images, judged on held-out ones with a margin (`candidates`)
     (engine.models.openvino_path; only with `pip install 'medlens[fast]'`);
   - `int8`: torch dynamic int8 quantisation of every nn.Linear of the image
     tower (fbgemm/oneDNN on x86 with AVX2+, VNNI where present; qnnpack on ARM);
   - `onnx-fp32`: the tower exported to ONNX and run by ONNX Runtime in fp32
     (same arithmetic, so it keeps the answer exactly: cosine >= 0.99999;
     its graph folds BatchNorm into convolutions and fuses activations,
     which made the shipped ResNet trunk 2.6-4.8x cheaper than torch fp32
     on a busy AMX machine; it is what a CPU without bf16 hardware gets
     for that trunk when no reduced precision keeps its answers);
   - `onnx-int8`: the same ONNX file dynamically quantised by ONNX Runtime
     (cached on disk: export + quantisation take 10-20 s).
   Where the CPU computes bf16 and OpenVINO is installed, the two dynamic
   int8 paths are not probed: on the AMX Xeon of bench/results they were
   2.5-3x slower than OpenVINO bf16 on ViT-B/16 and the ResNet trunk.
3. probes them against fp32 on real images (engine.models.calibration:
   pydicom's and nibabel's bundled scans unless told otherwise, as the app
   sends them to the model; synthetic colour textures only widen static
   int8's calibration, never judge parity: see `_probe_and_install`) at each
   batch-size class the engine runs (`PROBE_BATCHES`: 1, a single 2D image;
   12, the slices of a volume and the batches of an index run), interleaved
   repeats, minimum time; and checks that embeddings keep cosine >= 0.999
   (bf16) or >= 0.995 (int8) to fp32 and that the ranking of probe labels
   is kept wherever fp32 separates two labels by more than `LABEL_TAU`;
4. per batch class, keeps the fastest path that passes and is at least
   `MIN_SPEEDUP` faster than fp32 *at that class*, else fp32;
5. installs one forward that dispatches on the batch size (`BatchDispatch`)
   and remembers the decision on disk (engine.models.decisions: keyed by
   model id, CPU, versions and threads), so the next load builds only the
   winners.

Why per batch class: a probe at batch 1 and 4 chose ONNX Runtime int8 on an
AMX Xeon (3.2x at batch 1) while plain bf16 was 4.3x at batch 16; and the
shipped ResNet trunk at 96 px ran torch bf16 *slower* than fp32 at batch 1
(55.7 vs 46.8 ms/img) but 1.6x faster at batch 4. One choice for all sizes
is wrong somewhere; the engine sends 1 image (a 2D scan, search by example)
or 12 (a volume's slices, indexing), so those are the classes, and a batch
size goes to the nearest class on a log scale (2-3 -> 1, 4 and up -> 12).

Other decisions
- The fp32 `clip_model.model` is never modified: heatmaps need its
  gradients. Fast paths are copies (int8 ViT-B: ~90 MB; bf16: ~170 MB; an
  OpenVINO IR is kept on disk, fp16 weights, ~170 MB for ViT-B). If the fp32
  weights are changed in place afterwards, call `apply_best` again.
- Text stays fp32 on every path: label-set embeddings are cached by
  ClipModel, and a query is short. What makes text fast is cutting the
  padding: HF text towers pad every prompt to the context length (256 for
  BiomedCLIP) and mask the pads, so trailing all-pad columns are cut before
  the forward; the output is the same (checked at load, cosine >= 0.99999).
- Tiny models (image tower < MIN_IMAGE_PARAMS) skip the probe: nothing to gain.
- Every path but the fp32 reference runs `embedding_tower.embedding_only`:
  a class-token ViT's last block for the class token alone (the same
  embedding, 6.9% fewer multiply-adds on ViT-B/16; the ResNet trunk is
  unchanged). On the AMD EPYC, OpenVINO int8 at batch 16: 52.1 -> 49.0 ms/img.
- MEDLENS_INFERENCE=auto|<path> forces a path for every batch size (its
  parity is still measured and reported); MEDLENS_FASTPATH_CACHE=<folder>|off
  moves or disables the disk cache; MEDLENS_CALIBRATION_IMAGES=<folder>
  calibrates and checks on the user's own scans.
- `apply_best` never raises: any failure leaves fp32 and says why.
- Measured (2 threads, torch 2.14.1; bench/results/clip_throughput*.md and
  path_options.md have the tables and the commands):
  - Ice Lake, AVX-512 VNNI without BF16, BiomedCLIP-shaped ViT-B/16: fp32
    210/154 ms/img at batch 1/16, ONNX Runtime int8 97/95 (cosine 0.999),
    torch int8 ~145/95 (cosine 0.997).
  - Xeon with AMX (Sapphire Rapids class), quiet moments of a shared
    machine, the same ViT-B/16 at batch 1/12/16 (tower alone): fp32
    143/118/113 ms/img; OpenVINO bf16 35/26/25 (cosine 0.9999); torch bf16
    weights 49/26/25; AOTInductor bf16 (torch.export, dynamic batch, 26 s to
    compile once) 37/29/28; torch.compile bf16 (inductor, freezing) ~30/20 at
    batch 1/16 but 30 s of compilation per batch shape and process, so not a
    path; OpenVINO int8 (NNCF) 30/18/17.5 but cosine 0.81 on dermoscopy it was
    not calibrated on, which NNCF's SmoothQuant caused: without it the same
    speed and cosine >= 0.996 on 160 unseen real images of four modalities,
    so it is now a candidate on every x86 CPU with OpenVINO and NNCF and won
    both classes on this machine (bench/results/clip_throughput.md); ONNX Runtime int8 49/39/38; ONNX Runtime fp32 and
    OpenVINO fp32 within 0.9-1.3x of torch fp32.
  - The shipped medlens-clip (ResNet-152 trunk, 96 px) on the same machine:
    fp32 51/17.5/16.8 ms/img; ONNX Runtime fp32 25/12.5/12.4 (bit-for-bit
    the same answers: BatchNorm folded, fused graph); torch bf16 46/9.7/8.7
    (cosine 0.996: rejected); OpenVINO bf16 14/3.1/2.8, first rejected
    (cosine 0.998 on bundled MR slices), then chosen once its stem
    convolution stays fp32 (engine.models.openvino_path.keep_out_of_bf16:
    cosine 0.9990 on the probe, 0 label-order flips on 16 real images of
    four kinds, 5.8x/5.7x at batch 1/16 end to end:
    bench/results/clip_throughput_medlens-clip.md); int8 paths cosine
    0.77-0.96.
  - With another job on the cores torch's fp32 fell to ~1600 ms/img at
    batch 1 (its OpenMP threads wait for each other at every operator) while
    ONNX Runtime stayed near 270: the probe runs on the machine as it is at load.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import logging
import math
import os
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from engine import settings
from engine.models import decisions, embedding_tower, openvino_path
from engine.models.clip import ClipModel, InferencePath
from engine.models.cpu import CpuProfile, cpu_profile

log = logging.getLogger(__name__)

FASTPATH_VERSION = 6  # bump when a path's construction or the probe changes: invalidates cached decisions
PATHS = ("fp32", "bf16", "int8", "onnx-fp32", "onnx-int8", "openvino-bf16", "openvino-fp32", "openvino-int8")
MIN_COSINE = {
    "fp32": 0.99999,
    "bf16": 0.999,
    "int8": 0.995,
    "onnx-fp32": 0.99999,
    "onnx-int8": 0.995,
    "openvino-bf16": 0.999,
    "openvino-fp32": 0.9999,
    "openvino-int8": 0.995,
}
TEXT_TRIM_MIN_COSINE = 0.99999
# Static int8 calibrated on the generic bundled scans (not the user's) must clear MIN_COSINE by this much on the
# held-out probe images: on unseen real images its cosine fell 0.0023 below the held-out probe's (0.9984 ->
# 0.9961, 160 images of four modalities, random-weight ViT-B/16), so a bare pass on the probe is not enough.
GENERIC_INT8_MARGIN = 0.002
MIN_SPEEDUP = 1.1  # a fast path must beat fp32 by 10% at a batch class to run it (noise margin)
MIN_IMAGE_PARAMS = 5_000_000  # below this (test models) the probe costs more than it saves
# 1: a 2D image (labels, search by example); 12: a volume's slices (engine.zeroshot.imaging.DEFAULT_SLICES,
# engine.library.store.VOLUME_SLICES) and an index run's batches. tests/test_fastpath.py checks they agree.
PROBE_BATCHES = (1, 12)
PROBE_REPEATS = 3  # interleaved rounds; the minimum is kept (2 let one busy moment decide a class on a shared machine)
STATIC_INT8 = ("openvino-int8",)  # calibrated on the probe's even images, so judged on its odd ones
PROBE_SYNTHETIC = 8  # synthetic colour images added to the real ones (see _probe_and_install)
LABEL_TAU = 0.01  # score gap (cosine units; 1 logit at CLIP's scale 100) above which a label order must be kept
LABELS = {
    "fp32": "fp32",
    "bf16": "bf16 weights",
    "int8": "int8 dynamic",
    "onnx-fp32": "ONNX Runtime fp32",
    "onnx-int8": "ONNX Runtime int8",
    "openvino-bf16": "OpenVINO bf16",
    "openvino-fp32": "OpenVINO fp32",
    "openvino-int8": "OpenVINO int8",
}
PROBE_TEXTS = (
    "a chest x-ray with pneumonia",
    "a normal chest radiograph",
    "an ultrasound image of a benign breast mass",
    "histopathology of lung adenocarcinoma",
    "a dermoscopy image of a melanoma",
    "an axial CT slice of the abdomen",
    "a brain MRI",
)

_apply_lock = threading.Lock()


@dataclass
class Built:
    """One inference path ready to run, with what the probe found."""

    name: str
    why: str  # why it is tried on this CPU
    image_forward: Callable[[torch.Tensor], torch.Tensor] | None = None  # None: the fp32 model's
    build_s: float = 0.0
    ms: dict[int, float] = field(default_factory=dict)  # batch class -> ms per image (probe minimum, wall)
    cpu_ms: dict[int, float] = field(default_factory=dict)  # batch class -> process CPU ms per image (minimum)
    cos_image: float | None = None
    labels_ok: bool | None = None  # ranked probe labels kept (None: not checked)
    min_cosine: float | None = None  # None: MIN_COSINE[name]; higher for static int8 calibrated on generic images
    label_note: str = ""
    status: str = "not probed"
    keep: object = None  # the module/session the forward closes over (kept alive)


class BatchDispatch:
    """One image forward that runs each batch on the path chosen for its batch-size class."""

    def __init__(self, forwards: dict[int, Callable[[torch.Tensor], torch.Tensor]]):
        self.forwards = dict(forwards)
        self.classes = tuple(sorted(self.forwards))

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forwards[batch_class(len(pixels), self.classes)](pixels)


# --------------------------------------------------------------------------- decisions (pure)
def batch_class(n: int, classes: Sequence[int] = PROBE_BATCHES) -> int:
    """The probed batch size nearest to n on a log scale (ties go to the smaller class)."""
    n = max(1, int(n))
    return min(sorted(classes), key=lambda c: abs(math.log(n / c)))


def candidates(
    profile: CpuProfile,
    *,
    onnx_available: bool | None = None,
    openvino_available: bool | None = None,
    nncf_available: bool | None = None,
) -> list[tuple[str, str]]:
    """Paths worth probing on this CPU besides fp32, each with the reason, best guess first.

    Static int8 (openvino-int8) is tried on the generic bundled scans too, not only on the user's own
    (MEDLENS_CALIBRATION_IMAGES): quantised with SmoothQuant it kept cosine 0.9987 on them and fell to
    0.81-0.993 on unseen photographs and x-rays, so it was once gated on the user's images; without
    SmoothQuant (engine.models.openvino_path.quantize_ir) it kept >= 0.996 on 160 unseen real images of
    four modalities (random-weight ViT-B/16, AMX). It must still clear `GENERIC_INT8_MARGIN` on the held-out
    probe images when calibrated on the generic set (see `passes_parity`)."""
    onnx_available = _onnx_available() if onnx_available is None else onnx_available
    openvino_available = openvino_path.available() if openvino_available is None else openvino_available
    nncf_available = openvino_path.int8_available() if nncf_available is None else nncf_available
    x86_simd = has_x86_simd(profile)
    out = float_candidates(profile, openvino_available)
    int8_isa = None
    if x86_simd:
        int8_isa = (
            "AMX-INT8"
            if "amx_int8" in profile.flags
            else "AVX-512 VNNI"
            if "avx512_vnni" in profile.flags
            else "AVX-VNNI"
            if "avx_vnni" in profile.flags
            else profile.isa
        )
    elif profile.is_arm:
        int8_isa = "ARM i8mm" if "i8mm" in profile.flags else "ARM dot product" if "asimddp" in profile.flags else "ARM NEON"
    if x86_simd and openvino_available and nncf_available:
        out.append(("openvino-int8", f"OpenVINO + NNCF int8 on {int8_isa}"))
    if onnx_available and (x86_simd or profile.is_arm):
        out.append(("onnx-fp32", "ONNX Runtime: fused graph, same fp32 arithmetic"))
    dynamic_int8_wins_never = profile.native_bf16 and x86_simd and openvino_available
    if int8_isa and not dynamic_int8_wins_never:
        out.append(("int8", int8_isa))
        if onnx_available:
            out.append(("onnx-int8", int8_isa))
    return out


def has_x86_simd(profile: CpuProfile) -> bool:
    return profile.is_x86 and ("avx2" in profile.flags or "avx512f" in profile.flags or profile.capability in ("AVX2", "AVX512"))


def float_candidates(profile: CpuProfile, openvino_available: bool) -> list[tuple[str, str]]:
    """The reduced- or same-precision float paths (also the Q-Former encoders' candidates): bf16 only where
    the hardware computes it; OpenVINO on x86 with AVX2 or better."""
    x86_simd, out = has_x86_simd(profile), []
    if profile.native_bf16:
        if x86_simd and openvino_available:
            out.append(("openvino-bf16", f"OpenVINO on {profile.isa}: bf16 in hardware"))
        out.append(("bf16", f"{profile.isa} computes bf16 in hardware"))
    elif x86_simd and openvino_available:
        out.append(("openvino-fp32", f"OpenVINO on {profile.isa}"))
    return out


def rule_based(profile: CpuProfile) -> tuple[str, str]:
    """The path chosen from CPU flags alone (probe=False): torch bf16 where the hardware has it, else fp32.

    int8 is never chosen unmeasured: whether it keeps the answer depends on the weights."""
    if profile.native_bf16:
        return "bf16", f"{profile.isa} computes bf16 in hardware (chosen from CPU flags, not measured)"
    return "fp32", f"no bf16 hardware ({profile.isa}); int8 needs a probe to show it keeps the answer"


def passes_parity(r: Built) -> bool:
    """Cosine and label order (sets r.status when it fails)."""
    if r.status.startswith("error"):
        return False
    need = r.min_cosine if r.min_cosine is not None else MIN_COSINE[r.name]
    if r.cos_image is None or r.cos_image < need:
        r.status = f"rejected: cosine {r.cos_image if r.cos_image is None else round(r.cos_image, 5)} < {need}"
        return False
    if r.labels_ok is False:
        r.status = f"rejected: ranked labels changed ({r.label_note})"
        return False
    return True


def choose(results: list[Built], classes: Sequence[int] = PROBE_BATCHES, min_speedup: float = MIN_SPEEDUP) -> dict[int, tuple[str, str]]:
    """{batch class: (path name, reason)} from probe results; results[0] is fp32. Pure, for tests."""
    base = results[0]
    passing = [r for r in results[1:] if passes_parity(r)]
    out: dict[int, tuple[str, str]] = {}
    for b in classes:
        gains = {r.name: base.ms[b] / r.ms[b] for r in passing if b in base.ms and r.ms.get(b, 0) > 0}
        best = max(gains, key=gains.get, default=None)
        if best is not None and gains[best] >= min_speedup:
            r = next(r for r in passing if r.name == best)
            out[b] = (best, f"{r.why}; {gains[best]:.1f}x faster than fp32 at batch {b} on probe, cosine {r.cos_image:.4f}")
            continue
        tried = [f"{r.name} {r.status.removeprefix('rejected: ')}" for r in results[1:] if r.status.startswith(("rejected", "error"))]
        tried += [f"{name} {gain:.2f}x" for name, gain in gains.items()]
        out[b] = ("fp32", f"no path beat fp32 at batch {b} and kept the answer ({', '.join(tried) or 'no faster path for this CPU'})")
    for r in passing:
        won = [str(b) for b, (name, _) in out.items() if name == r.name]
        r.status = f"chosen for batch {', '.join(won)}" if won else f"passed; slower than the winner or < {min_speedup}x"
    return out


def order_flips(ref_scores: np.ndarray, scores: np.ndarray, tau: float = LABEL_TAU) -> int:
    """Pairs (i, j) with ref_scores[i] > ref_scores[j] + tau whose order `scores` reverses (per row, summed)."""
    ref_scores, scores = np.atleast_2d(ref_scores), np.atleast_2d(scores)
    gap = ref_scores[:, :, None] - ref_scores[:, None, :]
    flipped = scores[:, :, None] <= scores[:, None, :]
    return int(((gap > tau) & flipped).sum())


# --------------------------------------------------------------------------- environment
def _onnx_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def configure_threads(profile: CpuProfile) -> int:
    """torch threads = physical cores this process may use (MEDLENS_THREADS overrides)."""
    try:
        threads = settings.THREADS.get()
    except settings.SettingsError as exc:
        log.warning("%s; ignored", exc)
        threads = None
    if threads:
        torch.set_num_threads(threads)
    elif torch.get_num_threads() > profile.cores:
        torch.set_num_threads(profile.cores)
    return torch.get_num_threads()


def _decision_key(clip: ClipModel, profile: CpuProfile, threads: int) -> str:
    # the user's calibration folder decides whether static int8 is tried: pointing it elsewhere means a new probe
    return decisions.key(
        FASTPATH_VERSION, clip.model_id, profile.to_dict(), decisions.versions(), threads, str(settings.CALIBRATION_IMAGES.get() or "")
    )


# --------------------------------------------------------------------------- building paths
def _image_params(clip: ClipModel) -> int:
    return sum(p.numel() for p in clip.model.visual.parameters())


def _is_transformer(module: torch.nn.Module) -> bool:
    return any("attention" in type(m).__name__.lower() for m in module.modules())


def _frozen_copy(module: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    with torch.no_grad():
        twin = copy.deepcopy(module).eval()
        if dtype is not None:
            twin = twin.to(dtype)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def _bf16_twin(visual: torch.nn.Module) -> torch.nn.Module:
    """A bf16 copy of the image tower that takes and gives float32.

    A ResNet-style trunk (stages `layer1`..`layer4`, as timm and torchvision name them) keeps its stem and
    first stage in fp32; the later stages run in bf16 and the pooling and head after them in fp32 again. Why:
    bf16 keeps 8 significant bits, and the error made at full resolution is carried through every later block.
    On the shipped ResNet-152 (AMD EPYC with AVX512-BF16, 21 probe images, batch 16) the worst cosine to fp32 was
    0.99713 all in bf16 (below the 0.999 parity bar), 0.99884 with the stem in fp32 and 0.99928 with the stem and
    layer1 in fp32, at 1.66x fp32's speed against 1.75x. Other towers (ViTs) go to bf16 whole."""
    twin = _frozen_copy(visual)
    trunk = getattr(twin, "trunk", None)
    stages = [getattr(trunk, f"layer{i}", None) for i in range(1, 5)]
    in_bf16 = stages[1:] if all(isinstance(s, torch.nn.Module) for s in stages) else [twin]
    with torch.no_grad():
        for module in in_bf16:
            module.to(torch.bfloat16)
    # the bf16 run is consecutive modules: cast on the way into the first and out of the last
    in_bf16[0].register_forward_pre_hook(lambda _m, args: (args[0].to(torch.bfloat16), *args[1:]))
    in_bf16[-1].register_forward_hook(lambda _m, _args, out: out.float())
    return twin


def build_path(
    clip: ClipModel,
    name: str,
    profile: CpuProfile,
    why: str = "",
    calibration: torch.Tensor | None = None,
    keep_compiled: bool = False,
) -> Built:
    """One inference path for the image tower (a copy; clip.model stays fp32).

    `calibration`: preprocessed real images for openvino-int8 (default: engine.models.calibration's set).
    `keep_compiled`: an OpenVINO path keeps its compiled model in the cache folder (for a path already chosen)."""
    start = time.perf_counter()
    visual = clip.model.visual
    # The reference runs open_clip's tower as built; every other path runs the same embedding without the work
    # it never reads (a class-token ViT's last block for the class token only: engine.models.embedding_tower).
    tower = visual if name == "fp32" else embedding_tower.embedding_only(visual) or visual
    if name == "fp32":
        built = Built("fp32", why or "reference", lambda pixels, _m=visual: _m(pixels))
    elif name == "bf16":
        twin = _bf16_twin(tower)
        built = Built("bf16", why, lambda pixels, _m=twin: _m(pixels), keep=twin)
    elif name == "int8":
        if profile.is_arm and "qnnpack" in torch.backends.quantized.supported_engines:
            torch.backends.quantized.engine = "qnnpack"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
            qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
            twin = torch.ao.quantization.quantize_dynamic(_frozen_copy(tower), {torch.nn.Linear: qconfig})
        built = Built("int8", why, lambda pixels, _m=twin: _m(pixels), keep=twin)
    elif name in ("onnx-fp32", "onnx-int8"):
        session = _onnx_session(clip, tower, profile, quantized=name == "onnx-int8")
        input_name = session.get_inputs()[0].name

        def onnx_forward(pixels: torch.Tensor, _s=session, _i=input_name) -> torch.Tensor:
            arr = np.ascontiguousarray(pixels.detach().to("cpu", torch.float32).numpy())
            return torch.from_numpy(_s.run(None, {_i: arr})[0])

        built = Built(name, why, onnx_forward, keep=session)
    elif name.startswith("openvino-") and name in PATHS:
        forward = _openvino_forward(clip, tower, name, profile, calibration, keep_compiled)
        built = Built(name, why, forward, keep=forward)
    else:
        raise ValueError(f"unknown inference path '{name}' (known: {', '.join(PATHS)})")
    built.build_s = time.perf_counter() - start
    return built


def _openvino_forward(
    clip: ClipModel, visual: torch.nn.Module, name: str, profile: CpuProfile, calibration: torch.Tensor | None, keep_compiled: bool = False
):
    """The image tower `visual` as an OpenVINO IR (cached), int8-quantised for openvino-int8, compiled for this CPU."""
    base = decisions.key(FASTPATH_VERSION, clip.model_id, decisions.versions())
    example = torch.zeros(1, 3, clip.image_size, clip.image_size)
    folder = decisions.cache_dir()
    xml, tmp = openvino_path.cached_ir(folder, f"image-{base}.xml", lambda t: openvino_path.save_ir(visual, example, t, precise_stem=True))
    precision = (
        "f32" if name == "openvino-fp32" else "bf16" if name == "openvino-bf16" else openvino_path.precision_for(profile.native_bf16)
    )
    tmp_q = None
    if name == "openvino-int8":
        if calibration is None:  # a cached decision: the same images the probe calibrated on, so the same IR
            calibration = static_int8_calibration(clip)
        transformer = _is_transformer(visual)
        fingerprint = hashlib.sha256(calibration.float().numpy().tobytes()).hexdigest()[:16]
        samples = [calibration[i : i + 1] for i in range(len(calibration))]
        fp32_ir = xml
        xml, tmp_q = openvino_path.cached_ir(
            folder,
            f"image-int8-{decisions.key(base, fingerprint, transformer)}.xml",
            lambda t: openvino_path.quantize_ir(fp32_ir, t, samples, transformer=transformer),
        )
    compiled = openvino_path.compiled_cache(folder) if keep_compiled else None
    forward = openvino_path.OpenVinoForward(xml, precision, torch.get_num_threads(), compiled)
    for t in (tmp, tmp_q):
        if t is not None:
            t.cleanup()
    return forward


def _onnx_session(clip: ClipModel, visual: torch.nn.Module, profile: CpuProfile, *, quantized: bool):
    """An ONNX Runtime session of the image tower (fp32, or dynamically int8-quantised), exported once and
    cached on disk (ViT-B/16: 350 MB fp32, 90 MB int8)."""
    import onnxruntime as ort

    reduce_range = not profile.vnni  # u8s8 without VNNI can saturate: 7-bit weights avoid it
    key = decisions.key(FASTPATH_VERSION, clip.model_id, decisions.versions())
    folder = decisions.cache_dir()
    tmpdir = None
    if folder is None:
        tmpdir = tempfile.TemporaryDirectory(prefix="medlens-onnx-", ignore_cleanup_errors=True)
        folder = Path(tmpdir.name)
    fp32 = folder / f"image-fp32-{key}.onnx"
    int8 = folder / f"image-int8-{decisions.key(key, reduce_range)}.onnx"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not fp32.is_file() and not (quantized and int8.is_file()):
            partial = fp32.with_suffix(f".{os.getpid()}.partial")
            openvino_path.export_onnx(visual, torch.zeros(1, 3, clip.image_size, clip.image_size), partial)
            partial.replace(fp32)
        if quantized and not int8.is_file():
            _quantize_dynamic(fp32, int8, reduce_range)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        # Spinning ORT threads would steal the cores torch needs next (text, heatmaps).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(int8 if quantized else fp32), options, providers=["CPUExecutionProvider"])
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()


def _quantize_dynamic(fp32: Path, target: Path, reduce_range: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    partial = target.with_suffix(f".{os.getpid()}.partial")
    logging.disable(logging.WARNING)  # the quantiser logs a line per tensor on the root logger
    try:
        quantize_dynamic(str(fp32), str(partial), weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce_range)
    finally:
        logging.disable(logging.NOTSET)
    partial.replace(target)


# --------------------------------------------------------------------------- text
def trimmed_text_forward(clip: ClipModel) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A text forward that cuts trailing all-pad columns, for towers where pads are masked."""
    text = getattr(clip.model, "text", None)
    config = getattr(text, "config", None)
    pad = getattr(config, "pad_token_id", None)
    if text is None or pad is None or type(text).__name__ != "HFTextEncoder":
        return None  # open_clip's own text transformer adds a fixed-length positional table
    encode = clip.model.encode_text

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        used = (tokens != pad).any(dim=0).nonzero()
        if used.numel():
            tokens = tokens[:, : int(used.max()) + 1]
        return encode(tokens)

    return forward


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return (a * b).sum(-1)


def _check_text(clip: ClipModel, forward) -> float:
    """Cosine between the trimmed forward and the padded one on a few prompts.

    The reference keeps 16 pad columns past the longest prompt rather than all
    of them: it exercises the same masking at a fraction of the cost (BERT-base
    at context 256 takes ~0.3 s per prompt on 2 cores)."""
    tokens = clip.tokenizer(["pneumonia", PROBE_TEXTS[2]])  # two lengths: the short one has pads inside the cut
    pad = clip.model.text.config.pad_token_id
    used = int((tokens != pad).any(dim=0).nonzero().max()) + 1
    padded = tokens[:, : min(tokens.shape[1], used + 16)]
    with torch.inference_mode():
        return float(_cosines(clip.model.encode_text(padded), forward(tokens)).min())


# --------------------------------------------------------------------------- probe
def probe_images(clip: ClipModel, n: int = PROBE_BATCHES[-1], seed: int = 0) -> torch.Tensor:
    """Preprocessed synthetic images with structure (gradients, discs, texture), fixed seed (tests, forced paths)."""
    rng = np.random.default_rng(seed)
    size = clip.image_size
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    images = []
    for i in range(n):
        img = 90 + 80 * np.sin(2 * np.pi * (xx * rng.uniform(0.5, 3) + yy * rng.uniform(0.5, 3)))
        for _ in range(3):
            cy, cx, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.05, 0.25)]
            img = img + rng.uniform(-80, 80) * (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)
        img = img + rng.normal(0, 12, img.shape)
        rgb = np.stack([img, img * rng.uniform(0.7, 1.0), img * rng.uniform(0.5, 1.0)], axis=-1) if i % 2 else img
        images.append(np.clip(rgb, 0, 255).astype(np.uint8))
    return clip.image_tensor(images)


def static_int8_calibration(clip: ClipModel, images: Sequence[np.ndarray] | None = None) -> torch.Tensor:
    """What openvino-int8 is calibrated on: the even calibration images + PROBE_SYNTHETIC colour textures.

    One function for the probe and for a load from a cached decision: the quantised IR is cached under a
    fingerprint of these pixels, so a different set would quantise again (13 s) and run an IR nobody judged.
    `images`: the caller's calibration images (default: engine.models.calibration's choice)."""
    from engine.models.calibration import calibration_set

    pixels = clip.image_tensor(calibration_set(images).images)
    return torch.cat([pixels[::2], probe_images(clip, PROBE_SYNTHETIC)])


def _batch(pixels: torch.Tensor, b: int) -> torch.Tensor:
    """b images from pixels (repeated when there are fewer)."""
    reps = -(-b // len(pixels))
    return pixels.repeat(reps, 1, 1, 1)[:b] if reps > 1 else pixels[:b]


def _check_parity(paths: list[Built], forwards: dict, pixels: torch.Tensor, text: torch.Tensor | None, chunk: int) -> None:
    """cos_image and labels_ok of every path against paths[0] (fp32), on all of `pixels`."""

    def run(forward):
        return torch.cat([forward(pixels[i : i + chunk]).float() for i in range(0, len(pixels), chunk)])

    reference = run(forwards[paths[0].name])
    paths[0].cos_image, paths[0].labels_ok = 1.0, True
    ref_scores = None
    if text is not None:
        ref_scores = (torch.nn.functional.normalize(reference, dim=-1) @ text.T).numpy()
    for p in paths[1:]:
        try:
            out = run(forwards[p.name])
        except Exception as exc:
            p.status = f"error: {type(exc).__name__}: {str(exc)[:120]}"
            continue
        # a statically calibrated path is judged on the images it was not calibrated on (the odd rows)
        rows = slice(1, None, 2) if p.name in STATIC_INT8 and len(pixels) > 1 else slice(None)
        p.cos_image = float(_cosines(reference[rows], out[rows]).min())
        if ref_scores is not None:
            flips = order_flips(ref_scores[rows], (torch.nn.functional.normalize(out[rows], dim=-1) @ text.T).numpy())
            p.labels_ok = flips == 0
            held = " held-out" if rows.step else ""
            p.label_note = f"{flips} label-order flips beyond {LABEL_TAU} over {len(out[rows])}{held} images x {text.shape[0]} labels"


def probe(
    paths: list[Built],
    pixels: torch.Tensor,
    classes: Sequence[int] = PROBE_BATCHES,
    repeats: int = PROBE_REPEATS,
    text: torch.Tensor | None = None,
) -> None:
    """Check parity on `pixels` (real images) and time every path at each batch class (interleaved, minimum).

    `text`: L2-normalised text embeddings [L, D] whose ranking per image must be kept (None: not checked)."""
    forwards = {p.name: (p.image_forward or paths[0].image_forward) for p in paths}
    with torch.inference_mode():
        _check_parity(paths, forwards, pixels, text, max(classes))
        live = [p for p in paths if not p.status.startswith("error")]
        wall, cpu = time_interleaved({p.name: forwards[p.name] for p in live}, {b: _batch(pixels, b) for b in classes}, repeats)
    for p in live:
        p.ms = {b: round(v * 1000 / b, 2) for b, v in wall[p.name].items()}
        p.cpu_ms = {b: round(v * 1000 / b, 2) for b, v in cpu[p.name].items()}
        if p.status == "not probed":
            p.status = "probed"


def time_interleaved(forwards: dict[str, Callable], inputs: dict, repeats: int = PROBE_REPEATS) -> tuple[dict, dict]:
    """Minimum wall and process-CPU seconds per call of every forward on every input: one warm-up call each
    (oneDNN and OpenVINO build kernels per shape), then `repeats` rounds that alternate the forwards, so
    other work on the machine hits all of them alike. Returns ({name: {input key: s}}, same for CPU s)."""
    for forward in forwards.values():
        for x in inputs.values():
            forward(x)
    wall: dict[str, dict] = {name: {} for name in forwards}
    cpu: dict[str, dict] = {name: {} for name in forwards}
    for _ in range(max(1, repeats)):
        for name, forward in forwards.items():
            for k, x in inputs.items():
                t, c = time.perf_counter(), time.process_time()
                forward(x)
                wall[name][k] = min(wall[name].get(k, math.inf), time.perf_counter() - t)
                cpu[name][k] = min(cpu[name].get(k, math.inf), time.process_time() - c)
    return wall, cpu


# --------------------------------------------------------------------------- entry points
def _details(
    profile: CpuProfile, threads: int, chosen: dict[int, Built], results: list[Built], text_note: str, cos_text: float | None
) -> dict:
    d: dict = {
        "cpu": profile.model,
        "isa": profile.isa,
        "flags": sorted(profile.flags),
        "capability": profile.capability,
        "cores": profile.cores,
        "threads": threads,
        "text": text_note,
        "cos_text": None if cos_text is None else round(cos_text, 6),
    }
    base = results[0].ms if results else {}
    if results:
        d["probe"] = {
            r.name: {
                "ms_per_image": {str(b): v for b, v in r.ms.items()},
                "cpu_ms_per_image": {str(b): v for b, v in r.cpu_ms.items()},
                "speedup": {str(b): round(base[b] / v, 2) for b, v in r.ms.items() if b in base and v > 0},
                "cos_image": None if r.cos_image is None else round(r.cos_image, 5),
                "labels": r.label_note or None,
                "build_s": round(r.build_s, 2),
                "status": r.status,
            }
            for r in results
        }
    d["by_batch"] = {
        str(b): {
            "path": r.name,
            "speedup": round(base[b] / r.ms[b], 2) if b in base and r.ms.get(b) else None,
            "cos_image": None if r.cos_image is None else round(r.cos_image, 5),
        }
        for b, r in chosen.items()
    }
    return d


def apply_best(
    clip_model: ClipModel,
    *,
    probe: bool = True,
    force: str | None = None,
    min_image_params: int = MIN_IMAGE_PARAMS,
    calibration: Sequence[np.ndarray] | None = None,
) -> InferencePath:
    """Choose and install the inference path(s) for `clip_model`; returns the InferencePath. Never raises.

    `calibration`: real uint8 images for the probe (default: engine.models.calibration's set)."""
    with _apply_lock:
        try:
            return _apply(clip_model, probe_enabled=probe, force=force, min_image_params=min_image_params, calibration=calibration)
        except Exception as exc:  # a fast path is an optimisation: failure must not stop a load
            log.warning("fast path selection failed, using fp32: %s", exc)
            path = InferencePath("fp32", f"fast path selection failed ({type(exc).__name__}: {str(exc)[:160]})", {})
            clip_model.set_inference(path)
            return path


class _Installer:
    """Puts chosen paths on a ClipModel, with the text forward and the details shown to the user."""

    def __init__(self, clip: ClipModel, profile: CpuProfile, threads: int, known_cos_text: float | None = None):
        """known_cos_text: the text check's result from a cached decision (the check costs ~0.25 s per load)."""
        self.clip, self.profile, self.threads = clip, profile, threads
        self.text_forward = trimmed_text_forward(clip)
        self.cos_text = None
        self.text_note = "fp32"
        if self.text_forward is not None:
            self.cos_text = known_cos_text if known_cos_text is not None else _check_text(clip, self.text_forward)
            if self.cos_text >= TEXT_TRIM_MIN_COSINE:
                self.text_note = "fp32, padding cut to the longest prompt"
            else:
                self.text_forward = None
                self.text_note = f"fp32 (cutting padding changed the output: cosine {self.cos_text:.6f})"

    def __call__(self, chosen: dict[int, Built], reason: str, results: list[Built]) -> InferencePath:
        names = {b: r.name for b, r in chosen.items()}
        unique = list(dict.fromkeys(names.values()))
        name = unique[0] if len(unique) == 1 else " | ".join(f"{b}: {n}" for b, n in sorted(names.items()))
        details = _details(self.profile, self.threads, chosen, results, self.text_note, self.cos_text)
        path = InferencePath(name, reason, details, by_batch=names if len(unique) > 1 else {})
        forwards = {b: r.image_forward for b, r in chosen.items() if r.name != "fp32" and r.image_forward is not None}
        fp32 = self.clip.model.encode_image
        image_forward = None
        if forwards:
            image_forward = BatchDispatch({b: forwards.get(b, fp32) for b in chosen}) if len(unique) > 1 else next(iter(forwards.values()))
        self.clip.set_inference(path, image_forward, self.text_forward)
        log.info("inference path: %s", describe(self.clip))
        return path


def _apply(clip: ClipModel, *, probe_enabled: bool, force: str | None, min_image_params: int, calibration) -> InferencePath:
    profile = cpu_profile()
    threads = configure_threads(profile)
    mode = (force or settings.INFERENCE.get() or "auto").strip().lower()
    if mode not in PATHS + ("auto",):
        log.warning("MEDLENS_INFERENCE=%r unknown (auto, %s); using auto", mode, ", ".join(PATHS))
        mode = "auto"
    key = _decision_key(clip, profile, threads)
    cached = decisions.read(key) if mode == "auto" and probe_enabled else None
    usable = bool(cached) and set(cached.get("by_batch", {}).values()) <= set(PATHS)
    install = _Installer(clip, profile, threads, (cached or {}).get("details", {}).get("cos_text") if usable else None)

    params = _image_params(clip)
    if mode == "auto" and params < min_image_params:
        fp32 = Built("fp32", "small")
        return install({b: fp32 for b in PROBE_BATCHES}, f"small image tower ({params / 1e6:.1f}M parameters): no probe, fp32", [])
    if mode != "auto":
        return _apply_forced(clip, profile, mode, install)
    if not probe_enabled:
        name, reason = rule_based(profile)
        built = build_path(clip, name, profile, reason)
        return install({b: built for b in PROBE_BATCHES}, reason, [])

    if usable:
        try:
            return _apply_cached(clip, profile, cached, install, calibration)
        except Exception as exc:  # e.g. openvino uninstalled since: decide afresh
            log.info("cached inference path cannot be built (%s); probing again", exc)
    return _probe_and_install(clip, profile, key, install, calibration)


def _apply_forced(clip: ClipModel, profile: CpuProfile, mode: str, install: _Installer) -> InferencePath:
    built = build_path(clip, mode, profile, why=f"forced by MEDLENS_INFERENCE={mode}")
    if mode == "fp32":  # the reference itself: nothing to compare or time
        built.cos_image, built.status, results = 1.0, "forced", [built]
    else:
        results = [build_path(clip, "fp32", profile), built]
        probe(results, probe_images(clip, 2), classes=(1,), repeats=1)
    reason = f"forced by MEDLENS_INFERENCE={mode}"
    if mode in ("bf16", "openvino-bf16") and not profile.native_bf16:
        reason += f" (this CPU, {profile.isa}, has no bf16 hardware: expect it to be slower)"
    if built.cos_image is not None and built.cos_image < MIN_COSINE[mode]:
        reason += f"; cosine {built.cos_image:.4f} is below {MIN_COSINE[mode]}"
    return install({b: built for b in PROBE_BATCHES}, reason, results)


class LazyForward:
    """A chosen path built on its first batch, not at load.

    Why: a decision with a path per batch class (medlens-clip on the AMD EPYC: ONNX Runtime fp32 for one image,
    torch bf16 for 12) built both at every load, though a one-shot `medlens label` runs one class: a 2D image never
    needs the bf16 copy (0.13 s, ~120 MB), a CT series never the ONNX session (0.43 s with onnxruntime's import).
    A path that cannot be built then (its runtime broken since the decision) runs fp32 instead, and says so once."""

    def __init__(self, name: str, build: Callable[[], Built], fallback: Callable[[torch.Tensor], torch.Tensor]):
        self.name, self._build, self._fallback = name, build, fallback
        self._forward: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.built: Built | None = None
        self._lock = threading.Lock()

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._forward is None:
            with self._lock:
                if self._forward is None:
                    try:
                        self.built = self._build()
                        self._forward = self.built.image_forward or self._fallback
                    except Exception as exc:
                        log.warning("inference path %s could not be built (%s); this batch size runs fp32", self.name, exc)
                        self._forward = self._fallback
        return self._forward(pixels)


def _apply_cached(clip: ClipModel, profile: CpuProfile, cached: dict, install: _Installer, calibration) -> InferencePath:
    whys = cached.get("whys", {})
    # A runtime installed or removed since the decision changes its key (decisions.versions): no cached decision
    # names a path whose runtime is gone, so building one lazily below only fails if that runtime is broken.
    names = dict.fromkeys(cached["by_batch"].values())

    def build(name: str) -> Built:
        int8_calibration = static_int8_calibration(clip, calibration) if name in STATIC_INT8 else None
        return build_path(clip, name, profile, whys.get(name, ""), calibration=int8_calibration, keep_compiled=True)

    if len(names) > 1:  # one path per batch class: each is built when a batch of its class first comes
        fp32 = clip.model.encode_image
        built = {
            name: Built(name, whys.get(name, ""), None if name == "fp32" else LazyForward(name, lambda n=name: build(n), fp32))
            for name in names
        }
    else:
        built = {name: build(name) for name in names}
    chosen = {int(b): built[name] for b, name in cached["by_batch"].items()}
    path = install(chosen, cached["reason"] + " [decided on an earlier load]", [])
    for k in ("probe", "by_batch", "calibration", "load"):
        if k in cached.get("details", {}):
            path.details[k] = cached["details"][k]
    return path


def _probe_and_install(clip: ClipModel, profile: CpuProfile, key: str, install: _Installer, calibration) -> InferencePath:
    from engine.models.calibration import calibration_set

    started = time.perf_counter()
    calib = calibration_set(calibration)
    # Parity and timing on real images only, as the app sends them (a model never sees anything else). Static
    # int8 calibrates on the even ones + synthetic colour textures, which widen its activation ranges (calibrated
    # on grey scans alone it kept cosine 0.999 there and fell to 0.81-0.87 on colour photographs), and is
    # judged on the odd ones it never saw.
    pixels = clip.image_tensor(calib.images)
    int8_calibration = static_int8_calibration(clip, calibration)
    results = [build_path(clip, "fp32", profile)]
    calibrated = calibration is not None or settings.CALIBRATION_IMAGES.get() is not None
    for name, why in candidates(profile):
        try:
            results.append(build_path(clip, name, profile, why, calibration=int8_calibration))
            if name in STATIC_INT8 and not calibrated:
                results[-1].min_cosine = MIN_COSINE[name] + GENERIC_INT8_MARGIN
        except Exception as exc:
            failed = Built(name, why)
            failed.status = f"error: {type(exc).__name__}: {str(exc)[:120]}"
            results.append(failed)
    with torch.inference_mode():
        text = torch.from_numpy(clip.encode_texts(list(PROBE_TEXTS)))
    load_before = _loadavg()
    probe([r for r in results if not r.status.startswith("error")], pixels, text=text)
    picks = choose(results)
    by_name = {r.name: r for r in results}
    chosen = {b: by_name[name] for b, (name, _) in picks.items()}
    reason = (
        "; ".join(f"batch {b}: {why}" for b, (_, why) in picks.items())
        if len({n for n, _ in picks.values()}) > 1
        else next(iter(picks.values()))[1]
    )
    path = install(chosen, reason, results)
    path.details["choose_s"] = round(time.perf_counter() - started, 2)  # builds + probe (+ exports when not cached)
    path.details["calibration"] = f"{calib.source} (int8 calibration: half of them + {PROBE_SYNTHETIC} synthetic colour textures)"
    path.details["load"] = f"{load_before} before the probe, {_loadavg()} after"
    decisions.write(
        key,
        {
            "model": clip.model_id,
            "kind": "CLIP image tower",
            "by_batch": {str(b): r.name for b, r in chosen.items()},
            "whys": {r.name: r.why for r in chosen.values()},
            "reason": reason,
            "details": path.details,
            "speedup": {b: v["speedup"] for b, v in path.details["by_batch"].items()},
            "versions": decisions.versions(),
        },
    )
    for r in results:  # drop the losers' copies now (ViT-B: 90-350 MB each)
        if r not in chosen.values():
            r.keep = r.image_forward = None
    gc.collect()
    return path


def _loadavg() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def describe(clip_model: ClipModel) -> str:
    """One line for the UI/CLI, e.g. 'OpenVINO bf16 (AMX; 4.5x at batch 1, 5.4x at batch 12 faster than fp32 on probe, cosine 0.9999)'."""
    path = clip_model.path
    d = path.details or {}
    isa = d.get("isa", "")
    per = d.get("by_batch") or {}
    names = {b: v.get("path", path.name) for b, v in per.items()}
    if not per or set(names.values()) == {"fp32"}:
        return f"{LABELS.get(path.name, path.name)} ({path.reason})"

    def one(name: str, classes: list[str]) -> str:
        label = LABELS.get(name, name)
        speeds = [f"{per[b]['speedup']:.1f}x at batch {b}" for b in classes if per[b].get("speedup")]
        if name == "fp32" or not speeds:
            return label
        cos = per[classes[0]].get("cos_image")
        return f"{label} ({isa + '; ' if isa else ''}{', '.join(speeds)} faster than fp32 on probe" + (
            f", cosine {cos:.4f})" if cos else ")"
        )

    groups: dict[str, list[str]] = {}
    for b, name in names.items():
        groups.setdefault(name, []).append(b)
    if len(groups) == 1:
        return one(*next(iter(groups.items())))
    return "; ".join(f"batch {', '.join(bs)}: {one(name, bs)}" for name, bs in groups.items())
