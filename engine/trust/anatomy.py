"""The field-of-view check: no organ is reported more likely than its being in the scan's field of view.

A 2D model labelling sampled slices of a volume has no idea where in the
body the slices are: the shipped CLIP reported brain 97% "present" in an
abdominal CT. This module bounds each organ label of a volume by an
estimate of the probability that the organ can be in the field of view at
all, from evidence a radiologist would accept, and says why.

Design decisions
- Evidence, each cheap and independent of the 2D model being checked:
  1. the scan's physical cross-sections: on the sampled axial slices, the
     largest in-plane extent (mm) of the largest connected body region
     (CT: voxels above -500 HU; other modalities: above 10 % of the
     1st-99th percentile range, as engine.zeroshot.imaging picks slices).
     A head is at most about 22 cm across in any direction; an adult
     trunk at least about 26 cm, shoulders included. A slice of 24 cm or
     more is "trunk-sized", one under 24 cm "head-sized";
  2. the scan's length: the z-extent (mm) of the slices that hold body;
  3. the DICOM header's BodyPartExamined, when it names a region;
  4. the volume model's answer to "What body region is shown?" (the
     Q-Former reads the whole volume at once: engine.ask), calibrated when
     its checkpoint carries a calibration, else trusted at most
     `UNCALIBRATED_WEIGHT` (its answer mixed with a uniform one).
- The main region (head, neck, chest, abdomen, pelvis) gets a posterior
  P(m) proportional to the product of the evidence's likelihoods (naive
  Bayes over a uniform prior): the volume model's probability, the header
  (`HEADER_MISS` for a region it does not name), and the cross-sections
  (no head-sized slice: a head is physically excluded, `IMPOSSIBLE`; no
  trunk-sized slice: a trunk is possible only as a small child's,
  `SMALL_TRUNK`, an assumed share of narrow volumes).
- An organ (assets/anatomy.json: a span along the body's long axis and the
  cross-section it lies in) can be in view with probability at most
  min(size bound, axis bound): the size bound is `IMPOSSIBLE` for a head
  organ without a head-sized slice, and P(trunk regions) for a trunk
  organ without a trunk-sized slice; the axis bound sums P(m) over the
  regions m from which a field of view of this length can reach the
  organ (the field is centred anywhere in m and reaches half its length
  each way: generous, so adjacent regions are always reachable). The
  axis bound needs to know where along the body the scan is: without a
  header region or a volume model ("physical") only the size bound
  applies, since a uniform guess over regions would penalise every organ
  of a short scan.
- The bound is applied as a Frechet bound (P(organ present) <= P(organ in
  view)): present/absent probabilities become min(p, bound); a softmax
  over labels is bounded the same way and renormalised. Nothing is
  raised, only lowered, so the check can hide a true organ only when the
  evidence agrees it cannot be there; when the evidence conflicts (a
  narrow scan the volume model reads as an abdomen) the bound lands in
  the uncertain band and the result says so.
- Only volumes are checked (a 2D image has no length and its pixel size
  often no meaning); labels that name no organ of the table (findings such
  as "bone fracture") are never bounded. Limbs are outside this model: a
  knee MR is "head-sized" and its region rests on the volume model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from engine import settings

REGIONS = ("head", "neck", "chest", "abdomen", "pelvis")
TRUNK = ("chest", "abdomen", "pelvis")
HEAD_SIZED_MAX_MM = 240.0  # a slice narrower than this in every direction can be a head; wider cannot
IMPOSSIBLE = 0.01  # likelihood of what physics excludes (kept above 0: masks can be wrong)
SMALL_TRUNK = 0.05  # a narrow volume is a small child's trunk rather than a head, neck or limb (assumed share)
NECK_ON_WIDE = 0.2  # a neck field of view whose every slice is trunk-sized (the shoulders fill the lower neck)
HEADER_MISS = 0.05  # likelihood of a region the header's BodyPartExamined does not name
UNCALIBRATED_WEIGHT = 0.8  # an uncalibrated volume model's answer, mixed with a uniform one
CT_BODY_HU = -500.0
_SIDES = re.compile(r"\b(left|right|bilateral|both)\b")


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Organ:
    name: str
    span: tuple[float, float]  # mm from the vertex along the body's long axis (adult)
    size: str  # "head", "trunk" or "any": the cross-section it lies in


@dataclass(frozen=True)
class AnatomyTable:
    regions: dict[str, tuple[float, float]]
    region_words: dict[str, tuple[str, ...]]  # normalised word -> regions (header values, volume-model answers)
    organs: dict[str, Organ]  # normalised name or alias -> organ
    uninformative: frozenset[str]

    def organ(self, label: str) -> Organ | None:
        """The organ a label names ("Left kidney", "lungs", "pleural effusion"), or None."""
        text = " ".join(_SIDES.sub(" ", str(label).lower().replace("_", " ")).split())
        if text in self.organs:
            return self.organs[text]
        if text.endswith("s") and text[:-1] in self.organs:
            return self.organs[text[:-1]]
        return None

    def regions_named(self, word: str | None) -> tuple[str, ...] | None:
        """Regions a header value or an answer names; () when it names none we know, None when it says nothing."""
        if not word:
            return None
        key = re.sub(r"[\s_\-/&,]+", "", str(word).lower())
        if not key or key in self.uninformative:
            return None
        return self.region_words.get(key, ())


def anatomy_path() -> Path:
    env = settings.ASSETS.get()
    if env and (env / "anatomy.json").is_file():
        return env / "anatomy.json"
    return settings.REPO_ROOT / "assets" / "anatomy.json"


@lru_cache(maxsize=4)
def _load(path: str) -> AnatomyTable:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    squash = lambda w: re.sub(r"[\s_\-/&,]+", "", str(w).lower())  # noqa: E731
    regions, words = {}, {}
    for name, entry in data["regions"].items():
        if name not in REGIONS:
            raise ValueError(f"{path}: unknown region {name!r} (the model knows {', '.join(REGIONS)})")
        regions[name] = (float(entry["span"][0]), float(entry["span"][1]))
        for w in [name, *entry.get("aliases", ())]:
            words.setdefault(squash(w), ())
            words[squash(w)] = tuple(dict.fromkeys(words[squash(w)] + (name,)))
    for name, parts in (data.get("composite_regions") or {}).items():
        words[squash(name)] = tuple(parts)
    organs = {}
    for name, entry in data["organs"].items():
        organ = Organ(name, (float(entry["span"][0]), float(entry["span"][1])), str(entry.get("size", "any")))
        if organ.size not in ("head", "trunk", "any"):
            raise ValueError(f"{path}: organ {name!r} has size {organ.size!r} (head, trunk or any)")
        for w in [name, *entry.get("aliases", ())]:
            organs[" ".join(str(w).lower().split())] = organ
    return AnatomyTable(regions, words, organs, frozenset(squash(w) for w in data.get("uninformative_body_parts", ())))


def anatomy() -> AnatomyTable:
    return _load(str(anatomy_path()))


# --------------------------------------------------------------------------- physical evidence
@dataclass
class BodyFacts:
    """What the scan's geometry and header say (no model involved); computed once per scan."""

    sections_mm: list[float]  # per sampled axial slice: largest in-plane extent of the largest body region
    z_extent_mm: float  # length of the slices holding body
    body_part: str | None  # the header's BodyPartExamined (de-identified metadata), if any

    @property
    def head_sized(self) -> int:
        return sum(1 for s in self.sections_mm if 0 < s < HEAD_SIZED_MAX_MM)

    @property
    def trunk_sized(self) -> int:
        return sum(1 for s in self.sections_mm if s >= HEAD_SIZED_MAX_MM)

    def to_dict(self) -> dict[str, Any]:
        sizes = [s for s in self.sections_mm if s > 0]
        return {
            "cross_section_mm": [round(min(sizes)), round(max(sizes))] if sizes else None,
            "head_sized_slices": self.head_sized,
            "trunk_sized_slices": self.trunk_sized,
            "length_mm": round(self.z_extent_mm),
            "body_part_examined": self.body_part,
        }


