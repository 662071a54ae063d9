"""Where models come from: shipped checkpoint folders and known hub models.

Architectures live in engine/models/configs (data); this module only says
where weights are. Shipped checkpoints are folders under assets/models/
(MEDLENS_ASSETS overrides the assets folder). Hub entries need the network
the first time (then huggingface_hub's cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


DEFAULT_MODEL = "medlens-clip"  # trained by `python -m training.clip` (shipped in assets/models)


@dataclass(frozen=True)
class HubModel:
    repo: str
    architecture: str
    file: str | None = None  # a single training checkpoint to fetch (UniMed .pt); None = open_clip repo
    licence: str = ""
    note: str = ""


KNOWN_HUB: dict[str, HubModel] = {
    "biomedclip": HubModel(
        "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
        "biomedclip-vit-b16",
        licence="MIT",
        note="ViT-B/16 + PubMedBERT, 512-d, trained on PMC-15M",
    ),
    "unimed-clip-b16": HubModel(
        "UzairK/unimed-clip-vit-b16",
        "unimed-clip-vit-b16",
        file="unimed-clip-vit-b16.pt",
        licence="CC BY-NC 4.0",
        note="ViT-B/16-quickgelu + BiomedBERT; text config from microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
    ),
    "unimed-clip-l14": HubModel(
        "UzairK/unimed_clip_vit_l14_base_text_encoder",
        "unimed-clip-vit-l14-336",
        file="unimed_clip_vit_l14_base_text_encoder.pt",
        licence="CC BY-NC 4.0",
        note="ViT-L/14 336 px, 4.97 GB download",
    ),
}


@dataclass
class ModelEntry:
    name: str
    source: str  # how to ask for it
    where: str  # the folder or hub repo it loads from
    available_offline: bool
    licence: str = ""
    note: str = ""


def shipped_models() -> dict[str, Path]:
    """Shipped CLIP checkpoints by name (the Q-Formers beside them are listed by engine.ask)."""
    from engine.models import catalog

    return {name: entry.folder for name, entry in catalog.shipped(catalog.CLIP).items()}


def list_models() -> list[ModelEntry]:
    entries = []
    from engine.models import catalog

    for name, entry in catalog.shipped(catalog.CLIP).items():
        entries.append(ModelEntry(name, name, str(entry.folder), True, entry.licence, entry.note))
    for name, hub in KNOWN_HUB.items():
        entries.append(ModelEntry(name, f"hf-hub:{hub.repo}", f"https://huggingface.co/{hub.repo}", False, hub.licence, hub.note))
    return entries
