"""CLIP models from the Hugging Face hub (online only): open_clip repos through open_clip's files, UniMed `.pt` through our mapping.

Offline, download the repository elsewhere and load it with local-dir:/path.
"""

from __future__ import annotations

from engine.errors import ModelError
from engine.models.clip import ClipModel
from engine.models.registry import KNOWN_HUB


def load_hub(repo: str, name: str) -> ClipModel:
    from engine.models import checkpoint

    hub = next((h for h in KNOWN_HUB.values() if h.repo == repo), None)
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        if hub is not None and hub.file:
            pt = hf_hub_download(repo, hub.file)
            checkpoint.architecture(hub.architecture)  # a known architecture, or a clear error
            return checkpoint.load_unimed(pt, text_dir=None, name=name)
        folder = snapshot_download(repo, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.bin"])
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(
            f"cannot fetch {repo} from the Hugging Face hub ({type(exc).__name__}); offline, download it elsewhere "
            "and use local-dir:/path/to/folder"
        ) from None
    return checkpoint.load_folder(folder, name=name)
