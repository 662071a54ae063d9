"""Fit what makes a Q-Former checkpoint's answers trustworthy: calibrated closed answers and an OOD reference set.

    python -m training.qformer_trust runs/qformer/best --qa-manifest runs/qa/manifest.jsonl \\
        --data-root ../shared/data --cache runs/qformer_cache

Writes into the checkpoint folder (issue 14's trust contract, engine.trust):
- config.json "trust.closed": a temperature per question family, applied to
  the candidates' scores AskModel ranks (mean token log-likelihoods):
  p = softmax(scores / T). Fitted on the val split only; a family with
  fewer than `--min-family` val questions uses "default", fitted on every
  val closed question. Calibration.metrics keeps ECE before/after on val
  (training/qformer_eval.py adds the test split's).
- trust_reference.safetensors: the reference set of the kNN OOD flag, in the
  Q-Former's own space: `engine.ask.model.ood_embedding`, the query outputs
  averaged over the 32 queries (384-d), of the training rows (2D images and
  volume crops), threshold at the 99th percentile of the val rows' scores.

Design decisions
- Temperature, not Platt or binning: one number per family, robust on
  val sets of tens to hundreds of questions (engine.trust.calibration).
  Candidate lists of different lengths (3-way and 7-way diagnoses share a
  family) are padded with -inf scores, which softmax gives zero mass.
- Mean query outputs rather than the ITC image embeddings: the engine has
  them for every encoded scan (no projection, no text side), and they are
  what every answer and label reads; the ITC head is trained only to
  match captions and discards what captions do not mention.
- ECE is measured on the confidence of the chosen answer (top
  probability), 15 equal-width bins as engine.trust.ece; the reliability
  tables have 10 bins.
- No 3D val split exists (two labelled CT subjects: one trains, one tests),
  so 3D families (organ presence, side, count, plane) have no val
  questions and fall back to "default"; the card reports their test ECE.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from engine.ask.model import OOD_EMBEDDING, AskModel, ood_embedding
from engine.trust import Calibration, Calibrator, ReferenceSet, ece, fit_temperature, reliability_table
from engine.trust.calibration import DEFAULT_KEY
from engine.trust.ood import DEFAULT_K, DEFAULT_QUANTILE, REFERENCE_FILE
from training.qa_data import QARow, read_qa_manifest
from training.qformer_cache import TokenCache, open_exported

MIN_FAMILY = 30
ECE_BINS = 15


class Choices(NamedTuple):
    logits: np.ndarray  # [N, C] candidate scores, -inf padded
    truth: np.ndarray  # [N] index of the right candidate


def choices(items: list[dict]) -> Choices:
    width = max(len(i["scores"]) for i in items)
    logits = np.full((len(items), width), -np.inf)
    for n, item in enumerate(items):
        logits[n, : len(item["scores"])] = item["scores"]
    return Choices(logits, np.array([i["truth_index"] for i in items]))


def top_ece(probabilities: np.ndarray, truth: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of the chosen answer's confidence (reliability of the top probability)."""
    return ece(probabilities, truth, n_bins=bins)


def _temperature(items: list[dict], min_temperature: float) -> Calibrator:
    fitted = fit_temperature(*choices(items))
    if fitted.temperature >= min_temperature:
        return fitted
    return Calibrator("temperature", 1.0 / min_temperature, 0.0, fitted.n)


def fit_closed(items: list[dict], min_family: int = MIN_FAMILY, min_temperature: float = 0.0) -> Calibration:
    """Temperature per family with >= min_family val questions, plus "default" over all of them; val ECE in metrics.

    min_temperature: a floor on the fitted temperatures. 1.0 (the shipped recipe's) lets calibration only soften the
    model's answers: the val split holds 2D images only, and on the shipped model the sharpening fitted there
    (T 0.09-0.69) made held-out volumes and subjects more over-confident, not less."""
    if not items:
        return Calibration()
    by_family = defaultdict(list)
    for item in items:
        by_family[item["family"]].append(item)
    calibrators = {DEFAULT_KEY: _temperature(items, min_temperature)}
    for family, group in sorted(by_family.items()):
        if len(group) >= min_family:
            calibrators[family] = _temperature(group, min_temperature)
    calibration = Calibration(calibrators)
    calibration.metrics = {"val": calibration_report(calibration, items, bins=10, tables=False)}
    return calibration


def calibrated(calibration: Calibration, item: dict) -> np.ndarray:
    return calibration.get(item["family"]).choices(np.asarray(item["scores"], dtype=np.float64))


def _report(calibration: Calibration, items: list[dict], bins: int, tables: bool) -> dict:
    logits, truth = choices(items)
    raw = np.exp(logits - logits.max(axis=1, keepdims=True))
    raw = raw / raw.sum(axis=1, keepdims=True)
    cal = np.zeros_like(raw)
    for n, item in enumerate(items):
        cal[n, : len(item["scores"])] = calibrated(calibration, item)
    out = {
        "n": len(items),
        "accuracy": float(np.mean(raw.argmax(1) == truth)),
        "ece_before": top_ece(raw, truth),
        "ece_after": top_ece(cal, truth),
        "mean_confidence_before": float(raw.max(1).mean()),
        "mean_confidence_after": float(cal.max(1).mean()),
    }
    if tables:
        out["reliability_before"] = reliability_table(raw, truth, bins)
        out["reliability_after"] = reliability_table(cal, truth, bins)
    return out


