"""User-facing errors: each message says what went wrong and what to do about it."""


class MedLensError(Exception):
    """Base of the errors the CLI and the app show as a one-line message."""


class ModelError(MedLensError):
    """A model could not be found, built or loaded."""
