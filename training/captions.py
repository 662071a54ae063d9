"""Labels -> training captions, UniMed-CLIP style (templates x hand-written class descriptions).

A classification row becomes an image-text pair by drawing one sentence
from its caption pool each time it is seen: the modality and view in words
("a frontal (PA) chest X-ray", "an axial CT slice of the abdomen"), the
class name, and what the class LOOKS LIKE on that modality (keratin pearls
for squamous cell carcinoma on H&E, posterior acoustic shadowing for a
malignant breast mass on ultrasound). UniMed-CLIP showed that descriptions
like these, written per modality, teach a CLIP model more than bare names.

Design decisions
- Independent of evaluation: the engine's zero-shot prompts
  (assets/prompts/*.json) are what evaluation scores with; none of their
  sentences is reused here (tests/test_training_captions.py checks that no
  caption equals, or contains, an evaluation sentence). Class NAMES are the
  same on purpose: the point is that a user's label, phrased by prompts
  nobody trained on, still lands.
- Pools are deterministic: `caption_pool(row)` depends only on the row
  (multi-label subsets are drawn with a generator seeded by a hash of the
  row id), so the trainer can encode the vocabulary once with a frozen text
  tower. Pools hold at most `MAX_POOL` captions.
- Single-label pools are shared by every row of a class (and view), which
  keeps the vocabulary small; multi-label rows (NIH findings, CT/MR organs,
  brain structures) get the full list in a few phrasings, each present item
  on its own (shared across rows), and a few sampled subsets. NIH rows with
  findings also get "abnormal" phrasings; normal ones "no finding" phrasings.
- Modality-only captions ("a plain radiograph of the chest", "a retinal
  fundus image") make up about 1 in 12 of a labelled row's pool, so
  modality names are learnt without drowning the classes; unlabelled rows
  (extra.unlabelled, or no labels) get modality-only captions.
- Rows that carry a source caption and no labels (caption datasets) train
  on that text. BUSI's `text` is not used: its templated sentences are the
  engine's BUSI evaluation prompts.
"""

from __future__ import annotations

import hashlib
import random
from typing import Iterable

from training.manifest import Row

MAX_POOL = 40
MAX_ITEMS = 8  # present items that get a caption of their own (multi-label rows)
N_SUBSETS = 4  # sampled subsets of 2-3 items per multi-label row

# --------------------------------------------------------------------------- modality words
MODALITY_ONLY = {
    "xray": ["a plain radiograph of the chest", "a projection radiograph of the thorax", "chest radiography image"],
    "ct": ["a computed tomography image", "a cross-sectional CT image", "an image from a CT examination"],
    "mr": ["a magnetic resonance imaging slice", "an MR image of the body", "an image from an MRI examination"],
    "us": ["a B-mode ultrasound image", "a greyscale sonographic image", "an image from an ultrasound examination"],
    "pathology": [
        "a microscope image of tissue stained with H&E",
        "a haematoxylin and eosin histology image",
        "a digital pathology tile of stained tissue",
    ],
    "fundus": ["a retinal fundus image", "a colour photograph of the back of the eye", "a fundus camera image of the retina"],
    "dermoscopy": [
        "a dermatoscopic close-up of the skin",
        "a skin surface image taken through a dermatoscope",
        "a polarised dermoscopic photograph",
    ],
}
PLANE_WORD = {"axial": "an axial", "coronal": "a coronal", "sagittal": "a sagittal"}

