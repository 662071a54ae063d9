"""Model source strings: `hf-hub:org/repo`, `local-dir:/path`, or a shipped name.

One parser, used by the CLI, the app and training, so a string means the same
thing everywhere (open_clip's schemas, plus our shipped names).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.errors import ModelError

HF_HUB = "hf-hub"
LOCAL_DIR = "local-dir"
SHIPPED = "shipped"


@dataclass(frozen=True)
class ModelSource:
    kind: str  # HF_HUB, LOCAL_DIR or SHIPPED
    identifier: str  # "org/repo[@revision]", an absolute folder path, or a shipped name

    def __str__(self) -> str:
        return self.identifier if self.kind == SHIPPED else f"{self.kind}:{self.identifier}"


def parse_source(text: str) -> ModelSource:
    text = (text or "").strip()
    if not text:
        raise ModelError("empty model name: give a shipped name, hf-hub:org/repo or local-dir:/path")
    if text.startswith(HF_HUB + ":"):
        repo = text[len(HF_HUB) + 1 :].strip()
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ModelError(f"'{text}': a hub id looks like hf-hub:org/repo")
        return ModelSource(HF_HUB, repo)
    if text.startswith(LOCAL_DIR + ":"):
        path = text[len(LOCAL_DIR) + 1 :].strip()
        if not path:
            raise ModelError(f"'{text}': give a folder after local-dir:")
        return ModelSource(LOCAL_DIR, str(Path(path).expanduser().resolve()))
    if "/" in text or "\\" in text or ":" in text:
        raise ModelError(f"'{text}' is not a known model: use a shipped name (see `medlens models`), hf-hub:org/repo or local-dir:/path")
    return ModelSource(SHIPPED, text)
