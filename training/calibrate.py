"""Fit what a CLIP checkpoint's "trust" block holds: calibration per prompt set, and the OOD reference set.

    from training.calibrate import fit_trust, write_trust
    trust, reference = fit_trust(clip, val_emb, val_rows, train_emb, train_rows)
    write_trust(folder, trust, reference)      # config.json["trust"] + trust_reference.safetensors

    # an exported checkpoint, without retraining (its weights, so its test-split results, stay as they are):
    python -m training.calibrate assets/models/medlens-clip --manifest runs/manifest.jsonl \
        --data-root ../shared/data --cache runs/calibrate

The contract (engine.trust, read by the engine): "softmax" holds a
temperature per prompt-set key applied to logit_scale * cosines;
"present_absent" holds Platt (a, b) per prompt-set key applied to
logit_scale * (cos_present - cos_absent); "default" is the pooled fit used
for keys without their own.

Design decisions
- Fitted on validation splits only (never test), from the same embeddings
  and the same prompt ensembles the engine scores with (engine.zeroshot),
  so the calibrated probability is of the number the app computes.
- Examples per prompt set come from the evaluation tasks (training.tasks):
  softmax over a task's classes with its single true class; present/absent
  for every (image, class of its task) pair, true when the image has the
  class; the modality task gives the "other" prompt set's softmax examples;
  NIH findings give X-ray present/absent pairs. CT and MR have no
  validation split in ../shared/data (one subject each), so they use
  "default"; the card says so.
- The OOD reference set is up to 4,000 training embeddings (seeded
  subsample) with the 99th percentile of validation scores as threshold.
- ECE before and after, on the fitting split, goes into metrics; the
  evaluation (training.evaluate) adds the test split's.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from training.manifest import Row
from training.tasks import MODALITY_LABELS, MULTILABEL, NIH_FINDINGS, TASKS, Task

DEFAULT = "default"


@dataclass
class Examples:
    """Logits and targets per prompt-set key: softmax (logit rows, true index) and present/absent (logit, 0/1)."""

    softmax: dict[str, list[tuple[np.ndarray, int]]] = field(default_factory=dict)
    present_absent: dict[str, list[tuple[float, int]]] = field(default_factory=dict)

    def add_softmax(self, key: str, logits: np.ndarray, target: int) -> None:
        self.softmax.setdefault(key, []).append((np.asarray(logits, np.float64), int(target)))

    def add_pair(self, key: str, logit: float, target: int) -> None:
        self.present_absent.setdefault(key, []).append((float(logit), int(target)))


def _tasks_by_dataset() -> dict[str, list[Task]]:
    out: dict[str, list[Task]] = {}
    for task in TASKS.values():
        if task.name == "modality" or task.kind == MULTILABEL:
            continue
        for d in task.datasets:
            out.setdefault(d, []).append(task)
    return out


def _text(clip, labels: Sequence[str], key: str, cache: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(class, present, absent) embeddings of labels in prompt set `key`, cached."""
    from engine.zeroshot import load_prompt_set
    from engine.zeroshot.api import PRESENT_ABSENT, SOFTMAX, text_embeddings

    ck = (key, tuple(labels))
    if ck not in cache:
        pset = load_prompt_set(key)
        present, absent = text_embeddings(clip, list(labels), pset, PRESENT_ABSENT)
        cache[ck] = (np.asarray(text_embeddings(clip, list(labels), pset, SOFTMAX)), np.asarray(present), np.asarray(absent))
    return cache[ck]


