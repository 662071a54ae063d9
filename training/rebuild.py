"""`python -m training.rebuild`: rebuild the shipped default model from ../shared/data, end to end.

    python -m training.rebuild --data-root ../shared/data            # -> assets/models/medlens-clip

Steps, each a module that also runs on its own: data recipes -> manifest
(`training.recipes`), optional self-supervised pretraining of the image
trunk (`training.ssl`), CLIP training with K cached views per image
(`training.clip`, which also fits the "trust" block: calibration on the val
splits and the OOD reference set), held-out evaluation (`training.evaluate`),
the OOD evaluation on real files (`training.ood`), model card, copy into assets/.

Design decision: the shipped model's recipe is data (training/shipped.json):
the exact trainer arguments, so the card, this script and a user's GPU run
all read one source. Same seed, same data -> same metrics (the trainer is
deterministic on CPU; see the model card for the two-run check). The
arguments are training.config.RebuildConfig, shared by every rebuild command.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

from training.config import RebuildConfig, UsageError, parse, run_main

RECIPE = Path(__file__).with_name("shipped.json")
DEFAULT_EXPORT = Path(__file__).resolve().parents[1] / "assets" / "models" / "medlens-clip"


def _run(label: str, fn, argv: list[str]) -> None:
    print(f"\n== {label}: {' '.join(argv)}", file=sys.stderr, flush=True)
    code = fn(argv)
    if code not in (0, None):
        raise UsageError(f"{label} failed with exit code {code}")


def train_and_evaluate(args: RebuildConfig, recipe: dict, out: Path) -> tuple[Path, Path]:
    """recipes -> (ssl) -> clip -> (calibrate) -> evaluate -> ood; returns (model folder, evaluation folder)."""
    from training import calibrate, clip, evaluate, ood
    from training.recipes import main as recipes_main

    data, manifest = str(Path(args.data_root)), str(out / "manifest.jsonl")
    _run("recipes", recipes_main, ["--data-root", data, "--out", manifest])
    clip_args = ["--manifest", manifest, "--data-root", data, "--out", str(out / "clip"), "--seed", str(args.seed), *recipe["clip"]]
    if recipe.get("ssl"):
        from training import ssl

        ssl_out = out / "ssl"
        _run(
            "ssl", ssl.main, ["--manifest", manifest, "--data-root", data, "--out", str(ssl_out), "--seed", str(args.seed), *recipe["ssl"]]
        )
        clip_args += ["--init-trunk", str(ssl_out / "trunk.safetensors")]
    _run("clip", clip.main, clip_args)
    model_dir, eval_out = out / "clip" / "best", out / "eval"
    if recipe.get("calibrate") is not None:  # the trust block fitted on the exported weights (training.calibrate)
        cal_args = [str(model_dir), "--manifest", manifest, "--data-root", data, "--cache", str(out / "calibrate")]
        _run("calibrate", calibrate.main, [*cal_args, "--seed", str(args.seed), *recipe["calibrate"]])
    _run(
        "evaluate",
        evaluate.main,
        [f"local-dir:{model_dir}", "--manifest", manifest, "--data-root", data, "--out", str(eval_out), *recipe.get("evaluate", [])],
    )
    _run("ood", ood.main, [f"local-dir:{model_dir}", "--data-root", data, "--out", str(eval_out)])
    return model_dir, eval_out


def card_extras(recipe: dict, eval_out: Path) -> str:
    """The card's hand-written and measured sections that the recipe names, then the OOD evaluation."""
    parts = []
    for key in ("card_extra", "card_library"):  # card_library: issue 6's measurements (training.library_eval)
        path = Path(recipe[key]) if recipe.get(key) else None
        if path is not None and path.is_file():
            parts.append(path.read_text().rstrip())
    if (eval_out / "ood.md").is_file():
        parts.append((eval_out / "ood.md").read_text().rstrip())
    return "\n\n".join(parts)


def write_model_card(model_dir: Path, out: Path, eval_out: Path, recipe: dict, t0: float) -> None:
    from training.model_card import targets_table, write_card

    summary = json.loads((out / "clip" / "train_summary.json").read_text())
    metrics = json.loads((eval_out / "metrics.json").read_text())
    write_card(
        model_dir,
        name="medlens-clip",
        summary=summary,
        eval_md=(eval_out / "metrics.md").read_text(),
        command="python -m training.rebuild --data-root ../shared/data",
        towers_md=card_extras(recipe, eval_out),
        misses_md=targets_table(metrics),
        rebuild_s=time.time() - t0,
    )
    config = json.loads((model_dir / "config.json").read_text())
    vision = summary["model_cfg"]["vision_cfg"]
    config.update(
        {
            "licence": "CC BY-NC 4.0 (trained on HAM10000); research use, not for diagnosis",
            "note": f"{vision['timm_model_name']} @ {vision['image_size']} px + MiniLM, trained on ../shared/data",
        }
    )
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy2(eval_out / "metrics.json", model_dir / "metrics.json")
    if (eval_out / "ood.json").is_file():
        shutil.copy2(eval_out / "ood.json", model_dir / "ood.json")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(
        RebuildConfig, ["--export", str(DEFAULT_EXPORT), "--recipe", str(RECIPE), *(argv or [])], prog="python -m training.rebuild"
    )
    t0 = time.time()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    recipe = json.loads(Path(args.recipe).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir, eval_out = train_and_evaluate(args, recipe, out)
    write_model_card(model_dir, out, eval_out, recipe, t0)
    if args.export:
        dest = Path(args.export)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(model_dir, dest)
        print(f"exported to {dest}", file=sys.stderr)
    print(f"rebuild finished in {(time.time() - t0) / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
