"""Prompt ensembles: label sets and phrasings per modality, read from assets/prompts/*.json.

Design decisions
- Prompts are data, not code: one JSON file per modality (xray, ct, mr, us,
  pathology, fundus, dermoscopy, other) holding named label sets (presets),
  templates with a `{label}` slot, "present"/"absent" pair templates, and
  optional per-class entries (aliases, hand-written descriptions, or full
  sentences that replace the templates).
- A class embedding is the mean of its L2-normalised prompt embeddings,
  re-normalised (UniMed-CLIP's ensembling): several phrasings average out the
  wording, and a bare "a photo of X" is known to do badly on medical images.
- A label the user types that is not a preset class gets the modality's
  templates; one that matches a class name or alias (case, spaces and
  underscores ignored) gets that class's prompts. The label shown back is
  always the one the user typed.
- Present/absent (CT-CLIP style): each label gets two ensembles, "{label} is
  present..." and "no {label}...", so findings are scored independently.
- Files are read once per process (lru_cache); a user's labels never become
  file names (the modality key is checked against a fixed list).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from engine import settings
from engine.errors import MedLensError
from engine.scan import Modality

REPO_PROMPTS = settings.REPO_ROOT / "assets" / "prompts"

# prompt-set key per scan modality (file assets/prompts/<key>.json)
MODALITY_KEYS: dict[Modality, str] = {
    Modality.XRAY: "xray",
    Modality.CT: "ct",
    Modality.MR: "mr",
    Modality.US: "us",
    Modality.PATHOLOGY: "pathology",
    Modality.FUNDUS: "fundus",
    Modality.DERMOSCOPY: "dermoscopy",
    Modality.OTHER: "other",
}
PROMPT_SET_KEYS: tuple[str, ...] = tuple(MODALITY_KEYS.values())
# words a user may type for a prompt set besides its key
_KEY_ALIASES = {
    "x-ray": "xray",
    "cr": "xray",
    "dx": "xray",
    "radiograph": "xray",
    "mri": "mr",
    "ultrasound": "us",
    "histology": "pathology",
    "histopathology": "pathology",
    "retina": "fundus",
    "skin": "dermoscopy",
    "dermatology": "dermoscopy",
    "unknown": "other",
}


class PromptError(MedLensError):
    """Labels or prompt sets that cannot be used (empty list, unknown modality, broken asset)."""


class TextEncoder(Protocol):
    """What ensembling needs from a model: L2-normalised text embeddings (N, D)."""

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class ClassPrompts:
    """One preset class of a prompt set."""

    name: str  # canonical class name, e.g. "pleural effusion"
    aliases: tuple[str, ...] = ()  # other names a user may type ("effusion", HAM10000 codes)
    prompts: tuple[str, ...] = ()  # full sentences replacing the templates (e.g. for "normal")
    descriptions: tuple[str, ...] = ()  # hand-written sentences added to the templated prompts


@dataclass(frozen=True)
class PromptSet:
    """The label sets and prompt templates of one modality (assets/prompts/<key>.json)."""

    key: str  # "xray", "ct", ...
    title: str  # shown in pickers, e.g. "X-ray"
    label_sets: dict[str, tuple[str, ...]]  # preset name -> labels; the first is the default
    templates: tuple[str, ...]  # each holds "{label}"
    present_templates: tuple[str, ...]
    absent_templates: tuple[str, ...]
    classes: dict[str, ClassPrompts] = field(default_factory=dict)  # by canonical name
    about: str = ""

    @property
    def default_labels(self) -> list[str]:
        return list(next(iter(self.label_sets.values()), ()))

    def find_class(self, label: str) -> ClassPrompts | None:
        """The preset class a user's label names (by name or alias), if any."""
        wanted = normalise_label(label)
        for cls in self.classes.values():
            if wanted == normalise_label(cls.name) or wanted in (normalise_label(a) for a in cls.aliases):
                return cls
        return None

    def prompts(self, label: str) -> list[str]:
        """The sentences whose embeddings are averaged into `label`'s class embedding."""
        cls = self.find_class(label)
        if cls is not None and cls.prompts:
            return list(dict.fromkeys(cls.prompts))
        phrase = cls.name if cls is not None else _clean(label)
        out = [t.format(label=phrase) for t in self.templates]
        if cls is not None:
            out += list(cls.descriptions)
        return list(dict.fromkeys(out))

    def pair_prompts(self, label: str) -> tuple[list[str], list[str]]:
        """(present sentences, absent sentences) for present/absent scoring of `label`."""
        cls = self.find_class(label)
        phrase = cls.name if cls is not None else _clean(label)
        present = [t.format(label=phrase) for t in self.present_templates]
        if cls is not None:
            present += list(cls.descriptions)
        absent = [t.format(label=phrase) for t in self.absent_templates]
        return list(dict.fromkeys(present)), list(dict.fromkeys(absent))


def _clean(label: str) -> str:
    return " ".join(str(label).replace("_", " ").split())


def normalise_label(label: str) -> str:
    """Case-, space- and underscore-insensitive form used to match labels to classes."""
    return _clean(label).lower()


def clean_labels(labels: Sequence[str] | str | None) -> list[str]:
    """User labels: split a comma/newline-separated string, strip, drop empties and repeats (order kept).

    Raises PromptError when nothing is left.
    """
    if labels is None:
        labels = []
    if isinstance(labels, str):
        labels = re.split(r"[\n,;]+", labels)
    out: list[str] = []
    seen: set[str] = set()
    for raw in labels:
        text = " ".join(str(raw).split())
        key = normalise_label(text)
        if text and key not in seen:
            seen.add(key)
            out.append(text)
    if not out:
        raise PromptError("no labels given: list at least one label (e.g. 'pneumonia, normal'), or pick a preset label set")
    return out