# --------------------------------------------------------------------------- descriptions
# What each class looks like on its modality; written for MedLens, not copied from the prompt sets.
XRAY = {
    "normal": [
        "the lungs are well expanded and clear, the heart is of normal size and the costophrenic angles are sharp",
        "no consolidation, effusion, pneumothorax or cardiac enlargement",
    ],
    "atelectasis": [
        "a band-like or triangular density with displacement of fissures toward it, from collapsed lung",
        "partial lung collapse with crowding of vessels and loss of volume",
    ],
    "cardiomegaly": ["a wide heart shadow taking up more than half of the chest width", "an enlarged cardiac outline on a frontal view"],
    "consolidation": [
        "a homogeneous white area of lung in which air bronchograms stand out",
        "airspace filling that obscures the vessels of one lobe",
    ],
    "edema": [
        "fluffy opacities around both hila with Kerley B lines and thickened fissures",
        "bilateral hazy lungs with upper-lobe vessel diversion from fluid overload",
    ],
    "pleural effusion": [
        "fluid at the lung base that blunts the costophrenic angle and curves up the chest wall",
        "a dense basal shadow with a concave upper edge, hiding the hemidiaphragm",
    ],
    "emphysema": [
        "hyperinflated dark lungs with flattened hemidiaphragms and few peripheral vessels",
        "over-expanded lungs and a narrow vertical heart",
    ],
    "fibrosis": [
        "coarse reticular lines and honeycombing, mostly in the lower zones",
        "scarred lungs with a net-like pattern and volume loss",
    ],
    "hernia": ["a retrocardiac air-fluid level from a hiatal hernia", "bowel or stomach projecting above the diaphragm"],
    "infiltration": ["ill-defined patchy opacities scattered through the lung", "hazy interstitial or airspace shadowing"],
    "mass": ["a large rounded opacity more than three centimetres across", "a bulky lesion in the lung field"],
    "nodule": ["a small well-defined round density within the lung", "a coin-like spot in the lung field"],
    "pleural thickening": ["a smooth or lumpy rind of soft tissue along the chest wall", "thickened pleura lining the lung edge"],
    "pneumonia": [
        "patchy airspace opacities and areas of consolidation in one or both lungs",
        "fluffy shadowing of infected lung, sometimes with air bronchograms",
    ],
    "pneumothorax": [
        "a thin white visceral pleural line with no lung markings beyond it",
        "air in the pleural space around a partly collapsed lung",
    ],
    "enlarged cardiomediastinum": ["a widened mediastinal and cardiac silhouette"],
    "lung opacity": ["an area of the lung that is whiter than it should be"],
    "lung lesion": ["a focal abnormality within the lung parenchyma"],
    "fracture": ["a break in the cortex of a rib or clavicle"],
    "support devices": ["lines, tubes or leads overlying the chest"],
    "other pleural abnormality": ["an abnormality of the pleura other than fluid or air"],
}
US = {
    "normal": [
        "layers of skin, fat and glandular breast tissue with no focal mass",
        "homogeneous fibroglandular echoes and no discrete lesion",
    ],
    "benign": [
        "a well-circumscribed oval mass, wider than tall, oriented parallel to the skin",
        "a smooth-walled lesion, anechoic like a cyst or hypoechoic like a fibroadenoma, with posterior enhancement",
    ],
    "malignant": [
        "an irregular hypoechoic mass with spiculated or angular margins and posterior acoustic shadowing",
        "a taller-than-wide lesion with an echogenic halo and disrupted surrounding tissue planes",
    ],
    "non-malignant": [
        "either normal breast tissue or a circumscribed oval benign-looking mass",
        "no irregular, spiculated or shadowing mass",
    ],
}
PATHOLOGY = {
    "lung adenocarcinoma": [
        "tumour cells forming glands and acinar structures, some with mucin",
        "atypical columnar cells lining irregular gland-like spaces",
    ],
    "lung squamous cell carcinoma": [
        "sheets and nests of polygonal cells with keratin pearls",
        "intercellular bridges between large eosinophilic tumour cells",
    ],
    "benign lung tissue": [
        "thin alveolar walls around open air spaces, with no tumour",
        "delicate alveolar septa, small vessels and bronchioles without atypia",
    ],
}
FUNDUS = {
    "no diabetic retinopathy": [
        "an orange-red retina with a sharp optic disc and normal vessels, free of lesions",
        "no microaneurysms, haemorrhages, exudates or new vessels",
    ],
    "mild diabetic retinopathy": ["only a few scattered microaneurysms, tiny red dots between the vessels"],
    "moderate diabetic retinopathy": ["microaneurysms with dot-blot haemorrhages, hard exudates and some cotton wool spots"],
    "severe diabetic retinopathy": ["numerous haemorrhages in all four quadrants, venous beading and intraretinal microvascular anomalies"],
    "proliferative diabetic retinopathy": [
        "neovascularisation: fine new vessels on the disc or elsewhere, with possible pre-retinal haemorrhage"
    ],
    "diabetic maculopathy": ["yellow hard exudates and blot haemorrhages close to the fovea, threatening central vision"],
    "advanced eye disease": ["advanced diabetic eye disease with fibrovascular scarring, vitreous haemorrhage or tractional detachment"],
}
DERMOSCOPY = {
    "melanocytic nevus": [
        "a symmetric brown lesion with an even, regular pigment network and one or two colours",
        "uniform globules or a reticular pattern fading at the edge",
    ],
    "melanoma": [
        "an asymmetric lesion with multiple colours, an atypical pigment network and irregular streaks",
        "a blue-white veil, regression structures and irregular dots at the periphery",
    ],
    "benign keratosis": [
        "a stuck-on lesion with milia-like cysts, comedo-like openings and a cerebriform surface",
        "a sharply demarcated light-brown waxy lesion with fingerprint-like ridges",
    ],
    "basal cell carcinoma": [
        "arborising branching vessels over a shiny pink background with blue-grey ovoid nests",
        "leaf-like areas, ulceration and spoke-wheel structures without a pigment network",
    ],
    "actinic keratosis": [
        "a pink-red scaly patch with a strawberry pattern around hair follicles",
        "surface scale and erythema on sun-damaged skin",
    ],
    "vascular lesion": [
        "well-demarcated red to purple lagoons separated by pale septa",
        "red-blue lacunae typical of a haemangioma or angiokeratoma",
    ],
    "dermatofibroma": [
        "a central white scar-like patch surrounded by a fine light-brown network",
        "a firm papule with a peripheral delicate pigment ring",
    ],
}
# CT / MR organs: where each sits and how it looks; side words are the patient's.
ORGANS_CT = {
    "liver": "the liver, a large smooth soft-tissue organ filling the right upper abdomen under the diaphragm",
    "spleen": "the spleen, a crescent-shaped soft-tissue organ in the left upper abdomen behind the stomach",
    "left kidney": "the left kidney, a bean-shaped organ beside the spine in the left retroperitoneum",
    "right kidney": "the right kidney, a bean-shaped organ beside the spine, sitting lower than the left",
    "stomach": "the stomach, a hollow organ in the left upper abdomen, often holding air and fluid",
    "pancreas": "the pancreas, a lobulated gland lying across the spine behind the stomach",
    "gallbladder": "the gallbladder, a small fluid-filled sac of low density under the liver",
    "heart": "the heart, a large soft-tissue structure with contrast-filled chambers between the lungs",
    "left lung": "the left lung, black air-filled tissue with branching vessels in the left chest",
    "right lung": "the right lung, black air-filled tissue with branching vessels in the right chest",
    "aorta": "the aorta, a round bright vessel running in front of the spine",
    "vertebrae": "the vertebrae, dense white bone of the spinal column in the midline at the back",
    "colon": "the colon, bowel with air and stool framing the abdomen",
    "small bowel": "the small bowel, coiled fluid-filled loops in the centre of the abdomen",
    "urinary bladder": "the urinary bladder, a rounded fluid-filled organ low in the pelvis",
    "duodenum": "the duodenum, the C-shaped first part of the small bowel curving around the pancreas",
    "ribs": "the ribs, curved bright bony arcs around the chest and upper abdomen",
    "inferior vena cava": "the inferior vena cava, a large vein to the right of the aorta",
    "portal and splenic veins": "the portal and splenic veins, running behind the pancreas into the liver",
    "esophagus": "the oesophagus, a muscular tube behind the trachea and heart",
    "trachea": "the trachea, an air-filled tube in the midline of the neck and upper chest",
    "left adrenal gland": "the left adrenal gland, a thin Y-shaped structure above the left kidney",
    "right adrenal gland": "the right adrenal gland, a thin Y-shaped structure above the right kidney",
    "spinal cord": "the spinal cord, inside the bony spinal canal",
    "intervertebral discs": "the intervertebral discs between the vertebral bodies",
    "costal cartilages": "the costal cartilages joining the ribs to the sternum",
    "sternum": "the sternum, the flat breastbone at the front of the chest",
    "left erector spinae": "the left erector spinae, paraspinal back muscle beside the spine",
    "right erector spinae": "the right erector spinae, paraspinal back muscle beside the spine",
    "left iliopsoas": "the left iliopsoas, a muscle alongside the lumbar spine",
    "right iliopsoas": "the right iliopsoas, a muscle alongside the lumbar spine",
    "prostate": "the prostate, a gland below the bladder",
    "brain": "the brain inside the skull",
}
ORGANS_MR = {
    "liver": "the liver, a large homogeneous organ in the right upper abdomen",
    "spleen": "the spleen, an organ in the left upper abdomen, usually brighter than the liver on T2",
    "left kidney": "the left kidney, with cortex and medulla told apart, in the left flank",
    "right kidney": "the right kidney, with cortex and medulla told apart, in the right flank",
    "stomach": "the stomach, a hollow organ with fluid and folds in the left upper abdomen",
    "pancreas": "the pancreas, lying across the upper abdomen in front of the splenic vein",
    "gallbladder": "the gallbladder, a fluid-filled sac under the liver, bright on T2",
    "colon": "the colon, large bowel around the edges of the abdomen",
    "small bowel": "the small bowel, loops of fluid-filled bowel in the mid abdomen",
    "vertebrae": "the vertebrae, the spinal column at the back",
    "intervertebral discs": "the intervertebral discs between the vertebral bodies",
    "aorta": "the aorta, a round flow void in front of the spine",
}
BRAIN = {
    "brain": "brain tissue with grey matter cortex around white matter",
    "frontal lobe": "the frontal lobe, the front part of the cerebral hemispheres",
    "parietal lobe": "the parietal lobe, behind the central sulcus at the top of the hemispheres",
    "temporal lobe": "the temporal lobe, the lower lateral part of each hemisphere",
    "occipital lobe": "the occipital lobe at the back of the brain",
    "insula": "the insula, cortex folded deep within the lateral sulcus",
    "cingulate gyrus": "the cingulate gyrus curving above the corpus callosum",
    "hippocampus": "the hippocampus, a curved grey matter structure in the medial temporal lobe",
    "amygdala": "the amygdala, a small almond-shaped nucleus in front of the hippocampus",
    "thalamus": "the thalamus, paired deep grey matter either side of the third ventricle",
    "basal ganglia": "the basal ganglia: caudate, putamen and pallidum beside the internal capsule",
    "cerebellum": "the cerebellum, finely folded below the occipital lobes",
    "vermis": "the vermis, the midline part of the cerebellum",
}

