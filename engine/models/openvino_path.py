"""OpenVINO as an inference path for a frozen torch module: export once, compile per process, run.

Used by engine.models.fastpath (CLIP image towers) and engine.models.
encoder_path (the Q-Former's 3D and 2D encoders). OpenVINO is optional
(`pip install 'medlens[fast]'`, ~190 MB with NNCF); without it these paths are
simply not candidates.

Design decisions
- Route: torch.onnx.export (TorchScript exporter, as the onnx-int8 path) ->
  `Core.read_model` -> an IR (xml + bin) saved in the fast-path cache with
  weights stored as fp16 (half the disk; the CPU plugin widens them at
  compile time). Measured on the 3D I3ResNet-152: ONNX export + read 13.6 s
  against 28.7 s for `ov.convert_model`, and the ONNX route never touches
  OpenVINO's model-conversion tool (which sends telemetry). A later process
  reads the IR (memory-mapped) and compiles it: ~2 s for the 3D encoder.
- Precision: `INFERENCE_PRECISION_HINT` bf16 where the CPU computes bf16
  (AMX, AVX512-BF16): OpenVINO keeps the weights in bf16 and runs convolutions
  and matmuls on AMX tiles; f32 elsewhere. `PERFORMANCE_HINT` LATENCY with
  INFERENCE_NUM_THREADS = torch's thread count: one request at a time, as the
  engine calls it (THROUGHPUT streams measured 2.2x slower at batch 16 on 2
  threads: each stream gets one thread and a synchronous call uses one stream).
- int8: NNCF post-training quantisation (symmetric per-channel weights,
  per-tensor activations; `ModelType.TRANSFORMER` for ViTs, which keeps
  softmax/LayerNorm/GELU in float) on a small set of real images
  (engine.models.calibration). The quantised IR is cached too, keyed by the
  calibration set's fingerprint. Whether it keeps the answer is for the
  caller's probe to decide (random-weight ViT-B/16: cosine 0.887, rejected).
- Telemetry: NNCF sends usage data to Google Analytics unless told not to
  (and its import writes a client id under ~/intel); `quiet_nncf()` imports it
  with its documented switches (NNCF_CI, and CI=true for the openvino-
  telemetry consent check) so nothing is written or sent; both variables are
  restored afterwards. Checked by tests/test_openvino_path.py in a scratch HOME.
- Tried and dropped (AMX Xeon, 2 threads, random-weight ViT-B/16, process
  CPU ms/img at batch 16 on a busy machine): NNCF int8 weight compression
  (data-free) with DYNAMIC_QUANTIZATION_GROUP_SIZE 32/64 kept cosine 0.9995
  but cost 77 ms against 55 for plain bf16 (the CPU plugin dequantises the
  weights instead of running int8 matmuls for such models); a static batch
  shape per batch class and `ov.convert_model` (which keeps torch's
  scaled_dot_product_attention as one SDPA op) cost the same CPU as the
  dynamic-batch ONNX route (58-62 ms); the f16 precision hint (AVX512-FP16,
  no AMX-FP16 on this CPU) was 3x slower than bf16 on the ResNet trunk.
  On the AMD EPYC (Zen 4: AVX512-BF16 and VNNI, no AMX), int8 ViT-B/16 with
  the class-token last block at batch 16, 8 interleaved repeats, min / median
  ms/img: dynamic batch 47.4 / 51.7; static batch 16 47.2 / 51.6; two streams
  of one thread, each half the batch, 46.9 / 49.8, static 45.3 / 48.1. At
  most 4-7%, within the machine's noise, for a second compiled model per
  batch size: not taken. The int8 matrix products already run at ~400 GMAC/s,
  about what two Zen 4 cores' VNNI units do (bench/int8_ceiling.py), and
  converting through `ov.convert_model` (one SDPA node per attention) was
  slower under int8 (47.0 against 45.3).
- A compiled model is called through one infer request under a lock: a
  request is not thread-safe, and the engine runs one heavy job at a time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)


COMPILED_FOLDER = "openvino-compiled"  # under the fast-path cache: compiled models of chosen paths


def available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def int8_available() -> bool:
    return available() and importlib.util.find_spec("nncf") is not None


def precision_for(native_bf16: bool) -> str:
    """OpenVINO's inference precision hint for a CPU: bf16 where the hardware computes it."""
    return "bf16" if native_bf16 else "f32"