def _largest_extent_mm(mask: np.ndarray, row_mm: float, col_mm: float) -> float:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return 0.0
    sizes = np.bincount(labels.ravel())[1:]
    rows, cols = np.nonzero(labels == int(np.argmax(sizes)) + 1)
    return float(max((rows.max() - rows.min() + 1) * row_mm, (cols.max() - cols.min() + 1) * col_mm))


def body_facts(scan, volume: int = 0, n_slices: int = 12) -> BodyFacts | None:
    """Cross-sections and length of a volume (None for a 2D image)."""
    if scan.is_2d:
        return None
    from engine.scan import Modality
    from engine.views import canonical_volume
    from engine.zeroshot.imaging import foreground_extent, sample_indices

    vol, (dz, dy, dx) = canonical_volume(scan, volume)
    if scan.modality == Modality.CT:
        level = CT_BODY_HU
    else:
        sub = vol[:: max(1, vol.shape[0] // 32), ::4, ::4]
        finite = sub[np.isfinite(sub)]
        lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 0.0)
        level = lo + 0.1 * (hi - lo)
    sections = [
        _largest_extent_mm(np.nan_to_num(vol[i], nan=-np.inf) > level, dy, dx) for i in sample_indices(scan, "axial", n_slices, volume)
    ]
    first, last = foreground_extent(scan, "axial", volume)
    part = scan.metadata.get("BodyPartExamined")
    return BodyFacts(sections, float((last - first + 1) * dz), str(part) if part else None)


# --------------------------------------------------------------------------- the field of view
@dataclass
class Bound:
    """At most this probability for a label, and why."""

    label: str
    organ: str
    bound: float
    reason: str


@dataclass
class FieldOfView:
    """Posterior over the main region of a volume's field of view, and the evidence behind it."""

    regions: dict[str, float]  # region -> P(main region), sums to 1
    facts: BodyFacts
    evidence: list[str] = field(default_factory=list)  # one line per source, for the user
    volume_model: dict[str, float] | None = None  # region -> the volume model's probability (as used)
    located: bool = False  # a header or the volume model said where along the body: the axis bound applies

    @property
    def main(self) -> tuple[str, float]:
        region = max(self.regions, key=self.regions.get)
        return region, self.regions[region]

    def describe(self) -> str:
        region, p = self.main
        what = f"{region} field of view ({100 * p:.0f}%)" if p >= 0.6 else "field of view of uncertain region"
        return f"{what}: {'; '.join(self.evidence)}"

    def in_view(self, organ: Organ) -> float:
        """Upper bound on P(organ in the field of view)."""
        table = anatomy()
        half = self.facts.z_extent_mm / 2
        axis = sum(p for m, p in self.regions.items() if _gap(table.regions[m], organ.span) <= half) if self.located else 1.0
        size = 1.0
        if organ.size == "head" and self.facts.head_sized == 0:
            size = IMPOSSIBLE
        elif organ.size == "trunk" and self.facts.trunk_sized == 0:
            size = sum(self.regions[m] for m in TRUNK)
        return float(min(1.0, axis, size))

    def bound(self, label: str) -> Bound | None:
        """The bound on `label` (None when it names no organ of the table)."""
        organ = anatomy().organ(label)
        if organ is None:
            return None
        b = self.in_view(organ)
        region, p = self.main
        where = f"this {region} field of view" if p >= 0.6 else "this field of view"
        head = f"{label}: not in {where}" if b < 0.35 else f"{label}: {100 * b:.0f}% at most to be in {where}"
        return Bound(label, organ.name, b, f"{head} ({'; '.join(self.evidence)})")

    def to_dict(self) -> dict[str, Any]:
        region, p = self.main
        return {
            "main_region": region,
            "main_region_probability": round(p, 4),
            "regions": {m: round(v, 4) for m, v in self.regions.items()},
            **self.facts.to_dict(),
            "volume_model": None if self.volume_model is None else {m: round(v, 4) for m, v in self.volume_model.items()},
            "evidence": list(self.evidence),
        }


def _gap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, max(a[0], b[0]) - min(a[1], b[1]))


