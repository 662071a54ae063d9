"""What the benchmark tables say about the machine, in one place for every bench script.

The CPU's name comes from the engine's own CPU profile (engine.models.cpu), the
one the inference-path chooser uses, so tables and the engine agree."""

from __future__ import annotations

import os
import time
from pathlib import Path


def cpu_name() -> str:
    from engine.models.cpu import cpu_profile

    return cpu_profile().model


def cpu_flags() -> str:
    """The vector extensions that decide CPU inference speed (AVX2, AVX-512, VNNI, BF16, AMX)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    keep = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "avx_vnni") if f in flags]
    return ", ".join(keep) or "none of avx2/avx512/amx"


def loadavg() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def others_running() -> int:
    """Runnable threads on the machine besides the one asking (instantaneous, from /proc/loadavg)."""
    try:
        return max(0, int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1)
    except (OSError, ValueError, IndexError):
        return 0


def wait_quiet(limit_s: float) -> bool:
    """Wait until no other thread has been runnable for ~1 s (at most limit_s); True when quiet."""
    deadline, calm = time.monotonic() + limit_s, 0
    while time.monotonic() < deadline:
        calm = calm + 1 if others_running() == 0 else 0
        if calm >= 5:
            return True
        time.sleep(0.2)
    return False


def _status_mb(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_mb() -> float:
    """This process's resident memory now (MB)."""
    return _status_mb("VmRSS:")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB)."""
    return _status_mb("VmHWM:")


def first_touch_ms_per_mb(mb: int = 256) -> float:
    """What writing fresh memory costs (ms per MB): ~0.1 on a machine whose RAM is its own; 10-15 measured on a
    newly booted Firecracker VM, whose host backs each guest page on its first touch (the guest keeps it after).

    Timings that allocate hundreds of MB per repeat (a 300-slice series is 160 MB of pixels, twice over on the
    PACS path) then swing by seconds from one repeat to the next: name this figure beside them, and on such a
    VM touch the memory once first (`prefault`)."""
    import numpy as np

    t0 = time.perf_counter()
    block = np.ones(mb << 20, np.uint8)
    elapsed = time.perf_counter() - t0
    del block
    return elapsed * 1000 / mb


def prefault(gb: float) -> float:
    """Write `gb` GB once and free it (seconds taken): the guest pages of a fresh VM are backed from then on."""
    import numpy as np

    t0 = time.perf_counter()
    held = [np.ones(256 << 20, np.uint8) for _ in range(int(gb * 4))]  # all held at once: gb of distinct pages
    del held  # back to the kernel's free lists, still backed by the host
    return time.perf_counter() - t0


def machine_lines() -> list[str]:
    """Markdown bullet lines naming the machine: date, CPU model, its class and flags, load."""
    import datetime as dt

    from engine.models.cpu import cpu_profile

    p = cpu_profile()
    return [
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- CPU: {p.model} ({p.machine}), {p.cores} physical cores usable, torch kernels {p.capability}; class **{cpu_class(p)}**",
        f"- CPU flags of interest: {' '.join(sorted(p.flags)) or 'none read'}",
    ]


def cpu_class(profile=None) -> str:
    """The CPU class the issue's gates are stated for: 'AMX / AVX512-BF16', 'AVX-512 VNNI', 'AVX2', or other."""
    if profile is None:
        from engine.models.cpu import cpu_profile

        profile = cpu_profile()
    if profile.is_x86 and profile.native_bf16:
        return "AMX / AVX512-BF16"
    if "avx512_vnni" in profile.flags:
        return "AVX-512 VNNI"
    if "avx2" in profile.flags:
        return "AVX2"
    return profile.isa


# Speed-up gates over open_clip fp32 (issue 19), per CPU class and batch size; "everywhere never slower" is 1.0.
VIT_GATES = {"AMX / AVX512-BF16": {1: 3.0, 16: 5.0}, "AVX-512 VNNI": {1: 2.0, 16: 2.5}, "AVX2": {16: 1.5}}
SHIPPED_GATE = {"AMX / AVX512-BF16": 1.5}  # the shipped CLIP and the Q-Former's first answer, at equal answers


def uptime() -> str:
    import subprocess

    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"load average {loadavg()}"


def write_result(out, lines: list[str], echo: bool = False, end: str = "") -> None:
    """Write a result table (Markdown lines, then `end`) to `out`, creating its folder; print it too when asked."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + end)
    print("\n".join(lines) if echo else f"wrote {path}")
