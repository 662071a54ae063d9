"""Viewer and reader speed: the wall-clock checks that used to be unit-test asserts (issue 15).

Timing asserts flake on a busy machine, so they live here, measured with
interleaved repeats and medians, and the table says how loaded the machine
was. Targets (the old tests' limits):
- rendering one 512x512 view of a 60-slice CT with a 10 mm MIP: median < 100 ms per plane;
- the automatic window of a 200x512x512 volume: < 1 s;
- a zip holding one good series plus junk, traversal, a nested zip and a 1 GiB deflate bomb:
  loaded (the series) and refused (the rest) in < 30 s.

    python bench/viewer_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

import numpy as np  # noqa: E402

from _machine import cpu_flags, cpu_name, loadavg, write_result  # noqa: E402
from _report import table  # noqa: E402

OUT = REPO / "bench" / "results" / "viewer_speed.md"


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (fonts, caches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def render_times(repeats: int) -> dict[str, float]:
    from engine.scan import Modality, Scan
    from engine.views import render_view

    vol = np.random.default_rng(0).normal(0, 300, (60, 512, 512)).astype(np.float32)
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    scan = Scan(vol, (2.5, 0.7, 0.7), affine, Modality.CT)
    return {
        plane: _median_ms(lambda plane=plane: render_view(scan, plane, None, 50, 400, mip_mm=10), repeats)
        for plane in ("axial", "coronal", "sagittal")
    }


def auto_window_ms(repeats: int) -> float:
    from engine.windowing import auto_window

    vol = (np.arange(200 * 512 * 512, dtype=np.float32) % 4096).reshape(200, 512, 512)
    return _median_ms(lambda: auto_window(vol), repeats)


def hostile_zip_s(repeats: int) -> float:
    """The zip-safety acceptance case (tests/test_zip_safety.py builds the same archive)."""
    from test_zip_safety import hostile_zip

    from engine.io import load

    with tempfile.TemporaryDirectory() as tmp:
        path = hostile_zip(Path(tmp))
        return _median_ms(lambda: load([path]), repeats) / 1000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    before = loadavg()
    renders = render_times(args.repeats)
    window = auto_window_ms(args.repeats)
    zip_s = hostile_zip_s(max(1, args.repeats // 2))
    rows = [(f"render 512x512 {plane}, 10 mm MIP", f"{ms:.0f} ms", "< 100 ms", ms < 100) for plane, ms in renders.items()]
    rows.append(("auto window, 200x512x512", f"{window:.0f} ms", "< 1000 ms", window < 1000))
    rows.append(("hostile zip (series + junk + bomb)", f"{zip_s:.1f} s", "< 30 s", zip_s < 30))
    lines = [
        "# Viewer and reader speed (`python bench/viewer_speed.py`)",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- CPU: {cpu_name()}; flags: {cpu_flags()}",
        f"- load average before / after: {before} / {loadavg()}; median of {args.repeats} repeats after a warm-up",
        "",
        *table(
            "what | median | target | met", "lrll", ((what, value, target, "yes" if ok else "**no**") for what, value, target, ok in rows)
        ),
    ]
    write_result(OUT, lines, echo=True, end="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