@contextlib.contextmanager
def quiet_nncf():
    """Import NNCF with its telemetry off (no network, no files under ~/intel)."""
    saved = {name: os.environ.get(name) for name in ("NNCF_CI", "CI")}
    os.environ["NNCF_CI"] = "1"  # nncf.telemetry: use a stub
    os.environ["CI"] = "true"  # openvino_telemetry's consent check: declined, nothing written
    try:
        import nncf
        import nncf.telemetry.decorator as decorator
        import nncf.telemetry.wrapper as wrapper

        if not isinstance(wrapper.telemetry, wrapper.NNCFTelemetryStub):  # imported earlier by someone else
            wrapper.telemetry = decorator.telemetry = wrapper.NNCFTelemetryStub()
        yield nncf
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _Wrapper(torch.nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def export_onnx(
    forward: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, target: Path, dynamic_axes: Sequence[int] = (0,)
) -> None:
    """Write `forward` (a frozen module or one of its methods) as ONNX with the given input axes dynamic."""
    axes = {int(a): f"d{a}" for a in dynamic_axes}
    # Traced with autograd on: under no_grad, nn.MultiheadAttention (open_clip's own ViT) takes
    # its fused fast path, which the ONNX exporter cannot write.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Wrapper(forward).eval(),
            (example,),
            str(target),
            input_names=["pixels"],
            output_names=["features"],
            dynamic_axes={"pixels": axes, "features": {0: "d0"} if 0 in axes else {}},
            opset_version=17,
            dynamo=False,
        )


def save_ir(
    forward: Callable[[torch.Tensor], torch.Tensor],
    example: torch.Tensor,
    target: Path,
    dynamic_axes: Sequence[int] = (0,),
    *,
    precise_stem: bool = False,
) -> Path:
    """Export `forward` to an OpenVINO IR at `target` (.xml, fp16 weights) through ONNX; returns target.

    precise_stem: keep the first convolution out of bf16 (see `keep_out_of_bf16`)."""
    import openvino as ov

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="medlens-ov-export-") as tmp:
        onnx_file = Path(tmp) / "model.onnx"
        export_onnx(forward, example, onnx_file, dynamic_axes)
        model = ov.Core().read_model(str(onnx_file))
        partial = target.with_name(f"{target.stem}.{os.getpid()}.partial.xml")
        ov.save_model(model, str(partial), compress_to_fp16=True)
    if precise_stem:
        keep_out_of_bf16(partial, first_of_type="Convolution")
    partial.with_suffix(".bin").replace(target.with_suffix(".bin"))
    partial.replace(target)
    return target


PRECISE_ATTRIBUTE = {"name": "DisablePrecisionConversion", "version": "0", "value": "dynamic:dynamic"}


def keep_out_of_bf16(xml: Path, *, first_of_type: str) -> str:
    """Mark the first layer of type `first_of_type` in an IR so the CPU plugin leaves it in its own precision
    under a bf16 hint (OpenVINO's DisablePrecisionConversion runtime attribute, read from the IR); returns
    the layer's name. Written into the XML because the Python API cannot create that typed attribute.

    Why the stem: bf16 keeps 8 significant bits, so the input pixels themselves lose up to half a grey
    level before the first convolution. On the shipped ResNet-152 (medlens-clip, 257 real images of 9
    kinds) the worst cosine to fp32 went from 0.99832 to 0.99903 with only the stem convolution kept out
    of bf16, at ~5-10% of the bf16 time (the stem is ~1% of the multiply-adds); keeping whole later stages
    in float cost 1.5-4x the time and gained less (bench/results/path_options.md)."""
    import xml.etree.ElementTree as ET

    tree = ET.parse(xml)
    layer = next((el for el in tree.getroot().iter("layer") if el.get("type") == first_of_type), None)
    if layer is None:
        raise ValueError(f"no {first_of_type} layer in {xml.name}")
    rt_info = layer.find("rt_info")
    if rt_info is None:
        rt_info = ET.Element("rt_info")
        layer.insert(1 if layer.find("data") is not None else 0, rt_info)
    if not any(a.get("name") == PRECISE_ATTRIBUTE["name"] for a in rt_info.iter("attribute")):
        ET.SubElement(rt_info, "attribute", PRECISE_ATTRIBUTE)
    tree.write(xml, encoding="utf-8", xml_declaration=True)
    return str(layer.get("name"))