# How a class reads inside a sentence (countable findings take an article; BUSI classes a noun).
_PHRASE = {
    "xray": {"mass": "a mass", "nodule": "a nodule", "hernia": "a hernia", "fracture": "a fracture", "lung lesion": "a lung lesion"},
    "us": {
        "normal": "normal breast tissue",
        "benign": "a benign mass",
        "malignant": "a malignant mass",
        "non-malignant": "a non-malignant appearance",
    },
}


def _phrase(label: str, modality: str = "xray") -> str:
    return _PHRASE.get(modality, {}).get(label, label)


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _seed(row: Row) -> random.Random:
    return random.Random(int(hashlib.sha256(row.id.encode("utf-8")).hexdigest()[:16], 16))


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


def _cap(first: list[str], rest: list[str]) -> list[str]:
    """`first` (always kept) then `rest`, deduplicated, at most MAX_POOL."""
    return _unique(first + rest)[:MAX_POOL]


def _with_modality(pool: list[str], modality: str) -> list[str]:
    """Mix in modality-only captions at about one in twelve (at least one)."""
    extra = MODALITY_ONLY.get(modality, [])
    k = max(1, min(len(extra), round(len(pool) / 11)))
    return _unique(pool[: MAX_POOL - k] + extra[:k])


# --------------------------------------------------------------------------- image phrases
def _xray_images(row: Row) -> list[str]:
    paed = (row.extra or {}).get("population") == "paediatric"
    kind = "paediatric chest X-ray" if paed else "chest X-ray"
    view = (row.view or "").upper()
    if view in ("PA", "AP"):
        art = "an" if view == "AP" else "a"  # "an A-P", "a P-A"
        return [f"a frontal ({view}) {kind}", f"{art} {view} {kind.replace('X-ray', 'radiograph')}"]
    if view == "LATERAL":
        return [f"a lateral {kind}", f"a lateral-view {kind.replace('X-ray', 'radiograph')}"]
    return [f"a frontal {kind}", f"a {kind.replace('X-ray', 'radiograph')}"]


