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
