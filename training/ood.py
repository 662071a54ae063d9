"""`python -m training.evaluate MODEL --ood` (or `python -m training.ood MODEL`): real images the model never trained on.

    python -m training.evaluate medlens-clip --ood --out runs/ood/medlens-clip
    python -m training.evaluate medlens-qformer --ood        # the Q-Former, through the engine's ask API

The set is a committed manifest (training/data/ood_manifest.jsonl) of files that
ship inside installed packages (pydicom's own test files, deid-data, nibabel's
test data, Debian's dicom3tools examples) or lie in the shared data folder:
(source, relative path, true modality, organs present / impossible, licence).
No file is copied into the repository.

Design decisions
- Loaded exactly as the app loads a user's file: `engine.io.load` (readers,
  redaction), `engine.zeroshot.imaging.scan_images` (the 448 px model image;
  12 axial slices of a volume), then the model. Native resolution: nothing is
  resized before the engine does it.
- The header's modality is withheld from the model: modality is asked as a
  zero-shot choice among the seven modality labels of the "other" prompt set
  (the app's "image type" label set), whatever the header says. The windowing
  still follows the header, because the app windows that way too.
- Organ sanity on volumes and slices: present/absent probabilities (the app's
  present/absent mode, prompt set from the scan's modality as the app picks
  it) for organs known to be in the image and organs that cannot be (brain in
  an abdominal CT, liver in a head MRI). The figure is how often an impossible
  organ is called present (> 0.5), beside how often a present one is.
- Calibration: ECE of the modality answer (top probability vs correct) and of
  present/absent over the known organs, raw and, when the checkpoint carries a
  "trust" block, calibrated with engine.trust's own arithmetic.
- OOD flags: the kNN distance of each image's embedding to the checkpoint's
  reference set (engine.trust.ood). A volume's score is the median over its
  slices. "Foreign" items (a photograph, a drawing, a segmentation mask, a
  modality the model never saw) should be flagged; real images of known
  modalities should mostly not be.
- A file that is missing (a package not installed) or cannot be read is
  listed under "skipped" with the reason; it never stops the run.
- Never from the packages kept for an independent check (see the project
  rules): the manifest's sources are a closed list, checked on load.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from training.config import UsageError, run_main
from training.tasks import MODALITY_LABELS

MANIFEST = Path(__file__).with_name("data") / "ood_manifest.jsonl"
ORGANS = ("liver", "kidney", "lung", "brain", "heart")
FOREIGN = "foreign"
N_SLICES = 12  # engine.zeroshot.imaging.DEFAULT_SLICES: what the app samples
SOURCES = ("pydicom", "deid-data", "nibabel", "dicom3tools", "shared-data")


@dataclass(frozen=True)
class OodItem:
    id: str
    source: str  # one of SOURCES
    path: str  # relative to the source's root
    modality: str  # a training.manifest modality, or "foreign" (not an image type the model knows)
    present: tuple[str, ...] = ()
    impossible: tuple[str, ...] = ()
    licence: str = ""
    note: str = ""
    seen_in_training: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OodItem":
        data = dict(data)
        if data.get("source") not in SOURCES:
            raise ValueError(f"OOD item {data.get('id')!r}: source {data.get('source')!r} is not one of {SOURCES}")
        if data.get("modality") not in (*MODALITY_LABELS, FOREIGN):
            raise ValueError(f"OOD item {data.get('id')!r}: modality {data.get('modality')!r} unknown")
        data["present"], data["impossible"] = tuple(data.get("present", ())), tuple(data.get("impossible", ()))
        return cls(**data)


def read_items(path: str | Path = MANIFEST) -> list[OodItem]:
    from training.config import read_jsonl

    return [OodItem.from_dict(d) for d in read_jsonl(path)]


def source_root(source: str, data_root: str | Path | None) -> Path | None:
    """Where a source's files live on this machine (None: not installed / not given)."""
    if source == "shared-data":
        return Path(data_root) if data_root else None
    if source == "dicom3tools":
        p = Path("/usr/share/doc/dicom3tools/examples")
        return p if p.is_dir() else None
    module = {"pydicom": "pydicom.data", "deid-data": "deid_data", "nibabel": "nibabel"}[source]
    try:
        mod = __import__(module, fromlist=["__file__"])
    except ImportError:
        return None
    return Path(os.path.dirname(mod.__file__))


