"""What can go wrong with a PACS, each as an error a person can act on."""

from __future__ import annotations

from engine.scan import ScanError


class PacsError(ScanError):
    """A PACS request failed. A ScanError, so a `dicomweb:` path that fails reads like a file that fails."""


class PacsConfigError(PacsError):
    """MEDLENS_PACS_* settings are missing or unusable."""


class PacsUnreachable(PacsError):
    """The server did not answer (refused, timed out, TLS failure)."""


class PacsAuthError(PacsError):
    """The server refused the credentials (401) or this user's access (403)."""


class PacsNotFound(PacsError):
    """The study or series is not on the server (deleted, never stored, or a mistyped UID)."""


class PartialRetrieve(PacsError):
    """Fewer instances arrived than the server says the series holds."""


class NotAnImage(PacsError):
    """The series holds no image (a report, a segmentation, a presentation state...)."""


class LocatorError(PacsError):
    """A `dicomweb:` path is malformed."""