def collect(clip, emb: np.ndarray, rows: Sequence[Row]) -> Examples:
    """Every calibration example the rows give (emb: L2-normalised image embeddings, one per row)."""
    ex, cache, scale = Examples(), {}, float(clip.logit_scale)
    by_set = _tasks_by_dataset()
    mod_labels = list(MODALITY_LABELS.values())
    cls, _, _ = _text(clip, mod_labels, "other", cache)
    for e, row in zip(emb, rows):
        if row.modality in MODALITY_LABELS:
            ex.add_softmax("other", scale * (cls @ e), list(MODALITY_LABELS).index(row.modality))
        for task in by_set.get(row.dataset, []):
            cls_t, pres, absn = _text(clip, task.classes, task.prompt_modality, cache)
            target = task.class_of(row)
            if target is not None:
                ex.add_softmax(task.prompt_modality, scale * (cls_t @ e), target)
            margins = scale * (pres @ e - absn @ e)
            for i, c in enumerate(task.classes):
                ex.add_pair(task.prompt_modality, float(margins[i]), int(task.has_class(row, c)))
        if row.dataset == "nih_cxr14":
            findings = sorted(set(NIH_FINDINGS.values()) - {"normal"})
            _, pres, absn = _text(clip, findings, "xray", cache)
            margins = scale * (pres @ e - absn @ e)
            for i, f in enumerate(findings):
                ex.add_pair("xray", float(margins[i]), int(f in row.labels))
    return ex


def _softmax_arrays(items: list[tuple[np.ndarray, int]]) -> tuple[list[np.ndarray], np.ndarray]:
    return [z for z, _ in items], np.array([y for _, y in items])


def _choices_ece(cal, items: list[tuple[np.ndarray, int]]) -> float:
    """Top-label ECE: confidence = top calibrated probability, hit = the top class is right (rows may have different class counts)."""
    from engine.trust import ece

    conf, hit = np.zeros(len(items)), np.zeros(len(items))
    for n, (z, y) in enumerate(items):
        p = cal.choices(z[None, :])[0]
        conf[n], hit[n] = p.max(), float(p.argmax() == y)
    return ece(conf, hit)


def _nll_temperature(items: list[tuple[np.ndarray, int]]):
    """Temperature over rows of different class counts: minimise the mean NLL (fit_temperature pads none)."""
    from scipy.optimize import minimize_scalar

    from engine.trust import Calibrator

    def nll(log_t: float) -> float:
        total = 0.0
        for z, y in items:
            s = z / np.exp(log_t)
            s = s - s.max()
            total += float(np.log(np.exp(s).sum()) - s[y])
        return total / len(items)

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return Calibrator("temperature", float(1.0 / np.exp(res.x)), 0.0, len(items))


def fit_calibrations(ex: Examples, fitted_on: str):
    """(softmax Calibration, present_absent Calibration) with per-key fits, a pooled default, and ECE before/after."""
    from engine.trust import Calibration, ece, fit_platt, reliability_table
    from engine.trust.calibration import IDENTITY as IDENTITY_CAL

    sm, sm_metrics = {}, {}
    keys = sorted(ex.softmax)
    for key in [*keys, DEFAULT]:
        items = [it for k in keys for it in ex.softmax[k]] if key == DEFAULT else ex.softmax[key]
        if len(items) < 20:
            continue
        cal = _nll_temperature(items)
        sm[key] = cal
        sm_metrics[key] = {
            "n": len(items),
            "temperature": cal.temperature,
            "ece_before": _choices_ece(IDENTITY_CAL, items),
            "ece_after": _choices_ece(cal, items),
        }
    pa, pa_metrics = {}, {}
    keys = sorted(ex.present_absent)
    for key in [*keys, DEFAULT]:
        items = [it for k in keys for it in ex.present_absent[k]] if key == DEFAULT else ex.present_absent[key]
        x, y = np.array([z for z, _ in items]), np.array([t for _, t in items])
        if len(items) < 20 or y.min() == y.max():
            continue
        cal = fit_platt(x, y)
        pa[key] = cal
        pa_metrics[key] = {
            "n": len(items),
            "a": cal.a,
            "b": cal.b,
            "ece_before": ece(IDENTITY_CAL.binary(x), y),
            "ece_after": ece(cal.binary(x), y),
        }
        if key == DEFAULT:
            pa_metrics[key]["reliability_after"] = reliability_table(cal.binary(x), y)
            pa_metrics[key]["reliability_before"] = reliability_table(IDENTITY_CAL.binary(x), y)
    return (
        Calibration(sm, metrics={"fitted_on": fitted_on, "per_key": sm_metrics}),
        Calibration(pa, metrics={"fitted_on": fitted_on, "per_key": pa_metrics}),
    )