def _size_likelihood(facts: BodyFacts) -> tuple[dict[str, float], str]:
    sizes = [s for s in facts.sections_mm if s > 0]
    if not sizes:
        return {m: 1.0 for m in REGIONS}, "no body found on the slices"
    span = f"cross-sections {min(sizes) / 10:.0f}-{max(sizes) / 10:.0f} cm"
    if facts.head_sized == 0:
        return {"head": IMPOSSIBLE, "neck": NECK_ON_WIDE, **{m: 1.0 for m in TRUNK}}, f"{span}: every slice wider than a head"
    if facts.trunk_sized == 0:
        return {"head": 1.0, "neck": 1.0, **{m: SMALL_TRUNK for m in TRUNK}}, f"{span}: narrower than an adult trunk"
    return {m: 1.0 for m in REGIONS}, f"{span}: head- and trunk-sized slices"


def volume_model_likelihood(answer: Mapping[str, float], calibrated: bool) -> dict[str, float]:
    """The volume model's region probabilities (candidate -> p) as a likelihood per region.

    An uncalibrated answer is mixed with a uniform one (UNCALIBRATED_WEIGHT). Candidates naming
    no region of the axis (e.g. "skin") spread evenly; a region no candidate names (the neck)
    gets the likelihood of the least likely region the model could name."""
    table = anatomy()
    n = max(1, len(answer))
    out = {m: 0.0 for m in REGIONS}
    said: set[str] = set()
    spread = 0.0
    for candidate, p in answer.items():
        p = float(p) if calibrated else UNCALIBRATED_WEIGHT * float(p) + (1 - UNCALIBRATED_WEIGHT) / n
        named = [m for m in (table.regions_named(candidate) or ()) if m in out]
        said.update(named)
        for m in named:
            out[m] += p / len(named)
        if not named:
            spread += p
    out = {m: v + spread / len(REGIONS) for m, v in out.items()}
    least = min((out[m] for m in said), default=1.0)
    return {m: (v if m in said else least) for m, v in out.items()}


