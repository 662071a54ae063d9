"""`python -m training.ablation`: each domain-randomisation family's effect on the OOD set and the test splits.

    python -m training.ablation --run runs/cand --manifest runs/manifest.jsonl --data-root ../shared/data \\
        --out runs/ablation [--conditions all none no-overlays ...]

Reads a finished K-view run of `training.clip` (its args, its view-feature
cache) and trains the same head again, same seeds, under each condition:
"all" (every cached view), "none" (the clean view only: today's recipe) and
"no-F" for each family F (every randomised view in which F fired is replaced
by the image's clean view, so the run sees the same images and the same
number of views, only never F).

Design decisions
- No extra trunk passes: which families fired on which view is replayed
  from the generators training.randomise draws them from (the fire draws come
  first and are independent of the image), so one K-view cache serves every
  condition. The price: "no-F" trains on fewer randomised views than "all"
  (the clean view stands in), so it measures "F removed", not "F replaced".
- Evaluation per condition on the clean test rows (zero-shot, the engine's
  prompt sets, training.evaluate.zero_shot) and on the OOD set (modality
  accuracy with the header withheld), from trunk features computed once in
  bf16 (the same for every condition: only the head differs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from training.randomise import FAMILIES

CONDITIONS = ("all", "none", *(f"no-{f}" for f in FAMILIES))


def fired(n_rows: int, views: int, p: float, seed: int) -> np.ndarray:
    """bool (N, views, len(FAMILIES)): did family f fire on view k of row i (view 0, the clean one, never)."""
    out = np.zeros((n_rows, views, len(FAMILIES)), bool)
    for i in range(n_rows):
        for k in range(1, views):
            rng = np.random.default_rng([seed, i, k])
            out[i, k] = [rng.random() < p for _ in FAMILIES]  # randomise() draws these first, for every family
    return out


def condition_features(feats: torch.Tensor, fire: np.ndarray, condition: str) -> torch.Tensor:
    """The (views, N, F) features a condition trains on."""
    if condition == "all":
        return feats
    if condition == "none":
        return feats[:1]
    family = FAMILIES.index(condition[len("no-") :])
    out = feats.clone()
    for k in range(1, feats.shape[0]):
        hit = torch.as_tensor(fire[:, k, family])
        out[k, hit] = feats[0, hit]
    return out


def train_condition(run_args: dict[str, Any], condition: str, out: Path, cache: Path) -> Path:
    """Train the run's head under one condition; returns the exported best folder."""
    from training import clip
    from training.config import to_argv
    from training.distributed import init_distributed
    from training.params import ClipConfig, parse_clip_args

    values = {**run_args, "out": str(out), "trust": False, "export": None, "resume": "none", "quiet": True}
    args = parse_clip_args(to_argv(ClipConfig, values))
    env = init_distributed(args.device)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "cache").exists():
        (out / "cache").symlink_to(cache.resolve())
    clip.seed_everything(args.seed)
    built = clip.build_model(args, env)
    data = clip.build_data(args, env, built, out)
    fire = fired(len(data.train_rows), data.feats.shape[0], args.randomise_p, args.seed)
    data.feats = condition_features(data.feats, fire, condition)
    tr = clip.Trainer(args, env, built, data, out)
    tr.loop()
    clip.finish(tr)
    return out / "best"


def _trunk_features(trunk, preprocess, images: list[np.ndarray]) -> torch.Tensor:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        return torch.cat([trunk(preprocess(images[s : s + 64])).float() for s in range(0, len(images), 64)])


