"""Memory of loading big series: peak RSS of `medlens info`, before (a git ref) and after (this checkout),
and the app server's RSS while sessions hold scans and after they are released.

    python bench/memory.py                          # 2,000 and 3,000 slices, before = main, server scenario
    python bench/memory.py --slices 300 --over-cap-slices 400 --no-server      # smoke test, a minute

Series are written with pydicom (tests/_big_series.py) into a temporary
folder under bench/work/ (git-ignored) and deleted afterwards:
- 2,000 slices of 512x512 CT (a phantom, 12-bit stored, intercept -1024):
  as a folder (1 GB of files) and as a zip (deflate);
- 3,000 RLE-compressed slices of zeros in a zip (tens of MB): 786 M voxels,
  over the default cap of MEDLENS_MAX_SERIES_VOXELS, the case the issue
  found accepted with 7.9 GB peak.
Each `medlens info --json PATH` runs in a fresh process; its peak RSS is the
kernel's (wait4 ru_maxrss). "before" runs the engine of `--before-ref`
(default main), exported with `git archive` into bench/work/, on the same
files, interleaved with "after".

Server scenario (this checkout only): the app in a subprocess, with
MEDLENS_SESSION_IDLE_MIN short; clients (gradio_client) upload the
2,000-slice zip, one client uploads the over-cap zip while another keeps
loading a small file (its latency shows whether others are still served),
then the sessions go idle and the server's RSS is read again.

Writes bench/results/memory.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

import _machine  # noqa: E402
from load import rss_mb, start_server  # noqa: E402

WORK = REPO / "bench" / "work"
PY = sys.executable


# --------------------------------------------------------------------------- running medlens info
def run_info(path: Path, pythonpath: Path, env_extra: dict | None = None) -> dict:
    """`medlens info --json path` in a fresh process: seconds, peak RSS (MB, GNU time's %M), exit status, what it said."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath), **(env_extra or {})}
    code = "import sys; from engine.cli import main; sys.exit(main(sys.argv[1:]))"
    start = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "MAXRSS_KB %M", PY, "-c", code, "info", "--json", str(path)],
        env=env,
        cwd=str(pythonpath),
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    err = proc.stderr.strip().splitlines()
    peak = int(err.pop().split()[1]) / 1024 if err and err[-1].startswith("MAXRSS_KB") else float("nan")
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {
        "seconds": seconds,
        "peak_mb": peak,
        "status": proc.returncode,
        "shape": lines[0]["shape"] if lines else None,
        "message": err[0][:300] if err else "",
    }


def export_ref(ref: str) -> Path:
    """The engine of git ref `ref`, exported into bench/work/ref-<ref> (no worktree, no checkout)."""
    dest = WORK / f"ref-{ref.replace('/', '_')}"
    if not (dest / "engine").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", ref, "engine", "pyproject.toml"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


# --------------------------------------------------------------------------- the data
def build(folder: Path, slices: int, over_cap: int) -> dict[str, Path]:
    from _big_series import write_ct_series

    t0 = time.perf_counter()
    write_ct_series(folder / "series", slices)
    write_ct_series(folder / "zipwork", slices, zip_path=folder / "series.zip")
    write_ct_series(folder / "capwork", over_cap, pixels="zeros", rle=True, zip_path=folder / "over_cap.zip")
    print(f"wrote the series in {time.perf_counter() - t0:.0f} s", flush=True)
    return {"folder": folder / "series", "zip": folder / "series.zip", "over_cap": folder / "over_cap.zip"}


def size_mb(path: Path) -> float:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir()) / 2**20
    return path.stat().st_size / 2**20