def field_of_view(
    facts: BodyFacts, region_answer: Mapping[str, float] | None = None, *, calibrated: bool = False, model_name: str = "the volume model"
) -> FieldOfView:
    """Combine the evidence (module docstring) into a FieldOfView."""
    table = anatomy()
    posterior = {m: 1.0 for m in REGIONS}
    evidence: list[str] = []
    size, line = _size_likelihood(facts)
    evidence.append(line)
    evidence.append(f"{facts.z_extent_mm / 10:.0f} cm long")
    named = table.regions_named(facts.body_part)
    if named:
        evidence.append(f"DICOM header: {facts.body_part}")
        for m in REGIONS:
            posterior[m] *= 1.0 if m in named else HEADER_MISS
    vm = None
    if region_answer:
        vm = volume_model_likelihood(region_answer, calibrated)
        top = max(region_answer, key=region_answer.get)
        evidence.append(f"{model_name} reads {top} ({100 * float(region_answer[top]):.0f}%{'' if calibrated else ', uncalibrated'})")
        for m in REGIONS:
            posterior[m] *= vm[m]
    for m in REGIONS:
        posterior[m] *= size[m]
    total = sum(posterior.values())
    return FieldOfView({m: v / total for m, v in posterior.items()}, facts, evidence, vm, located=bool(named) or vm is not None)
