"""`dicomweb:` paths: a PACS series (or study) named like a file.

    dicomweb:STUDY_UID/SERIES_UID   one series
    dicomweb:STUDY_UID              every image series of the study
    dicomweb:sealed:TOKEN           the same, sealed (what the library stores)

Design decisions
- A path holds UIDs only; which server they live on is MEDLENS_PACS_URL
  (engine.pacs.config), so no credential or host ever sits in a path.
- Real Study/Series Instance UIDs are identifiers (DICOM PS3.15 replaces
  them when de-identifying), so the library never stores them in clear.
  `storable()` seals a path with AES-SIV (the `cryptography` package): a
  deterministic, authenticated encryption keyed from the same secret salt
  as the library's UID mapping (engine.deid). The same series always gives
  the same sealed text (the library can look a source up again), it opens
  only where that salt is, and a tampered token is refused. A sealed path
  works wherever a plain one does.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

from engine.pacs.errors import LocatorError

SCHEME = "dicomweb:"
SEALED = SCHEME + "sealed:"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_KEY_CONTEXT = b"medlens dicomweb locator seal v1"


def check_uid(uid: str, what: str = "UID") -> str:
    """A syntactically valid DICOM UID (digits and dots, at most 64 characters), or LocatorError."""
    text = str(uid).strip()
    if not text or len(text) > 64 or not _UID.match(text):
        raise LocatorError(f"{what} UID {text[:70]!r} is not a DICOM UID (digits separated by dots, at most 64 characters)")
    return text


@dataclass(frozen=True)
class Locator:
    """A study, or one series of it, on the configured PACS."""

    study_uid: str
    series_uid: str | None = None

    @property
    def text(self) -> str:
        return SCHEME + self.study_uid + (f"/{self.series_uid}" if self.series_uid else "")


def is_locator(path: object) -> bool:
    return isinstance(path, str) and path.strip().lower().startswith(SCHEME)


def parse(path: str) -> Locator:
    """`dicomweb:STUDY[/SERIES]` or a sealed path -> Locator (LocatorError when malformed)."""
    text = str(path).strip()
    if not is_locator(text):
        raise LocatorError(f"{text[:80]!r} is not a dicomweb: path (dicomweb:STUDY_UID or dicomweb:STUDY_UID/SERIES_UID)")
    if text.lower().startswith(SEALED):
        text = _unseal(text[len(SEALED) :])
    body = text[len(SCHEME) :].strip().strip("/")
    parts = body.split("/")
    if not body or len(parts) > 2:
        raise LocatorError(f"{str(path)[:80]!r}: write dicomweb:STUDY_UID or dicomweb:STUDY_UID/SERIES_UID")
    study = check_uid(parts[0], "study")
    series = check_uid(parts[1], "series") if len(parts) == 2 else None
    return Locator(study, series)


# --------------------------------------------------------------------------- sealing
def _aead():
    from cryptography.hazmat.primitives.ciphers.aead import AESSIV

    from engine.deid import derived_key

    return AESSIV(derived_key(_KEY_CONTEXT))  # 64 bytes: AES-256-SIV


def seal(locator: Locator) -> str:
    """The sealed path of `locator` (deterministic: the same locator, the same text)."""
    token = _aead().encrypt(locator.text.encode("ascii"), None)
    return SEALED + base64.urlsafe_b64encode(token).decode("ascii").rstrip("=")


def _unseal(token: str) -> str:
    from cryptography.exceptions import InvalidTag

    try:
        raw = base64.urlsafe_b64decode(token.strip() + "=" * (-len(token.strip()) % 4))
        return _aead().decrypt(raw, None).decode("ascii")
    except (InvalidTag, ValueError, UnicodeDecodeError):
        raise LocatorError(
            "this sealed dicomweb: path cannot be opened here: it was sealed with another MEDLENS_UID_SALT "
            "(another machine or user), or it was altered"
        ) from None


def storable(path: str) -> str:
    """What a library may store for `path`: a dicomweb: path sealed, any other path unchanged."""
    if not is_locator(path):
        return path
    if str(path).strip().lower().startswith(SEALED):
        return str(path).strip()
    return seal(parse(path))