# --------------------------------------------------------------------------- the server scenario
def load_file(url: str, path: Path) -> tuple[float, str]:
    """(seconds, error or '') of one /load_files call in a new client session."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    start = time.perf_counter()
    try:
        client.predict([handle_file(str(path))], api_name="/load_files")
        return time.perf_counter() - start, ""
    except Exception as exc:  # the app's message for the user
        return time.perf_counter() - start, str(exc).splitlines()[0][:300]


def server_scenario(data: dict[str, Path], clients: int, idle_min: float) -> dict:
    from pydicom.data import get_testdata_file

    from _app import free_port

    port = free_port()
    proc = start_server(port, {"MEDLENS_SESSION_IDLE_MIN": str(idle_min)})
    url = f"http://127.0.0.1:{port}/"
    out: dict = {"clients": clients, "idle_min": idle_min}
    try:
        time.sleep(2)
        out["baseline_mb"] = rss_mb(proc.pid)
        peak = [out["baseline_mb"]]
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                peak.append(rss_mb(proc.pid))
                time.sleep(0.2)

        threading.Thread(target=watch, daemon=True).start()
        results = []
        threads = [threading.Thread(target=lambda: results.append(load_file(url, data["zip"]))) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["big_loads"] = results
        out["loaded_mb"] = rss_mb(proc.pid)
        # one more user uploads a series over the cap while another keeps loading a small file
        small = Path(get_testdata_file("CT_small.dcm"))
        small_times: list[float] = []
        refusal: list = []
        t = threading.Thread(target=lambda: refusal.append(load_file(url, data["over_cap"])))
        t.start()
        while t.is_alive() or len(small_times) < 3:
            small_times.append(load_file(url, small)[0])
        out["over_cap"] = refusal[0]
        out["small_during_refusal_s"] = small_times
        # a small user during a big load
        small_times = []
        t = threading.Thread(target=lambda: refusal.append(load_file(url, data["zip"])))
        t.start()
        while t.is_alive() or len(small_times) < 3:
            small_times.append(load_file(url, small)[0])
        out["big_during_small"] = refusal[-1]
        out["small_during_big_load_s"] = small_times
        out["after_all_loads_mb"] = rss_mb(proc.pid)
        wait = idle_min * 60 + 45
        print(f"waiting {wait:.0f} s for the idle sessions to be released", flush=True)
        time.sleep(wait)
        out["released_mb"] = rss_mb(proc.pid)
        stop.set()
        out["peak_mb"] = max(peak)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


# --------------------------------------------------------------------------- report
def write_report(args, data, sizes, rows, server, path: Path) -> None:
    lines = [
        "# Memory: loading big series, and a server's sessions",
        "",
        f"- Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Command: `python bench/memory.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- CPU: {_machine.cpu_name()}, {os.cpu_count()} cores; memory {_total_gb():.0f} GB; Python {platform.python_version()}",
        f"- Machine load (1/5/15-min load average) at the start: {args.load_before}; at the end: {_machine.loadavg()} "
        "(a shared machine: times vary with other work, memory figures do not)",
        f"- before = engine at git ref `{args.before_ref}`; after = this checkout",
        "",
        "## `medlens info --json PATH`, one fresh process each",
        "",
        "| input | on disk MB | code | seconds | peak RSS MB | result |",
        "|---|---:|---|---:|---:|---|",
    ]
    for name, side, r in rows:
        result = f"shape {r['shape']}" if r["status"] == 0 and r["shape"] else f"exit {r['status']}: {r['message']}"
        lines.append(f"| {name} | {sizes[name]:,.0f} | {side} | {r['seconds']:.1f} | {r['peak_mb']:,.0f} | {result} |")
    lines += [
        "",
        f"Series: {args.slices:,} slices of 512x512 (a phantom CT: 12-bit stored, intercept -1024) = "
        f"{args.slices * 512 * 512 / 1e6:,.0f} M voxels, {args.slices * 512 * 512 * 4 / 2**20:,.0f} MB as float32, "
        f"{args.slices * 512 * 512 * 2 / 2**20:,.0f} MB as int16; over_cap: {args.over_cap_slices:,} RLE slices of zeros = "
        f"{args.over_cap_slices * 512 * 512 / 1e6:,.0f} M voxels (default cap 600 M).",
        "",
    ]
    if server:
        loads = server["big_loads"]
        lines += [
            "## The app server (this checkout)",
            "",
            f"{server['clients']} clients (gradio_client, one session each) upload the {args.slices:,}-slice zip at once; "
            "then one client uploads the over-cap zip while another keeps loading CT_small.dcm, and one more "
            f"uploads the {args.slices:,}-slice zip while the small loads go on; then every session is left idle "
            f"(MEDLENS_SESSION_IDLE_MIN={server['idle_min']:g}).",
            "",
            "| server RSS | MB |",
            "|---|---:|",
            f"| at start | {server['baseline_mb']:,.0f} |",
            f"| after {server['clients']} concurrent loads | {server['loaded_mb']:,.0f} |",
            f"| after every load | {server['after_all_loads_mb']:,.0f} |",
            f"| peak (sampled every 0.2 s) | {server['peak_mb']:,.0f} |",
            f"| after the sessions went idle and were released | {server['released_mb']:,.0f} |",
            "",
            f"- concurrent big loads: {', '.join(f'{s:.1f} s' + (f' ({e})' if e else '') for s, e in loads)}",
            f"- over-cap upload: answered in {server['over_cap'][0]:.1f} s: {server['over_cap'][1] or 'loaded (not refused!)'}",
            f"- small loads meanwhile: {_spread(server['small_during_refusal_s'])}",
            f"- big load alone: {server['big_during_small'][0]:.1f} s {server['big_during_small'][1]}; "
            f"small loads meanwhile: {_spread(server['small_during_big_load_s'])}",
            "",
        ]
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())


def _spread(values: list[float]) -> str:
    return f"{len(values)} loads, median {statistics.median(values):.2f} s, max {max(values):.2f} s" if values else "none"


def _total_gb() -> float:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=2000)
    ap.add_argument("--over-cap-slices", type=int, default=3000)
    ap.add_argument("--before-ref", default="main", help="git ref whose engine is 'before' ('' to skip)")
    ap.add_argument("--before-over-cap", action="store_true", help="also run 'before' on the over-cap zip (it loads it: ~8 GB)")
    ap.add_argument("--no-server", action="store_true")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--idle-min", type=float, default=0.5)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "memory.md")
    args = ap.parse_args()
    args.load_before = _machine.loadavg()
    WORK.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WORK, prefix="memory-") as tmp:
        data = build(Path(tmp), args.slices, args.over_cap_slices)
        sizes = {name: size_mb(p) for name, p in data.items()}
        before = export_ref(args.before_ref) if args.before_ref else None
        rows = []
        for name in ("folder", "zip", "over_cap"):
            sides = [("after", REPO)]
            if before is not None and (name != "over_cap" or args.before_over_cap):
                sides.insert(0, (f"before ({args.before_ref})", before))
            for side, root in sides:
                r = run_info(data[name], root)
                print(f"{name:9s} {side:14s} {r['seconds']:6.1f} s {r['peak_mb']:8.0f} MB  {r['shape'] or r['message'][:100]}", flush=True)
                rows.append((name, side, r))
        server = None if args.no_server else server_scenario(data, args.clients, args.idle_min)
        write_report(args, data, sizes, rows, server, args.out)


if __name__ == "__main__":
    main()
