"""Where the time of the OpenVINO int8 ViT-B/16 goes on this CPU, and the most any path can gain over fp32 here.

    python bench/int8_ceiling.py            # BiomedCLIP-shaped ViT-B/16, batch 16, 2 threads

Issue 19's gate for ViT-B/16 at batch 16 is the same (5x open_clip fp32) on
every CPU with AVX512-BF16, with or without AMX. This script measures what
that asks of the machine it runs on:
1. the engine's openvino-int8 path (the one `apply_best` picks on such CPUs
   without AMX) is built as the engine builds it (NNCF-quantised IR, the
   class-token last block), compiled at a static batch of 16 with
   OpenVINO's per-node counters on; its time is split by node type;
2. the int8 matrix products' rate (multiply-adds per second), counted from
   the compiled model's own shapes;
3. torch's fp32 and bf16 rates on the same matrix shapes (F.linear, the
   kernels open_clip's fp32 tower runs), and open_clip's fp32 tower itself;
4. the bound: if everything but the int8 matrix products took no time at
   all, the tower would take (int8 products' ms/img); divided into open_clip
   fp32's ms/img, that is the most int8 can reach on this CPU without
   changing the arithmetic.
All in one process, interleaved repeats, minimum time.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _machine import loadavg, machine_lines  # noqa: E402
from _setup import RESULTS, fresh_fastpath_cache  # noqa: E402

BATCH = 16
MATMUL_NODES = ("FullyConnected", "FullyConnectedQuantizedLegacy")


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def compiled_int8(cache: Path, threads: int):
    """The engine's openvino-int8 IR (from the fast-path cache), compiled at batch 16 with per-node counters."""
    import openvino as ov

    xml = next(cache.glob("image-int8-*.xml"))
    core = ov.Core()
    model = core.read_model(str(xml))
    model.reshape([BATCH, 3, 224, 224])
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "bf16", "PERF_COUNT": True}
    return core.compile_model(model, "CPU", config)


def matmul_macs(compiled) -> dict[str, int]:
    """{node name: multiply-adds} of the compiled model's int8 matrix products (static shapes)."""
    macs = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        if op.get_rt_info()["layerType"].astype(str) not in MATMUL_NODES:
            continue
        out = [int(d) for d in op.get_output_partial_shape(0).to_shape()]
        inner = int(op.input(0).get_partial_shape().to_shape()[-1])
        macs[op.get_friendly_name()] = int(np.prod(out)) * inner
    return macs


