"""Errors of the batch runner (bad SOURCEs, an output folder of another job, a missing engine)."""

from engine.errors import MedLensError


class BatchError(MedLensError):
    """A batch run cannot start or go on; the message says what to do."""
