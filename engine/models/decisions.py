"""Where the fast-path choices are remembered: one JSON file of decisions and the exported models beside it.

Both choosers (engine.models.fastpath for CLIP image towers, engine.models.
encoder_path for the Q-Former's frozen encoders) measure their candidate
paths once per machine and keep the verdict here, so the next process builds
only the winners.

Design decisions
- A decision is keyed by everything that can change the verdict: the
  chooser's version (bumped when a path's construction changes), the model
  id, the CPU profile (model name, flags, cores), the versions of torch and
  of every optional runtime that is installed (onnxruntime, openvino, nncf)
  and the thread count. Anything else (the load on the machine at probe
  time) is recorded in the decision, not in its key.
- Versions are read from package metadata, not by importing the runtimes:
  importing OpenVINO costs ~0.5 s, and a process that only reads a cached
  fp32 decision should not pay it.
- One file, `decisions.json`, rewritten atomically (write a temporary file,
  then rename); concurrent writers can lose each other's entry but never
  corrupt the file, and a lost entry only means one more probe.
- MEDLENS_FASTPATH_CACHE=<folder> moves the folder, `off` disables it (then
  every load probes, and exported models live in a temporary folder).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from engine import settings

log = logging.getLogger(__name__)

DECISIONS_FILE = "decisions.json"
OPTIONAL_RUNTIMES = ("onnxruntime", "openvino", "nncf")


def cache_dir() -> Path | None:
    """Where exported models and decisions are kept; None when MEDLENS_FASTPATH_CACHE=off."""
    env = settings.FASTPATH_CACHE.get() or ""
    if env.lower() in ("off", "0", "none", "false"):
        return None
    if env:
        return Path(env).expanduser()
    return settings.user_cache_dir() / "fastpath"


def versions() -> dict[str, str]:
    """torch's version and those of the optional runtimes that are installed."""
    import torch

    out = {"torch": torch.__version__}
    for name in OPTIONAL_RUNTIMES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def key(*parts) -> str:
    """A short stable hash of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def read_all(folder: Path | None = None) -> dict[str, dict]:
    folder = cache_dir() if folder is None else folder
    if folder is None:
        return {}
    try:
        data = json.loads((folder / DECISIONS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read(decision_key: str) -> dict | None:
    return read_all().get(decision_key)


def write(decision_key: str, value: dict) -> None:
    """Remember a decision (with the date); never raises (a decision that is not kept is probed again)."""
    folder = cache_dir()
    if folder is None:
        return
    value = {**value, "decided": dt.datetime.now().strftime("%Y-%m-%d %H:%M")}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        decisions = read_all(folder)
        decisions[decision_key] = value
        tmp = folder / f"{DECISIONS_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(decisions, indent=1))
        tmp.replace(folder / DECISIONS_FILE)
    except OSError as exc:
        log.info("fast path decision not cached: %s", exc)


@dataclass
class Remembered:
    """One cached decision, as `medlens models --speed` prints it."""

    model: str  # model id (name@revision) or encoder id
    kind: str  # "CLIP image tower", "Q-Former 3D encoder", ...
    by_batch: dict[str, str]  # batch class -> path name ("1" -> "openvino-bf16")
    speedup: dict[str, float]  # batch class -> probe speed-up over fp32
    cpu: str
    threads: int | None
    versions: dict[str, str]
    decided: str
    current: bool  # made for this CPU, these versions and this thread count


def remembered(folder: Path | None = None) -> list[Remembered]:
    """Every cached decision, newest first; `current` marks those this process would use."""
    from engine.models.cpu import cpu_profile

    here = cpu_profile().model
    now = versions()
    out = []
    for value in read_all(folder).values():
        if not isinstance(value, dict) or "by_batch" not in value:
            continue  # written by an older chooser (FASTPATH_VERSION 1): never used again
        details = value.get("details", {})
        out.append(
            Remembered(
                model=str(value.get("model", "?")),
                kind=str(value.get("kind", "CLIP image tower")),
                by_batch={str(k): str(v) for k, v in value["by_batch"].items()},
                speedup={str(k): float(v) for k, v in (value.get("speedup") or {}).items() if v is not None},
                cpu=str(details.get("cpu", "?")),
                threads=details.get("threads"),
                versions=dict(value.get("versions") or {}),
                decided=str(value.get("decided", "")),
                current=details.get("cpu") == here and value.get("versions") == now,
            )
        )
    return sorted(out, key=lambda r: r.decided, reverse=True)
