"""Every MEDLENS_* setting in one typed place.

Design decisions
- A setting is data (`Setting`: environment variable, type, default, one
  line of documentation). `SETTINGS` lists them all; the README's settings
  table is generated from it (`markdown_table()`), and a test checks that
  no `MEDLENS_*` variable is read anywhere else in engine/, app/ or
  training/ (tests/test_settings.py).
- Values are read from the environment at each call, not once at import:
  tests and long-running servers change them (monkeypatch, a new deploy),
  and reading a dict entry is cheap next to anything that uses a setting.
- A malformed value (a word where a number belongs) is a `SettingsError`
  naming the variable and what it expects, never a silent fallback: a
  hospital IT team must learn at start-up that its memory cap was ignored.
- Paths the project derives (the assets folder, the per-user data, config
  and cache folders) live here too, so the assets folder is found one way.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, TypeVar

from engine.errors import MedLensError

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[1]


class SettingsError(MedLensError):
    """A MEDLENS_* variable holds a value that cannot be used; the message names it."""


def _text(raw: str) -> str:
    return raw


def _path(raw: str) -> Path:
    return Path(raw).expanduser()


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("must be above 0")
    return value


_EXPECTS = {_text: "text", _path: "a path", _positive_int: "a whole number >= 1", _positive_float: "a number > 0"}


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One environment variable: its type (a parser of the raw string), default and meaning."""

    env: str
    parse: Callable[[str], T]
    default: T | None
    doc: str
    default_doc: str = ""  # how the default is shown in the README when it is computed

    def raw(self) -> str:
        return os.environ.get(self.env, "").strip()

    def get(self) -> T | None:
        """The value from the environment, or the default when unset or blank."""
        raw = self.raw()
        if not raw:
            return self.default
        try:
            return self.parse(raw)
        except (TypeError, ValueError) as exc:
            expects = _EXPECTS.get(self.parse, "a valid value")
            raise SettingsError(f"{self.env}={raw!r} cannot be used: expected {expects} ({exc})") from None


# --------------------------------------------------------------------------- the settings
MODEL = Setting("MEDLENS_MODEL", _text, None, "zero-shot (CLIP) model of the app and the CLI: a shipped name, hf-hub:org/repo or local-dir:/path", "the shipped default")
ASK_MODEL = Setting("MEDLENS_ASK_MODEL", _text, None, "question-answering (Q-Former) model of the app and `medlens ask`", "the shipped Q-Former")
ASSETS = Setting("MEDLENS_ASSETS", _path, None, "folder holding models/, prompts/ and qa/ (replaces the repository's assets/)", "<repository>/assets")
PROMPTS = Setting("MEDLENS_PROMPTS", _path, None, "extra folder of prompt-set JSON files, searched before the assets' prompts/")
LIBRARY = Setting("MEDLENS_LIBRARY", _path, None, "the scan library's SQLite file (the CLI's --library wins)", "<user data dir>/medlens/library.db")
INFERENCE = Setting("MEDLENS_INFERENCE", _text, "auto", "force a CPU inference path: auto, fp32, bf16, int8, onnx-int8, openvino-bf16, openvino-fp32, openvino-int8 (parity is still measured and reported; the Q-Former's encoders take fp32, bf16 and the openvino float paths)")
THREADS = Setting("MEDLENS_THREADS", _positive_int, None, "torch threads (default: the physical cores this process may use)", "physical cores")
CALIBRATION_IMAGES = Setting("MEDLENS_CALIBRATION_IMAGES", _path, None, "folder of scans (DICOM, NIfTI, PNG/JPEG) the fast-path probe calibrates int8 paths and checks parity on", "pydicom's and nibabel's bundled test images")
FASTPATH_CACHE = Setting("MEDLENS_FASTPATH_CACHE", _text, None, "folder for exported fast-path models and probe decisions, or `off`", "<user cache dir>/medlens/fastpath")
UID_SALT = Setting("MEDLENS_UID_SALT", _text, None, "secret salt of the de-identifying UID mapping (keep it stable to keep UIDs stable)", "a random per-user file")

SETTINGS: tuple[Setting, ...] = (
    MODEL,
    ASK_MODEL,
    ASSETS,
    PROMPTS,
    LIBRARY,
    INFERENCE,
    THREADS,
    CALIBRATION_IMAGES,
    FASTPATH_CACHE,
    UID_SALT,
)


# --------------------------------------------------------------------------- derived paths
def assets_dir() -> Path:
    """The assets folder: $MEDLENS_ASSETS, else the repository's assets/."""
    return ASSETS.get() or REPO_ROOT / "assets"


def user_data_dir() -> Path:
    """<user data dir>/medlens (platformdirs' user_data_dir rule, without the dependency)."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        xdg = os.environ.get("XDG_DATA_HOME", "").strip()
        base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "medlens"


def user_config_dir() -> Path:
    """<user config dir>/medlens ($XDG_CONFIG_HOME or ~/.config)."""
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "medlens"


def user_cache_dir() -> Path:
    """<user cache dir>/medlens ($XDG_CACHE_HOME or ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medlens"


def markdown_table() -> str:
    """The README's settings table, generated from SETTINGS."""
    rows = ["| variable | meaning | default |", "|---|---|---|"]
    for s in SETTINGS:
        default = s.default_doc or ("" if s.default is None else f"`{s.default}`")
        rows.append(f"| `{s.env}` | {s.doc} | {default or 'unset'} |")
    return "\n".join(rows)