def _slice_images(row: Row) -> list[str]:
    noun = {"ct": "CT", "mr": "MRI"}.get(row.modality, row.modality)
    plane = (row.slice or {}).get("plane") or row.view
    art = PLANE_WORD.get(plane or "", "a")
    region = row.body_part
    where = f" of the {region}" if region else ""
    if row.modality == "mr" and region == "brain":
        return [f"{art} brain MRI slice", f"{art} MR image of the head"]
    if row.modality == "ct":  # "an axial CT slice of the abdomen" is an evaluation prompt: say "section"
        return [f"{art} CT section{where.replace(' of ', ' through ')}", f"{art} computed tomography image{where}"]
    return [f"{art} {noun} slice{where}", f"{art} magnetic resonance image{where}"]


def _images(row: Row) -> list[str]:
    m = row.modality
    if m == "xray":
        return _xray_images(row)
    if m in ("ct", "mr") and (row.slice or row.view in PLANE_WORD):
        return _slice_images(row)
    if m == "ct":
        return ["a CT image", "a computed tomography slice"]
    if m == "mr":
        return ["an MRI slice", "a magnetic resonance image"]
    if m == "us":
        part = row.body_part or "breast"
        return [f"a {part} ultrasound image", f"a sonogram of the {part}"]
    if m == "pathology":
        tissue = f" of {row.body_part} tissue" if row.body_part else ""
        return [f"an H&E-stained histopathology image{tissue}", f"a histology tile{tissue}"]
    if m == "fundus":
        eye = f" of the {row.view}" if row.view in ("left eye", "right eye") else ""
        return [f"a colour fundus photograph{eye}", f"a retinal photograph{eye}"]
    if m == "dermoscopy":
        site = f" on the {row.body_part}" if row.body_part else ""
        return [f"a dermoscopy image of a skin lesion{site}", f"a dermatoscopic view of a lesion{site}"]
    return ["a medical image"]