# --------------------------------------------------------------------------- loading
def prompt_dirs() -> list[Path]:
    """Where prompt files are looked for: $MEDLENS_PROMPTS, $MEDLENS_ASSETS/prompts, the repository's assets/prompts."""
    dirs = []
    if settings.PROMPTS.get():
        dirs.append(settings.PROMPTS.get())
    if settings.ASSETS.get():
        dirs.append(settings.ASSETS.get() / "prompts")
    dirs.append(REPO_PROMPTS)
    return dirs


def prompt_set_key(modality: Modality | str | None) -> str:
    """The prompt-set key for a scan modality or a name a user typed ("X-ray", "CT", "xray")."""
    if modality is None:
        return "other"
    if isinstance(modality, Modality):
        return MODALITY_KEYS[modality]
    text = str(modality).strip()
    try:
        return MODALITY_KEYS[Modality(text.upper())]
    except ValueError:
        pass
    key = text.lower()
    key = _KEY_ALIASES.get(key, key)
    if key not in PROMPT_SET_KEYS:
        raise PromptError(f"unknown modality {text!r} for prompts; choose one of {', '.join(PROMPT_SET_KEYS)}")
    return key


def load_prompt_set(modality: Modality | str | None) -> PromptSet:
    """The prompt set of a modality (Modality, or a key such as "xray", "ct", "other")."""
    return _load(prompt_set_key(modality), tuple(str(d) for d in prompt_dirs()))


def all_prompt_sets() -> list[PromptSet]:
    """Every modality's prompt set, in PROMPT_SET_KEYS order."""
    return [load_prompt_set(key) for key in PROMPT_SET_KEYS]


@lru_cache(maxsize=32)
def _load(key: str, dirs: tuple[str, ...]) -> PromptSet:
    path = next((Path(d) / f"{key}.json" for d in dirs if (Path(d) / f"{key}.json").is_file()), None)
    if path is None:
        raise PromptError(f"prompt set '{key}' is missing (looked for {key}.json in {', '.join(dirs)})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return parse_prompt_set(data, key)
    except PromptError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PromptError(f"prompt set {path} is malformed ({type(exc).__name__}: {exc})") from None


def parse_prompt_set(data: dict, key: str) -> PromptSet:
    """Validate and build a PromptSet from its JSON object."""

    def templates(name: str) -> tuple[str, ...]:
        items = tuple(str(t) for t in data.get(name, ()))
        if not items:
            raise PromptError(f"prompt set '{key}': '{name}' is empty")
        for t in items:
            if "{label}" not in t:
                raise PromptError(f"prompt set '{key}': template {t!r} in '{name}' has no {{label}} slot")
            t.format(label="x")  # stray braces fail here, not at scoring time
        return items

    classes = {}
    for name, entry in (data.get("classes") or {}).items():
        entry = entry or {}
        classes[name] = ClassPrompts(
            name=name,
            aliases=tuple(entry.get("aliases", ())),
            prompts=tuple(entry.get("prompts", ())),
            descriptions=tuple(entry.get("descriptions", ())),
        )
    label_sets = {str(n): tuple(str(x) for x in labels) for n, labels in (data.get("label_sets") or {}).items()}
    if not label_sets or not all(label_sets.values()):
        raise PromptError(f"prompt set '{key}': needs at least one non-empty label set")
    return PromptSet(
        key=key,
        title=str(data.get("title", key)),
        label_sets=label_sets,
        templates=templates("templates"),
        present_templates=templates("present_templates"),
        absent_templates=templates("absent_templates"),
        classes=classes,
        about=str(data.get("about", "")),
    )


# --------------------------------------------------------------------------- embeddings
def ensemble(model: TextEncoder, prompt_lists: Sequence[Sequence[str]]) -> np.ndarray:
    """(L, D) float32: per list, the mean of its normalised prompt embeddings, re-normalised.

    All prompts go to the model in one call (repeats are encoded once; the
    model's text cache makes a second call with the same labels free).
    """
    flat = [p for prompts in prompt_lists for p in prompts]
    if any(len(p) == 0 for p in prompt_lists):
        raise PromptError("a label has no prompts")
    unique = list(dict.fromkeys(flat))
    emb = np.asarray(model.encode_texts(unique), dtype=np.float64)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)  # normalised even from a stub
    row = {text: i for i, text in enumerate(unique)}
    out = np.empty((len(prompt_lists), emb.shape[1]), dtype=np.float64)
    for i, prompts in enumerate(prompt_lists):
        mean = emb[[row[p] for p in prompts]].mean(axis=0)
        out[i] = mean / max(np.linalg.norm(mean), 1e-12)
    return out.astype(np.float32)


def class_embeddings(model: TextEncoder, labels: Sequence[str], prompt_set: PromptSet) -> np.ndarray:
    """(L, D) ensembled class embeddings of `labels` under `prompt_set`."""
    return ensemble(model, [prompt_set.prompts(label) for label in labels])


def pair_embeddings(model: TextEncoder, labels: Sequence[str], prompt_set: PromptSet) -> tuple[np.ndarray, np.ndarray]:
    """((L, D) present, (L, D) absent) ensembled embeddings for present/absent scoring."""
    pairs = [prompt_set.pair_prompts(label) for label in labels]
    both = ensemble(model, [p for p, _ in pairs] + [a for _, a in pairs])
    return both[: len(labels)], both[len(labels) :]
