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


def _flag(raw: str) -> bool:
    word = raw.lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError("not a yes/no word")


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("must be above 0")
    return value


def _one_of(*choices: str) -> Callable[[str], str]:
    """A parser accepting one of `choices` (any case)."""

    def parse(raw: str) -> str:
        value = raw.lower()
        if value not in choices:
            raise ValueError(f"{raw!r} is not one of them")
        return value

    return parse


REDACT_MODES = ("auto", "off", "always")
FOV_CHECKS = ("auto", "physical", "off")
_redact_mode = _one_of(*REDACT_MODES)
_fov_check = _one_of(*FOV_CHECKS)


_EXPECTS = {
    _text: "text",
    _path: "a path",
    _positive_int: "a whole number >= 1",
    _positive_float: "a number > 0",
    _flag: "1/0, true/false, yes/no or on/off",
    _redact_mode: "auto, off or always",
    _fov_check: "auto, physical or off",
}


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
MODEL = Setting(
    "MEDLENS_MODEL",
    _text,
    None,
    "zero-shot (CLIP) model of the app and the CLI: a shipped name, hf-hub:org/repo or local-dir:/path",
    "the shipped default",
)
ASK_MODEL = Setting(
    "MEDLENS_ASK_MODEL", _text, None, "question-answering (Q-Former) model of the app and `medlens ask`", "the shipped Q-Former"
)
FOV_CHECK = Setting(
    "MEDLENS_FOV_CHECK",
    _fov_check,
    "auto",
    "field-of-view check of organ labels on volumes: auto (the Q-Former's body region + the DICOM header + the scan's size), "
    "physical (header and size only: no second model), off (raw 2D answers)",
)
ASSETS = Setting(
    "MEDLENS_ASSETS", _path, None, "folder holding models/, prompts/ and qa/ (replaces the repository's assets/)", "<repository>/assets"
)
PROMPTS = Setting("MEDLENS_PROMPTS", _path, None, "extra folder of prompt-set JSON files, searched before the assets' prompts/")
LIBRARY = Setting(
    "MEDLENS_LIBRARY", _path, None, "the scan library's SQLite file (the CLI's --library wins)", "<user data dir>/medlens/library.db"
)
INFERENCE = Setting(
    "MEDLENS_INFERENCE",
    _text,
    "auto",
    "force a CPU inference path: auto, fp32, bf16, int8, onnx-int8, openvino-bf16, openvino-fp32, openvino-int8 (parity is still measured and reported; the Q-Former's encoders take fp32, bf16 and the openvino float paths)",
)
THREADS = Setting(
    "MEDLENS_THREADS", _positive_int, None, "torch threads (default: the physical cores this process may use)", "physical cores"
)
CALIBRATION_IMAGES = Setting(
    "MEDLENS_CALIBRATION_IMAGES",
    _path,
    None,
    "folder of scans (DICOM, NIfTI, PNG/JPEG) the fast-path probe calibrates int8 paths and checks parity on",
    "pydicom's and nibabel's bundled test images",
)
FASTPATH_CACHE = Setting(
    "MEDLENS_FASTPATH_CACHE",
    _text,
    None,
    "folder for exported fast-path models and probe decisions, or `off`",
    "<user cache dir>/medlens/fastpath",
)
UID_SALT = Setting(
    "MEDLENS_UID_SALT",
    _text,
    None,
    "secret salt of the de-identifying UID mapping (keep it stable to keep UIDs stable)",
    "a random per-user file",
)
MAX_SERIES_VOXELS = Setting(
    "MEDLENS_MAX_SERIES_VOXELS",
    _positive_int,
    600_000_000,
    "largest series, volume or image loaded, in voxels (slices x rows x columns x volumes), checked from headers before any decoding",
    "`600000000` (a 2,290-slice 512x512 CT; 1.2 GB as int16)",
)
MEMORY_BUDGET_MB = Setting(
    "MEDLENS_MEMORY_BUDGET_MB",
    _positive_int,
    None,
    "memory for loaded scans across all sessions of a server (or one CLI process): a load that does not fit is refused, and one upload may hold at most half",
    "a quarter of the memory this process may use",
)
SESSION_IDLE_MIN = Setting(
    "MEDLENS_SESSION_IDLE_MIN",
    _positive_float,
    15.0,
    "minutes without use after which a session's loaded scans are released (browser and API sessions; a closed tab's after one minute)",
)
AUTH_FILE = Setting(
    "MEDLENS_AUTH_FILE",
    _path,
    None,
    "login file of the app: one `NAME:scrypt$...` line per user, written by `medlens user add NAME` (setting it turns login on)",
    "unset: no login",
)
USERS = Setting(
    "MEDLENS_USERS",
    _text,
    None,
    "login users as `NAME:HASH` pairs separated by commas or spaces, hashes from `medlens user hash NAME` (setting it turns login on)",
    "unset: no login",
)
ALLOW_ANONYMOUS = Setting(
    "MEDLENS_ALLOW_ANONYMOUS",
    _flag,
    False,
    "let a server listening beyond loopback (or a Space) run without login: visitors may view, label and ask, never use the library; when off such a server refuses to start",
    "off",
)
AUDIT_LOG = Setting(
    "MEDLENS_AUDIT_LOG",
    _text,
    None,
    "append-only JSON Lines audit log (who, when, action, model, de-identified scan hash, outcome), or `off`",
    "<user data dir>/medlens/audit.jsonl",
)
REDACT = Setting(
    "MEDLENS_REDACT",
    _redact_mode,
    "auto",
    "burned-in text removal on load: auto (OCR and blank text in US, SC, XA, RF and images flagged for burned-in text), "
    "always (every scan), off (never: flagged scans stay flagged, unredacted)",
)
TESSERACT = Setting(
    "MEDLENS_TESSERACT", _text, "tesseract", "the Tesseract OCR program used for burned-in text removal (a name on PATH or a path)"
)
# The PACS (engine.pacs). Credentials come from here only: never from the command line, never logged.
PACS_URL = Setting("MEDLENS_PACS_URL", _text, None, "DICOMweb root of the PACS, e.g. https://pacs.example.org/dicom-web (unset: no PACS)")
PACS_USER = Setting("MEDLENS_PACS_USER", _text, None, "PACS user name (HTTP basic authentication, with MEDLENS_PACS_PASSWORD)")
PACS_PASSWORD = Setting("MEDLENS_PACS_PASSWORD", _text, None, "PACS password (never put it on a command line; it is never logged)")
PACS_TOKEN = Setting("MEDLENS_PACS_TOKEN", _text, None, "PACS bearer token (OAuth/OIDC), instead of user and password")
PACS_CA_BUNDLE = Setting(
    "MEDLENS_PACS_CA_BUNDLE",
    _path,
    None,
    "CA certificate file that signs the PACS's TLS certificate (verification is always on)",
    "the system's CAs",
)
PACS_ALLOW_HTTP = Setting(
    "MEDLENS_PACS_ALLOW_HTTP",
    _flag,
    False,
    "allow plain http:// to a PACS that is not on this machine (images and credentials travel unencrypted)",
    "off",
)
PACS_TIMEOUT = Setting(
    "MEDLENS_PACS_TIMEOUT", _positive_float, 120.0, "seconds to wait for one PACS request (a large series takes one request)"
)

SETTINGS: tuple[Setting, ...] = (
    MODEL,
    ASK_MODEL,
    FOV_CHECK,
    ASSETS,
    PROMPTS,
    LIBRARY,
    INFERENCE,
    THREADS,
    CALIBRATION_IMAGES,
    FASTPATH_CACHE,
    UID_SALT,
    MAX_SERIES_VOXELS,
    MEMORY_BUDGET_MB,
    SESSION_IDLE_MIN,
    AUTH_FILE,
    USERS,
    ALLOW_ANONYMOUS,
    AUDIT_LOG,
    REDACT,
    TESSERACT,
    PACS_URL,
    PACS_USER,
    PACS_PASSWORD,
    PACS_TOKEN,
    PACS_CA_BUNDLE,
    PACS_ALLOW_HTTP,
    PACS_TIMEOUT,
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