def _cap_first(s: str) -> str:
    return s[:1].upper() + s[1:]


# --------------------------------------------------------------------------- single-class rows
_DESCRIPTIONS = {"xray": XRAY, "us": US, "pathology": PATHOLOGY, "fundus": FUNDUS, "dermoscopy": DERMOSCOPY}


def _single(row: Row, label: str) -> list[str]:
    imgs = _images(row)
    a, b = imgs[0], imgs[-1]
    name = _phrase(label, row.modality)
    descs = _DESCRIPTIONS.get(row.modality, {}).get(label, [])
    out = [f"{a} showing {name}", f"{b} with {name}", f"{_cap_first(name)} seen on {a}", f"{a}: diagnosis {label}", f"{name} in {b}"]
    if not label.startswith("no "):
        out.append(f"{b}, findings of {name}")
    if row.modality == "xray" and label != "normal":
        out += [f"an abnormal {_bare(a)} showing {name}", f"abnormal {_bare(b)}: {label}"]
    for d in descs:
        out += [f"{a} showing {name}: {d}", f"{_cap_first(d)}, typical of {name}, on {b}", f"{b}: {d}"]
    return out


def _bare(phrase: str) -> str:
    """Drop the leading article: "a frontal (PA) chest X-ray" -> "frontal (PA) chest X-ray"."""
    for art in ("a ", "an "):
        if phrase.startswith(art):
            return phrase[len(art) :]
    return phrase


def _xray_normal(row: Row) -> list[str]:
    imgs = _xray_images(row)
    paed = "paediatric" in imgs[0]
    out = [] if paed else ["a normal chest X-ray with no finding"]
    out += [
        f"{imgs[0]} with no finding",
        f"{imgs[-1]}, no abnormality found",
        f"{_cap_first(imgs[0])}, normal study",
        f"a normal {_bare(imgs[-1])}",
        f"{imgs[0]} read as normal",
    ]
    out += [f"{img}: {d}" for img in imgs for d in XRAY["normal"]]
    return out


# --------------------------------------------------------------------------- multi-label rows
def _item_text(row: Row, item: str) -> str | None:
    if row.modality == "mr" and row.body_part == "brain":
        return BRAIN.get(item)
    if row.modality == "mr":
        return ORGANS_MR.get(item) or ORGANS_CT.get(item)
    if row.modality == "ct":
        return ORGANS_CT.get(item)
    descs = _DESCRIPTIONS.get(row.modality, {}).get(item)
    return descs[0] if descs else None


