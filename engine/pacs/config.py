"""Where the PACS is and how to authenticate: from MEDLENS_PACS_* (engine.settings) only.

Design decisions
- Credentials come from the environment (user + password for HTTP basic
  authentication, or a bearer token), never from a command-line argument:
  arguments are visible to every user of the machine (`ps`) and end up in
  shell histories. They are kept out of every repr and message; `identity`
  (scheme, host, port and path of the URL) is what messages and the JSON
  results name.
- TLS certificates are always verified (the system's CAs, or the file in
  MEDLENS_PACS_CA_BUNDLE for a hospital CA). There is no switch to turn
  verification off. Orthanc's built-in HTTPS crashed on every request in
  our tests: put TLS on a reverse proxy in front of it.
- Plain http:// is accepted for a PACS on this machine (loopback), and for
  another host only with MEDLENS_PACS_ALLOW_HTTP=1, because images and
  credentials would cross the network unencrypted.
- A URL that carries credentials (https://user:pw@host) is refused: the URL
  is shown in messages, the credentials must not be.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from engine import settings
from engine.pacs.errors import PacsConfigError

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


@dataclass(frozen=True)
class PacsConfig:
    """One DICOMweb server and the credentials for it."""

    url: str  # DICOMweb root, e.g. https://pacs.example.org/dicom-web (no trailing slash)
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    ca_bundle: Path | None = None  # None: the system's CAs
    timeout: float = 120.0  # seconds per request

    @property
    def identity(self) -> str:
        """The server as messages and results name it: the URL, which never holds credentials."""
        return self.url

    @property
    def auth_kind(self) -> str:
        if self.token:
            return "bearer token"
        if self.user:
            return f"user {self.user}"
        return "no credentials"

    def describe(self) -> str:
        return f"{self.identity} ({self.auth_kind})"


def is_loopback(host: str) -> bool:
    host = (host or "").strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, allow_http: bool = False) -> str:
    """The DICOMweb root without a trailing slash, or PacsConfigError saying what is wrong with it."""
    text = (url or "").strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PacsConfigError(
            f"MEDLENS_PACS_URL must be the http(s) address of the DICOMweb root, e.g. https://pacs.example.org/dicom-web "
            f"(got {text[:80]!r})"
        )
    if parts.username or parts.password or "@" in parts.netloc:
        raise PacsConfigError(
            "MEDLENS_PACS_URL must not carry credentials: set MEDLENS_PACS_USER and MEDLENS_PACS_PASSWORD (or MEDLENS_PACS_TOKEN) instead"
        )
    if parts.query or parts.fragment:
        raise PacsConfigError("MEDLENS_PACS_URL must be the DICOMweb root without '?' or '#' parts")
    if parts.scheme == "http" and not is_loopback(parts.hostname) and not allow_http:
        raise PacsConfigError(
            f"MEDLENS_PACS_URL uses plain http:// to {parts.hostname}: images and credentials would cross the network "
            "unencrypted. Use https:// (TLS on a reverse proxy in front of the PACS), or set MEDLENS_PACS_ALLOW_HTTP=1 "
            "on a network you trust"
        )
    return text.rstrip("/")


def configured() -> bool:
    """Whether MEDLENS_PACS_URL is set (the app shows its PACS tab either way, saying what to set)."""
    return bool(settings.PACS_URL.get())


def config_from_settings() -> PacsConfig:
    """The PACS named by MEDLENS_PACS_*; PacsConfigError when it is not set or not usable."""
    url = settings.PACS_URL.get()
    if not url:
        raise PacsConfigError(
            "no PACS configured: set MEDLENS_PACS_URL to its DICOMweb root (e.g. https://pacs.example.org/dicom-web) and "
            "MEDLENS_PACS_USER / MEDLENS_PACS_PASSWORD or MEDLENS_PACS_TOKEN in the environment"
        )
    user, password, token = settings.PACS_USER.get(), settings.PACS_PASSWORD.get(), settings.PACS_TOKEN.get()
    if token and (user or password):
        raise PacsConfigError("set either MEDLENS_PACS_TOKEN or MEDLENS_PACS_USER + MEDLENS_PACS_PASSWORD, not both")
    if bool(user) != bool(password):
        missing = "MEDLENS_PACS_PASSWORD" if user else "MEDLENS_PACS_USER"
        raise PacsConfigError(f"{missing} is not set: basic authentication needs both the user and the password")
    ca_bundle = settings.PACS_CA_BUNDLE.get()
    if ca_bundle is not None and not ca_bundle.is_file():
        raise PacsConfigError(f"MEDLENS_PACS_CA_BUNDLE={ca_bundle} is not a file (a PEM file of CA certificates)")
    return PacsConfig(
        url=check_url(url, bool(settings.PACS_ALLOW_HTTP.get())),
        user=user,
        password=password,
        token=token,
        ca_bundle=ca_bundle,
        timeout=float(settings.PACS_TIMEOUT.get() or 120.0),
    )