def calibration_report(calibration: Calibration, items: list[dict], bins: int = 10, tables: bool = True) -> dict:
    """ECE before/after (and reliability tables) over all items, per family, and for 3D organ presence."""
    if not items:
        return {"n": 0}
    families = defaultdict(list)
    for item in items:
        families[item["family"]].append(item)
    organ_3d = [i for i in items if i.get("kind") == "volume" and i["family"] == "organ_presence"]
    report = {
        "fitted": calibration.fitted,
        "all": _report(calibration, items, bins, tables),
        "per_family": {
            f: {
                **_report(calibration, v, bins, False),
                "temperature": calibration.get(f).temperature,
                "own_temperature": f in calibration.calibrators,
            }
            for f, v in sorted(families.items())
        },
    }
    if organ_3d:
        report["organ_presence_3d"] = _report(calibration, organ_3d, bins, tables)
    return report


def closed_calibration(config: dict) -> Calibration:
    return Calibration.from_config(((config.get("trust") or {}).get("closed")))


# --------------------------------------------------------------------------- OOD reference set
def row_embeddings(model: AskModel, caches: dict[str, TokenCache], rows: list[QARow]) -> np.ndarray:
    out = []
    for row in rows:
        tokens, grid = caches[row.kind].get(row)
        out.append(ood_embedding(model.encode_tokens(tokens[None].float(), grid)))
    return np.stack(out) if out else np.zeros((0, model.qformer.config.hidden_size), np.float32)


def fit_reference(
    model: AskModel,
    caches,
    train: list[QARow],
    val: list[QARow],
    *,
    quantile: float = DEFAULT_QUANTILE,
    k: int = DEFAULT_K,
    max_vectors: int = 4000,
    seed: int = 0,
) -> ReferenceSet:
    """Training rows' embeddings (subsampled) as the reference, the threshold at `quantile` of the val rows' scores."""
    return ReferenceSet.fit(
        row_embeddings(model, caches, train),
        [r.modality for r in train],
        row_embeddings(model, caches, val),
        k=k,
        quantile=quantile,
        max_vectors=max_vectors,
        seed=seed,
    )


def load_reference(folder: str | Path) -> ReferenceSet | None:
    return ReferenceSet.load(Path(folder))


def held_out_flags(model: AskModel, caches, rows: list[QARow], reference: ReferenceSet) -> dict:
    """Per dataset (and kind): rows, share flagged, median kNN distance."""
    by = defaultdict(list)
    for row in rows:
        by[f"{row.dataset} ({row.split})"].append(row)
    out = {}
    for name, group in sorted(by.items()):
        scores = reference.scores(row_embeddings(model, caches, group))
        out[name] = {"n": len(group), "flagged": float(np.mean(scores > reference.threshold)), "median_score": float(np.median(scores))}
    return out


def _pydicom(name: str) -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file(name))


def _deid(name: str) -> Path:
    import deid_data

    return Path(deid_data.__file__).parent / "data" / name


def _nibabel(name: str) -> Path:
    from nibabel.testing import data_path

    return Path(data_path) / name


# Real files from outside every training source, loaded as the app loads them (what, where, expected to be foreign?).
FOREIGN_FILES: tuple[tuple[str, Callable[[str], Path], str, bool], ...] = (
    ("ultrasound, colour (pydicom examples_rgb_color.dcm)", _pydicom, "examples_rgb_color.dcm", True),
    ("ultrasound, palette colour (pydicom examples_palette.dcm)", _pydicom, "examples_palette.dcm", True),
    ("ultrasound (pydicom examples_jpeg2k.dcm)", _pydicom, "examples_jpeg2k.dcm", True),
    ("ultrasound, grey (deid-data GREYSCALE_IMAGE.dcm)", _deid, "ultrasounds/GREYSCALE_IMAGE.dcm", True),
    ("nuclear medicine (pydicom JPEG2000.dcm)", _pydicom, "JPEG2000.dcm", True),
    ("veterinary radiograph (deid-data cat.dcm)", _deid, "animals/cat.dcm", True),
    ("CT of the head, one slice (deid-data ctbrain1.dcm)", _deid, "humans/ctbrain1.dcm", False),
    ("CT slice (pydicom CT_small.dcm)", _pydicom, "CT_small.dcm", False),
    ("CT slice (pydicom 693_J2KI.dcm)", _pydicom, "693_J2KI.dcm", False),
    ("MR slice (pydicom MR_small.dcm)", _pydicom, "MR_small.dcm", False),
    ("MR slice (pydicom examples_overlay.dcm)", _pydicom, "examples_overlay.dcm", False),
    ("brain MR volume (nibabel anatomical.nii)", _nibabel, "anatomical.nii", False),
    ("brain fMRI volume (nibabel example4d.nii.gz)", _nibabel, "example4d.nii.gz", False),
)


