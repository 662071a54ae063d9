"""The CPU inference options that were tried for the CLIP image towers, kept or not, with their numbers.

    python bench/path_options.py                          # ViT-B/16 (BiomedCLIP-shaped) and medlens-clip
    python bench/path_options.py --compile                # also torch.compile (30-140 s of compilation per shape)
    python bench/path_options.py --models medlens-clip --repeats 5

engine.models.fastpath probes only the paths that can win; this script
measures the ones that were considered and lost too, on the same 16 real
images, batch 1 and 16, interleaved repeats (minimum wall ms/img, minimum
process CPU ms/img), with the minimum cosine of the embeddings to fp32:

- torch: fp32; fp32 channels_last; bf16 weights; bf16 weights channels_last;
  autocast bf16; fp16 weights; TorchScript freeze + optimize_for_inference
  (BatchNorm folding, oneDNN layouts); oneDNN "fp32 math in bf16"
  (`torch.backends.mkldnn.*.fp32_precision = "bf16"`); oneDNN Graph
  (TorchScript trace + freeze with `torch.jit.enable_onednn_fusion`); for
  ViTs, timm's fused attention (F.scaled_dot_product_attention) against
  its explicit softmax attention; with --compile, torch.compile bf16
  (inductor, freezing) and its compilation time;
- OpenVINO: f32, bf16 and f16 precision hints; LATENCY against THROUGHPUT
  performance hints; 1 against 2 inference threads;
- ONNX Runtime: fp32, with and without spinning threads;
- IPEX (intel-extension-for-pytorch): whether it is importable (its wheels
  pin one torch version; none matches torch 2.14).
Options that need bf16 hardware are skipped on CPUs without it.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

from _machine import machine_lines, uptime  # noqa: E402

CL = torch.channels_last
FAILED: dict[str, str] = {}  # options that could not be built or run, with the reason (reported per model)


def torch_options(visual: torch.nn.Module, example: torch.Tensor, native_bf16: bool, compile_: bool, is_vit: bool) -> dict:
    opts = {"fp32": visual}
    if not is_vit:
        cl = copy.deepcopy(visual).to(memory_format=CL)
        opts["fp32 channels_last"] = lambda x, _m=cl: _m(x.contiguous(memory_format=CL))
    half = copy.deepcopy(visual).half()
    opts["fp16 weights"] = lambda x, _m=half: _m(x.half()).float()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(copy.deepcopy(visual), example, check_trace=False)))
            frozen(example)
        opts["TorchScript freeze + optimize_for_inference"] = frozen
    except Exception as exc:  # the ViT's traced graph trips TorchScript's optimiser (torch 2.14.1)
        FAILED["TorchScript freeze + optimize_for_inference"] = f"{type(exc).__name__}: {str(exc)[:100]}"

    def fpmath(x, _m=visual):
        with torch.backends.mkldnn.flags(enabled=True, fp32_precision="bf16"):
            return _m(x)

    if native_bf16:
        opts["oneDNN fp32 math in bf16"] = fpmath
        bf = copy.deepcopy(visual).to(torch.bfloat16)
        opts["bf16 weights"] = lambda x, _m=bf: _m(x.to(torch.bfloat16)).float()
        if not is_vit:
            bfc = copy.deepcopy(visual).to(torch.bfloat16).to(memory_format=CL)
            opts["bf16 weights channels_last"] = lambda x, _m=bfc: _m(x.to(torch.bfloat16).contiguous(memory_format=CL)).float()

        def autocast(x, _m=visual):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return _m(x).float()

        opts["autocast bf16"] = autocast
        opts.update(onednn_graph(visual, example))
        if is_vit:
            opts.update(explicit_attention(bf))
        if compile_:
            import torch._inductor.config as inductor

            inductor.freezing = True
            twin = copy.deepcopy(visual).to(torch.bfloat16)
            compiled = torch.compile(twin, dynamic=False)
            opts["torch.compile bf16 (freezing)"] = lambda x, _c=compiled: _c(x.to(torch.bfloat16)).float()
    return opts


def onednn_graph(visual, example) -> dict:
    try:
        torch.jit.enable_onednn_fusion(True)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.freeze(torch.jit.trace(copy.deepcopy(visual), example, check_trace=False))
            traced(example)

        def run(x, _m=traced):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return _m(x).float()

        return {"oneDNN Graph (TorchScript, autocast bf16)": run}
    except Exception as exc:
        FAILED["oneDNN Graph (TorchScript, autocast bf16)"] = f"{type(exc).__name__}: {str(exc)[:100]}"
        return {}
    finally:
        torch.jit.enable_onednn_fusion(False)


def explicit_attention(bf16_visual) -> dict:
    """The same bf16 ViT with timm's explicit softmax attention instead of F.scaled_dot_product_attention."""
    twin = copy.deepcopy(bf16_visual)
    switched = 0
    for m in twin.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
            switched += 1
    return (
        {f"bf16 weights, explicit attention ({switched} blocks)": lambda x, _m=twin: _m(x.to(torch.bfloat16)).float()} if switched else {}
    )