# --------------------------------------------------------------------------- one item
@dataclass
class ItemResult:
    item: OodItem
    header_modality: str  # engine Modality value from the file (never shown to the model)
    n_images: int
    modality_probs: dict[str, float]  # modality key -> probability (raw)
    modality_probs_cal: dict[str, float] | None
    organ_probs: dict[str, float] = field(default_factory=dict)  # organ -> P(present), raw
    organ_probs_cal: dict[str, float] | None = None
    ood_score: float | None = None
    ood_flag: bool | None = None

    @property
    def predicted(self) -> str:
        return max(self.modality_probs, key=self.modality_probs.get)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.item.id,
            "true": self.item.modality,
            "predicted": self.predicted,
            "header_modality": self.header_modality,
            "n_images": self.n_images,
            "seen_in_training": self.item.seen_in_training,
            "modality_probs": self.modality_probs,
            "modality_probs_calibrated": self.modality_probs_cal,
            "organ_probs": self.organ_probs,
            "organ_probs_calibrated": self.organ_probs_cal,
            "present": list(self.item.present),
            "impossible": list(self.item.impossible),
            "ood_score": self.ood_score,
            "ood_flag": self.ood_flag,
        }


def load_item(item: OodItem, root: Path):
    """The scan the app would show for this file (a folder is read as a DICOM series)."""
    from engine.io import load

    result = load(root / item.path)
    return max(result.scans, key=lambda s: s.voxels.size)


class Judge:
    """Scores scans with one model as the app does; CLIP models directly, the Q-Former through engine.ask."""

    def __init__(self, model, trust: "TrustParts"):
        self.model, self.trust = model, trust
        self.is_clip = hasattr(model, "encode_images")

    def modality(self, scan) -> tuple[dict[str, float], dict[str, float] | None, np.ndarray | None]:
        keys, labels = list(MODALITY_LABELS), list(MODALITY_LABELS.values())
        if not self.is_clip:
            from engine.ask.api import label_volume

            res = label_volume(scan, labels, self.model, prompt_set="other")
            probs = {r["label"]: r["probability"] for r in res["labels"]}
            return {k: float(probs[lab]) for k, lab in zip(keys, labels)}, None, None
        from engine.zeroshot import load_prompt_set
        from engine.zeroshot.api import SOFTMAX, label_from_embeddings
        from engine.zeroshot.imaging import scan_images

        images = scan_images(scan, n_slices=N_SLICES)
        emb = self.model.encode_images([im.pixels for im in images])
        pset = load_prompt_set("other")
        res = label_from_embeddings(emb, images, labels, self.model, pset, mode=SOFTMAX, aggregation="mean")
        probs = res.probabilities()
        raw = {k: float(probs[lab]) for k, lab in zip(keys, labels)}
        cal = None
        if self.trust.softmax is not None:
            scores = {s.label: s.score for s in res.labels}
            logits = float(self.model.logit_scale) * np.array([scores[lab] for lab in labels])
            p = self.trust.softmax.get("other").choices(logits)
            cal = {k: float(v) for k, v in zip(keys, p)}
        return raw, cal, emb

    def organs(self, scan, organs: Sequence[str]) -> tuple[dict[str, float], dict[str, float] | None]:
        if not organs or not self.is_clip:
            return {}, None
        from engine.zeroshot.api import PRESENT_ABSENT, label_scan

        res = label_scan(scan, list(organs), self.model, mode=PRESENT_ABSENT, n_slices=N_SLICES)
        raw = {s.label: float(s.probability) for s in res.labels}
        cal = None
        if self.trust.present_absent is not None:
            c = self.trust.present_absent.get(res.prompt_set)
            cal = {s.label: float(c.binary(res.logit_scale * (s.score - (s.absent_score or 0.0)))) for s in res.labels}
        return raw, cal


@dataclass
class TrustParts:
    """What a checkpoint's "trust" block holds, read with engine.trust (None where it has none)."""

    softmax: Any = None
    present_absent: Any = None
    reference: Any = None

    @classmethod
    def of(cls, folder: Path | None, config: dict[str, Any]) -> "TrustParts":
        from engine.trust import Calibration, ReferenceSet

        block = (config or {}).get("trust") or {}
        return cls(
            Calibration.from_config(block["softmax"]) if block.get("softmax") else None,
            Calibration.from_config(block["present_absent"]) if block.get("present_absent") else None,
            ReferenceSet.load(folder) if folder is not None else None,
        )


def judge_item(judge: Judge, item: OodItem, root: Path) -> ItemResult:
    scan = load_item(item, root)
    header = scan.modality.value
    raw, cal, emb = judge.modality(scan)
    organs = sorted(set(item.present) | set(item.impossible))
    organ_raw, organ_cal = judge.organs(scan, organs)
    score = flag = None
    if emb is not None and judge.trust.reference is not None:
        score = float(np.median(judge.trust.reference.scores(emb)))
        flag = bool(score > judge.trust.reference.threshold)
    n = 1 if scan.is_2d else len(emb) if emb is not None else 0
    return ItemResult(item, header, n, raw, cal, organ_raw, organ_cal, score, flag)


