"""`python -m training.rebuild_qformer`: rebuild the shipped Q-Former from ../shared/data, end to end.

    python -m training.rebuild_qformer --data-root ../shared/data      # -> assets/models/medlens-qformer

Steps, each a module that also runs on its own: the QA recipe
(`training.recipes.qa`), the frozen-encoder token cache and stage-1
training (`training.qformer`; later phases, `qformer_continue` in the recipe,
each continue from the previous phase's best checkpoint with their own
flags and seed),
held-out evaluation
(`training.qformer_eval`), the model card (`training.qformer_card`), copy
into assets/. The recipe is data (training/shipped_qformer.json), as for
the CLIP model (training/rebuild.py).
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.rebuild_qformer", description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--out", default="runs/rebuild_qformer", help="work folder (QA manifest, token cache, checkpoints, evaluation)")
    p.add_argument("--export", default=str(DEFAULT_EXPORT), help="where the finished model folder goes ('' to skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--recipe", default=str(RECIPE))
    args = p.parse_args(argv)
    t0 = time.time()
    recipe = json.loads(Path(args.recipe).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = str(Path(args.data_root))
    manifest = str(out / "qa_manifest.jsonl")
    threads = ["--threads", str(args.threads)] if args.threads else []

    from training import qa_baseline, qformer, qformer_eval
    from training.recipes import qa

    _run("qa recipe", qa.main, ["--data-root", data, "--out", manifest, *recipe.get("qa", [])])
    _run("clip baseline", qa_baseline.main, ["--manifest", manifest, "--data-root", data, "--out", str(out / "clip_baseline.json")])
    _run("qformer", qformer.main, ["--qa-manifest", manifest, "--data-root", data, "--out", str(out / "qformer"),
                                   "--cache", str(out / "cache"), "--seed", str(args.seed), *threads, *recipe["qformer"]])
    model_dir = out / "qformer" / "best"
    phases = recipe.get("qformer_continue") or []
    if phases and isinstance(phases[0], str):  # one continued phase, written as a flat argument list
        phases = [phases]
    for i, phase in enumerate(phases):  # same data and cache, the previous phase's best weights, new flags
        folder = out / ("qformer_continue" if i == 0 else f"qformer_continue{i + 1}")
        _run("qformer continue", qformer.main, ["--qa-manifest", manifest, "--data-root", data, "--out", str(folder),
                                                "--cache", str(out / "cache"), "--init", str(model_dir), "--seed", str(args.seed + i),
                                                *threads, *phase])
        model_dir = folder / "best"
    _run("evaluate", qformer_eval.main, [str(model_dir), "--qa-manifest", manifest, "--data-root", data, "--out", str(out / "eval"),
                                         "--cache", str(out / "cache"), "--clip-baseline", str(out / "clip_baseline.json"), *threads,
                                         *recipe.get("evaluate", [])])
    from training.qformer_card import write

    config = json.loads((model_dir / "config.json").read_text())
    config.update({"licence": "CC BY-NC 4.0 (trained on HAM10000); research use, not for diagnosis",
                   "note": "Q-Former over the frozen Astra I3ResNet-152 (3D) and its deflated 2D kernels; answers questions, 3D labels"})
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    notes = Path(recipe["card_notes"]) if recipe.get("card_notes") else None
    write(model_dir, out / "eval" / "results.json", command=COMMAND, minutes=(time.time() - t0) / 60,
          notes_md=notes.read_text() if notes is not None and notes.is_file() else "")
    shutil.copy2(out / "eval" / "results.json", model_dir / "metrics.json")
    if args.export:
        dest = Path(args.export)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(model_dir, dest)
        print(f"exported to {dest}", file=sys.stderr)
    print(f"rebuild finished in {(time.time() - t0) / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