def runtime_precisions(forward: "OpenVinoForward") -> dict[str, str]:
    """{layer name: the precision the compiled model runs it in} (for tests and benchmarks)."""
    return {
        op.get_friendly_name(): op.get_rt_info()["runtimePrecision"].astype(str)
        for op in forward.compiled.get_runtime_model().get_ordered_ops()
    }


def quantize_ir(source: Path, target: Path, calibration: Sequence[torch.Tensor], *, transformer: bool) -> Path:
    """NNCF post-training int8 quantisation of the IR at `source` on `calibration` inputs; saved at `target`."""
    import openvino as ov

    with quiet_nncf() as nncf:
        model = ov.Core().read_model(str(source))
        dataset = nncf.Dataset([np.ascontiguousarray(x.detach().float().numpy()) for x in calibration])
        kwargs = {}
        if transformer:
            from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

            # SmoothQuant off (alpha -1): it moves activation ranges into the weights as the calibration images
            # set them, and on images unlike those (colour photographs, x-rays after grey scans) the ViT-B/16
            # fell to cosine 0.81; without it, >= 0.996 on 160 unseen real images, and as fast (bench/results).
            no_smoothing = AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))
            kwargs = {"model_type": nncf.ModelType.TRANSFORMER, "advanced_parameters": no_smoothing}
        logging.disable(logging.WARNING)  # NNCF logs per layer and draws progress bars
        try:
            sink = io.StringIO()
            with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                warnings.simplefilter("ignore")
                quantized = nncf.quantize(model, dataset, subset_size=len(calibration), fast_bias_correction=True, **kwargs)
        finally:
            logging.disable(logging.NOTSET)
    partial = target.with_name(f"{target.stem}.{os.getpid()}.partial.xml")
    ov.save_model(quantized, str(partial), compress_to_fp16=False)
    partial.with_suffix(".bin").replace(target.with_suffix(".bin"))
    partial.replace(target)
    return target


class OpenVinoForward:
    """A compiled OpenVINO model called like a torch module: float tensor in, float32 tensor out."""

    def __init__(self, xml: Path, precision: str, threads: int, compiled_cache: Path | None = None):
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": int(threads)}
        if compiled_cache is not None:
            # OpenVINO keeps the compiled model here, keyed by the model, this configuration and its own version, and
            # imports it on the next load instead of compiling again (AMD EPYC: the medlens-clip image tower, bf16,
            # 1 thread, 0.55 -> 0.16 s; the 3D encoder, bf16, 2 threads, 0.92 -> 0.53 s; ~115 MB on disk per path).
            # Only chosen paths ask for it: a probe's rejected candidates would leave ~100 MB blobs behind.
            compiled_cache.mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(compiled_cache)
        self.compiled = core.compile_model(core.read_model(str(xml)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.precision = precision
        self._lock = threading.Lock()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        with self._lock:
            out = self.request.infer({0: arr})[0]
            return torch.from_numpy(np.array(out, dtype=np.float32, copy=True))  # the request reuses its buffer


def compiled_cache(folder: Path | None) -> Path | None:
    """Where a chosen path's compiled models are kept: beside the IRs, or nowhere without a cache folder."""
    return None if folder is None else folder / COMPILED_FOLDER


def cached_ir(folder: Path | None, name: str, build: Callable[[Path], Path]) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """`folder/name` (an .xml), built by `build(target)` when absent. Without a cache folder it is built
    in a temporary folder, returned with it (keep it alive while the IR is read)."""
    tmpdir = None
    if folder is None:
        tmpdir = tempfile.TemporaryDirectory(prefix="medlens-ov-", ignore_cleanup_errors=True)
        folder = Path(tmpdir.name)
    target = folder / name
    if not (target.is_file() and target.with_suffix(".bin").is_file()):
        build(target)
    return target, tmpdir