def eval_inputs(manifest: str, data_root: str, cache: Path) -> dict[str, Any]:
    """Clean trunk features of the test rows and of the OOD set's model images (computed once, saved)."""
    path = cache / "ablation_eval_features.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    from engine.models.preprocess import ImagePreprocess
    from training import ood
    from training.manifest import PixelLoader, read_manifest
    from training.towers.astra2d import ASTRA_PREPROCESS, deflated_resnet152
    from engine.zeroshot.imaging import scan_images

    trunk, pre = deflated_resnet152().eval(), ImagePreprocess(96, ASTRA_PREPROCESS["mean"], ASTRA_PREPROCESS["std"])
    test = read_manifest(manifest, splits=["test"])
    loader = PixelLoader(data_root)
    test_feats = _trunk_features(trunk, pre, [loader.pixels448(r) for r in test])
    oods = []
    for item in ood.read_items():
        root = ood.source_root(item.source, data_root)
        if item.modality == ood.FOREIGN or root is None or not (root / item.path).exists():
            continue
        images = scan_images(ood.load_item(item, root), n_slices=ood.N_SLICES)
        oods.append(
            {"id": item.id, "modality": item.modality, "images": images, "feats": _trunk_features(trunk, pre, [im.pixels for im in images])}
        )
    data = {"test_rows": test, "test_feats": test_feats, "ood": oods}
    torch.save(data, path)
    return data


def evaluate_condition(folder: Path, inputs: dict[str, Any]) -> dict[str, Any]:
    from engine.models import load_model
    from engine.zeroshot import load_prompt_set
    from engine.zeroshot.api import SOFTMAX, label_from_embeddings
    from training.evaluate import _task_rows, zero_shot
    from training.tasks import MODALITY_LABELS, MULTILABEL, TASKS

    model = load_model(f"local-dir:{folder}", fast=False)

    def head(feats: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return torch.nn.functional.normalize(model.model.visual.head(feats), dim=-1).numpy()

    test_emb = {r.id: e for r, e in zip(inputs["test_rows"], head(inputs["test_feats"]))}
    out: dict[str, Any] = {"test": {}}
    for name, task in TASKS.items():
        rows, y, _ = _task_rows(task, inputs["test_rows"], None)
        res = zero_shot(task, np.stack([test_emb[r.id] for r in rows]), rows, y, model)
        out["test"][name] = (
            res.get("mean_auc") if task.kind == MULTILABEL else res.get("auc") if task.kind == "binary" else res.get("accuracy")
        )
    labels, keys, pset = list(MODALITY_LABELS.values()), list(MODALITY_LABELS), load_prompt_set("other")
    hits: dict[str, list[bool]] = {}
    for item in inputs["ood"]:
        res = label_from_embeddings(head(item["feats"]), item["images"], labels, model, pset, mode=SOFTMAX, aggregation="mean")
        hits.setdefault(item["modality"], []).append(keys[labels.index(res.top.label)] == item["modality"])
    out["ood"] = {m: float(np.mean(h)) for m, h in hits.items()}
    out["ood"]["all"] = float(np.mean([x for h in hits.values() for x in h]))
    return out


def to_markdown(results: dict[str, dict[str, Any]]) -> str:
    tasks = list(next(iter(results.values()))["test"])
    mods = [m for m in next(iter(results.values()))["ood"] if m != "all"]
    head = ["condition", "OOD modality acc", *[f"OOD {m}" for m in mods], *tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cond, r in results.items():
        cells = [
            cond,
            f"{r['ood']['all']:.3f}",
            *[f"{r['ood'][m]:.3f}" for m in mods],
            *["n/a" if r["test"][t] is None else f"{r['test'][t]:.3f}" for t in tasks],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.ablation", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished `training.clip --views K` run folder")
    p.add_argument("--manifest", default="runs/manifest.jsonl")
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    a = p.parse_args(argv)
    run, out = Path(a.run), Path(a.out)
    run_args = json.loads((run / "train_summary.json").read_text())["args"]
    inputs = eval_inputs(a.manifest, a.data_root, run / "cache")
    results = {}
    for cond in a.conditions:
        t0 = time.time()
        folder = train_condition(run_args, cond, out / cond, run / "cache")
        results[cond] = {**evaluate_condition(folder, inputs), "wall_s": round(time.time() - t0, 1)}
        (out / "ablation.json").write_text(json.dumps(results, indent=2))
        (out / "ablation.md").write_text(to_markdown(results))
        print(f"{cond}: {json.dumps(results[cond])}", file=sys.stderr, flush=True)
    print(to_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