def foreign_flags(model: AskModel, reference: ReferenceSet) -> list[dict]:
    """Each FOREIGN_FILES entry through engine.io and AskModel.encode, its score and flag (a file that fails to load says why)."""
    from engine.io import load_one

    out = []
    for what, where, name, foreign in FOREIGN_FILES:
        try:
            scan, _ = load_one([str(where(name))])
            score = float(reference.scores(ood_embedding(model.encode(scan))[None])[0])
            out.append({"file": what, "expected_foreign": foreign, "score": score, "flagged": score > reference.threshold})
        except Exception as exc:  # a missing test package or an unreadable file is reported, not fatal
            out.append({"file": what, "expected_foreign": foreign, "error": f"{type(exc).__name__}: {str(exc)[:160]}"})
    return out


# --------------------------------------------------------------------------- writing
def write_trust(folder: str | Path, calibration: Calibration, reference: ReferenceSet | None, fitted_on: str) -> dict:
    """Add the "trust" object to the checkpoint's config.json and the reference set beside it."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    trust = dict(config.get("trust") or {})
    trust.update({"closed": calibration.to_config(), "fitted_on": fitted_on})
    if reference is not None:
        reference.save(folder)
        trust["ood"] = {
            "method": "knn",
            "k": reference.k,
            "quantile": DEFAULT_QUANTILE,
            "file": REFERENCE_FILE,
            "embedding": OOD_EMBEDDING,
            "threshold": reference.threshold,
            "n_reference": int(len(reference.vectors)),
        }
    else:  # no reference set: none of an earlier fit may stay behind
        trust.pop("ood", None)
        (folder / REFERENCE_FILE).unlink(missing_ok=True)
    config["trust"] = trust
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return trust


def add_test_metrics(folder: str | Path, results: dict) -> None:
    """Copy the evaluation's test-split calibration figures into trust.closed.metrics (the contract's "and on the test split")."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    report = results.get("calibration") or {}
    closed = (config.get("trust") or {}).get("closed")
    if closed is None or not report.get("all"):
        return
    closed.setdefault("metrics", {})["test"] = {k: v for k, v in report["all"].items() if not k.startswith("reliability")}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.qformer_trust", description=__doc__.split("\n")[0])
    p.add_argument("model", help="checkpoint folder (written in place)")
    p.add_argument("--qa-manifest", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--cache", required=True, help="the token cache folder the trainer used")
    p.add_argument("--min-family", type=int, default=MIN_FAMILY, help="val questions a family needs for its own temperature")
    p.add_argument("--max-reference", type=int, default=4000, help="training embeddings kept in the reference set")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument(
        "--fill-train",
        type=int,
        default=0,
        metavar="MAX_IMAGE_ROWS",
        help="encode the trainer's train rows first (every volume crop + 2D rows capped as the trainer's --max-image-rows, "
        "same --seed): for a checkpoint whose trainer's cache is gone (0: use the rows already cached)",
    )
    p.add_argument("--seed", type=int, default=0, help="the trainer's seed (with --fill-train)")
    p.add_argument(
        "--min-temperature", type=float, default=0.0, help="floor on the fitted temperatures (1.0: calibration never sharpens answers)"
    )
    p.add_argument(
        "--no-reference",
        action="store_true",
        help="fit no OOD reference set (the flag then rests on the header check): for a val split unlike the held-out data",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    from training.qformer import split_rows
    from training.qformer_eval import closed_items

    args = parse_args(argv)
    model, caches = open_exported(args.model, args.cache, args.threads)
    rows = read_qa_manifest(args.qa_manifest, splits=["train", "val"])
    val = [r for r in rows if r.split == "val"]
    for cache in caches.values():  # every val row (the trainer's own val is capped); train rows are the trainer's cached ones
        cache.fill(val, args.data_root)
        if args.fill_train:
            cache.fill(split_rows(rows, "train", args.fill_train, args.seed), args.data_root)  # the trainer's train rows
    train = [r for r in rows if r.split == "train" and r in caches[r.kind]]
    items = closed_items(model, caches, val)
    calibration = fit_closed(items, args.min_family, args.min_temperature)
    reference = None if args.no_reference else fit_reference(model, caches, train, val, max_vectors=args.max_reference)
    fitted_on = (
        f"val split of {args.qa_manifest}: {len(items)} closed questions on {len(val)} rows "
        f"({', '.join(sorted({r.dataset for r in val}))}); "
        + (
            "no OOD reference set (--no-reference)"
            if reference is None
            else f"OOD reference: {len(train)} training rows, threshold from {len(val)} val rows"
        )
    )
    trust = write_trust(args.model, calibration, reference, fitted_on)
    print(
        json.dumps(
            {
                "temperatures": {k: round(c.temperature, 3) for k, c in calibration.calibrators.items()},
                "val": calibration.metrics.get("val", {}).get("all"),
                "ood_threshold": (trust.get("ood") or {}).get("threshold"),
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