# --------------------------------------------------------------------------- the summary
def _ece(results: list[ItemResult], calibrated: bool) -> float | None:
    from engine.trust import ece

    rows = [r for r in results if r.item.modality != FOREIGN]
    probs = [r.modality_probs_cal if calibrated else r.modality_probs for r in rows]
    if not rows or any(p is None for p in probs):
        return None
    keys = list(MODALITY_LABELS)
    p = np.array([[d[k] for k in keys] for d in probs])
    y = np.array([keys.index(r.item.modality) for r in rows])
    return ece(p, y, n_bins=10)


def _organ_pairs(results: list[ItemResult], calibrated: bool) -> tuple[np.ndarray, np.ndarray] | None:
    p, y = [], []
    for r in results:
        probs = r.organ_probs_cal if calibrated else r.organ_probs
        if probs is None:
            return None
        for organ in r.item.present:
            p.append(probs[organ]), y.append(1)
        for organ in r.item.impossible:
            p.append(probs[organ]), y.append(0)
    return np.array(p), np.array(y)


def summarise(results: list[ItemResult]) -> dict[str, Any]:
    from engine.trust import ece

    known = [r for r in results if r.item.modality != FOREIGN]
    per_mod = {}
    for m in MODALITY_LABELS:
        rows = [r for r in known if r.item.modality == m]
        if rows:
            per_mod[m] = {
                "n": len(rows),
                "accuracy": float(np.mean([r.predicted == m for r in rows])),
                "unseen_n": sum(not r.item.seen_in_training for r in rows),
                "unseen_accuracy": float(np.mean([r.predicted == m for r in rows if not r.item.seen_in_training] or [np.nan])),
            }
    out: dict[str, Any] = {
        "modality": {
            "n": len(known),
            "accuracy": float(np.mean([r.predicted == r.item.modality for r in known])) if known else None,
            "min_per_modality": min((v["accuracy"] for v in per_mod.values()), default=None),
            "per_modality": per_mod,
            "ece": _ece(results, False),
            "ece_calibrated": _ece(results, True),
        },
    }
    organ = {}
    for cal in (False, True):
        pairs = _organ_pairs([r for r in results if r.organ_probs], cal)
        if pairs is None or not len(pairs[0]):
            continue
        p, y = pairs
        organ["calibrated" if cal else "raw"] = {
            "pairs": int(len(y)),
            "impossible_called_present": int(np.sum((p > 0.5) & (y == 0))),
            "impossible": int(np.sum(y == 0)),
            "present_called_present": int(np.sum((p > 0.5) & (y == 1))),
            "present": int(np.sum(y == 1)),
            "ece": ece(p, y, n_bins=10),
        }
    out["organ_sanity"] = organ
    flagged = [r for r in results if r.ood_flag is not None]
    if flagged:
        foreign = [r for r in flagged if r.item.modality == FOREIGN]
        real = [r for r in flagged if r.item.modality != FOREIGN]
        out["ood_flags"] = {
            "foreign_n": len(foreign),
            "foreign_flagged": sum(r.ood_flag for r in foreign),
            "known_n": len(real),
            "known_flagged": sum(r.ood_flag for r in real),
        }
    return out


# --------------------------------------------------------------------------- running
def model_folder(source: str) -> Path | None:
    """The checkpoint folder behind a model source (for its trust reference set), or None."""
    from engine.models import catalog
    from engine.models.source import LOCAL_DIR, parse_source

    parsed = parse_source(source)
    if parsed.kind == LOCAL_DIR:
        return Path(parsed.identifier)
    listing = catalog.shipped()
    return listing[parsed.identifier].folder if parsed.identifier in listing else None


