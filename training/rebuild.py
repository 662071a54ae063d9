"""`python -m training.rebuild`: rebuild the shipped default model from ../shared/data, end to end.

    python -m training.rebuild --data-root ../shared/data            # -> assets/models/medlens-clip

Steps, each a module that also runs on its own: data recipes -> manifest
(`training.recipes`), optional self-supervised pretraining of the image
trunk (`training.ssl`), CLIP training (`training.clip`), held-out
evaluation (`training.evaluate`), model card, copy into assets/.

Design decision: the shipped model's recipe is data (training/shipped.json):
the exact trainer arguments, so the card, this script and a user's GPU run
all read one source. Same seed, same data -> same metrics (the trainer is
deterministic on CPU; see the model card for the two-run check).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

RECIPE = Path(__file__).with_name("shipped.json")
DEFAULT_EXPORT = Path(__file__).resolve().parents[1] / "assets" / "models" / "medlens-clip"


def _run(label: str, fn, argv: list[str]) -> None:
    print(f"\n== {label}: {' '.join(argv)}", file=sys.stderr, flush=True)
    code = fn(argv)
    if code not in (0, None):
        raise SystemExit(f"{label} failed with exit code {code}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.rebuild", description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--out", default="runs/rebuild", help="work folder (manifest, caches, checkpoints, evaluation)")
    p.add_argument("--export", default=str(DEFAULT_EXPORT), help="where the finished model folder goes ('' to skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe", default=str(RECIPE))
    args = p.parse_args(argv)
    t0 = time.time()
    recipe = json.loads(Path(args.recipe).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = str(Path(args.data_root))
    manifest = str(out / "manifest.jsonl")

    from training.recipes import main as recipes_main

    _run("recipes", recipes_main, ["--data-root", data, "--out", manifest])
    clip_args = ["--manifest", manifest, "--data-root", data, "--out", str(out / "clip"), "--seed", str(args.seed),
                 *recipe["clip"]]
    if recipe.get("ssl"):
        from training import ssl

        ssl_out = out / "ssl"
        _run("ssl", ssl.main, ["--manifest", manifest, "--data-root", data, "--out", str(ssl_out), "--seed", str(args.seed), *recipe["ssl"]])
        clip_args += ["--init-trunk", str(ssl_out / "trunk.safetensors")]
    from training import clip

    _run("clip", clip.main, clip_args)
    model_dir = out / "clip" / "best"
    from training import evaluate

    eval_out = out / "eval"
    _run("evaluate", evaluate.main, [f"local-dir:{model_dir}", "--manifest", manifest, "--data-root", data, "--out", str(eval_out),
                                     *recipe.get("evaluate", [])])
    from training.model_card import targets_table, write_card

    summary = json.loads((out / "clip" / "train_summary.json").read_text())
    eval_md = (eval_out / "metrics.md").read_text()
    extra = Path(recipe["card_extra"]) if recipe.get("card_extra") else None
    extra_md = extra.read_text() if extra is not None and extra.is_file() else ""
    library = Path(recipe["card_library"]) if recipe.get("card_library") else None  # issue 6's measurements (training.library_eval)
    if library is not None and library.is_file():
        extra_md = extra_md.rstrip() + "\n\n" + library.read_text()
    command = "python -m training.rebuild --data-root ../shared/data"
    metrics = json.loads((eval_out / "metrics.json").read_text())
    write_card(model_dir, name="medlens-clip", summary=summary, eval_md=eval_md, command=command, towers_md=extra_md,
               misses_md=targets_table(metrics), rebuild_s=time.time() - t0)
    config = json.loads((model_dir / "config.json").read_text())
    config.update({"licence": "CC BY-NC 4.0 (trained on HAM10000); research use, not for diagnosis",
                   "note": f"{summary['model_cfg']['vision_cfg']['timm_model_name']} @ {summary['model_cfg']['vision_cfg']['image_size']} px + MiniLM, trained on ../shared/data"})
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy2(eval_out / "metrics.json", model_dir / "metrics.json")
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
