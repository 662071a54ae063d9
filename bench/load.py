"""Load test of the app: N concurrent users, each uploading a scan, labelling it and asking about it.

    python bench/load.py                        # N = 5, 10, 20; same file and distinct files; shipped models
    python bench/load.py --users 2 --modes same # smoke test

The app runs as `app.py` does (shipped models: medlens-clip for labels,
medlens-qformer for questions) in a subprocess on a free loopback port.
After a warm-up (one user, two at once, five distinct files: model loading
and first-use costs are not counted), each scenario starts
N threads at once (a barrier), each with its own gradio_client session:
  /load_files (the upload and the load), /label_scan (the modality's preset
  labels, 12 axial slices for volumes), /ask_question ("Which imaging
  modality is this?").
Files: "same" gives every user pydicom's CT_small.dcm; "distinct" gives each
user a different real file: images of ../shared/data (X-ray, ultrasound,
fundus, dermoscopy, pathology) when present, else copies of pydicom's
CT_small.dcm / MR_small.dcm with one pixel changed per user (distinct bytes
and content hash).
A call is an error when it raises, or when its result does not belong to the
user's own file (the loaded shape and modality are checked against a local
`engine.io.load` of that file).

Writes bench/results/load.md: errors and p50/p95/max per endpoint, the
server's peak RSS (sampled every 0.2 s) per scenario, the machine and its
load (`uptime`) before and after, since a shared machine slows every number.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]
SHARED = Path(os.environ.get("MEDLENS_SHARED_DATA", REPO.parent / "shared" / "data"))
WORK = REPO / "bench" / "work"
QUESTION = "Which imaging modality is this?"
ENDPOINTS = ("load", "label", "ask")

import _machine  # noqa: E402


# --------------------------------------------------------------------------- the server
def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average " + _machine.loadavg()


def rss_mb(pid: int, field_name: str = "VmRSS:") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def start_server(port: int, env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    """The app as app.py launches it, in a subprocess on 127.0.0.1:port (`env_extra`: MEDLENS_* settings)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1", **(env_extra or {})}
    env.pop("GRADIO_TEMP_DIR", None)  # the app's own upload folder, as a deployment gets
    code = (
        "import app, sys; from engine import settings; demo = app.build_demo(model=settings.MODEL.get()); "
        f"demo.launch(server_name='127.0.0.1', server_port={port}, quiet=True, **app.launch_kwargs())"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import urllib.request

    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError("the app exited: " + proc.stderr.read().decode()[-3000:])
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except Exception:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the app did not start in 5 minutes")


class RssWatch:
    """The server's RSS, sampled every 0.2 s while a scenario runs."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()

    def __enter__(self):
        self.peak = rss_mb(self.pid)
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self):
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __exit__(self, *exc):
        self._stop.set()


# --------------------------------------------------------------------------- the files
@dataclass
class UserFile:
    path: Path
    shape: list[int]  # what engine.io.load gives for it: the server must give this user the same
    modality: str


def _expect(path: Path) -> UserFile:
    from engine.io import load

    scan = load([path]).scans[0]
    return UserFile(path, list(scan.voxels.shape), scan.modality.value)


def shared_images(n: int) -> list[Path]:
    """Up to n real images of ../shared/data, round-robin over modalities."""
    groups = [
        sorted((SHARED / rel).glob(pattern))[:n]
        for rel, pattern in (
            ("xray/nih_cxr14_1000/images", "*.png"),
            ("ultrasound/busi/images", "*.png"),
            ("fundus/dr_maculopathy/images", "*.jp*g"),
            ("dermatology/ham10000/images", "*.jp*g"),
            ("pathology/lc25000_lung/images", "*.jp*g"),
        )
    ]
    out: list[Path] = []
    while len(out) < n and any(groups):
        for g in groups:
            if g and len(out) < n:
                out.append(g.pop(0))
    return out


def distinct_files(n: int, folder: Path) -> list[UserFile]:
    """n files with distinct contents (see the module docstring)."""
    import pydicom
    from pydicom.data import get_testdata_file

    paths = shared_images(n) if SHARED.is_dir() else []
    templates = [get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")]
    k = 0
    while len(paths) < n:
        ds = pydicom.dcmread(templates[k % 2])
        pixels = ds.pixel_array.copy()
        pixels.flat[k] = pixels.flat[k] + 1 + k
        ds.PixelData = pixels.tobytes()
        path = folder / f"user{k:02d}.dcm"
        ds.save_as(path)
        paths.append(path)
        k += 1
    return [_expect(Path(p)) for p in paths]


# --------------------------------------------------------------------------- one user
@dataclass
class Timings:
    seconds: dict[str, list[float]] = field(default_factory=lambda: {e: [] for e in ENDPOINTS})
    errors: dict[str, list[str]] = field(default_factory=lambda: {e: [] for e in ENDPOINTS})
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, endpoint: str, seconds: float, error: str = "") -> None:
        with self.lock:
            self.seconds[endpoint].append(seconds)
            if error:
                self.errors[endpoint].append(error[:200])


def _call(timings: Timings, endpoint: str, fn):
    start = time.perf_counter()
    try:
        out = fn()
    except Exception as exc:  # the app's message, or a transport error
        timings.record(endpoint, time.perf_counter() - start, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return None
    timings.record(endpoint, time.perf_counter() - start)
    return out


def one_user(url: str, file: UserFile, timings: Timings, barrier: threading.Barrier | None) -> None:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    try:
        if barrier is not None:
            barrier.wait()
        out = _call(timings, "load", lambda: client.predict([handle_file(str(file.path))], api_name="/load_files"))
        if out is None:
            return
        meta = out[11]["series"]
        if meta["shape"] != file.shape or meta["modality"] != file.modality:
            timings.record("load", 0.0, f"wrong scan: got {meta['shape']} {meta['modality']}, uploaded {file.shape} {file.modality}")
            return
        axial = out[5].get("value", 0) if isinstance(out[5], dict) else 0
        center, width = out[3]["value"], out[4]["value"]
        _call(
            timings,
            "label",
            lambda: client.predict(0, 0, "medlens-clip", "auto", "", "softmax", "mean", ["axial"], 12, api_name="/label_scan"),
        )
        _call(
            timings,
            "ask",
            lambda: client.predict(0, 0, "medlens-qformer", QUESTION, axial, center, width, False, 20, api_name="/ask_question"),
        )
    finally:
        client.close()


def scenario(url: str, pid: int, files: list[UserFile]) -> dict:
    timings = Timings()
    barrier = threading.Barrier(len(files))
    threads = [threading.Thread(target=one_user, args=(url, f, timings, barrier)) for f in files]
    load_before = uptime()
    start = time.perf_counter()
    with RssWatch(pid) as watch:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return {
        "timings": timings,
        "wall_s": time.perf_counter() - start,
        "peak_mb": watch.peak,
        "uptime_before": load_before,
        "uptime_after": uptime(),
    }


# --------------------------------------------------------------------------- report
def _avg(text: str) -> str:
    return text.split("load average:")[-1].strip()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))]


def report(args, results: list[tuple[int, str, dict]], server: dict, path: Path) -> None:
    lines = [
        "# Load test: concurrent users uploading, labelling and asking",
        "",
        f"- Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Command: `python bench/load.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- Machine: {_machine.cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        f"- `uptime` at the start: {server['uptime_start']}",
        f"- `uptime` at the end: {uptime()}",
        "- Server: the app as `app.py` runs it (shipped medlens-clip and medlens-qformer), loads 2 at a time, "
        "labels and answers 1 at a time (one heavy job on 2 cores)",
        f"- Server RSS: {server['rss_start_mb']:,.0f} MB after start-up and a warm-up user; peak over the whole run "
        f"{rss_mb(server['pid'], 'VmHWM:') if server.get('alive') else server.get('hwm_mb', float('nan')):,.0f} MB",
        "",
        "Each user: `/load_files` (upload + load), `/label_scan`, `/ask_question`, in one gradio_client session; "
        "all users start together. Seconds per call, from the client.",
        "",
        "| users | files | endpoint | calls | errors | p50 s | p95 s | max s | wall s | server peak RSS MB |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, mode, r in results:
        t = r["timings"]
        for e in ENDPOINTS:
            s = t.seconds[e]
            lines.append(
                f"| {n} | {mode} | {e} | {len(s)} | {len(t.errors[e])} | {_pct(s, 0.5):.2f} | {_pct(s, 0.95):.2f} | "
                f"{max(s) if s else float('nan'):.2f} | {r['wall_s']:.0f} | {r['peak_mb']:,.0f} |"
            )
    errors = [(n, mode, e, msg) for n, mode, r in results for e in ENDPOINTS for msg in r["timings"].errors[e]]
    lines += ["", f"Errors: {len(errors)}" + ("" if not errors else ", first ones:"), ""]
    lines += [f"- {n} users, {mode}, {e}: {msg}" for n, mode, e, msg in errors[:10]]
    lines += ["", "Machine load per scenario (`uptime` before / after):", ""]
    lines += [f"- {n} {mode}: {_avg(r['uptime_before'])} / {_avg(r['uptime_after'])}" for n, mode, r in results]
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--modes", nargs="+", choices=["same", "distinct"], default=["same", "distinct"])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "load.md")
    args = ap.parse_args()
    from pydicom.data import get_testdata_file

    from _app import free_port

    WORK.mkdir(parents=True, exist_ok=True)
    server = {"uptime_start": uptime()}
    port = free_port()
    proc = start_server(port)
    url = f"http://127.0.0.1:{port}/"
    results = []
    with tempfile.TemporaryDirectory(dir=WORK, prefix="load-") as tmp:
        same = _expect(Path(get_testdata_file("CT_small.dcm")))
        try:
            warm = Timings()
            for files in ([same], [same, same], distinct_files(5, Path(tmp))):  # model loading and first-use costs
                threads = [threading.Thread(target=one_user, args=(url, f, warm, None)) for f in files]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            if any(warm.errors.values()):
                raise RuntimeError(f"the warm-up user failed: {warm.errors}")
            server.update(pid=proc.pid, rss_start_mb=rss_mb(proc.pid), alive=True)
            for n in args.users:
                for mode in args.modes:
                    files = [same] * n if mode == "same" else distinct_files(n, Path(tmp))
                    r = scenario(url, proc.pid, files)
                    errs = sum(len(v) for v in r["timings"].errors.values())
                    print(
                        f"{n:3d} users {mode:8s}: {r['wall_s']:.0f} s, {errs} errors, label p95 "
                        f"{_pct(r['timings'].seconds['label'], 0.95):.2f} s, peak {r['peak_mb']:,.0f} MB",
                        flush=True,
                    )
                    results.append((n, mode, r))
            report(args, results, server, args.out)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
