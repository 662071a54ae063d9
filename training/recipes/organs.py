"""Readable organ names for label-map classes, and a body region per slice.

Design decisions
- TotalSegmentator names ("kidney_left", "lung_upper_lobe_left",
  "vertebrae_L3", "rib_left_7") become plain lower-case English with the
  side first ("left kidney", "left lung", "vertebrae", "ribs"): the names a
  user types and the engine's CT prompt set uses. Lobes, single vertebrae
  and single ribs merge into one structure each, because a 2D model
  cannot tell T11 from T12 and captions with 24 rib names teach nothing.
- Brain atlas (AAL) regions merge into the 12 structures a reader names
  (frontal lobe, ..., basal ganglia, cerebellum, vermis); sides merge too.
- Body region of a slice = the region (head/chest/abdomen/pelvis) whose
  marker organs cover the most pixels of that slice; None when no marker
  organ is present. Simple, and right where it matters: axial slices of the
  lung bases with a sliver of liver stay "chest".
"""

from __future__ import annotations

import re

from training.tasks import ABDOMINAL_ORGANS

_SIDES = ("left", "right")
# TotalSegmentator base names (side removed) -> readable names; others just lose underscores.
_BASE = {
    "clavicula": "clavicle",
    "iliac_vena": "iliac vein",
    "hip": "hip bone",
    "autochthon": "erector spinae",
    "portal_vein_and_splenic_vein": "portal and splenic veins",
    "kidney_cyst": "kidney cyst",
    "thyroid_gland": "thyroid gland",
    "pulmonary_vein": "pulmonary veins",
}


def ts_organ_name(name: str) -> str:
    """TotalSegmentator class name -> canonical organ name ("kidney_left" -> "left kidney")."""
    n = name.strip().lower()
    if n.startswith("vertebrae"):
        return "vertebrae"
    if n.startswith("rib_"):
        return "ribs"
    m = re.fullmatch(r"lung(?:_(?:upper|middle|lower)_lobe)?_(left|right)", n)
    if m:
        return f"{m.group(1)} lung"
    parts = n.split("_")
    side = parts[-1] if parts[-1] in _SIDES else None
    base = "_".join(parts[:-1]) if side else n
    word = _BASE.get(base, base.replace("_", " "))
    return f"{side} {word}" if side else word


# AAL region name prefixes -> structure (first match wins; order matters for ParaHippocampal).
_AAL_GROUPS = (
    ("Hippocampus", "hippocampus"),
    ("ParaHippocampal", "temporal lobe"),
    ("Amygdala", "amygdala"),
    ("Insula", "insula"),
    ("Cingulum", "cingulate gyrus"),
    ("Thalamus", "thalamus"),
    ("Caudate", "basal ganglia"),
    ("Putamen", "basal ganglia"),
    ("Pallidum", "basal ganglia"),
    ("Cerebelum", "cerebellum"),
    ("Vermis", "vermis"),
    ("Precentral", "frontal lobe"),
    ("Frontal", "frontal lobe"),
    ("Rolandic", "frontal lobe"),
    ("Supp_Motor", "frontal lobe"),
    ("Olfactory", "frontal lobe"),
    ("Rectus", "frontal lobe"),
    ("Paracentral", "frontal lobe"),
    ("Postcentral", "parietal lobe"),
    ("Parietal", "parietal lobe"),
    ("SupraMarginal", "parietal lobe"),
    ("Angular", "parietal lobe"),
    ("Precuneus", "parietal lobe"),
    ("Heschl", "temporal lobe"),
    ("Temporal", "temporal lobe"),
    ("Fusiform", "temporal lobe"),
    ("Calcarine", "occipital lobe"),
    ("Cuneus", "occipital lobe"),
    ("Lingual", "occipital lobe"),
    ("Occipital", "occipital lobe"),
)
BRAIN_STRUCTURES = tuple(dict.fromkeys(g for _p, g in _AAL_GROUPS))


def aal_structure(region: str) -> str:
    for prefix, group in _AAL_GROUPS:
        if region.startswith(prefix):
            return group
    raise ValueError(f"AAL region {region!r} has no structure group")


_REGION_MARKERS = {
    "head": {"brain", "skull"},
    "chest": {
        "left lung",
        "right lung",
        "heart",
        "trachea",
        "pulmonary veins",
        "left atrial appendage",
        "superior vena cava",
        "brachiocephalic trunk",
        "sternum",
        "thyroid gland",
    },
    "abdomen": {
        *ABDOMINAL_ORGANS,
        "left adrenal gland",
        "right adrenal gland",
        "duodenum",
        "small bowel",
        "colon",
        "portal and splenic veins",
    },
    "pelvis": {
        "urinary bladder",
        "prostate",
        "sacrum",
        "left hip bone",
        "right hip bone",
        "left femur",
        "right femur",
        "left gluteus maximus",
        "right gluteus maximus",
        "left gluteus medius",
        "right gluteus medius",
        "left gluteus minimus",
        "right gluteus minimus",
    },
}
BODY_REGIONS = tuple(_REGION_MARKERS)


def body_region(areas: dict[str, int]) -> str | None:
    """Region whose marker organs cover the most pixels (areas: organ -> pixel count on the slice)."""
    score = {region: sum(areas.get(o, 0) for o in markers) for region, markers in _REGION_MARKERS.items()}
    best = max(score, key=score.__getitem__)
    return best if score[best] > 0 else None
