"""The fastest CPU path for the Q-Former's frozen image encoders, chosen once per machine and said.

The volume Q-Former's first answer on a scan is dominated by its frozen
encoder: the Astra I3ResNet-152 for volumes (engine.models.i3resnet) and its
deflated 2D trunk for images. `fast_encoder(...)` returns a `FastEncoder`
(a callable: input -> fp32 features) on the path this CPU runs fastest:

- `fp32`: the torch module as loaded (channels_last_3d for the 3D net);
- `bf16`: a torch bf16 copy, only where the hardware computes bf16 (AMX,
  AVX512-BF16); emulated bf16 3D convolutions ran ~80x slower than fp32 on a
  2-core AVX2 EPYC (features agreed, cosine 0.99996), so without bf16
  hardware it is never a candidate;
- `openvino-bf16` (bf16 CPUs) / `openvino-fp32` (other x86): the module
  exported once to an OpenVINO IR (engine.models.openvino_path, fp16
  weights on disk: 235 MB for the 3D net) with dynamic spatial axes, since
  volumes arrive at many sizes, compiled with that precision hint.

Design decisions
- Chosen by a probe, as the 2D CLIP paths are (engine.models.fastpath): every
  candidate runs a small real example (the caller's: a bundled MR volume
  prepared by the model's own VolumePrep, a bundled CT slice for 2D),
  interleaved repeats, minimum time; a path is kept only when its features
  keep cosine >= 0.999 to fp32 (whole map, and every token >= 0.995) and it
  is at least `MIN_SPEEDUP` faster. One batch class: the Q-Former encodes
  one scan at a time.
- The verdict is cached with the 2D paths' (engine.models.decisions; key:
  encoder id and weights revision, CPU, versions, threads). A later process
  with a cached OpenVINO verdict and IR never builds the 470 MB torch model
  (`load_module` is only called when needed): load + first answer get
  cheaper, not only the encode.
- MEDLENS_INFERENCE=fp32|bf16|openvino-bf16|openvino-fp32 forces a path
  (other values mean auto here). Any failure falls back to fp32 and says why.
- Measured on the AMX Xeon of bench/results/encoder3d.md (2 threads, quiet
  moments of a shared machine; minimum seconds): the 3D encoder at
  128x128x64: torch fp32 (channels_last_3d) 0.82, contiguous 0.90, torch bf16
  channels_last_3d 0.25, bf16 contiguous 0.69, autocast bf16 0.30, OpenVINO
  bf16 0.115 (cosine 0.99984, every token >= 0.9998); the CT series as the
  shipped Q-Former prepares it (128x128x16): fp32 0.31, OpenVINO bf16 0.036
  (8.8x); the brain MRI (64x96x64): 0.34 against 0.061 (5.6x). The 2D trunk
  at 128 px: 65 ms against 12 (5.3x). torch.compile bf16 ran 128x128x64 in
  0.74 CPU-s against OpenVINO's 0.27 on a busy machine, after 89 s of
  compilation per shape and process: not a path.
- The first answer on a scan is read + prepare + encode + answer + evidence:
  with the encoder 9x faster the CT series' first answer goes from 0.87 to
  0.62 s (1.4x; decoding its 20 JPEG 2000 slices is ~0.4 s of it, serial in
  pydicom/openjpeg, which holds the GIL), the brain MRI's 2.05x
  (bench/results/ask_latency.md).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from engine import settings
from engine.models import decisions, openvino_path
from engine.models.cpu import CpuProfile, cpu_profile

log = logging.getLogger(__name__)

ENCODER_PATH_VERSION = 1
PATHS = ("fp32", "bf16", "openvino-bf16", "openvino-fp32")
LABELS = {"fp32": "fp32", "bf16": "torch bf16", "openvino-bf16": "OpenVINO bf16", "openvino-fp32": "OpenVINO fp32"}
MIN_COSINE = {"fp32": 1.0, "bf16": 0.999, "openvino-bf16": 0.999, "openvino-fp32": 0.9999}
MIN_TOKEN_COSINE = 0.995
MIN_SPEEDUP = 1.1
PROBE_REPEATS = 2

_lock = threading.Lock()


@dataclass
class EncoderPath:
    """Which path an encoder runs, and why (shown with the Q-Former's answers)."""

    name: str = "fp32"
    reason: str = "default"
    details: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return LABELS.get(self.name, self.name)


@dataclass
class Trial:
    """One candidate path and what the probe found."""

    name: str
    why: str
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None
    build_s: float = 0.0
    s: float | None = None  # minimum wall seconds per call
    cpu_s: float | None = None  # minimum process CPU seconds per call
    cos: float | None = None  # cosine of the whole feature map to fp32
    cos_token: float | None = None  # lowest cosine of one token (a feature vector of the grid) to fp32
    status: str = "not probed"


class FastEncoder:
    """An encoder on its chosen path: `encoder(x)` -> fp32 features (the module's output for x)."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], path: EncoderPath, keep: object = None):
        self.forward, self.path, self._keep = forward, path, keep

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).float()


# --------------------------------------------------------------------------- decisions (pure)
def candidates(profile: CpuProfile, *, openvino_available: bool | None = None) -> list[tuple[str, str]]:
    """Paths worth probing besides fp32 on this CPU, each with the reason (the 2D chooser's float paths)."""
    from engine.models.fastpath import float_candidates

    return float_candidates(profile, openvino_path.available() if openvino_available is None else openvino_available)


def choose(trials: list[Trial], min_speedup: float = MIN_SPEEDUP) -> tuple[str, str]:
    """(name, reason) from probe results; trials[0] is fp32. Pure, for tests."""
    base = trials[0]
    best, best_gain, notes = None, 0.0, []
    for t in trials[1:]:
        if t.status.startswith("error"):
            notes.append(f"{t.name}: {t.status}")
            continue
        if t.cos is None or t.cos < MIN_COSINE[t.name] or (t.cos_token or 0.0) < MIN_TOKEN_COSINE:
            t.status = f"rejected: cosine {t.cos if t.cos is None else round(t.cos, 5)} (token {t.cos_token if t.cos_token is None else round(t.cos_token, 4)})"
            notes.append(f"{t.name} {t.status.removeprefix('rejected: ')}")
            continue
        gain = base.s / t.s if base.s and t.s else 0.0
        if gain < min_speedup:
            t.status = f"rejected: {gain:.2f}x vs fp32 (needs {min_speedup}x)"
            notes.append(f"{t.name} {gain:.2f}x")
            continue
        t.status = "passed"
        if gain > best_gain:
            best, best_gain = t, gain
    if best is None:
        return "fp32", f"no path beat fp32 and kept the features ({', '.join(notes) or 'no faster path for this CPU'})"
    best.status = "chosen"
    return best.name, f"{best.why}; {best_gain:.1f}x faster than fp32 on probe, cosine {best.cos:.5f}"


def _cosines(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(whole-map cosine, lowest per-token cosine) of two feature maps [B, C, *grid]."""
    a, b = a.float(), b.float()
    whole = float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
    tokens = float(torch.nn.functional.cosine_similarity(a.flatten(2), b.flatten(2), dim=1).min())
    return whole, tokens


# --------------------------------------------------------------------------- building
def build(
    name: str,
    module: torch.nn.Module,
    forward_name: str,
    example: torch.Tensor,
    dynamic_axes: Sequence[int],
    ir_key: str,
    profile: CpuProfile,
    why: str = "",
    keep_compiled: bool = False,
) -> Trial:
    """One path for `getattr(module, forward_name)`; OpenVINO IRs are cached under `ir_key` (and, with
    `keep_compiled`, for a path already chosen, the compiled model too)."""
    start = time.perf_counter()
    trial = Trial(name, why)
    if name == "fp32":
        trial.forward = getattr(module, forward_name)
    elif name == "bf16":
        with torch.no_grad():
            twin = copy.deepcopy(module).to(torch.bfloat16).eval()
        method = getattr(twin, forward_name)
        trial.forward = lambda x, _m=method: _m(x.to(torch.bfloat16)).float()
    elif name in ("openvino-bf16", "openvino-fp32"):
        trial.forward = _openvino(name, lambda: getattr(module, forward_name), example, dynamic_axes, ir_key, keep_compiled)
    else:
        raise ValueError(f"unknown encoder path '{name}' (known: {', '.join(PATHS)})")
    trial.build_s = time.perf_counter() - start
    return trial


def _openvino(
    name: str,
    forward: Callable[[], Callable],
    example: torch.Tensor,
    dynamic_axes: Sequence[int],
    ir_key: str,
    keep_compiled: bool = False,
):
    precision = "bf16" if name == "openvino-bf16" else "f32"
    folder = decisions.cache_dir()
    xml, tmp = openvino_path.cached_ir(
        folder, f"encoder-{ir_key}.xml", lambda target: openvino_path.save_ir(forward(), example, target, dynamic_axes)
    )
    compiled = openvino_path.compiled_cache(folder) if keep_compiled else None
    try:
        return openvino_path.OpenVinoForward(xml, precision, torch.get_num_threads(), compiled)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _ir_ready(ir_key: str) -> bool:
    folder = decisions.cache_dir()
    return folder is not None and (folder / f"encoder-{ir_key}.xml").is_file() and (folder / f"encoder-{ir_key}.bin").is_file()


# --------------------------------------------------------------------------- entry point
def fast_encoder(
    encoder_id: str,
    kind: str,
    load_module: Callable[[], torch.nn.Module],
    example: Callable[[], torch.Tensor],
    *,
    forward: str = "forward",
    dynamic_axes: Sequence[int] = (0,),
) -> FastEncoder:
    """The encoder `encoder_id` on the fastest path that keeps its features on this CPU. Never raises
    for a path problem (falls back to fp32, saying why); `load_module` errors (missing weights) propagate.

    encoder_id: names the module and its weights revision (decisions and IRs are keyed by it);
    kind: words for `medlens models --speed` ("Q-Former 3D encoder"); load_module: builds the fp32
    module (called only when needed); example: a small real input for the probe and the export;
    forward: the method that maps an input to features; dynamic_axes: input axes that vary."""
    with _lock:
        profile = cpu_profile()
        threads = torch.get_num_threads()
        forced = (settings.INFERENCE.raw() or "").strip().lower()
        key = decisions.key("encoder", ENCODER_PATH_VERSION, encoder_id, profile.to_dict(), decisions.versions(), threads)
        ir_key = decisions.key(ENCODER_PATH_VERSION, encoder_id, decisions.versions())
        if forced in PATHS:
            return _forced(forced, profile, load_module, example, forward, dynamic_axes, ir_key)
        cached = decisions.read(key)
        name = (cached or {}).get("by_batch", {}).get("1")
        if name in PATHS:
            try:
                module = None if name.startswith("openvino") and _ir_ready(ir_key) else load_module()
                trial = build(
                    name, module, forward, example() if module is not None else None, dynamic_axes, ir_key, profile, keep_compiled=True
                )
                path = EncoderPath(name, cached.get("reason", "") + " [decided on an earlier load]", cached.get("details", {}))
                return FastEncoder(trial.forward, path, keep=module)
            except Exception as exc:
                log.info("cached encoder path %s cannot be built (%s); probing again", name, exc)
        return _probe(encoder_id, kind, key, ir_key, profile, load_module(), example(), forward, dynamic_axes)


def _forced(name: str, profile: CpuProfile, load_module, example, forward: str, dynamic_axes, ir_key: str) -> FastEncoder:
    module = load_module()
    reason = f"forced by MEDLENS_INFERENCE={name}"
    if name in ("bf16", "openvino-bf16") and not profile.native_bf16:
        reason += f" ({profile.isa} has no bf16 hardware: expect it to be much slower)"
    try:
        trial = build(name, module, forward, None if name == "fp32" else example(), dynamic_axes, ir_key, profile, reason)
    except Exception as exc:
        trial, reason = (
            build("fp32", module, forward, None, dynamic_axes, ir_key, profile),
            f"fp32: {name} failed ({type(exc).__name__}: {str(exc)[:120]})",
        )
    return FastEncoder(trial.forward, EncoderPath(trial.name, reason, {"cpu": profile.model, "isa": profile.isa}), keep=module)


def _probe(
    encoder_id: str,
    kind: str,
    key: str,
    ir_key: str,
    profile: CpuProfile,
    module: torch.nn.Module,
    example: torch.Tensor,
    forward: str,
    dynamic_axes,
) -> FastEncoder:
    from engine.models.fastpath import time_interleaved

    started = time.perf_counter()
    trials = [build("fp32", module, forward, example, dynamic_axes, ir_key, profile, "reference")]
    for name, why in candidates(profile):
        try:
            trials.append(build(name, module, forward, example, dynamic_axes, ir_key, profile, why))
        except Exception as exc:
            trials.append(Trial(name, why, status=f"error: {type(exc).__name__}: {str(exc)[:120]}"))
    live = [t for t in trials if t.forward is not None]
    with torch.inference_mode():
        reference = trials[0].forward(example).float()
        for t in live[1:]:
            try:
                t.cos, t.cos_token = _cosines(reference, t.forward(example))
            except Exception as exc:
                t.status, t.forward = f"error: {type(exc).__name__}: {str(exc)[:120]}", None
        live = [t for t in live if t.forward is not None]
        wall, cpu = time_interleaved({t.name: t.forward for t in live}, {1: example}, PROBE_REPEATS)
    for t in live:
        t.s, t.cpu_s = wall[t.name][1], cpu[t.name][1]
        t.status = "probed" if t.status == "not probed" else t.status
    name, reason = choose(trials)
    chosen = next(t for t in trials if t.name == name)
    details = {
        "cpu": profile.model,
        "isa": profile.isa,
        "threads": torch.get_num_threads(),
        "example": list(example.shape),
        "choose_s": round(time.perf_counter() - started, 2),
        "probe": {
            t.name: {
                "s": None if t.s is None else round(t.s, 4),
                "cpu_s": None if t.cpu_s is None else round(t.cpu_s, 4),
                "speedup": round(trials[0].s / t.s, 2) if t.s and trials[0].s else None,
                "cos": None if t.cos is None else round(t.cos, 6),
                "cos_token": None if t.cos_token is None else round(t.cos_token, 5),
                "build_s": round(t.build_s, 2),
                "status": t.status,
            }
            for t in trials
        },
    }
    speedup = details["probe"][name]["speedup"]
    decisions.write(
        key,
        {
            "model": encoder_id,
            "kind": kind,
            "by_batch": {"1": name},
            "reason": reason,
            "details": details,
            "speedup": {"1": speedup},
            "versions": decisions.versions(),
        },
    )
    log.info("%s: %s (%s)", kind, LABELS[name], reason)
    return FastEncoder(chosen.forward, EncoderPath(name, reason, details), keep=module)
