"""Question families of "Ask the scan" (engine/ask/questions.py + assets/qa/question_families.json)."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.ask.questions import (
    QuestionError,
    candidates_for,
    load_families,
    match_question,
    max_question_chars,
    normalise_answer,
    organ_members,
    organ_vocabulary,
    render_question,
    suggested_questions,
    validate_question,
    vocabulary,
)
from engine.errors import MedLensError

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- families as data
def test_families_load_and_are_well_formed():
    fams = load_families()
    expected = {
        "organ_presence",
        "organs_in_view",
        "modality",
        "modality_check",
        "body_region",
        "plane",
        "side",
        "count",
        "finding_yes_no",
        "abnormality",
        "diagnosis",
        "tissue_type",
        "dr_grade",
    }
    assert expected <= set(fams)
    for fam in fams.values():
        assert len(fam.templates) >= 4, fam.id  # several phrasings each
        assert fam.closed == bool(fam.candidates), fam.id  # closed <=> candidates to rank
    assert fams["organs_in_view"].closed is False
    assert fams["organ_presence"].candidates == ("yes", "no")
    assert set(fams["modality"].candidates) == {"ct", "mri", "x-ray", "ultrasound", "histopathology", "fundus photograph", "dermoscopy"}
    assert set(fams["plane"].candidates) == {"axial", "coronal", "sagittal"}
    assert {"head", "chest", "abdomen", "pelvis"} <= set(fams["body_region"].candidates)


def test_every_template_renders_and_matches_back():
    rng = random.Random(0)
    slots_for = {
        "organ_presence": [{"organ": o} for o in ("liver", "vertebrae", "left kidney", "frontal lobe", "portal and splenic veins")],
        "side": [{"organ_pair": p} for p in ("kidney", "lung", "adrenal gland")],
        "count": [{"organ_plural": p} for p in ("kidney", "lung")],
        "modality_check": [{"modality": m} for m in candidates_for("modality")],
        "finding_yes_no": [{"finding": f} for f in vocabulary()["findings"]],
    }
    for fam in load_families().values():
        for slots in slots_for.get(fam.id, [{}]):
            for template in fam.templates:
                names = set(re.findall(r"\{(\w+)\}", template)) - {"be"}
                if "finding_adj" in names and not vocabulary()["findings"][slots["finding"]].get("adjectives"):
                    continue
                q = render_question(fam.id, rng, template=template, **slots)
                m = match_question(q)
                assert m is not None, (fam.id, q)
                assert (m.family, m.slots) == (fam.id, slots), (q, m)
                assert m.how == "template"


def test_every_organ_round_trips():
    rng = random.Random(1)
    for organ in organ_vocabulary():
        q = render_question("organ_presence", rng, organ=organ)
        m = match_question(q)
        assert m is not None and m.family == "organ_presence" and m.slots == {"organ": organ}, (q, m)


def test_slot_vocabularies_do_not_overlap():
    """A word that is both an organ and a finding would make questions ambiguous."""
    from engine.ask.questions import _slot_forms

    forms = _slot_forms()
    assert not set(forms["organ"]) & set(forms["finding"])
    assert not set(forms["organ"]) & set(forms["modality"])
    assert not set(forms["finding"]) & set(forms["modality"])


# --------------------------------------------------------------------------- matching
@pytest.mark.parametrize(
    "question, family, slots",
    [
        ("Is the liver visible", "organ_presence", {"organ": "liver"}),
        ("can you see the liver?", "organ_presence", {"organ": "liver"}),
        ("liver present?", "organ_presence", {"organ": "liver"}),
        ("LIVER VISIBLE??", "organ_presence", {"organ": "liver"}),
        ("  is   the Liver   in view ", "organ_presence", {"organ": "liver"}),
        ("Would the spleen be seen here?", "organ_presence", {"organ": "spleen"}),
        ("Is the liver visible on CT?", "organ_presence", {"organ": "liver"}),
        ("Is the bladder visible?", "organ_presence", {"organ": "urinary bladder"}),
        ("Are the kidneys visible?", "organ_presence", {"organ": "kidney"}),
        ("Is the spine in the field of view?", "organ_presence", {"organ": "vertebrae"}),
        ("Is the hippocampus visible in this scan?", "organ_presence", {"organ": "hippocampus"}),
        ("Which kidney is visible, left or right?", "side", {"organ_pair": "kidney"}),
        ("left or right lung?", "side", {"organ_pair": "lung"}),
        ("How many kidneys are visible?", "count", {"organ_plural": "kidney"}),
        ("how many lungs can be seen", "count", {"organ_plural": "lung"}),
        ("Which organs are in view?", "organs_in_view", {}),
        ("what organs do you see?", "organs_in_view", {}),
        ("Can you tell me which organs are visible?", "organs_in_view", {}),
        ("What is the imaging modality?", "modality", {}),
        ("what kind of scan is this", "modality", {}),
        ("What's the modality?", "modality", {}),
        ("Is this an MRI?", "modality_check", {"modality": "mri"}),
        ("is this a CT scan?", "modality_check", {"modality": "ct"}),
        ("Is this an x ray?", "modality_check", {"modality": "x-ray"}),
        ("Is this an MRI of the brain?", "modality_check", {"modality": "mri"}),
        ("What body part is this?", "body_region", {}),
        ("Where in the body is this?", "body_region", {}),
        ("In which plane is this slice?", "plane", {}),
        ("axial, coronal or sagittal?", "plane", {}),
        ("Is there pneumonia?", "finding_yes_no", {"finding": "pneumonia"}),
        ("pneumonia?", "finding_yes_no", {"finding": "pneumonia"}),
        ("Any signs of pneumonia in the left lung?", "finding_yes_no", {"finding": "pneumonia"}),
        ("Is the lesion malignant?", "finding_yes_no", {"finding": "malignant"}),
        ("is it cancerous?", "finding_yes_no", {"finding": "malignant"}),
        ("Is this a melanoma?", "finding_yes_no", {"finding": "melanoma"}),
        ("Is there referable DR?", "finding_yes_no", {"finding": "referable diabetic retinopathy"}),
        ("Is there a pleural effusion?", "finding_yes_no", {"finding": "pleural effusion"}),
        ("Does the patient have an enlarged heart?", "finding_yes_no", {"finding": "cardiomegaly"}),
        ("Is there any abnormality?", "abnormality", {}),
        ("anything abnormal here?", "abnormality", {}),
        ("What grade of diabetic retinopathy is this?", "dr_grade", {}),
        ("What type of tissue is this?", "tissue_type", {}),
        ("What is the diagnosis?", "diagnosis", {}),
        ("Is it benign or malignant?", "diagnosis", {}),
    ],
)
def test_match_phrasings(question, family, slots):
    m = match_question(question)
    assert m is not None, question
    assert (m.family, m.slots) == (family, slots)
    fam = load_families()[family]
    assert m.closed == fam.closed
    if m.closed:
        assert m.candidates and set(m.candidates) <= set(candidates_for(family)) | set(m.candidates)


@pytest.mark.parametrize(
    "question",
    [
        "What is the size of the liver?",  # about the liver, but no family answers sizes: open
        "Is the liver enlarged?",
        "Describe the findings in detail.",
        "Tell me a joke",
        "asdf qwerty",
        "?",
        "",
        "   ",
        # not English: answered as open questions (validate_question accepts them)
        "Ist die Leber sichtbar?",
        "¿Hay neumonía?",
        "La rate est-elle visible ?",
        "肝臓は見えますか？",
        "Видна ли печень?",
    ],
)
def test_unknown_and_non_english_questions_match_nothing(question):
    assert match_question(question) is None


def test_modality_narrows_and_redirects():
    assert match_question("What is the diagnosis?", modality="US").candidates == ("normal", "benign", "malignant")
    derm = match_question("What is the diagnosis?", modality="dermoscopy")
    assert "melanoma" in derm.candidates and "benign" not in derm.candidates
    path = match_question("What is the diagnosis?", modality="PATHOLOGY")
    assert path.family == "tissue_type" and "lung adenocarcinoma" in path.candidates
    assert match_question("What is the diagnosis?", modality="fundus").family == "dr_grade"
    from engine.scan import Modality

    assert match_question("What is the diagnosis?", modality=Modality.US).family == "diagnosis"


def test_organ_groups():
    assert organ_members("kidney") == ("left kidney", "right kidney")
    assert organ_members("liver") == ("liver",)


# --------------------------------------------------------------------------- validation
def test_validate_question():
    assert validate_question("  Is the liver visible?\n") == "Is the liver visible?"
    assert validate_question("Ist die Leber sichtbar?") == "Ist die Leber sichtbar?"  # passes through
    assert validate_question("a\x00b\tc") == "a b c"
    limit = max_question_chars()
    assert limit == 500
    assert validate_question("x" * limit) == "x" * limit
    for bad in ("", "   ", "\n\t "):
        with pytest.raises(QuestionError, match="empty"):
            validate_question(bad)
    with pytest.raises(QuestionError, match=r"501 characters.*limit is 500"):
        validate_question("x" * 501)
    with pytest.raises(QuestionError, match="text"):
        validate_question(None)
    assert issubclass(QuestionError, MedLensError)


# --------------------------------------------------------------------------- answers
@pytest.mark.parametrize(
    "text, family, expected",
    [
        ("Yes", None, "yes"),
        ("Yes, the liver is visible.", "organ_presence", "yes"),
        ("no.", "organ_presence", "no"),
        ("MR", None, "mri"),
        ("Magnetic resonance imaging", None, "mri"),
        ("X ray", None, "x-ray"),
        ("xray", None, "x-ray"),
        ("X-Ray", None, "x-ray"),
        ("An ultrasound", None, "ultrasound"),
        ("Spleen, the Liver, right kidney.", None, "liver, right kidney, spleen"),
        ("liver, liver , spleen", None, "liver, spleen"),
        ("portal and splenic veins, liver", "organs_in_view", "liver, portal and splenic veins"),
        ("liver and spleen", "organs_in_view", "liver, spleen"),
        ("bladder, liver", "organs_in_view", "liver, urinary bladder"),
        ("Brain", "body_region", "head"),
        ("Thorax", "body_region", "chest"),
        ("transverse", "plane", "axial"),
        ("Two", None, "2"),
        ("adenocarcinoma", "tissue_type", "lung adenocarcinoma"),
        ("PDR", "dr_grade", "proliferative diabetic retinopathy"),
        ("nevus", "diagnosis", "melanocytic nevus"),
        ("", None, ""),
        (None, None, ""),
    ],
)
def test_normalise_answer(text, family, expected):
    assert normalise_answer(text, family) == expected


def test_candidates_are_normal_forms():
    for fam in load_families().values():
        for c in fam.candidates:
            assert normalise_answer(c, fam.id) == c, (fam.id, c)


# --------------------------------------------------------------------------- suggestions
@pytest.mark.parametrize(
    "modality, region",
    [
        ("CT", "abdomen"),
        ("CT", "chest"),
        ("CT", None),
        ("ct", "pelvis"),
        ("CT", "brain"),
        ("MR", "head"),
        ("mri", "abdomen"),
        ("XRAY", None),
        ("US", None),
        ("PATHOLOGY", None),
        ("FUNDUS", None),
        ("DERMOSCOPY", None),
        ("OTHER", None),
        (None, None),
    ],
)
def test_suggested_questions_match_families(modality, region):
    qs = suggested_questions(modality, region)
    assert qs and len(qs) == len(set(qs))
    for q in qs:
        assert match_question(q, modality=modality) is not None, q


def test_suggestions_follow_region():
    assert "Is the liver visible?" in suggested_questions("CT", "abdomen")
    assert "Is the cerebellum visible?" in suggested_questions("MR", "brain")  # brain -> head


# --------------------------------------------------------------------------- consistency with training
def test_organ_vocabulary_matches_recipes():
    from training.recipes.organs import BRAIN_STRUCTURES, _REGION_MARKERS
    from training.tasks import DR_GRADES, HAM_DX, LC25000, NIH_FINDINGS, TASKS

    v = vocabulary()
    assert v["organs"]["brain"] == ["brain"] + sorted(BRAIN_STRUCTURES)
    everything = set(organ_vocabulary())
    assert {o for markers in _REGION_MARKERS.values() for o in markers} <= everything
    assert set(TASKS["ct_organs"].classes) <= set(v["organs"]["ct"])
    assert set(v["organs_in_view"]) <= everything
    assert v["nih_findings"] == sorted(set(NIH_FINDINGS.values()) - {"normal"})
    assert set(v["nih_findings"]) <= set(v["findings"])
    assert v["diagnoses"]["dermoscopy"] == [HAM_DX[k] for k in ("nv", "mel", "bkl", "bcc", "akiec", "vasc", "df")]
    assert set(v["diagnoses"]["dermoscopy"]) == set(TASKS["ham7"].classes)
    assert v["diagnoses"]["us"] == list(TASKS["busi_malignant"].classes)
    assert v["tissue_types"] == list(LC25000.values()) == list(TASKS["lc25000"].classes)
    assert v["dr_grades"] == list(DR_GRADES)


def test_organ_vocabulary_equals_totalsegmentator_names(shared_data):
    from training.recipes.organs import ts_organ_name

    names = json.loads((shared_data / "volumes/totalsegmentator/class_names.json").read_text())
    assert list(organ_vocabulary("ct")) == sorted({ts_organ_name(n) for n in names["total"].values()})
    assert list(organ_vocabulary("mr")) == sorted({ts_organ_name(n) for n in names["total_mr"].values()})


def test_engine_ask_imports_no_training_or_gradio():
    code = (
        "import sys, engine.ask.questions as q; q.match_question('Is the liver visible?'); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('training', 'gradio')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