def evaluate_calibration(ex: Examples, softmax, present_absent) -> dict[str, Any]:
    """ECE before/after of fitted calibrations on other examples (the test split), per key and pooled."""
    from engine.trust import ece, reliability_table
    from engine.trust.calibration import IDENTITY as IDENTITY_CAL

    out: dict[str, Any] = {"softmax": {}, "present_absent": {}}
    for key, items in sorted(ex.softmax.items()):
        out["softmax"][key] = {
            "n": len(items),
            "ece_before": _choices_ece(IDENTITY_CAL, items),
            "ece_after": _choices_ece(softmax.get(key), items),
        }
    pooled_x, pooled_y, pooled_p = [], [], []
    for key, items in sorted(ex.present_absent.items()):
        x, y = np.array([z for z, _ in items]), np.array([t for _, t in items])
        p = present_absent.get(key).binary(x)
        out["present_absent"][key] = {"n": len(items), "ece_before": ece(IDENTITY_CAL.binary(x), y), "ece_after": ece(p, y)}
        pooled_x.append(x), pooled_y.append(y), pooled_p.append(p)
    if pooled_x:
        x, y, p = np.concatenate(pooled_x), np.concatenate(pooled_y), np.concatenate(pooled_p)
        out["present_absent"]["all"] = {
            "n": int(len(y)),
            "ece_before": ece(IDENTITY_CAL.binary(x), y),
            "ece_after": ece(p, y),
            "reliability_after": reliability_table(p, y),
            "reliability_before": reliability_table(IDENTITY_CAL.binary(x), y),
        }
    return out


def fit_trust(
    clip, val_emb: np.ndarray, val_rows: Sequence[Row], train_emb: np.ndarray, train_rows: Sequence[Row], *, seed: int = 0
) -> tuple[dict[str, Any], Any]:
    """The "trust" block for config.json and the ReferenceSet to save beside it."""
    from engine.trust import ReferenceSet

    fitted_on = f"validation splits of the training manifest: {len(val_rows)} images"
    softmax, present_absent = fit_calibrations(collect(clip, val_emb, val_rows), fitted_on)
    reference = ReferenceSet.fit(train_emb, [r.modality for r in train_rows], val_emb, seed=seed)
    block = {
        "present_absent": present_absent.to_config(),
        "softmax": softmax.to_config(),
        "fitted_on": fitted_on,
        "ood": {
            "method": "knn",
            "k": reference.k,
            "quantile": 0.99,
            "file": "trust_reference.safetensors",
            "reference_vectors": int(len(reference.vectors)),
            "threshold": reference.threshold,
        },
    }
    return block, reference


def write_trust(folder: str | Path, block: dict[str, Any], reference) -> None:
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    config["trust"] = block
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    reference.save(folder)


def trust_of(config: dict[str, Any]):
    """(softmax, present_absent) Calibrations of a checkpoint config, or None when it has no trust block."""
    from engine.trust import Calibration

    block = (config or {}).get("trust")
    if not block:
        return None
    return Calibration.from_config(block.get("softmax")), Calibration.from_config(block.get("present_absent"))


