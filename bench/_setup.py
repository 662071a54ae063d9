"""The start every model benchmark shares: where its table goes, and an empty inference-path decision cache."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def add_out_option(parser, name: str) -> None:
    """--out: the result file, bench/results/NAME by default."""
    parser.add_argument("--out", default=str(RESULTS / name))


def fresh_fastpath_cache(prefix: str) -> tempfile.TemporaryDirectory:
    """Point MEDLENS_FASTPATH_CACHE at a new empty folder (cleaned up by the caller) and clear a forced
    MEDLENS_INFERENCE, so the engine makes (and the bench times) its choice of inference path from scratch."""
    cache = tempfile.TemporaryDirectory(prefix=prefix)
    os.environ["MEDLENS_FASTPATH_CACHE"] = cache.name
    os.environ.pop("MEDLENS_INFERENCE", None)
    return cache
