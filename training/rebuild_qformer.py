"""`python -m training.rebuild_qformer`: rebuild the shipped Q-Former from ../shared/data, end to end.

    python -m training.rebuild_qformer --data-root ../shared/data      # -> assets/models/medlens-qformer

Steps, each a module that also runs on its own: the QA recipe
(`training.recipes.qa`), the zero-shot CLIP baseline on the same questions
(`training.qa_baseline`), the frozen-encoder token cache and stage-1
training (`training.qformer`; later phases, `qformer_continue` in the
recipe, each continue from the previous phase's best checkpoint with their
own flags and seed), calibration and the OOD reference set fitted on the
val split (`training.qformer_trust`), held-out evaluation
(`training.qformer_eval`), the model card (`training.qformer_card`), copy
into assets/. The recipe is data (training/shipped_qformer.json), as for
the CLIP model (training/rebuild.py).

Design decisions
- The token cache and the CLIP baseline are pure functions of their
  inputs: a cache entry is keyed by what its row points at
  (training/qformer_cache.py), and the baseline is re-used only when it was
  computed on a manifest with the same SHA-256. Everything else (training,
  calibration, evaluation) runs every time.
- Same seed, same data, same thread count -> the same checkpoint (the
  trainer's sampling is seeded per rank; CPU kernels are deterministic for a
  fixed thread count).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from training.rebuild import _run

RECIPE = Path(__file__).with_name("shipped_qformer.json")
DEFAULT_EXPORT = Path(__file__).resolve().parents[1] / "assets" / "models" / "medlens-qformer"
COMMAND = "python -m training.rebuild_qformer --data-root ../shared/data"
LICENCE = "CC BY-NC 4.0 (trained on HAM10000); research use, not for diagnosis"
NOTE = "Q-Former over the frozen Astra I3ResNet-152 (3D) and its deflated 2D kernels; answers questions, 3D labels"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.rebuild_qformer", description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--out", default="runs/rebuild_qformer", help="work folder (QA manifest, token cache, checkpoints, evaluation)")
    p.add_argument("--export", default=str(DEFAULT_EXPORT), help="where the finished model folder goes ('' to skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--recipe", default=str(RECIPE))
    return p.parse_args(argv)


def _phases(recipe: dict) -> list[list[str]]:
    phases = recipe.get("qformer_continue") or []
    if phases and isinstance(phases[0], str):  # one continued phase, written as a flat argument list
        phases = [phases]
    return phases


def clip_baseline(out: Path, manifest: str, data: str) -> None:
    """The CLIP baseline on the manifest's test questions, re-used when computed on this very manifest."""
    from training import qa_baseline
    from training.evaluate import file_sha256

    path = out / "clip_baseline.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        if (previous.get("manifest") or {}).get("sha256") == file_sha256(manifest):
            print(f"\n== clip baseline: re-used {path} (same manifest)", file=sys.stderr, flush=True)
            return
    _run("clip baseline", qa_baseline.main, ["--manifest", manifest, "--data-root", data, "--out", str(path)])


def train_phases(args, recipe: dict, out: Path, manifest: str, data: str) -> Path:
    """The first phase, then each continued phase from the previous one's best checkpoint; the last best/ folder."""
    from training import qformer

    threads = ["--threads", str(args.threads)] if args.threads else []
    common = ["--qa-manifest", manifest, "--data-root", data, "--cache", str(out / "cache"), *threads]
    _run("qformer", qformer.main, [*common, "--out", str(out / "qformer"), "--seed", str(args.seed), *recipe["qformer"]])
    model_dir = out / "qformer" / "best"
    for i, phase in enumerate(_phases(recipe)):  # same data and cache, the previous phase's best weights, new flags
        folder = out / ("qformer_continue" if i == 0 else f"qformer_continue{i + 1}")
        _run(
            "qformer continue",
            qformer.main,
            [*common, "--out", str(folder), "--init", str(model_dir), "--seed", str(args.seed + i), *phase],
        )
        model_dir = folder / "best"
    return model_dir


def trust_and_evaluate(args, recipe: dict, model_dir: Path, out: Path, manifest: str, data: str) -> Path:
    """Calibration and OOD reference (val split), then the held-out evaluation; returns results.json."""
    from training import qformer_eval, qformer_trust

    threads = ["--threads", str(args.threads)] if args.threads else []
    _run(
        "trust",
        qformer_trust.main,
        [str(model_dir), "--qa-manifest", manifest, "--data-root", data, "--cache", str(out / "cache"), *threads, *recipe.get("trust", [])],
    )
    _run(
        "evaluate",
        qformer_eval.main,
        [
            str(model_dir),
            "--qa-manifest",
            manifest,
            "--data-root",
            data,
            "--out",
            str(out / "eval"),
            "--cache",
            str(out / "cache"),
            "--clip-baseline",
            str(out / "clip_baseline.json"),
            *threads,
            *recipe.get("evaluate", []),
        ],
    )
    results = out / "eval" / "results.json"
    qformer_trust.add_test_metrics(model_dir, json.loads(results.read_text()))
    return results


def finish(model_dir: Path, results: Path, recipe: dict, minutes: float, export: str) -> None:
    """Licence and note into the config, the card, metrics.json; copy to `export`."""
    from training.qformer_card import write

    config = json.loads((model_dir / "config.json").read_text())
    config.update({"licence": LICENCE, "note": NOTE})
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    notes = Path(recipe["card_notes"]) if recipe.get("card_notes") else None
    write(model_dir, results, command=COMMAND, minutes=minutes, notes_md=notes.read_text() if notes is not None and notes.is_file() else "")
    shutil.copy2(results, model_dir / "metrics.json")
    if export:
        dest = Path(export)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(model_dir, dest)
        print(f"exported to {dest}", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    recipe = json.loads(Path(args.recipe).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, manifest = str(Path(args.data_root)), str(out / "qa_manifest.jsonl")

    from training.recipes import qa

    _run("qa recipe", qa.main, ["--data-root", data, "--out", manifest, *recipe.get("qa", [])])
    clip_baseline(out, manifest, data)
    model_dir = train_phases(args, recipe, out, manifest, data)
    results = trust_and_evaluate(args, recipe, model_dir, out, manifest, data)
    finish(model_dir, results, recipe, (time.time() - t0) / 60, args.export)
    print(f"rebuild finished in {(time.time() - t0) / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