def torch_linear_rate(dtype: torch.dtype, repeats: int) -> float:
    """torch F.linear multiply-adds per second on ViT-B/16's four matrix shapes at batch 16 (197 tokens)."""
    tokens = BATCH * 197
    shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
    total_s, total_macs = 0.0, 0
    for inner, outer in shapes:
        x = torch.randn(tokens, inner, dtype=dtype)
        w = torch.randn(outer, inner, dtype=dtype)
        total_s += best_of(lambda x=x, w=w: torch.nn.functional.linear(x, w), repeats)
        total_macs += tokens * inner * outer
    return total_macs / total_s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "int8_ceiling.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from _biomedclip_shape import biomedclip_shaped

    from engine.models import fastpath
    from engine.models.cpu import cpu_profile

    cache = fresh_fastpath_cache("medlens-int8-ceiling-")
    clip, _ = biomedclip_shaped(seed=0)
    fastpath.build_path(clip, "openvino-int8", cpu_profile())  # writes the quantised IR into the cache
    compiled = compiled_int8(Path(cache.name), args.threads)
    request = compiled.create_infer_request()
    pixels = torch.randn(BATCH, 3, 224, 224)
    arr = pixels.numpy()
    load_before = loadavg()

    def fp32_tower():
        with torch.no_grad():
            clip.model.encode_image(pixels)

    # interleave the two sides; the profile kept is that of the int8 run that was fastest
    fp32_s, int8_s, profile = [], [], None
    fp32_tower()  # warm-up of both sides
    request.infer({0: arr})
    for _ in range(args.repeats):
        t = time.perf_counter()
        fp32_tower()
        fp32_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        request.infer({0: arr})
        int8_s.append(time.perf_counter() - t)
        if int8_s[-1] == min(int8_s):
            profile = [(i.node_name, i.node_type, i.exec_type, i.real_time.total_seconds()) for i in request.profiling_info]
    fp32_ms, int8_ms = min(fp32_s) * 1000 / BATCH, min(int8_s) * 1000 / BATCH
    by_type: dict[str, float] = collections.Counter()
    counts: dict[str, int] = collections.Counter()
    for _name, node_type, exec_type, seconds in profile:
        by_type[f"{node_type} ({exec_type})"] += seconds * 1000 / BATCH
        counts[f"{node_type} ({exec_type})"] += 1
    macs = matmul_macs(compiled)
    matmul_ms = sum(seconds for name, node_type, _e, seconds in profile if node_type in MATMUL_NODES) * 1000 / BATCH
    int8_rate = sum(macs.values()) / BATCH / (matmul_ms / 1000)
    fp32_rate = torch_linear_rate(torch.float32, args.repeats)
    bf16_rate = torch_linear_rate(torch.bfloat16, args.repeats) if cpu_profile().native_bf16 else float("nan")
    counted_ms = sum(by_type.values())
    bound = fp32_ms / matmul_ms

    lines = [
        "# Int8 ceiling: ViT-B/16 on this CPU, OpenVINO int8 against open_clip fp32",
        "",
        *machine_lines(),
        f"- threads: {args.threads}; model: BiomedCLIP-shaped ViT-B/16 224 px, random weights; batch {BATCH}; pixels random",
        f"- path: the engine's openvino-int8 (NNCF, SmoothQuant off, class-token last block), static batch {BATCH}, bf16 hint "
        f"for what stays float; {args.repeats} interleaved repeats, minimum; load {load_before} before, {loadavg()} after",
        "- command: `python bench/int8_ceiling.py`",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| open_clip fp32 tower (`encode_image`), ms/img | {fp32_ms:.1f} |",
        f"| openvino-int8 tower, ms/img (wall) | {int8_ms:.1f} |",
        f"| of which int8 matrix products (per-node counters), ms/img | {matmul_ms:.1f} |",
        f"| multiply-adds in those products, GMAC/img | {sum(macs.values()) / BATCH / 1e9:.2f} |",
        f"| int8 matrix-product rate, GMAC/s | {int8_rate / 1e9:.0f} |",
        f"| torch fp32 F.linear rate on the same shapes, GMAC/s | {fp32_rate / 1e9:.0f} |",
        f"| torch bf16 F.linear rate on the same shapes, GMAC/s | {bf16_rate / 1e9:.0f} |",
        f"| int8 / fp32 matrix-product rate | {int8_rate / fp32_rate:.2f}x |",
        f"| tower speed-up now (fp32 / int8 wall) | {fp32_ms / int8_ms:.2f}x |",
        f"| **bound**: fp32 tower / int8 matrix products alone | **{bound:.2f}x** |",
        "",
        f"Where the int8 tower's time goes (per-node counters of the fastest run, {counted_ms:.1f} ms/img counted):",
        "",
        "| node type (kernel) | nodes | ms/img | share |",
        "|---|---:|---:|---:|",
    ]
    for key, ms in sorted(by_type.items(), key=lambda kv: -kv[1])[:12]:
        lines.append(f"| {key} | {counts[key]} | {ms:.2f} | {100 * ms / counted_ms:.1f}% |")
    lines += [
        "",
        "The bound counts nothing but the int8 matrix products: attention's softmax and its two small products, "
        "LayerNorm, GELU, the layout changes and the preprocessing all come on top, and open_clip fp32 runs them too. "
        "A speed-up over open_clip fp32 above the bound needs fewer multiply-adds (a different model or fewer tokens: "
        "not the same answer) or a CPU with a faster int8 or bf16 unit (AMX).",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    cache.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
