"""Training captions (training/captions.py): descriptions, determinism, size, independence from eval prompts."""

from __future__ import annotations

import random
import re

from training.captions import MAX_POOL, MODALITY_ONLY, caption_pool, caption_vocabulary, sample_caption
from training.manifest import Row
from training.tasks import DR_GRADES, HAM_DX, LC25000, NIH_FINDINGS, TASKS


def row(id="r/1", dataset="x", modality="xray", labels=("normal",), **kw) -> Row:
    return Row(id=id, dataset=dataset, modality=modality, path="a.png", split="train", subject="s", labels=list(labels), **kw)


def pool_text(r: Row) -> str:
    return "\n".join(caption_pool(r)).lower()


def _every_kind_of_row() -> list[Row]:
    rows = [
        row(f"nih/{i}", "nih_cxr14", "xray", [lab], view=v, body_part="chest")
        for i, lab in enumerate(sorted(set(NIH_FINDINGS.values())))
        for v in ("PA", "AP")
    ]
    rows.append(row("nih/multi", "nih_cxr14", "xray", ["edema", "pleural effusion", "cardiomegaly"], view="AP"))
    rows += [row(f"pn/{lab}", "pneumoniamnist", "xray", [lab], extra={"population": "paediatric"}) for lab in ("normal", "pneumonia")]
    rows += [
        row(f"busi/{lab}", "busi", "us", [lab], body_part="breast", text=f"An ultrasound image of breast with {lab} findings.")
        for lab in ("normal", "benign", "malignant")
    ]
    rows += [row(f"bm/{lab}", "breastmnist", "us", [lab], body_part="breast") for lab in ("malignant", "non-malignant")]
    rows += [row(f"lc/{lab}", "lc25000_lung", "pathology", [lab], body_part="lung") for lab in LC25000.values()]
    rows += [row(f"fd/{g}", "fundus_dr", "fundus", [g], view="left eye") for g in DR_GRADES]
    rows += [row(f"fdm/{g}", "fundus_dr", "fundus", [g, "diabetic maculopathy"], view="right eye") for g in DR_GRADES[1:]]
    rows.append(row("fd/aded", "fundus_dr", "fundus", ["advanced eye disease"]))
    rows += [row(f"ham/{dx}", "ham10000", "dermoscopy", [dx], body_part="back") for dx in HAM_DX.values()]
    ct = list(TASKS["ct_organs"].classes)
    for plane in ("axial", "coronal", "sagittal"):
        rows.append(row(f"ct/{plane}", "ct_organs", "ct", ct[:6], slice={"plane": plane, "index": 3}, view=plane, body_part="abdomen"))
        rows.append(
            row(f"mr/{plane}", "mr_organs", "mr", ["liver", "spleen"], slice={"plane": plane, "index": 3}, view=plane, body_part="abdomen")
        )
        rows.append(
            row(
                f"brain/{plane}",
                "brain_mri",
                "mr",
                ["brain", "hippocampus", "thalamus"],
                slice={"plane": plane, "index": 3},
                view=plane,
                body_part="brain",
            )
        )
    rows += [row(f"ct1/{o}", "ct_organs", "ct", [o], slice={"plane": "axial", "index": 1}, view="axial") for o in ct]
    return rows


def test_captions_name_modality_view_and_describe_the_class():
    pneu = pool_text(row("p/1", "pneumoniamnist", "xray", ["pneumonia"], extra={"population": "paediatric"}))
    assert "paediatric chest x-ray" in pneu and "airspace opacities" in pneu and "consolidation" in pneu
    mal = pool_text(row("b/1", "busi", "us", ["malignant"], body_part="breast"))
    assert "ultrasound" in mal and "spiculated" in mal and "posterior acoustic shadowing" in mal and "taller-than-wide" in mal
    mel = pool_text(row("h/1", "ham10000", "dermoscopy", ["melanoma"], body_part="back"))
    assert "dermoscopy image" in mel and "blue-white veil" in mel and "multiple colours" in mel and "on the back" in mel
    scc = pool_text(row("l/1", "lc25000_lung", "pathology", ["lung squamous cell carcinoma"], body_part="lung"))
    assert "h&e" in scc and "keratin pearls" in scc and "intercellular bridges" in scc
    aca = pool_text(row("l/2", "lc25000_lung", "pathology", ["lung adenocarcinoma"], body_part="lung"))
    assert "acinar" in aca and "alveolar" in pool_text(row("l/3", "lc25000_lung", "pathology", ["benign lung tissue"]))
    dr = pool_text(row("f/1", "fundus_dr", "fundus", ["moderate diabetic retinopathy", "diabetic maculopathy"], view="left eye"))
    assert "fundus photograph of the left eye" in dr and "microaneurysms" in dr and "fovea" in dr
    assert "moderate diabetic retinopathy with diabetic maculopathy" in dr
    assert "neovascularisation" in pool_text(row("f/2", "fundus_dr", "fundus", ["proliferative diabetic retinopathy"]))
    ct = pool_text(
        row("c/1", "ct_organs", "ct", ["liver", "spleen"], slice={"plane": "axial", "index": 4}, view="axial", body_part="abdomen")
    )
    assert "axial ct section through the abdomen showing the liver and the spleen" in ct
    assert "right upper abdomen" in ct  # where the liver is
    pa = caption_pool(row("n/1", "nih_cxr14", "xray", ["cardiomegaly"], view="PA"))
    assert any(c.startswith("a frontal (PA) chest X-ray") for c in pa)