def runtime_options(visual, example, native_bf16: bool, folder: Path) -> dict:
    from engine.models import openvino_path

    opts = {}
    onnx_file = folder / "tower.onnx"
    openvino_path.export_onnx(visual, example, onnx_file)
    if importlib.util.find_spec("onnxruntime"):
        import onnxruntime as ort

        for spin in ("0", "1"):
            o = ort.SessionOptions()
            o.intra_op_num_threads, o.inter_op_num_threads = torch.get_num_threads(), 1
            o.add_session_config_entry("session.intra_op.allow_spinning", spin)
            s = ort.InferenceSession(str(onnx_file), o, providers=["CPUExecutionProvider"])
            opts[f"ONNX Runtime fp32, spinning {'on' if spin == '1' else 'off'}"] = lambda x, _s=s: torch.from_numpy(
                _s.run(None, {_s.get_inputs()[0].name: x.numpy()})[0]
            )
    if openvino_path.available():
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(onnx_file))
        precisions = ["f32"] + (["bf16", "f16"] if native_bf16 else [])
        configs = [(p, "LATENCY", torch.get_num_threads()) for p in precisions]
        if native_bf16:
            configs += [("bf16", "THROUGHPUT", torch.get_num_threads()), ("bf16", "LATENCY", 1)]
        for precision, hint, threads in configs:
            compiled = core.compile_model(
                model, "CPU", {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": threads}
            )
            request = compiled.create_infer_request()
            opts[f"OpenVINO {precision}, {hint}, {threads} thread(s)"] = lambda x, _r=request: torch.from_numpy(
                _r.infer({0: x.numpy()})[0].copy()
            )
    return opts


def measure(name: str, clip, images, args, native_bf16: bool) -> list[str]:
    from engine.models.fastpath import time_interleaved

    visual = clip.model.visual.eval()
    pixels = clip.image_tensor(images)
    is_vit = any("attention" in type(m).__name__.lower() for m in visual.modules())
    build = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        opts = torch_options(visual, pixels[:1], native_bf16, args.compile, is_vit)
        opts.update(runtime_options(visual, pixels[:1], native_bf16, Path(tmp)))
        build_s = time.perf_counter() - t
        rows = []
        with torch.inference_mode():
            reference = visual(pixels).float()
            for option, forward in list(opts.items()):
                t = time.perf_counter()
                try:
                    out = forward(pixels).float()  # the first call: compilation / kernel creation for batch 16
                    forward(pixels[:1])
                except Exception as exc:
                    FAILED[option] = f"{type(exc).__name__}: {str(exc)[:100]}"
                    del opts[option]
                    continue
                build[option] = time.perf_counter() - t
                cos = float(torch.nn.functional.cosine_similarity(reference, out).min())
                rows.append((option, cos))
                print(f"{name}: {option}: cosine {cos:.5f}, first calls {build[option]:.1f} s", flush=True)
            wall, cpu = time_interleaved(opts, {1: pixels[:1], 16: pixels}, args.repeats)
    base = {b: wall["fp32"][b] for b in (1, 16)}
    lines = [
        f"## {name}",
        "",
        f"Building every option took {build_s:.0f} s.",
        "",
        "| option | b1 ms/img | b16 ms/img | speed-up b1 / b16 | CPU ms/img b1 / b16 | min cosine | first calls s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for option, cos in rows:
        w, c = wall[option], cpu[option]
        lines.append(
            f"| {option} | {w[1] * 1000:.1f} | {w[16] * 1000 / 16:.1f} | {base[1] / w[1]:.2f} / {base[16] / w[16]:.2f} | "
            f"{c[1] * 1000:.1f} / {c[16] * 1000 / 16:.1f} | {cos:.5f} | {build[option]:.1f} |"
        )
    lines += [f"| {option} | failed: {why} | | | | | |" for option, why in FAILED.items()]
    FAILED.clear()
    return lines + [""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="biomedclip-shape,medlens-clip")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "path_options.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from clip_throughput import load_clip, load_images

    from engine.models.cpu import cpu_profile

    native = cpu_profile().native_bf16
    load_before = uptime()
    images, note = load_images(16, True)
    ipex = (
        "importable"
        if importlib.util.find_spec("intel_extension_for_pytorch")
        else "not installed: its newest wheel on PyPI (2.8.0) requires torch 2.8, and MedLens pins torch 2.14.1"
    )
    lines = (
        ["# CPU inference options for the CLIP image towers: what was tried", ""]
        + machine_lines()
        + [
            f"- torch {torch.__version__}, {torch.get_num_threads()} threads; images: {note}; {args.repeats} interleaved repeats, minimum",
            f"- IPEX: {ipex}",
            f"- command: `python bench/path_options.py --models {args.models} --repeats {args.repeats}{' --compile' if args.compile else ''}`",
            "",
        ]
    )
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        clip, model_note = load_clip(name)
        lines += measure(f"{name} ({model_note})", clip, images, args, native)
        del clip
    lines += [f"Load: before `{load_before}`; after `{uptime()}`.", ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