def _the(item: str, row: Row) -> str:
    """Anatomy takes 'the' ("the liver"); findings keep their article rules ("a nodule")."""
    if row.modality in ("ct", "mr"):
        return f"the {item}"
    return _phrase(item, row.modality)


def _multi(row: Row, items: list[str]) -> tuple[list[str], list[str]]:
    """(captions always kept, captions that may be cut by MAX_POOL) for a row with several items."""
    rng = _seed(row)
    imgs = _images(row)
    a, b = imgs[0], imgs[-1]
    named = [_the(i, row) for i in items]
    shuffled = named[:]
    rng.shuffle(shuffled)
    first = [f"{a} showing {_join(named)}", f"{b} with {_join(shuffled)}", f"{_cap_first(_join(shuffled))} on {a}"]
    if row.modality == "xray":
        first += [f"an abnormal {_bare(a)} showing {_join(named)}", f"abnormal {_bare(b)}: {_join(shuffled)}"]
    rest: list[str] = []
    singles = items if len(items) <= MAX_ITEMS else rng.sample(items, MAX_ITEMS)
    for item in singles:
        rest.append(f"{a} showing {_the(item, row)}")
        text = _item_text(row, item)
        if text:
            rest.append(f"{a}: {text}")
    if len(items) > 2:
        for _ in range(N_SUBSETS):
            k = rng.randint(2, min(3, len(items) - 1))
            sub = sorted(rng.sample(range(len(items)), k))
            rest.append(f"{a} including {_join([named[i] for i in sub])}")
    return first, rest


# --------------------------------------------------------------------------- public API
def _modality_only(row: Row) -> list[str]:
    base = MODALITY_ONLY.get(row.modality, ["a medical image"])
    if row.modality in ("ct", "mr") and (row.slice or row.view in PLANE_WORD):
        plane = (row.slice or {}).get("plane") or row.view
        noun = "CT" if row.modality == "ct" else "MRI"
        base = [f"{PLANE_WORD[plane]} {noun} slice", f"{PLANE_WORD[plane]} {noun} image"] + base
    return base


def caption_pool(row: Row) -> list[str]:
    """Every caption `row` may be given (deterministic, distinct, at most MAX_POOL)."""
    extra = row.extra or {}
    if row.text and not row.labels and row.dataset != "busi":
        return [" ".join(row.text.split())]
    labels = [lab for lab in row.labels if lab]
    if extra.get("unlabelled") or not labels:
        return _unique(_modality_only(row))[:MAX_POOL]
    if row.modality == "xray" and labels == ["normal"]:
        return _with_modality(_unique(_xray_normal(row)), row.modality)
    if row.modality == "fundus" and len(labels) == 2 and "diabetic maculopathy" in labels:
        grade = next(lab for lab in labels if lab != "diabetic maculopathy")
        imgs = _images(row)
        both = [
            f"{imgs[0]} showing {grade} with diabetic maculopathy",
            f"{imgs[-1]}: {grade} and diabetic maculopathy",
            f"{imgs[0]}: {FUNDUS.get(grade, [''])[0]}; {FUNDUS['diabetic maculopathy'][0]}",
        ]
        return _with_modality(_unique(both + _single(row, grade)[:8] + _single(row, "diabetic maculopathy")[:8]), row.modality)
    if len(labels) == 1 and row.modality not in ("ct", "mr"):
        return _with_modality(_unique(_single(row, labels[0])), row.modality)
    if row.modality == "mr" and row.body_part == "brain":  # "brain" is on every brain row: name the parts
        labels = [lab for lab in labels if lab != "brain"] or ["brain"]
    first, rest = _multi(row, labels)
    return _with_modality(_cap(first, rest), row.modality)


def sample_caption(row: Row, rng: random.Random) -> str:
    return rng.choice(caption_pool(row))


def caption_vocabulary(rows: Iterable[Row]) -> list[str]:
    """Sorted union of the rows' pools: what a frozen text tower encodes once."""
    vocab: set[str] = set()
    for row in rows:
        vocab.update(caption_pool(row))
    return sorted(vocab)