def test_nih_abnormal_and_normal_phrasings():
    multi = caption_pool(row("n/2", "nih_cxr14", "xray", ["atelectasis", "pleural effusion"], view="AP"))
    assert any(c.startswith("an abnormal") and "atelectasis" in c and "pleural effusion" in c for c in multi)
    single = caption_pool(row("n/3", "nih_cxr14", "xray", ["nodule"], view="PA"))
    assert any("abnormal" in c and "nodule" in c for c in single)
    normal = caption_pool(row("n/4", "nih_cxr14", "xray", ["normal"], view="PA"))
    assert "a normal chest X-ray with no finding" in normal and not any(re.search(r"\babnormal\b", c) for c in normal)


def test_pools_are_deterministic_bounded_and_mix_in_modality_captions():
    rows = _every_kind_of_row()
    for r in rows:
        pool = caption_pool(r)
        assert pool == caption_pool(Row.from_dict(dict(vars(r))))  # same row, same pool
        assert 1 <= len(pool) <= MAX_POOL and len(set(pool)) == len(pool)
        if r.labels:
            modality_only = [c for c in pool if c in MODALITY_ONLY[r.modality]]
            assert 1 <= len(modality_only) <= max(1, len(pool) // 6), (r.id, modality_only)
    many = ["liver", "spleen", "stomach", "colon", "aorta", "vertebrae", "ribs"]
    a = caption_pool(row("ct/a", "ct_organs", "ct", many, slice={"plane": "axial", "index": 1}))
    b = caption_pool(row("ct/b", "ct_organs", "ct", many, slice={"plane": "axial", "index": 1}))
    assert a != b and set(a) & set(b)  # sampled subsets differ per row; shared phrasings stay shared
    rng = random.Random(3)
    r = rows[0]
    assert all(sample_caption(r, rng) in caption_pool(r) for _ in range(20))


def test_unlabelled_and_caption_rows():
    unl = caption_pool(row("u/1", "ct_organs", "ct", [], slice={"plane": "coronal", "index": 2}, extra={"unlabelled": True}))
    assert unl and all(("ct" in c.lower() or "computed tomography" in c.lower()) for c in unl)
    assert any("coronal" in c for c in unl)
    cap = caption_pool(row("roco/1", "roco", "ct", [], text="Axial  CT showing a  liver cyst.", extra={"caption_source": True}))
    assert cap == ["Axial CT showing a liver cyst."]
    busi = caption_pool(row("busi/1", "busi", "us", ["benign"], text="An ultrasound image of breast with benign findings."))
    assert "An ultrasound image of breast with benign findings." not in busi and any("benign" in c for c in busi)


def test_vocabulary_stays_small_for_many_multilabel_rows():
    rng = random.Random(0)
    organs = list(TASKS["ct_organs"].classes) + ["ribs", "duodenum", "inferior vena cava"]
    rows = []
    for i in range(1500):
        plane = rng.choice(["axial", "coronal", "sagittal"])
        rows.append(
            row(
                f"ct/{i}",
                "ct_organs",
                "ct",
                sorted(rng.sample(organs, rng.randint(0, 9))),
                slice={"plane": plane, "index": i},
                body_part=rng.choice(["abdomen", "chest", None]),
            )
        )
    rows += [row(f"p/{i}", "pneumoniamnist", "xray", [rng.choice(["normal", "pneumonia"])]) for i in range(3000)]
    vocab = caption_vocabulary(rows)
    assert len(vocab) == len(set(vocab)) and vocab == sorted(vocab)
    assert len(vocab) < 12 * 1500 + 100  # about 10 per multi-label row at most, single-label classes shared
    assert len(caption_vocabulary(rows[1500:])) < 60


def _norm(text: str) -> str:
    return " " + " ".join(re.sub(r"[^a-z0-9&]+", " ", text.lower()).split()) + " "


def test_training_captions_do_not_reuse_evaluation_prompts():
    """Evaluation scores with assets/prompts; training must not have seen those sentences."""
    from engine.zeroshot.prompts import all_prompt_sets

    evaluation = set()
    for ps in all_prompt_sets():
        for label in {lab for labels in ps.label_sets.values() for lab in labels} | set(ps.classes):
            present, absent = ps.pair_prompts(label)
            evaluation.update(map(_norm, ps.prompts(label) + present + absent))
    vocab = [_norm(c) for c in caption_vocabulary(_every_kind_of_row())]
    assert not set(vocab) & evaluation
    # nor as part of a longer caption (6+ words: the brief's own "a normal chest X-ray with no finding"
    # contains the 5-word evaluation prompt "a normal chest X-ray")
    long = [e for e in evaluation if len(e.split()) >= 6]
    assert not [(e, c) for e in long for c in vocab if e in c]