def calibration_markdown(cal: dict[str, Any], title: str) -> list[str]:
    """The card's calibration section: ECE per prompt set before/after, and the pooled present/absent reliability table."""
    f = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [
        title,
        "",
        "Expected calibration error (15 equal-width bins): present/absent per prompt set (Platt) and the softmax top answer (temperature).",
        "",
        "| scores | prompt set | n | ECE raw | ECE calibrated |",
        "|---|---|---|---|---|",
    ]
    for part, name in (("present_absent", "present/absent"), ("softmax", "softmax")):
        for key, r in cal.get(part, {}).items():
            lines.append(f"| {name} | {key} | {r['n']} | {f(r['ece_before'])} | {f(r['ece_after'])} |")
    pooled = cal.get("present_absent", {}).get("all")
    if pooled:
        lines += [
            "",
            "Reliability of present/absent, all prompt sets pooled (the data of a reliability plot: "
            "a calibrated model has accuracy = confidence in every bin):",
            "",
            "| P(present) bin | n | mean P raw | fraction present | n | mean P calibrated | fraction present |",
            "|---|---|---|---|---|---|---|",
        ]
        before = {(r["low"], r["high"]): r for r in pooled["reliability_before"]}
        after = {(r["low"], r["high"]): r for r in pooled["reliability_after"]}
        for edge in sorted(set(before) | set(after)):
            b, a = before.get(edge), after.get(edge)
            cells = [
                f"{b['count']} | {b['confidence']:.2f} | {b['accuracy']:.2f}" if b else "0 | | ",
                f"{a['count']} | {a['confidence']:.2f} | {a['accuracy']:.2f}" if a else "0 | | ",
            ]
            lines.append(f"| {edge[0]:.1f}-{edge[1]:.1f} | {cells[0]} | {cells[1]} |")
    return lines + [""]


# --------------------------------------------------------------------------- an exported checkpoint, in place
def embed_images(clip, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Unit-norm fp32 embeddings of model-size uint8 images (N, S, S, 3), through the checkpoint's own preprocessing."""
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            pixels = clip.preprocess.standardise(clip.preprocess.scale(np.asarray(images[start : start + batch])))
            out.append(torch.nn.functional.normalize(torch.as_tensor(clip.encode_image_tensor(pixels)).float(), dim=-1))
    return torch.cat(out).numpy()


def fit_folder(folder: str | Path, manifest: str | Path, data_root: str | Path, cache: str | Path, *, max_train: int = 4000, seed: int = 0):
    """Fit and write the trust block of an exported CLIP folder from its training manifest's val split and train rows."""
    from engine.models import load_model
    from training.image_cache import build_cache
    from training.manifest import read_manifest

    folder, cache = Path(folder), Path(cache)
    clip = load_model(f"local-dir:{folder}", fast=False)  # fp32: the reference the fast paths are checked against
    size = int(clip.preprocess.size)
    val_rows = read_manifest(manifest, splits=["val"])
    train_rows = read_manifest(manifest, splits=["train"])
    if not val_rows or not train_rows:
        raise SystemExit(f"{manifest} needs train and val rows (found {len(train_rows)} train, {len(val_rows)} val)")
    if len(train_rows) > max_train:  # the reference set keeps at most this many: embed no more
        keep = np.sort(np.random.default_rng(seed).choice(len(train_rows), max_train, replace=False))
        train_rows = [train_rows[i] for i in keep]
    val_emb = embed_images(clip, build_cache(val_rows, data_root, size, cache / f"val_{size}.npy"))
    train_emb = embed_images(clip, build_cache(train_rows, data_root, size, cache / f"train{max_train}_{seed}_{size}.npy"))
    block, reference = fit_trust(clip, val_emb, val_rows, train_emb, train_rows, seed=seed)
    write_trust(folder, block, reference)
    return block, reference


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.calibrate", description="Fit the trust block of an exported CLIP folder, in place."
    )
    p.add_argument("model", help="checkpoint folder (config.json + weights); written in place")
    p.add_argument("--manifest", required=True, help="the training manifest the checkpoint was trained on (its val split fits)")
    p.add_argument("--data-root", required=True)
    p.add_argument("--cache", required=True, help="folder for the decoded model-size images")
    p.add_argument("--max-train", type=int, default=4000, help="training rows embedded for the OOD reference set")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    block, reference = fit_folder(args.model, args.manifest, args.data_root, args.cache, max_train=args.max_train, seed=args.seed)
    metrics = block["present_absent"].get("metrics", {})
    print(json.dumps({"fitted_on": block["fitted_on"], "present_absent": metrics, "ood_threshold": reference.threshold}, indent=1)[:3000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
