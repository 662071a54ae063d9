"""Question families for "Ask the scan": matching, candidate answers, answer normalisation.

A *family* is one kind of question (organ presence, modality, plane, a
finding yes/no, ...). Families, their phrasings (templates with `{slot}`s),
their slot vocabularies and their candidate answers are data, in
assets/qa/question_families.json, read once per process. The QA training
recipes (training/recipes/qa.py) render questions from the same templates
that `match_question` recognises at inference, so what the model was trained
on and what a user's question is mapped to cannot drift apart.

Design decisions
- Closed families (yes/no, modality, plane, body region, side, count,
  diagnosis, ...) are answered by ranking their `candidates`; open ones
  (organs in view) by generated text. A question that matches no family
  (`match_question` returns None) is not an error: it gets an open,
  generated answer. That includes questions in languages other than
  English, which are accepted by `validate_question` and simply never
  match an (English) family.
- Matching works on a canonical form of the text (`canonical`): NFKC, lower
  case, punctuation dropped, articles and "please" dropped, "are" -> "is",
  contractions expanded, "x ray"/"xray" -> "x-ray", a trailing "in this
  image/scan" or "here" dropped. Templates are canonicalised the same way,
  so "Is the liver visible", "is liver visible?" and "IS THE LIVER VISIBLE
  IN THIS SCAN" are one question.
- Two passes: (1) exact template match with slot alternations (precise);
  (2) keyword rules per family (`keywords`, `needs` a slot) in the JSON's
  family order, most specific first, for phrasings no template has ("can
  you see the liver?" is a template, "would the liver be seen here?" is
  caught by rules). Free-form questions that mention an organ without a
  presence cue ("is the liver enlarged?") deliberately match nothing.
- Organ groups ("kidney", "lungs" without a side) are slot values meaning
  "any of the members" (`organ_members`); the recipes only ask about single
  organs, the matcher accepts both.
- `normalise_answer` is the exact-match scorer's view of an answer: lower
  case, punctuation and articles dropped, synonyms mapped ("mr" -> "mri",
  "x ray" -> "x-ray", "two" -> "2"; per family: "brain" -> "head" for body
  region, "adenocarcinoma" -> "lung adenocarcinoma" for tissue type),
  comma-separated lists sorted and de-duplicated, and a yes/no family's
  "Yes, it is visible." reduced to "yes".
- engine/ never imports training/: the organ vocabulary lives in the JSON
  asset; tests/test_qa_questions.py checks it against training/recipes.
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

from engine import settings
from engine.errors import MedLensError

ASSET = settings.REPO_ROOT / "assets" / "qa" / "question_families.json"
DEFAULT_MAX_CHARS = 500

__all__ = [
    "QuestionError",
    "Family",
    "QuestionMatch",
    "load_families",
    "vocabulary",
    "match_question",
    "suggested_questions",
    "normalise_answer",
    "validate_question",
    "render_question",
    "canonical",
    "candidates_for",
    "organ_members",
    "organ_vocabulary",
    "is_plural",
    "modality_key",
    "max_question_chars",
]


class QuestionError(MedLensError):
    """A question that cannot be asked (empty, too long, not text); the message says how to fix it."""


@dataclass(frozen=True)
class Family:
    id: str
    closed: bool  # True: answer = one of `candidates` (ranked); False: generated free text
    templates: tuple[str, ...]  # phrasings with {slot}s; {be} = is/are by the organ's number
    candidates: tuple[str, ...]  # canonical answers of a closed family (diagnosis: union over modalities)
    slots: tuple[str, ...]  # slot names the templates use
    description: str = ""
    keywords: tuple[str, ...] = ()  # fallback rules: "word", "a+b" (all tokens), "^phrase" (starts with)
    needs: str | None = None  # slot that must be found in the question for the fallback rule
    yes_no_start: bool = False  # fallback also fires on a yes/no question start (is/does/can ...) + the slot
    by_modality: Mapping[str, str] = field(default_factory=dict)  # modality -> family to use instead


@dataclass(frozen=True)
class QuestionMatch:
    family: str  # family id
    slots: dict[str, str]  # canonical slot values, e.g. {"organ": "liver"}
    candidates: tuple[str, ...]  # closed: the answers to rank; open: ()
    closed: bool
    how: str  # "template" or "keywords"
    template: str | None = None  # the template that matched (how == "template")


# --------------------------------------------------------------------------- loading
def asset_path() -> Path:
    """$MEDLENS_ASSETS/qa/question_families.json when present, else the repository's asset."""
    env = settings.ASSETS.get()
    if env and (env / "qa" / "question_families.json").is_file():
        return env / "qa" / "question_families.json"
    return ASSET


