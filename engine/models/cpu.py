"""What CPU this process runs on, as far as choosing an inference path needs to know.

Design decisions
- Linux: /proc/cpuinfo gives the model name and the ISA flags that matter
  (AMX, AVX512-BF16, VNNI, AVX2); the number of cores is the number of
  distinct (physical id, core id) pairs, capped by the CPUs this process may
  run on (sched_getaffinity) and by a cgroup CPU quota (containers, CI).
- macOS, Windows, other Unixes: model name from `platform`/sysctl, no flags
  (the probe in `fastpath` still measures whatever paths torch offers).
- ARM: /proc/cpuinfo's "Features" line (asimd, bf16, i8mm, ...) is read the
  same way; ARM names its BF16 extension `bf16`.
- Flags only name what the hardware offers; `torch.backends.cpu.
  get_cpu_capability()` says which kernels torch actually dispatches to.
- Only the flags of interest are kept, so the profile prints in one line.
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# ISA flags that decide between inference paths (Linux /proc/cpuinfo spelling).
FLAGS_OF_INTEREST = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",  # int8 dot products (Cascade Lake+, Zen 4+)
    "avx_vnni",  # VEX-encoded VNNI (Alder Lake+, no AVX-512)
    "avx512_bf16",  # bf16 dot products (Cooper Lake, Sapphire Rapids+, Zen 4+)
    "amx_tile",  # Advanced Matrix Extensions (Sapphire Rapids+)
    "amx_bf16",
    "amx_int8",
    # ARM (Features line)
    "asimd",
    "asimddp",
    "bf16",
    "i8mm",
    "sve",
)


@dataclass(frozen=True)
class CpuProfile:
    """The CPU as the path chooser sees it."""

    model: str  # "Intel(R) Xeon(R) Platinum 8480+", or platform.processor() where unknown
    machine: str  # platform.machine(): x86_64, aarch64, arm64, AMD64
    flags: frozenset[str] = field(default_factory=frozenset)  # subset of FLAGS_OF_INTEREST
    capability: str = "unknown"  # torch.backends.cpu.get_cpu_capability(): AVX512, AVX2, DEFAULT, ...
    cores: int = 1  # physical cores this process may use
    logical: int = 1  # logical CPUs this process may use
    source: str = "unknown"  # where the facts came from: /proc/cpuinfo, sysctl, platform

    @property
    def is_x86(self) -> bool:
        return self.machine.lower() in ("x86_64", "amd64", "i686", "x86")

    @property
    def is_arm(self) -> bool:
        return self.machine.lower() in ("aarch64", "arm64") or self.machine.lower().startswith("arm")

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.flags or "amx_tile" in self.flags

    @property
    def native_bf16(self) -> bool:
        """The hardware computes bf16 dot products (AMX, AVX512-BF16, ARM BF16)."""
        if self.is_x86:
            return self.amx or "avx512_bf16" in self.flags
        return "bf16" in self.flags

    @property
    def vnni(self) -> bool:
        return "avx512_vnni" in self.flags or "avx_vnni" in self.flags or "amx_int8" in self.flags

    @property
    def isa(self) -> str:
        """The best ISA level in words, for messages: 'AMX', 'AVX-512 VNNI', 'AVX2', ..."""
        if self.amx:
            return "AMX"
        if "avx512_bf16" in self.flags:
            return "AVX512-BF16"
        if "avx512_vnni" in self.flags:
            return "AVX-512 VNNI"
        if "avx512f" in self.flags:
            return "AVX-512"
        if "avx_vnni" in self.flags:
            return "AVX-VNNI"
        if "avx2" in self.flags:
            return "AVX2"
        if self.is_arm:
            return "ARM " + "+".join(f for f in ("asimd", "asimddp", "bf16", "i8mm", "sve") if f in self.flags) if self.flags else "ARM"
        return self.capability

    def summary(self) -> str:
        flags = " ".join(sorted(self.flags)) or "none read"
        return f"{self.model} ({self.machine}, {self.cores} cores, torch {self.capability}; flags: {flags})"

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "machine": self.machine,
            "flags": sorted(self.flags),
            "capability": self.capability,
            "cores": self.cores,
            "logical": self.logical,
            "source": self.source,
        }


def parse_cpuinfo(text: str) -> tuple[str, set[str], int]:
    """(model name, flags of interest, physical cores) from /proc/cpuinfo text."""
    model = ""
    flags: set[str] = set()
    cores: set[tuple[str, str]] = set()
    physical = core = None
    processors = 0
    for line in text.splitlines():
        if ":" not in line:
            if physical is not None and core is not None:
                cores.add((physical, core))
            physical = core = None
            continue
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key == "processor":
            processors += 1
        elif key in ("model name", "cpu model", "hardware") and not model:
            model = value
        elif key in ("flags", "features"):
            flags.update(f for f in value.split() if f in FLAGS_OF_INTEREST)
        elif key == "physical id":
            physical = value
        elif key == "core id":
            core = value
    if physical is not None and core is not None:
        cores.add((physical, core))
    return model, flags, len(cores) or processors


def _cgroup_cpus() -> float | None:
    """CPUs allowed by a cgroup v2/v1 quota, or None when unlimited/unknown."""
    try:
        v2 = Path("/sys/fs/cgroup/cpu.max")
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            if quota != "max":
                return int(quota) / int(period)
        q1, p1 = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
        if q1.is_file() and p1.is_file():
            quota = int(q1.read_text())
            if quota > 0:
                return quota / int(p1.read_text())
    except (OSError, ValueError):
        pass
    return None


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=2).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _torch_capability() -> str:
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:
        return "unknown"


def cpu_profile(cpuinfo: str | None = None) -> CpuProfile:
    """This machine's CPU. `cpuinfo` (text of /proc/cpuinfo) is for tests."""
    machine = platform.machine() or "unknown"
    model, flags, physical, source = "", set(), 0, "platform"
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = None
    if cpuinfo:
        model, flags, physical = parse_cpuinfo(cpuinfo)
        source = "/proc/cpuinfo"
    elif platform.system() == "Darwin":
        model = _sysctl("machdep.cpu.brand_string")
        try:
            physical = int(_sysctl("hw.physicalcpu") or 0)
        except ValueError:
            physical = 0
        if machine == "arm64" and _sysctl("hw.optional.arm.FEAT_BF16") == "1":
            flags.add("bf16")
        source = "sysctl"
    model = model or platform.processor() or machine
    try:
        logical = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        logical = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota is not None:
        logical = max(1, min(logical, int(quota + 0.5)))
    # SMT siblings share one core's vector units: threads beyond physical cores rarely help.
    smt = max(1, (os.cpu_count() or 1) // physical) if physical else 1
    cores = max(1, min(physical or logical, logical // smt if smt > 1 else logical))
    return CpuProfile(
        model=model,
        machine=machine,
        flags=frozenset(flags),
        capability=_torch_capability(),
        cores=cores,
        logical=logical,
        source=source,
    )