def load_judge(source: str, exact: bool = True) -> Judge:
    from engine.models import catalog

    folder = model_folder(source)
    config = catalog.read_config(folder) if folder is not None else {}
    task = catalog.ASK if str((config or {}).get("format", "")).startswith("medlens-qformer") else catalog.CLIP
    try:
        model = catalog.load(source, task, fast=not exact)
    except Exception as exc:
        raise UsageError(f"cannot load model {source!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return Judge(model, TrustParts.of(folder, config or {}))


def evaluate_ood(
    judge: Judge,
    items: Sequence[OodItem],
    data_root: str | Path | None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    results, skipped = [], []
    for item in items:
        root = source_root(item.source, data_root)
        if root is None or not (root / item.path).exists():
            skipped.append({"id": item.id, "reason": f"{item.source} not installed or file missing"})
            continue
        try:
            results.append(judge_item(judge, item, root))
        except Exception as exc:  # one unreadable file never spoils the set
            skipped.append({"id": item.id, "reason": f"{type(exc).__name__}: {str(exc)[:160]}"})
            continue
        r = results[-1]
        log(
            f"{item.id}: true {item.modality}, predicted {r.predicted} ({r.modality_probs[r.predicted]:.2f})"
            + (f", ood {r.ood_score:.3f}{' FLAG' if r.ood_flag else ''}" if r.ood_score is not None else "")
        )
    return {"summary": summarise(results), "items": [r.to_dict() for r in results], "skipped": skipped}


def to_markdown(res: dict[str, Any]) -> str:
    s = res["summary"]
    m = s["modality"]
    f3 = lambda x: "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"  # noqa: E731
    lines = [
        "## Out-of-distribution evaluation (`python -m training.evaluate MODEL --ood`)",
        "",
        f"Model `{res.get('model', '')}`; {len(res['items'])} real files at native resolution through `engine.io.load` "
        f"(manifest `training/data/ood_manifest.jsonl`, sha256 `{res.get('manifest_sha256', '')[:12]}`), "
        f"{len(res['skipped'])} skipped; {res.get('date', '')}.",
        "",
        f"Modality (header withheld; seven-way choice of the `other` prompt set): accuracy {f3(m['accuracy'])} over {m['n']} "
        f"images; ECE {f3(m['ece'])} raw, {f3(m['ece_calibrated'])} calibrated.",
        "",
        "| modality | n | accuracy | never trained on: n | accuracy |",
        "|---|---|---|---|---|",
    ]
    for k, v in m["per_modality"].items():
        lines.append(f"| {k} | {v['n']} | {f3(v['accuracy'])} | {v['unseen_n']} | {f3(v['unseen_accuracy'])} |")
    for name, o in s.get("organ_sanity", {}).items():
        lines += [
            "",
            f"Organ sanity ({name}): impossible organs called present (> 0.5) {o['impossible_called_present']}/{o['impossible']}; "
            f"present organs called present {o['present_called_present']}/{o['present']}; ECE {f3(o['ece'])} over {o['pairs']} pairs.",
        ]
    if "ood_flags" in s:
        o = s["ood_flags"]
        lines += [
            "",
            f"OOD flag (kNN distance to the training embeddings): foreign images flagged {o['foreign_flagged']}/{o['foreign_n']}, "
            f"real images of known modalities flagged {o['known_flagged']}/{o['known_n']}.",
        ]
    else:
        lines += ["", "OOD flag: the checkpoint carries no reference set (no flag rate)."]
    lines += ["", "| file | true | predicted (p) | header | organs P(present) | OOD score |", "|---|---|---|---|---|---|"]
    for it in res["items"]:
        organs = ", ".join(f"{'!' if o in it['impossible'] else ''}{o} {p:.2f}" for o, p in it["organ_probs"].items())
        score = "" if it["ood_score"] is None else f"{it['ood_score']:.3f}{' flagged' if it['ood_flag'] else ''}"
        lines.append(
            f"| {it['id']}{' (trained on)' if it['seen_in_training'] else ''} | {it['true']} | {it['predicted']} "
            f"({it['modality_probs'][it['predicted']]:.2f}) | {it['header_modality']} | {organs} | {score} |"
        )
    lines += [
        "",
        "`!organ`: an organ that cannot be in that image. Skipped: "
        + (", ".join(f"{d['id']} ({d['reason']})" for d in res["skipped"]) or "none")
        + ".",
    ]
    return "\n".join(lines) + "\n"


def run(
    source: str,
    *,
    data_root: str | None,
    out: str | Path,
    manifest: str | Path = MANIFEST,
    exact: bool = True,
    ids: Sequence[str] | None = None,
) -> tuple[dict[str, Any], str]:
    from training.evaluate import file_sha256

    if not Path(manifest).is_file():
        raise UsageError(f"OOD manifest {manifest} not found")
    items = read_items(manifest)
    if ids:
        items = [i for i in items if i.id in set(ids)]
    t0 = time.perf_counter()
    judge = load_judge(source, exact)
    body = evaluate_ood(judge, items, data_root)
    res = {
        "model": getattr(judge.model, "model_id", getattr(judge.model, "name", source)),
        "source": source,
        "manifest_sha256": file_sha256(manifest),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **body,
    }
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ood.json").write_text(json.dumps(res, indent=2, default=float) + "\n")
    md = to_markdown(res)
    (out / "ood.md").write_text(md)
    return res, md


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m training.ood", description="OOD evaluation on real files at native resolution")
    p.add_argument("model")
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--out", default=None)
    p.add_argument("--manifest", default=str(MANIFEST))
    p.add_argument("--fast", action="store_true", help="the engine's fast inference path (default: exact fp32)")
    args = p.parse_args(argv)

    def go(_argv) -> int:
        _res, md = run(
            args.model,
            data_root=args.data_root,
            out=args.out or Path("runs/ood") / Path(args.model).name,
            manifest=args.manifest,
            exact=not args.fast,
        )
        print(md)
        return 0

    return run_main(go)


if __name__ == "__main__":
    sys.exit(main())