@lru_cache(maxsize=4)
def _load(path: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MedLensError(f"question families asset {path} cannot be read ({exc}); reinstall MedLens") from None


def _doc() -> dict[str, Any]:
    return _load(str(asset_path()))


def vocabulary() -> dict[str, Any]:
    """The asset's `vocabulary` section (organs, modalities, findings, ...), read-only by convention."""
    return _doc()["vocabulary"]


def max_question_chars() -> int:
    return int(_doc().get("max_question_chars", DEFAULT_MAX_CHARS))


def _resolve_candidates(spec: Any, vocab: dict[str, Any]) -> tuple[str, ...]:
    if spec is None:
        return ()
    if isinstance(spec, list):
        return tuple(spec)
    value: Any = {"vocabulary": vocab}
    for part in str(spec).split("."):
        value = value[part]
    if isinstance(value, dict):  # e.g. modalities: {answer: forms}; diagnoses: {modality: [answers]}
        flat: list[str] = []
        for k, v in value.items():
            flat += v if isinstance(v, list) and spec.endswith("diagnoses") else [k]
        return tuple(dict.fromkeys(flat))
    return tuple(value)


@lru_cache(maxsize=4)
def _families(path: str) -> dict[str, Family]:
    doc = _load(path)
    vocab = doc["vocabulary"]
    out: dict[str, Family] = {}
    for f in doc["families"]:
        out[f["id"]] = Family(
            id=f["id"],
            closed=bool(f["closed"]),
            templates=tuple(f["templates"]),
            candidates=_resolve_candidates(f.get("candidates"), vocab),
            slots=tuple(f.get("slots", ())),
            description=f.get("description", ""),
            keywords=tuple(f.get("keywords", ())),
            needs=f.get("needs"),
            yes_no_start=bool(f.get("yes_no_start", False)),
            by_modality=dict(f.get("by_modality", {})),
        )
    return out


def load_families() -> dict[str, Family]:
    """Family id -> Family, in the asset's order (the fallback matcher's priority order)."""
    return _families(str(asset_path()))


# --------------------------------------------------------------------------- vocabulary helpers
def organ_vocabulary(key: str | None = None) -> tuple[str, ...]:
    """Canonical organ names: one list ("ct", "mr", "brain") or all of them (sorted, unique)."""
    organs = vocabulary()["organs"]
    if key is not None:
        return tuple(organs[key])
    return tuple(sorted({o for names in organs.values() for o in names}))


def organ_members(name: str) -> tuple[str, ...]:
    """The organs an organ slot value stands for: a group ("kidney") -> its members, else (name,)."""
    group = vocabulary()["organ_groups"].get(name)
    return tuple(group["members"]) if group else (name,)


def is_plural(organ: str) -> bool:
    return organ in set(vocabulary()["plural_organs"])


_MODALITY_ALIASES = {
    "ct": "ct",
    "mr": "mr",
    "mri": "mr",
    "xray": "xray",
    "x-ray": "xray",
    "cr": "xray",
    "dx": "xray",
    "us": "us",
    "ultrasound": "us",
    "pathology": "pathology",
    "histopathology": "pathology",
    "fundus": "fundus",
    "fundus photograph": "fundus",
    "dermoscopy": "dermoscopy",
}


def modality_key(modality: Any) -> str | None:
    """A manifest modality code (ct, mr, xray, us, pathology, fundus, dermoscopy) for an engine
    Modality, its value ("XRAY"), a manifest code or an answer word ("mri"); None when unknown/other."""
    if modality is None:
        return None
    text = str(getattr(modality, "value", modality)).strip().lower()
    return _MODALITY_ALIASES.get(text)


# --------------------------------------------------------------------------- canonical text
_CONTRACTIONS = {
    "what's": "what is",
    "where's": "where is",
    "which's": "which is",
    "there's": "there is",
    "it's": "it is",
    "isn't": "is not",
    "aren't": "are not",
    "can't": "cannot",
    "don't": "do not",
    "doesn't": "does not",
    "wasn't": "was not",
    "that's": "that is",
    "how's": "how is",
}
_DROP = {"a", "an", "the", "please"}
_TOKEN_MAP = {"are": "is", "oedema": "edema", "tumour": "tumor", "visualised": "visualized", "colour": "color"}
_POLITE_PREFIX = re.compile(r"^(can you tell me|could you tell me|tell me|do you know|i would like to know|i want to know)\s+")
_TRAILING_PLACE = re.compile(
    r"(\s+(in|on|of|from|within)\s+(this|these|current)?\s*(image|images|scan|scans|picture|study|slice|volume|film|photo|photograph|exam|examination))+$"
    r"|\s+here$"
)
_YES_NO_START = {"is", "does", "do", "can", "could", "was", "were", "has", "have", "any", "did", "will", "would", "should", "may", "might"}


def _base(text: str) -> str:
    """Lower case, NFKC, x-ray spelled one way, contractions expanded, punctuation -> spaces."""
    t = unicodedata.normalize("NFKC", str(text)).lower().replace("\u2019", "'").replace("`", "'")
    t = re.sub(r"\bx[\s\-]?rays?\b", "x-ray", t)
    for short, long in _CONTRACTIONS.items():
        t = t.replace(short, long)
    t = re.sub(r"[^\w&\-\s]", " ", t)  # keep letters (any script), digits, '&' (H&E) and hyphens
    t = re.sub(r"(?<![\w&])-|-(?![\w&])", " ", t)  # a hyphen only inside a word
    return t


def canonical(text: str, *, keep_place: bool = False) -> str:
    """The matching form of a question (module docstring). keep_place: keep "in this image"."""
    tokens = [_TOKEN_MAP.get(w, w) for w in _base(text).split() if w not in _DROP]
    t = " ".join(tokens)
    t = _POLITE_PREFIX.sub("", t)
    if not keep_place:
        t = _TRAILING_PLACE.sub("", t).strip()
    return t


# --------------------------------------------------------------------------- slots
def _slot_forms() -> dict[str, dict[str, str]]:
    return _slot_forms_cached(str(asset_path()))


@lru_cache(maxsize=4)
def _slot_forms_cached(path: str) -> dict[str, dict[str, str]]:
    """slot -> {canonical surface form: canonical value}."""
    v = _load(path)["vocabulary"]
    forms: dict[str, dict[str, str]] = {k: {} for k in ("organ", "organ_pair", "organ_plural", "modality", "finding", "finding_adj")}

    def add(slot: str, form: str, value: str) -> None:
        c = canonical(form, keep_place=True)
        if c:
            forms[slot].setdefault(c, value)

    for organ in sorted({o for names in v["organs"].values() for o in names}):
        add("organ", organ, organ)
    for organ, syns in v["organ_synonyms"].items():
        for s in syns:
            add("organ", s, organ)
    for group, spec in v["organ_groups"].items():
        for s in spec["forms"]:
            add("organ", s, group)
    for pair, spec in v["paired_organs"].items():
        for s in (pair, spec["plural"]):
            add("organ_pair", s, pair)
            add("organ_plural", s, pair)
    for answer, syns in v["modalities"].items():
        for s in [answer, *syns]:
            add("modality", s, answer)
    for finding, spec in v["findings"].items():
        for s in [finding, *spec.get("forms", [])]:
            add("finding", s, finding)
        for s in spec.get("adjectives", []):
            add("finding_adj", s, finding)
    return forms


def _alternation(slot: str) -> str:
    return "|".join(re.escape(f) for f in sorted(_slot_forms()[slot], key=len, reverse=True))


@lru_cache(maxsize=16)
def _slot_search(slot: str, path: str) -> re.Pattern:
    return re.compile(r"(?<![\w&-])(" + _alternation(slot) + r")(?![\w&-])")


def _find_slot(slot: str, text: str) -> str | None:
    m = _slot_search(slot, str(asset_path())).search(text)
    return _slot_forms()[slot][m.group(1)] if m else None


# --------------------------------------------------------------------------- templates
@lru_cache(maxsize=4)
def _compiled(path: str) -> list[tuple[str, str, re.Pattern, tuple[str, ...]]]:
    """(family id, template, full-match regex, slot names) for every template, in family order."""
    out = []
    for fam in _families(path).values():
        for template in fam.templates:
            t = template.replace("{be}", "is")
            slots = tuple(re.findall(r"\{(\w+)\}", t))
            for s in slots:
                t = t.replace("{" + s + "}", f" qqslot{s.replace('_', '')}qq ")
            pattern = re.escape(canonical(t))
            for s in slots:
                pattern = pattern.replace(f"qqslot{s.replace('_', '')}qq", f"(?P<{s}>{_alternation(s)})")
            out.append((fam.id, template, re.compile(pattern), slots))
    return out


def candidates_for(family: str, modality: Any = None) -> tuple[str, ...]:
    """Candidate answers of a closed family, narrowed by modality where the family depends on it
    (diagnosis: BUSI classes for ultrasound, HAM10000 classes for dermoscopy)."""
    fam = load_families()[family]
    if family == "diagnosis":
        key = modality_key(modality)
        per = vocabulary()["diagnoses"]
        if key in per:
            return tuple(per[key])
    return fam.candidates


def _make_match(family: str, slots: dict[str, str], modality: Any, how: str, template: str | None) -> QuestionMatch:
    fams = load_families()
    fam = fams[family]
    key = modality_key(modality)
    if key and key in fam.by_modality:  # "what is the diagnosis?" of an H&E tile is its tissue type
        fam = fams[fam.by_modality[key]]
    return QuestionMatch(fam.id, dict(slots), candidates_for(fam.id, modality) if fam.closed else (), fam.closed, how, template)


def _keyword_hit(keyword: str, text: str, tokens: set[str]) -> bool:
    if keyword.startswith("^"):
        return text == keyword[1:] or text.startswith(keyword[1:] + " ")
    if "+" in keyword:
        return all(w in tokens for w in keyword.split("+"))
    if " " in keyword:
        return re.search(r"(?<!\w)" + re.escape(keyword) + r"(?!\w)", text) is not None
    return keyword in tokens


def match_question(text: str, modality: Any = None) -> QuestionMatch | None:
    """The family (and slots, candidates) of a question, or None when no family fits (then the
    answer is generated freely). `modality` (engine Modality, "CT", "mri", ...) narrows diagnosis
    candidates and redirects diagnosis to tissue type (pathology) or DR grade (fundus)."""
    if not isinstance(text, str) or not text.strip():
        return None
    path = str(asset_path())
    canon = canonical(text)
    if not canon:
        return None
    for family, template, pattern, slot_names in _compiled(path):
        m = pattern.fullmatch(canon)
        if m:
            forms = _slot_forms()
            slots = {("finding" if s == "finding_adj" else s): forms[s][m.group(s)] for s in slot_names}
            return _make_match(family, slots, modality, "template", template)
    full = canonical(text, keep_place=True)
    tokens = set(full.split())
    starts_yes_no = full.split()[0] in _YES_NO_START
    for fam in load_families().values():
        slots: dict[str, str] = {}
        if fam.needs:
            value = _find_slot(fam.needs, full)
            if value is None and fam.needs == "finding":
                value = _find_slot("finding_adj", full)
            if value is None and fam.needs == "organ_plural":
                value = _find_slot("organ_pair", full)
            if value is None:
                continue
            slots[fam.needs] = value
        hit = any(_keyword_hit(k, full, tokens) for k in fam.keywords)
        # "is it X or Y?" asks to choose, not yes/no: a yes/no start alone does not make it a yes/no question
        if hit or (fam.yes_no_start and fam.needs and starts_yes_no and "or" not in tokens):
            return _make_match(fam.id, slots, modality, "keywords", None)
    return None


# --------------------------------------------------------------------------- rendering
# "Is this a {modality}?" wants a noun ("a CT scan"); "taken with {modality}" wants the technique ("CT")
_MODALITY_NOUN = {
    "ct": "CT scan",
    "mri": "MRI",
    "x-ray": "X-ray",
    "ultrasound": "ultrasound image",
    "histopathology": "histopathology slide",
    "fundus photograph": "fundus photograph",
    "dermoscopy": "dermoscopy image",
}
_MODALITY_TECHNIQUE = {
    "ct": "CT",
    "mri": "MRI",
    "x-ray": "X-ray",
    "ultrasound": "ultrasound",
    "histopathology": "histopathology",
    "fundus photograph": "fundus photography",
    "dermoscopy": "dermoscopy",
}
_AN = re.compile(r"\b([Aa]) (?=(?:[aeiouAEIOU]|MRI\b|X-ray\b|H&E\b|MR\b))")


def _surface(slot: str, value: str, template: str = "") -> str:
    v = vocabulary()
    if slot == "organ_plural":
        return v["paired_organs"][value]["plural"]
    if slot == "modality":
        table = _MODALITY_NOUN if "a {modality}" in template else _MODALITY_TECHNIQUE
        return table.get(value, value)
    if slot == "finding":
        forms = v["findings"].get(value, {}).get("forms") or [value]
        return forms[0]
    if slot == "finding_adj":
        return v["findings"][value]["adjectives"][0]
    return value


def render_question(family: str, rng: random.Random | None = None, template: str | None = None, **slots: str) -> str:
    """A question of `family` with canonical slot values (organ="liver", finding="pneumonia", ...):
    a random usable template (or the given one), "is"/"are" by the organ's number, a/an fixed."""
    fam = load_families()[family]
    if template is None:
        usable = [t for t in fam.templates if _usable(t, slots)]
        if not usable:
            raise ValueError(f"family {family}: no template fits slots {sorted(slots)}")
        template = (rng or random).choice(usable)
    values = dict(slots)
    if "finding" in values and "{finding_adj}" in template:
        values["finding_adj"] = values["finding"]
    organ = values.get("organ")
    out = template.replace("{be}", "are" if organ and is_plural(organ) else "is")
    for name in re.findall(r"\{(\w+)\}", out):
        out = out.replace("{" + name + "}", _surface(name, values[name], template))
    out = _AN.sub(lambda m: m.group(1) + "n ", out)
    return out[:1].upper() + out[1:]


def _usable(template: str, slots: Mapping[str, str]) -> bool:
    names = set(re.findall(r"\{(\w+)\}", template)) - {"be"}
    if "finding_adj" in names:
        finding = slots.get("finding")
        return bool(finding and vocabulary()["findings"].get(finding, {}).get("adjectives")) and names - {"finding_adj"} <= set(slots)
    return names <= set(slots)


# --------------------------------------------------------------------------- suggestions
def suggested_questions(modality: Any, body_region: str | None = None) -> list[str]:
    """Questions worth offering for a scan of this modality (and body region, e.g. "abdomen")."""
    sugg = _doc()["suggestions"]
    key = modality_key(modality)
    section = sugg.get(key, {}) if key else {}
    region = normalise_answer(body_region, family="body_region") if body_region else None
    out: list[str] = []
    for q in [*section.get(region, []), *section.get("*", []), *sugg.get("*", [])]:
        if q not in out:
            out.append(q)
    return out


# --------------------------------------------------------------------------- answers
def _item(text: str) -> str:
    t = _base(text)
    return " ".join(w for w in t.split() if w not in ("a", "an", "the"))


@lru_cache(maxsize=32)
def _answer_map(family: str | None, path: str) -> dict[str, str]:
    doc = _load(path)
    v = doc["vocabulary"]
    syn = doc["answer_synonyms"]
    table: dict[str, str] = {}

    def add(value: str, forms: Iterable[str]) -> None:
        for f in forms:
            table.setdefault(_item(f), value)

    if family:
        for value, forms in syn.get(family, {}).items():
            add(value, forms)
        if family == "body_region":
            for value, forms in v["body_regions"].items():
                add(value, forms)
        if family == "plane":
            for value, forms in v["planes"].items():
                add(value, forms)
        if family == "organs_in_view":
            for value, forms in v["organ_synonyms"].items():
                add(value, forms)
    for value, forms in syn["*"].items():
        add(value, forms)
    for value, forms in v["modalities"].items():
        add(value, forms)
    return table


@lru_cache(maxsize=4)
def _known_items(path: str) -> frozenset[str]:
    v = _load(path)["vocabulary"]
    names = {o for names in v["organs"].values() for o in names}
    names |= {s for syns in v["organ_synonyms"].values() for s in syns}
    names |= {s for forms in v["body_regions"].values() for s in forms}
    return frozenset(_item(n) for n in names)


def normalise_answer(text: str | None, family: str | None = None) -> str:
    """An answer as exact-match scoring compares it (module docstring); `family` adds that family's
    synonyms ("brain" -> "head" for body_region) and reduces yes/no answers to their first word."""
    if text is None:
        return ""
    path = str(asset_path())
    lowered = _base(text).strip()
    fam = load_families().get(family) if family else None
    if fam is not None and fam.candidates == ("yes", "no"):
        m = re.match(r"\s*(yes|no)\b", lowered)
        if m:
            return m.group(1)
    table = _answer_map(family, path)
    known = _known_items(path)
    items: list[str] = []
    for part in re.split(r"[,;\n]", unicodedata.normalize("NFKC", str(text)).lower()):
        item = _item(part)
        if not item:
            continue
        pieces = [item] if (item in known or item in table or " and " not in f" {item} ") else re.split(r"\s+and\s+", item)
        for piece in pieces:
            piece = re.sub(r"^(and|or)\s+", "", piece.strip())
            if piece:
                items.append(table.get(piece, piece))
    return ", ".join(sorted(dict.fromkeys(items)))


# --------------------------------------------------------------------------- validation
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def validate_question(text: Any) -> str:
    """The question, whitespace tidied, or QuestionError when it cannot be asked.

    Refused: anything not a string, an empty or whitespace-only question, and one longer than
    `max_question_chars()` (500) characters. Accepted as is: questions in any language; a
    non-English question matches no family and is answered as an open question."""
    if not isinstance(text, str):
        raise QuestionError("the question must be text (a string)")
    cleaned = " ".join(_CONTROL.sub(" ", text).split())
    if not cleaned:
        raise QuestionError("the question is empty: type a question about the scan, e.g. 'Which organs are in view?'")
    limit = max_question_chars()
    if len(cleaned) > limit:
        raise QuestionError(f"the question is {len(cleaned)} characters long; the limit is {limit} characters: shorten it")
    return cleaned
