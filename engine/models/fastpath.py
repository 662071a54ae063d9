"""Pick the fastest CPU inference path that keeps the answer, per machine, and say which.

`apply_best(clip_model)` is called by `load_model`. It
1. reads the CPU (`engine.models.cpu.cpu_profile`) and sets torch's threads
   to the physical cores this process may use (MEDLENS_THREADS overrides);
2. lists the paths this CPU makes worth trying (`candidates`):
   - `bf16`: a bf16 copy of the image tower, only where the hardware computes
     bf16 (AMX, AVX512-BF16, ARM BF16). Without it torch emulates bf16 and is
     2-10x *slower* than fp32 (measured: AMD EPYC AVX2 10x, Ice Lake AVX-512
     without BF16 about 2x), so such a CPU never gets it from `auto`;
   - `int8`: torch dynamic int8 quantisation of every nn.Linear of the image
     tower (fbgemm/oneDNN on x86 with AVX2+, VNNI where present; qnnpack on ARM);
   - `onnx-int8`: the image tower exported to ONNX and dynamically quantised
     by ONNX Runtime (only when onnxruntime and onnx are installed; the
     quantised file is cached on disk because export + quantisation take
     10-20 s on ViT-B);
3. probes them against fp32 on a few synthetic images at batch 1 and batch
   4 (interleaved repeats, minimum time: robust to other work on the
   machine) and checks that embeddings keep cosine >= 0.999 (bf16) or
   >= 0.995 (int8) to fp32;
4. keeps the fastest path that passes and is at least `MIN_SPEEDUP` faster
   than fp32 at *both* batch sizes (never slower anywhere), else fp32;
5. calls `clip_model.set_inference(InferencePath(...), image_forward, text_forward)`
   and remembers the decision on disk (keyed by model id, CPU, versions and
   threads), so the next load builds only the winner.

Other decisions
- The fp32 `clip_model.model` is never modified: heatmaps need its
  gradients. Fast paths are copies of the image tower (int8 ViT-B: ~90 MB;
  bf16: ~170 MB). If the fp32 weights are changed in place afterwards, call
  `apply_best` again.
- Text stays fp32 on every path: label-set embeddings are cached by
  ClipModel, and a query is short. What makes text fast is cutting the
  padding: HF text towers pad every prompt to the context length (256 for
  BiomedCLIP) and mask the pads, so trailing all-pad columns are cut before
  the forward; the output is the same (checked at load, cosine >= 0.99999).
- Tiny models (image tower < MIN_IMAGE_PARAMS) skip the probe: nothing to gain.
- MEDLENS_INFERENCE=auto|fp32|bf16|int8|onnx-int8 forces a path (its parity
  is still measured and reported); MEDLENS_FASTPATH_CACHE=<folder>|off moves
  or disables the disk cache.
- `apply_best` never raises: any failure leaves fp32 and says why.
- Measured on a 2-core Ice Lake (AVX-512 VNNI, no BF16/AMX), BiomedCLIP-
  shaped ViT-B/16: fp32 210/154 ms/img at batch 1/16, ONNX Runtime int8
  97/95 (cosine 0.999 on real images), torch int8 ~145/95 (cosine 0.997).
  With another job on the cores torch's fp32 fell to ~1600 ms/img at batch 1
  (its threads wait for each other at every operator) while ONNX Runtime
  stayed near 270: the probe runs on the machine as it is at load.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from engine import settings
from engine.models.clip import ClipModel, InferencePath
from engine.models.cpu import CpuProfile, cpu_profile

log = logging.getLogger(__name__)

FASTPATH_VERSION = 1  # bump when a path's construction changes: invalidates cached decisions
PATHS = ("fp32", "bf16", "int8", "onnx-int8")
MIN_COSINE = {"fp32": 0.99999, "bf16": 0.999, "int8": 0.995, "onnx-int8": 0.995}
TEXT_TRIM_MIN_COSINE = 0.99999
MIN_SPEEDUP = 1.1  # a fast path must beat fp32 by 10% at batch 1 and at batch PROBE_BATCH (noise margin)
MIN_IMAGE_PARAMS = 5_000_000  # below this (test models) the probe costs more than it saves
PROBE_BATCH = 4
PROBE_REPEATS = 2
LABELS = {"fp32": "fp32", "bf16": "bf16 weights", "int8": "int8 dynamic", "onnx-int8": "ONNX Runtime int8"}
PROBE_TEXTS = (
    "a chest x-ray with pneumonia",
    "a normal chest radiograph",
    "an ultrasound image of a benign breast mass",
    "histopathology of lung adenocarcinoma",
    "a dermoscopy image of a melanoma",
)

_apply_lock = threading.Lock()


@dataclass
class Built:
    """One inference path ready to run, with what the probe found."""

    name: str
    why: str  # why it is tried on this CPU
    image_forward: Callable[[torch.Tensor], torch.Tensor] | None = None  # None: the fp32 model's
    build_s: float = 0.0
    ms: dict[int, float] = field(default_factory=dict)  # batch -> ms per image (probe minimum)
    cos_image: float | None = None
    status: str = "not probed"
    keep: object = None  # the module/session the forward closes over (kept alive)


# --------------------------------------------------------------------------- decisions (pure)
def candidates(profile: CpuProfile, *, onnx_available: bool | None = None) -> list[tuple[str, str]]:
    """Paths worth probing on this CPU besides fp32, each with the reason, best guess first."""
    if onnx_available is None:
        onnx_available = _onnx_available()
    out: list[tuple[str, str]] = []
    if profile.native_bf16:
        out.append(("bf16", f"{profile.isa} computes bf16 in hardware"))
    int8_isa = None
    if profile.is_x86 and ("avx2" in profile.flags or "avx512f" in profile.flags or profile.capability in ("AVX2", "AVX512")):
        int8_isa = "AVX-512 VNNI" if "avx512_vnni" in profile.flags else "AVX-VNNI" if "avx_vnni" in profile.flags else profile.isa
    elif profile.is_arm:
        int8_isa = "ARM i8mm" if "i8mm" in profile.flags else "ARM dot product" if "asimddp" in profile.flags else "ARM NEON"
    if int8_isa:
        out.append(("int8", int8_isa))
        if onnx_available:
            out.append(("onnx-int8", int8_isa))
    return out


def rule_based(profile: CpuProfile) -> tuple[str, str]:
    """The path chosen from CPU flags alone (probe=False): bf16 where the hardware has it, else fp32.

    int8 is never chosen unmeasured: whether it keeps the answer depends on the weights."""
    if profile.native_bf16:
        return "bf16", f"{profile.isa} computes bf16 in hardware (chosen from CPU flags, not measured)"
    return "fp32", f"no bf16 hardware ({profile.isa}); int8 needs a probe to show it keeps the answer"


def choose(results: list[Built], min_speedup: float = MIN_SPEEDUP) -> tuple[str, str]:
    """(name, reason) from probe results; results[0] is fp32. Pure, for tests."""
    base = results[0]
    best, best_gain, notes = None, 0.0, []
    for r in results[1:]:
        if r.status.startswith("error"):
            notes.append(f"{r.name}: {r.status}")
            continue
        need = MIN_COSINE[r.name]
        if r.cos_image is None or r.cos_image < need:
            r.status = f"rejected: cosine {r.cos_image if r.cos_image is None else round(r.cos_image, 5)} < {need}"
            notes.append(f"{r.name} {r.status[10:]}")
            continue
        gains = [base.ms[b] / r.ms[b] for b in base.ms if b in r.ms and r.ms[b] > 0]
        gain = min(gains) if gains else 0.0
        if gain < min_speedup:
            r.status = f"rejected: {gain:.2f}x vs fp32 (needs {min_speedup}x at every batch size)"
            notes.append(f"{r.name} {gain:.2f}x")
            continue
        r.status = "passed"
        if gain > best_gain:
            best, best_gain = r, gain
    if best is None:
        tried = ", ".join(notes) if notes else "no faster path for this CPU"
        return "fp32", f"no path beat fp32 and kept the answer ({tried})"
    best.status = "chosen"
    return best.name, f"{best.why}; {best_gain:.1f}x faster than fp32 on probe, cosine {best.cos_image:.4f}"


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


def cache_dir() -> Path | None:
    """Where exported models and decisions are kept; None when MEDLENS_FASTPATH_CACHE=off."""
    env = settings.FASTPATH_CACHE.get() or ""
    if env.lower() in ("off", "0", "none", "false"):
        return None
    if env:
        return Path(env).expanduser()
    return settings.user_cache_dir() / "fastpath"


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except Exception:
        pass
    return out


def _decision_key(clip: ClipModel, profile: CpuProfile, threads: int) -> str:
    raw = json.dumps([FASTPATH_VERSION, clip.model_id, profile.to_dict(), _versions(), threads], sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def _read_decisions(folder: Path | None) -> dict:
    if folder is None:
        return {}
    try:
        return json.loads((folder / "decisions.json").read_text())
    except (OSError, ValueError):
        return {}


def _write_decision(folder: Path | None, key: str, value: dict) -> None:
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        decisions = _read_decisions(folder)
        decisions[key] = value
        tmp = folder / f"decisions.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(decisions, indent=1))
        tmp.replace(folder / "decisions.json")
    except OSError as exc:
        log.info("fast path decision not cached: %s", exc)


# --------------------------------------------------------------------------- building paths
def _image_params(clip: ClipModel) -> int:
    return sum(p.numel() for p in clip.model.visual.parameters())


def build_path(clip: ClipModel, name: str, profile: CpuProfile, why: str = "") -> Built:
    """One inference path for the image tower (a copy; clip.model stays fp32)."""
    start = time.perf_counter()
    visual = clip.model.visual
    if name == "fp32":
        built = Built("fp32", why or "reference", lambda pixels, _m=visual: _m(pixels))
    elif name == "bf16":
        with torch.no_grad():
            twin = copy.deepcopy(visual).to(torch.bfloat16).eval()
        for p in twin.parameters():
            p.requires_grad_(False)

        def bf16_forward(pixels: torch.Tensor, _m=twin) -> torch.Tensor:
            return _m(pixels.to(torch.bfloat16)).float()

        built = Built("bf16", why, bf16_forward, keep=twin)
    elif name == "int8":
        if profile.is_arm and "qnnpack" in torch.backends.quantized.supported_engines:
            torch.backends.quantized.engine = "qnnpack"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
            qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
            twin = torch.ao.quantization.quantize_dynamic(copy.deepcopy(visual).eval(), {torch.nn.Linear: qconfig})
        for p in twin.parameters():
            p.requires_grad_(False)
        built = Built("int8", why, lambda pixels, _m=twin: _m(pixels), keep=twin)
    elif name == "onnx-int8":
        session = _onnx_int8_session(clip, profile)
        input_name = session.get_inputs()[0].name

        def onnx_forward(pixels: torch.Tensor, _s=session, _i=input_name) -> torch.Tensor:
            arr = np.ascontiguousarray(pixels.detach().to("cpu", torch.float32).numpy())
            return torch.from_numpy(_s.run(None, {_i: arr})[0])

        built = Built("onnx-int8", why, onnx_forward, keep=session)
    else:
        raise ValueError(f"unknown inference path '{name}' (known: {', '.join(PATHS)})")
    built.build_s = time.perf_counter() - start
    return built


def _onnx_int8_session(clip: ClipModel, profile: CpuProfile):
    """An ONNX Runtime session of the int8-quantised image tower, exported once and cached on disk."""
    import onnxruntime as ort

    reduce_range = not profile.vnni  # u8s8 without VNNI can saturate: 7-bit weights avoid it
    key = hashlib.sha256(json.dumps([FASTPATH_VERSION, clip.model_id, _versions(), reduce_range]).encode()).hexdigest()[:16]
    folder = cache_dir()
    tmpdir = None
    if folder is None:
        tmpdir = tempfile.TemporaryDirectory(prefix="medlens-onnx-")
        folder = Path(tmpdir.name)
    target = folder / f"image-int8-{key}.onnx"
    try:
        if not target.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            _export_int8(clip.model.visual, clip.image_size, target, reduce_range)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        # Spinning ORT threads would steal the cores torch needs next (text, heatmaps).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()


def _export_int8(visual: torch.nn.Module, size: int, target: Path, reduce_range: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    class Tower(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixels):
            return self.inner(pixels)

    with tempfile.TemporaryDirectory(prefix="medlens-onnx-export-") as tmp:
        fp32 = Path(tmp) / "image-fp32.onnx"
        example = torch.zeros(1, 3, size, size)
        # Traced with autograd on: under no_grad, nn.MultiheadAttention (open_clip's own ViT) takes
        # its fused fast path, which the ONNX exporter cannot write.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Tower(visual).eval(),
                (example,),
                str(fp32),
                input_names=["pixels"],
                output_names=["features"],
                dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
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
def probe_images(clip: ClipModel, n: int = PROBE_BATCH, seed: int = 0) -> torch.Tensor:
    """Preprocessed synthetic images with structure (gradients, discs, texture), fixed seed."""
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


def probe(paths: list[Built], pixels: torch.Tensor, repeats: int = PROBE_REPEATS) -> None:
    """Time every path at batch 1 and batch len(pixels) (interleaved, minimum) and set cos_image."""
    single = pixels[:1]
    batches = {1: single, len(pixels): pixels} if len(pixels) > 1 else {1: single}
    best: dict[str, dict[int, float]] = {p.name: {} for p in paths}
    forwards = {p.name: (p.image_forward or paths[0].image_forward) for p in paths}
    with torch.inference_mode():
        reference = forwards[paths[0].name](pixels)
        paths[0].cos_image = 1.0
        for p in paths[1:]:
            try:
                p.cos_image = float(_cosines(reference, forwards[p.name](pixels)).min())  # also the warm-up
            except Exception as exc:
                p.status = f"error: {type(exc).__name__}: {str(exc)[:120]}"
        forwards[paths[0].name](single)  # warm-up of batch 1 for the reference
        live = [p for p in paths if not p.status.startswith("error")]
        for _ in range(repeats):
            for p in live:
                for b, x in batches.items():
                    t = time.perf_counter()
                    forwards[p.name](x)
                    ms = (time.perf_counter() - t) * 1000 / len(x)
                    best[p.name][b] = min(best[p.name].get(b, float("inf")), ms)
    for p in live:
        p.ms = {b: round(v, 2) for b, v in best[p.name].items()}
        if p.status == "not probed":
            p.status = "probed"


# --------------------------------------------------------------------------- entry points
def _details(profile: CpuProfile, threads: int, chosen: Built | None, results: list[Built], text_note: str, cos_text: float | None) -> dict:
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
    if results:
        base = results[0].ms
        d["probe"] = {
            r.name: {
                "ms_per_image": {str(b): v for b, v in r.ms.items()},
                "speedup": {str(b): round(base[b] / v, 2) for b, v in r.ms.items() if b in base and v > 0},
                "cos_image": None if r.cos_image is None else round(r.cos_image, 5),
                "build_s": round(r.build_s, 2),
                "status": r.status,
            }
            for r in results
        }
    if chosen is not None and chosen.ms and results:
        base = results[0].ms
        gains = [base[b] / chosen.ms[b] for b in chosen.ms if b in base and chosen.ms[b] > 0]
        d["speedup"] = round(min(gains), 2) if gains else None
        d["cos_image"] = None if chosen.cos_image is None else round(chosen.cos_image, 5)
    return d


def apply_best(clip_model: ClipModel, *, probe: bool = True, force: str | None = None, min_image_params: int = MIN_IMAGE_PARAMS) -> InferencePath:
    """Choose and install the inference path for `clip_model`; returns it. Never raises."""
    with _apply_lock:
        try:
            return _apply(clip_model, probe_enabled=probe, force=force, min_image_params=min_image_params)
        except Exception as exc:  # a fast path is an optimisation: failure must not stop a load
            log.warning("fast path selection failed, using fp32: %s", exc)
            path = InferencePath("fp32", f"fast path selection failed ({type(exc).__name__}: {str(exc)[:160]})", {})
            clip_model.set_inference(path)
            return path


def _apply(clip: ClipModel, *, probe_enabled: bool, force: str | None, min_image_params: int) -> InferencePath:
    profile = cpu_profile()
    threads = configure_threads(profile)
    mode = (force or settings.INFERENCE.get() or "auto").strip().lower()
    if mode not in PATHS + ("auto",):
        log.warning("MEDLENS_INFERENCE=%r unknown (auto, %s); using auto", mode, ", ".join(PATHS))
        mode = "auto"

    text_forward = trimmed_text_forward(clip)
    cos_text = None
    text_note = "fp32"
    if text_forward is not None:
        cos_text = _check_text(clip, text_forward)
        if cos_text >= TEXT_TRIM_MIN_COSINE:
            text_note = "fp32, padding cut to the longest prompt"
        else:
            text_forward, text_note = None, f"fp32 (cutting padding changed the output: cosine {cos_text:.6f})"

    def install(built: Built | None, name: str, reason: str, results: list[Built]) -> InferencePath:
        path = InferencePath(name, reason, _details(profile, threads, built, results, text_note, cos_text))
        image_forward = built.image_forward if built is not None and built.name != "fp32" else None
        clip.set_inference(path, image_forward, text_forward)
        log.info("inference path: %s", describe(clip))
        return path

    params = _image_params(clip)
    if mode == "auto" and params < min_image_params:
        return install(None, "fp32", f"small image tower ({params / 1e6:.1f}M parameters): no probe, fp32", [])

    if mode != "auto":
        built = build_path(clip, mode, profile, why=f"forced by MEDLENS_INFERENCE={mode}")
        results = [build_path(clip, "fp32", profile), built] if mode != "fp32" else [built]
        probe(results, probe_images(clip, 2), repeats=1)
        reason = f"forced by MEDLENS_INFERENCE={mode}"
        if mode == "bf16" and not profile.native_bf16:
            reason += f" (this CPU, {profile.isa}, has no bf16 hardware: expect it to be slower)"
        if built.cos_image is not None and built.cos_image < MIN_COSINE[mode]:
            reason += f"; cosine {built.cos_image:.4f} is below {MIN_COSINE[mode]}"
        return install(built, mode, reason, results)

    if not probe_enabled:
        name, reason = rule_based(profile)
        return install(build_path(clip, name, profile, reason), name, reason, [])

    folder = cache_dir()
    key = _decision_key(clip, profile, threads)
    cached = _read_decisions(folder).get(key)
    if cached and cached.get("name") in PATHS:
        name = cached["name"]
        try:
            built = build_path(clip, name, profile, cached.get("why", ""))
        except Exception as exc:  # e.g. onnxruntime uninstalled since: decide afresh
            log.info("cached inference path %s cannot be built (%s); probing again", name, exc)
        else:
            path = install(built, name, cached["reason"] + " [decided on an earlier load]", [])
            path.details.update({k: v for k, v in cached.get("details", {}).items() if k not in path.details or k in ("probe", "speedup", "cos_image")})
            return path

    started = time.perf_counter()
    results = [build_path(clip, "fp32", profile)]
    for name, why in candidates(profile):
        try:
            results.append(build_path(clip, name, profile, why))
        except Exception as exc:
            failed = Built(name, why)
            failed.status = f"error: {type(exc).__name__}: {str(exc)[:120]}"
            results.append(failed)
    probe([r for r in results if not r.status.startswith("error")], probe_images(clip))
    name, reason = choose(results)
    chosen = next(r for r in results if r.name == name)
    path = install(chosen if name != "fp32" else None, name, reason, results)
    path.details["choose_s"] = round(time.perf_counter() - started, 2)  # builds + probe (+ ONNX export when not cached)
    _write_decision(folder, key, {"name": name, "why": chosen.why, "reason": reason, "details": path.details})
    for r in results:  # drop the losers' copies now (ViT-B: 90-350 MB each)
        if r is not chosen:
            r.keep = r.image_forward = None
    gc.collect()
    return path


def describe(clip_model: ClipModel) -> str:
    """One line for the UI/CLI, e.g. 'int8 dynamic (AVX-512 VNNI, 1.9x faster than fp32 on probe, cosine 0.9991)'."""
    path = clip_model.path
    d = path.details or {}
    label = LABELS.get(path.name, path.name)
    speed, cos = d.get("speedup"), d.get("cos_image")
    if path.name != "fp32" and speed:
        isa = d.get("isa", "")
        return f"{label} ({isa + ', ' if isa else ''}{speed:.1f}x faster than fp32 on probe, cosine {cos:.4f})"
    return f"{label} ({path.reason})"
